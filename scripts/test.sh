#!/usr/bin/env bash
# kdjax test command: set up a virtualenv (if missing), install kdjax with its
# test extras, and run the test suite:
#   scripts/test.sh            everything (what CI runs) over $PYTEST_WORKERS workers (default 2);
#                              the tests that start several processes of their own (marker
#                              `procs`) run one at a time on one worker
#   scripts/test.sh --quick    the quick tier only (pytest -m "not slow")
#   scripts/test.sh ARGS…      ARGS go to pytest (e.g. tests/test_losses_logits.py -x)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || exit 1
  .venv/bin/python -m pip install -q --upgrade pip || exit 1
fi
.venv/bin/python -m pip install -q -e '.[test]' || exit 1
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
# One persistent XLA cache for the whole run: the many tests and subprocesses that compile the same
# tiny programs compile each once (results are unchanged; only compile time is saved).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  cache_root="$(mktemp -d)"
  trap 'rm -rf "$cache_root"' EXIT
  export JAX_COMPILATION_CACHE_DIR="$cache_root/xla"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}"
fi

quick=0
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then quick=1; else args+=("$a"); fi
done

# pytest exits 5 when a phase selects no test (e.g. ARGS name one quick file): not a failure.
phase() { .venv/bin/python -m pytest -q "$@"; local rc=$?; [ "$rc" -eq 5 ] && rc=0; return "$rc"; }

workers=(-n "${PYTEST_WORKERS:-2}" --dist loadgroup)
if [ "$quick" -eq 1 ]; then
  phase "${workers[@]}" -m "not slow" ${args[@]+"${args[@]}"}
  exit $?
fi
# The tests that start processes of their own (marker `procs`) form one xdist group: they run one
# after another on one worker while the other worker runs the rest.
phase "${workers[@]}" ${args[@]+"${args[@]}"}
