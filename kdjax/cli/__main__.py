"""``python -m kdjax.cli``: the ``kdjax`` command, as ``python -m kdjax`` (what the SLURM sweep script runs)."""

from kdjax.__main__ import main

if __name__ == "__main__":
  main()
