"""The ``kdjax`` command's exit statuses and the user error it reports in one line."""

from __future__ import annotations

from kdjax._interrupt import Terminated
from kdjax.errors import ConfigError


class CliError(ConfigError):
  """A user error: printed as one line, exit status 1."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT: Ctrl-C outside the training loop (inside it: 75 with a checkpoint)
TERMINATED_EXIT = 143  # 128 + SIGTERM: SIGTERM outside the training loop (inside it: 75 with a checkpoint)
INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE: an unexpected exception (a bug), reported with its traceback
PREEMPTED_EXIT = 75  # as kdjax.engine.faults.PREEMPTED_EXIT (not imported: it pulls in JAX)


def one_line(e: BaseException) -> str:
  """The first line of an exception's message (its type name when it has none)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def stopped(e: KeyboardInterrupt, when: str = "nothing after the last checkpoint was saved") -> tuple[int, str]:
  """``(exit status, the one line)`` for Ctrl-C (130) or SIGTERM (143, :class:`Terminated`) outside training."""
  if isinstance(e, Terminated):
    return TERMINATED_EXIT, f"kdjax: terminated by SIGTERM ({when}); re-run the same command to resume"
  return INTERRUPTED_EXIT, f"kdjax: interrupted ({when}); re-run the same command to resume"
