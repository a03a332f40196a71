"""Ctrl-C that is never lost: installed before anything heavy is imported (only ``signal`` here).

Python prints and drops a ``KeyboardInterrupt`` raised inside a garbage-collection
callback or a ``__del__``; JAX runs such callbacks while it imports and compiles, so a
Ctrl-C during set-up could vanish and the run train to its end. The handler below
raises as usual *and* remembers the signal; the training loop checks before its first
step (:func:`raise_pending_sigint`).
"""

from __future__ import annotations

import signal
import sys

_sigint_seen = False


def _record_sigint(signum, frame) -> None:
  global _sigint_seen
  _sigint_seen = True
  raise KeyboardInterrupt


def record_sigint() -> None:
  """Ctrl-C raises ``KeyboardInterrupt`` as usual and is also remembered, so one that lands where Python
  swallows the exception (a garbage-collection callback, a ``__del__``) still stops the run before its first
  step (:func:`raise_pending_sigint`). Only when SIGINT has Python's default handler (not ignored)."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _record_sigint)
    sys.unraisablehook = _quiet_swallowed_sigint(sys.unraisablehook)


def _quiet_swallowed_sigint(previous):
  """An unraisable-exception hook that drops the remembered Ctrl-C (it is re-raised before the first step,
  so Python's "Exception ignored in …" traceback would only be noise) and passes everything else on."""

  def hook(unraisable) -> None:
    if not (_sigint_seen and unraisable.exc_type is KeyboardInterrupt):
      previous(unraisable)

  return hook


def raise_pending_sigint() -> None:
  """``KeyboardInterrupt`` if a Ctrl-C arrived (see :func:`record_sigint`) and was swallowed."""
  if _sigint_seen:
    raise KeyboardInterrupt
