"""``python -m kdjax``: the ``kdjax`` command (``kdjax --help``).

Importing the command pulls in JAX and TensorFlow Datasets (seconds); Ctrl-C
or SIGTERM during that import is reported as one line too (exit 130 / 143).
"""

import sys


def main() -> None:
  from kdjax import _interrupt

  _interrupt.record_sigint()  # before JAX is imported: a Ctrl-C it would swallow is still remembered
  try:
    from kdjax import cli
  except KeyboardInterrupt as e:
    term = isinstance(e, _interrupt.Terminated)
    print(f"kdjax: {'terminated by SIGTERM' if term else 'interrupted'} before anything ran", file=sys.stderr)
    sys.exit(143 if term else 130)
  cli.run_main()


if __name__ == "__main__":
  main()
