# Sourced by the scripts in scripts/ (not run on its own): sets PY to the Python that runs kdjax.
#
#   KDJAX_PYTHON=/path/to/python   use that interpreter as it is (kdjax must already be importable
#                                  there, e.g. the virtualenv a test suite runs in); nothing is installed
#   otherwise                      the repository's .venv, created with $PYTHON (default python3) if it
#                                  is missing, with kdjax installed into it (pip install -e .), as
#                                  scripts/demo.sh does
#
# Meant for scripts that run under `set -euo pipefail`: a failed step stops the caller.

KDJAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KDJAX_PYTHON:-}" ]]; then
  PY="$KDJAX_PYTHON"
else
  if [[ ! -x "$KDJAX_ROOT/.venv/bin/python" ]]; then
    echo "creating $KDJAX_ROOT/.venv and installing kdjax into it (once)" >&2
    "${PYTHON:-python3}" -m venv "$KDJAX_ROOT/.venv"
    "$KDJAX_ROOT/.venv/bin/python" -m pip install -q --upgrade pip
  fi
  "$KDJAX_ROOT/.venv/bin/python" -m pip install -q -e "$KDJAX_ROOT"
  PY="$KDJAX_ROOT/.venv/bin/python"
fi
