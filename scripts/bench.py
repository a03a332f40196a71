"""``python scripts/bench.py …``: the benchmark, :mod:`kdjax.bench` (also ``kdjax bench``, ``python -m kdjax.bench``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's kdjax, installed or not
from kdjax.bench import *  # noqa: E402, F403 - the benchmark's names, for code that loads this file as a module
from kdjax.bench import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
