"""``train``: the thin loop over any iterable of batches, and the hooks it calls.

    state = kdjax.train(distiller, state, batches, steps=1000, hooks=[
        kdjax.hooks.Checkpoint(kdjax.Checkpointer("ckpt", save_every=100), meta=lambda step: {}),
        kdjax.hooks.Every(500, lambda progress: print(distiller.evaluate(progress.state, eval_batches()))),
    ])

The loop only draws a batch, calls ``distiller.step`` and hands the
:class:`Progress` to each hook, in order; checkpoints, evaluation, logging,
progress bars, NaN checks, preemption and fault injection are hooks a user
may add to, reorder or replace. ``kdjax distill`` runs exactly this loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from kdjax.engine import faults


@dataclasses.dataclass
class Progress:
  """What the loop shares with its hooks (hooks may replace ``state`` and ``metrics``).

  Attributes:
    state: the current train state (donated by the next step).
    step: optimizer steps done.
    total_steps: where the loop stops.
    metrics: the last step's metrics (device arrays), None before the first.
    stop: set by a hook to end the loop after this step: ``"preempted"``.
  """

  state: Any
  step: int
  total_steps: int
  metrics: dict | None = None
  stop: str | None = None


class Hook:
  """Called by :func:`train`: ``start`` once, ``after_step`` after every step,
  ``end`` when the loop finishes or stops, ``close`` always (also on an exception)."""

  def start(self, progress: Progress) -> None:
    del progress

  def after_step(self, progress: Progress) -> None:
    del progress

  def end(self, progress: Progress) -> None:
    del progress

  def close(self) -> None:
    pass


def train(
  distiller,
  state,
  batches: Iterable,
  *,
  steps: int,
  hooks: Sequence[Hook] = (),
  init_steps: int = 0,
  start_step: int | None = None,
):
  """Run ``distiller.step`` until ``steps`` optimizer steps are done; returns the final state.

  Args:
    distiller: a :class:`kdjax.Distiller` (after ``init``).
    state: the state to continue from (it is donated).
    batches: any iterable of batches (this process's rows; see :mod:`kdjax.batch`),
      positioned at the next batch to train on. With a ``split`` placement
      the loop draws one batch ahead (its teacher forward runs while the
      student trains), so the iterator is one batch past the step the hooks
      see; dispatching runs under ``jax.transfer_guard("disallow")``.
    steps: total optimizer steps (the loop starts at ``state.step``).
    hooks: called in order after every step.
    init_steps: the first ``init_steps`` steps run the method's init stage.
    start_step: ``state.step`` if the caller knows it (saves one device read).

  Raises:
    faults.Preempted: a hook stopped the loop for preemption (the
      :class:`Checkpoint` hook saved the state first).
  """
  progress = Progress(state=state, step=int(state.step) if start_step is None else start_step, total_steps=steps)
  ahead = getattr(distiller, "runs_ahead", False)
  try:
    for h in hooks:
      h.start(progress)
    it = iter(batches)
    batch = None
    while progress.step < steps and progress.stop is None:
      stage = "init" if progress.step < init_steps else "main"
      if batch is None:
        batch = next(it)
        if ahead:
          distiller.prefetch(batch)
      with _guard(ahead):
        progress.state, progress.metrics = distiller.step(progress.state, batch, stage=stage)
        progress.step += 1
        batch = None
        if ahead and progress.step < steps:  # the teacher starts on the next batch while the student trains
          batch = next(it)
          distiller.prefetch(batch)
      for h in hooks:
        h.after_step(progress)
    for h in hooks:
      h.end(progress)
  finally:
    for h in hooks:
      h.close()
  if progress.stop == "preempted":
    raise faults.Preempted(progress.step)
  return progress.state


def _guard(ahead: bool):
  """While dispatching a split placement's work, no implicit transfer may block on the host."""
  return jax.transfer_guard("disallow") if ahead else contextlib.nullcontext()


class Every(Hook):
  """Call ``fn(progress)`` every ``every`` steps (and at the last step when ``at_end``)."""

  def __init__(self, every: int, fn: Callable[[Progress], None], *, at_end: bool = True):
    self.every, self.fn, self.at_end = every, fn, at_end

  def after_step(self, progress: Progress) -> None:
    if (self.every and progress.step % self.every == 0) or (self.at_end and progress.step == progress.total_steps):
      self.fn(progress)


class NonFiniteCheck(Hook):
  """Raise :class:`faults.NonFiniteLoss` on the first NaN/Inf loss term.

  Metrics stay on the device until checked (every ``every`` steps, every 64
  pending steps, before a save and at the end), so the step never waits for
  the host. ``last_good()`` names the newest saved checkpoint for the message.
  """

  def __init__(self, every: int, last_good: Callable[[], int | None] = lambda: None, enabled: bool = True):
    self.every, self.last_good, self.enabled = every, last_good, enabled
    self.pending: list[tuple[int, dict]] = []

  def after_step(self, progress: Progress) -> None:
    if not self.enabled:
      return
    self.pending.append((progress.step, progress.metrics))
    if progress.step % self.every == 0 or len(self.pending) >= 64:
      self.check()

  def check(self) -> None:
    pending, self.pending = self.pending, []
    for step, m in pending:
      bad = sorted(k for k, v in m.items() if faults.is_loss_key(k) and not np.isfinite(np.asarray(v)).all())
      if bad:
        raise faults.NonFiniteLoss(step, [k for k in bad if not k.endswith("loss/total")] or bad, self.last_good())

  def end(self, progress: Progress) -> None:
    self.check()


class Checkpoint(Hook):
  """Save every ``checkpointer.save_every`` steps, and at the end or on preemption (forced).

  ``meta(step)`` is the JSON metadata saved with the state (data position,
  provenance …). A ``guard`` (:class:`NonFiniteCheck`) is checked first, so
  a state that a non-finite step produced is never written; then
  ``before_save()`` runs (e.g. flush metric files, so what a checkpoint
  resumes from is always on disk).
  """

  def __init__(
    self,
    checkpointer,
    meta: Callable[[int], dict],
    guard: NonFiniteCheck | None = None,
    before_save: Callable[[], None] | None = None,
  ):
    self.checkpointer, self.meta, self.guard, self.before_save = checkpointer, meta, guard, before_save
    steps = checkpointer.all_steps()
    self.last_good: int | None = steps[-1] if steps else None

  def save(self, progress: Progress, force: bool = False) -> None:
    if self.guard is not None:
      self.guard.check()
    if self.before_save is not None:
      self.before_save()
    if self.checkpointer.save(progress.step, progress.state, self.meta(progress.step), force=force):
      self.last_good = progress.step

  def after_step(self, progress: Progress) -> None:
    every = self.checkpointer.save_every
    if every and progress.step % every == 0 and progress.step < progress.total_steps:
      self.save(progress)

  def end(self, progress: Progress) -> None:
    self.save(progress, force=True)
    self.checkpointer.close()

  def close(self) -> None:
    self.checkpointer.close()  # waits for an in-flight save: the last good checkpoint is complete


class Preemption(Hook):
  """Finish the step, save and stop on SIGTERM/SIGINT (``progress.stop = "preempted"``).

  With several processes JAX's preemption service owns SIGTERM and agrees on
  a step (``reached_preemption_sync_point``); a local handler would
  desynchronise the hosts, so only SIGINT is handled locally there.
  """

  def __init__(self, multihost: bool = False):
    self.multihost, self.flag, self.old = multihost, False, {}

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.flag = True

  def start(self, progress: Progress) -> None:
    faults.raise_pending_sigint()  # a Ctrl-C during set-up that Python swallowed: stop before the first step
    signals = (signal.SIGINT,) if self.multihost else (signal.SIGTERM, signal.SIGINT)
    self.old = {s: signal.signal(s, self._on_signal) for s in signals}

  def after_step(self, progress: Progress) -> None:
    if self.flag or (self.multihost and faults.preemption_sync_point(progress.step)):
      progress.stop = "preempted"

  def close(self) -> None:
    for s, handler in self.old.items():
      signal.signal(s, handler)
    self.old = {}


class InjectFault(Hook):
  """Test hook: :class:`faults.Fault` right after its step.

  ``NAN`` poisons the state and metrics (place this hook first); a signal is
  sent after the step's checkpoint save has started (place it after
  :class:`Checkpoint`), so ``KILL`` may hit an async save in flight.
  """

  def __init__(self, fault: faults.Fault, phase: str):
    self.fault, self.phase = fault, phase

  def after_step(self, progress: Progress) -> None:
    if progress.step != self.fault.step:
      return
    if self.phase == "poison" and self.fault.action == "NAN":
      progress.state, progress.metrics = faults.poison(progress.state, progress.metrics, self.fault.term)
    elif self.phase == "signal" and self.fault.action != "NAN":
      faults.send_signal(self.fault.action)


class ProgressBar(Hook):
  """A tqdm bar over the steps (nothing when ``quiet``)."""

  def __init__(self, desc: str, quiet: bool = False):
    self.desc, self.quiet, self.bar = desc, quiet, None

  def start(self, progress: Progress) -> None:
    from kdjax import report

    self.bar = report.progress(None, total=progress.total_steps - progress.step, desc=self.desc, quiet=self.quiet)

  def after_step(self, progress: Progress) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
