"""Faults: exits, the fault-injection hook of the tests, and what a diverging step looks like.

Exit statuses of the CLI (documented in the README): 0 done, 1 bad input,
``NONFINITE_EXIT`` (65) when a loss became NaN/Inf, 70 for a bug,
``PREEMPTED_EXIT`` (75, EX_TEMPFAIL) after SIGTERM/SIGINT with a checkpoint
saved.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp

from kdjax._interrupt import raise_pending_sigint, record_sigint  # noqa: F401  (re-exported for the loop)
from kdjax.engine.state import TrainState
from kdjax.errors import ConfigError

PREEMPTED_EXIT = 75
NONFINITE_EXIT = 65


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; the state at ``step`` was saved."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}; checkpoint saved, re-run the same command to resume")
    self.step = step


class NonFiniteLoss(Exception):
  """A loss term became NaN or Inf."""

  def __init__(self, step: int, terms: list[str], last_good: int | None):
    where = f"; last good checkpoint: step {last_good}" if last_good is not None else "; no checkpoint was written"
    super().__init__(f"non-finite loss at step {step} in {', '.join(terms)}{where}")
    self.step, self.terms, self.last_good = step, terms, last_good


FAULT_ENV = "KDJAX_FAULT_AT_STEP"
_FAULT_ACTIONS = ("KILL", "TERM", "INT", "NAN")


@dataclasses.dataclass(frozen=True)
class Fault:
  """Fault-injection test hook: right after optimizer step ``step``, ``action``.

  ``KILL``/``TERM``/``INT`` send that signal to this process once the step's
  periodic checkpoint save has *started* (so ``KILL`` may hit an async save in
  flight); ``NAN`` makes the step's ``term`` (default: every non-total loss
  term) and the student parameters NaN, as a diverging step would.

  From the environment: ``KDJAX_FAULT_AT_STEP=N:ACTION[:TERM]``, e.g.
  ``12:TERM`` or ``5:NAN:loss/kd``.
  """

  step: int
  action: str = "KILL"
  term: str | None = None

  def __post_init__(self):
    if self.step < 1 or self.action not in _FAULT_ACTIONS:
      raise ConfigError(
        f"{FAULT_ENV}: step={self.step}, action={self.action!r}; expected a step ≥ 1 and one of "
        f"{'|'.join(_FAULT_ACTIONS)}, e.g. {FAULT_ENV}=12:TERM"
      )


def fault_from_env(environ: dict[str, str] | None = None) -> Fault | None:
  """The :class:`Fault` named by ``$KDJAX_FAULT_AT_STEP`` (None when unset)."""
  spec = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
  if not spec:
    return None
  parts = spec.split(":", 2)
  try:
    step = int(parts[0])
  except ValueError:
    raise ConfigError(
      f"{FAULT_ENV}={spec!r}: expected N:{'|'.join(_FAULT_ACTIONS)}[:loss term], e.g. {FAULT_ENV}=12:TERM"
    ) from None
  return Fault(step, parts[1].upper() if len(parts) > 1 else "KILL", parts[2] if len(parts) > 2 else None)


def send_signal(action: str) -> None:
  os.kill(os.getpid(), getattr(signal, "SIG" + action))
  if action == "KILL":
    while True:  # SIGKILL cannot be caught; never run another step
      time.sleep(1)


def is_loss_key(k: str) -> bool:
  return k.startswith("loss/") or "/loss/" in k


def poison(state: TrainState, metrics: dict, term: str | None) -> tuple[TrainState, dict]:
  """NaN in the student params and in loss ``term`` (None: every non-total term)."""
  terms = [k for k in metrics if is_loss_key(k) and not k.endswith("loss/total")]
  if term is not None:
    if term not in metrics:
      raise ConfigError(f"{FAULT_ENV}: no loss term {term!r} in this run; terms: {', '.join(sorted(terms))}")
    terms = [term]
  nan = lambda x: jax.device_put(jnp.full(x.shape, jnp.nan, x.dtype), x.sharding)  # noqa: E731
  to_nan = lambda x: nan(x) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  metrics = {k: (nan(v) if k in terms or k.endswith("loss/total") else v) for k, v in metrics.items()}
  return state.replace(params=jax.tree.map(to_nan, state.params)), metrics


def preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils

  return multihost_utils.reached_preemption_sync_point(step)
