"""``python -m kdjax``: the ``kdjax`` command (``kdjax --help``).

Importing the command pulls in JAX and TensorFlow Datasets (seconds); Ctrl-C
during that import is reported as one line too.
"""

import sys


def main() -> None:
  from kdjax import _interrupt

  _interrupt.record_sigint()  # before JAX is imported: a Ctrl-C it would swallow is still remembered
  try:
    from kdjax import cli
  except KeyboardInterrupt:
    print("kdjax: interrupted before anything ran", file=sys.stderr)
    sys.exit(130)
  cli.run_main()


if __name__ == "__main__":
  main()
