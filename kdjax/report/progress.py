"""Progress bars (tqdm) that stay out of logs: shown only when stderr is a terminal."""

from __future__ import annotations

import sys
from typing import TypeVar
from collections.abc import Iterable

__all__ = ["progress", "log"]

T = TypeVar("T")


def _interactive() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):  # replaced or closed stderr
    return False


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", quiet: bool = False) -> Iterable[T]:
  """``iterable`` wrapped in a tqdm bar on stderr; a plain pass-through when
  ``quiet`` or when stderr is not a TTY (batch jobs, CI, redirected logs)."""
  from tqdm import tqdm

  return tqdm(
    iterable, total=total, desc=desc or None, disable=quiet or not _interactive(), dynamic_ncols=True, file=sys.stderr
  )


def log(message: str, quiet: bool = False) -> None:
  """One line on stderr that does not break an active progress bar."""
  if quiet:
    return
  from tqdm import tqdm

  tqdm.write(message, file=sys.stderr)
