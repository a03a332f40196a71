"""Ctrl-C and SIGTERM that are never lost: installed before anything heavy is imported (only ``signal`` here).

Python prints and drops a ``KeyboardInterrupt`` raised inside a garbage-collection
callback or a ``__del__``; JAX runs such callbacks while it imports and compiles, so a
Ctrl-C during set-up could vanish and the run train to its end. The handlers below
raise as usual *and* remember the signal; the training loop checks before its first
step (:func:`raise_pending_sigint`). SIGTERM before training (a scheduler cancelling a
job that is still starting) raises :class:`Terminated`, a ``KeyboardInterrupt``, so
it stops the run the same way, with one line; during training kdjax's preemption
hook takes SIGTERM over and saves a checkpoint.
"""

from __future__ import annotations

import signal
import sys

_sigint_seen = False
_sigterm_seen = False


class Terminated(KeyboardInterrupt):
  """SIGTERM arrived outside the training loop (nothing to save)."""


def _record_sigint(signum, frame) -> None:
  global _sigint_seen
  _sigint_seen = True
  raise KeyboardInterrupt


def _record_sigterm(signum, frame) -> None:
  global _sigterm_seen
  _sigterm_seen = True
  raise Terminated


def record_sigint() -> None:
  """Ctrl-C raises ``KeyboardInterrupt`` as usual and SIGTERM raises :class:`Terminated`; both are also
  remembered, so one that lands where Python swallows the exception (a garbage-collection callback, a
  ``__del__``) still stops the run before its first step (:func:`raise_pending_sigint`). Each only when its
  signal has Python's default handling (not ignored, not taken over by someone else)."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _record_sigint)
  if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _record_sigterm)
  if not getattr(sys.unraisablehook, "_kdjax", False):
    sys.unraisablehook = _quiet_swallowed_sigint(sys.unraisablehook)


def _quiet_swallowed_sigint(previous):
  """An unraisable-exception hook that drops the remembered Ctrl-C or SIGTERM (it is re-raised before the first
  step, so Python's "Exception ignored in …" traceback would only be noise) and passes everything else on."""

  def hook(unraisable) -> None:
    if not ((_sigint_seen or _sigterm_seen) and issubclass(unraisable.exc_type, KeyboardInterrupt)):
      previous(unraisable)

  hook._kdjax = True
  return hook


def raise_pending_sigint() -> None:
  """:class:`Terminated` or ``KeyboardInterrupt`` if SIGTERM or Ctrl-C arrived (see :func:`record_sigint`)."""
  if _sigterm_seen:
    raise Terminated
  if _sigint_seen:
    raise KeyboardInterrupt
