#!/usr/bin/env bash
# kdjax demo: set up the virtualenv (if missing), install kdjax, then run the
# default experiment end to end on the embedded MNIST-1D dataset (no network):
# teacher → student from scratch vs student with KD, over 5 seeds; prints the
# table and writes results/mnist1d_kd.md and PNG plots. Extra args go to
# scripts/demo.py (e.g. --seeds 2 --steps 2000).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e .
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec .venv/bin/python scripts/demo.py "$@"
