"""``fit(cfg)``: one training run from an ``Experiment`` to a workdir of results.

What ``kdjax train-teacher`` / ``kdjax distill`` run: :func:`kdjax.engine.experiment.build`
makes the :class:`~kdjax.engine.distiller.Distiller` and data from the config,
this module restores the workdir's latest good checkpoint, assembles the hooks
(metrics, evaluation, checkpoints, NaN checks, preemption, fault injection)
and hands everything to the public thin loop :func:`kdjax.engine.hooks.train`.
Re-running the same command with the same workdir continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path

import jax

from kdjax import checkpoint as ckpt
from kdjax import config as cfg_lib
from kdjax.config import Experiment
from kdjax.engine import evaluation, hooks, teachers
from kdjax.engine import workdir as wd
from kdjax.engine.experiment import Run, build
from kdjax.engine.faults import Fault, fault_from_env
from kdjax.engine.state import TrainState
from kdjax.errors import ConfigError
from kdjax.parallel import sharding

log = logging.getLogger(__name__)

LOG_FILE = wd.LOG_FILE  # library log records and tracebacks of a run


@dataclasses.dataclass
class Record:
  """What a run reports besides its state: time, evaluations, resumes."""

  elapsed_before: float = 0.0
  best: float = -1.0
  best_step: int | None = None
  resumed_from: list = dataclasses.field(default_factory=list)
  last_eval: dict = dataclasses.field(default_factory=dict)
  t0: float = dataclasses.field(default_factory=time.perf_counter)

  def seconds(self) -> float:
    return self.elapsed_before + time.perf_counter() - self.t0


def _resume(checkpointer: ckpt.Checkpointer, run: Run, provenance: dict, record: Record) -> TrainState:
  """The latest checkpoint that verifies (data position restored), or the fresh state.

  Raises ``ValueError`` when the checkpoints belong to another experiment or
  teacher (naming what differs; nothing is moved), and when every checkpoint
  of this workdir failed verification unless ``run.restart`` is set.
  """

  def check_meta(step: int, meta: dict) -> None:
    where = str(checkpointer.directory / str(step))
    if isinstance(meta.get("config"), dict):
      diff = wd.config_diff(meta["config"], provenance["config"])
      if diff != "none":
        raise ConfigError(
          f"the checkpoint {where!r} belongs to another experiment (differs in {diff}); use a new --run.workdir"
        )
    if meta.get("teacher_hash") != run.teacher_hash:
      raise ConfigError(
        f"the checkpoint {where!r} was trained with teacher {meta.get('teacher_hash')} but the "
        f"configured teacher is {run.teacher_hash}; use a new --run.workdir"
      )

  restored = checkpointer.restore_latest(
    run.distiller.abstract_state, check_meta, allow_unverified=run.cfg.run.allow_unverified
  )
  if restored is None:
    aside = checkpointer.set_aside_steps()
    if aside and not run.cfg.run.restart:
      raise ConfigError(
        f"no checkpoint in {str(checkpointer.directory)!r} verified (damaged ones are in "
        f"{str(checkpointer.corrupt_directory)!r}: {', '.join(aside)}); pass --run.restart to train "
        f"from step 0 in this workdir, or use a new --run.workdir"
      )
    return run.state
  step0, state, meta = restored
  run.loader.restore(meta["data"])
  record.elapsed_before = float(meta.get("seconds", 0.0))
  record.best, record.best_step = float(meta.get("best_test_accuracy", -1.0)), meta.get("best_step")
  record.resumed_from = [*meta.get("resumed_from", []), step0]
  log.info("resuming from step %d (%s)", step0, checkpointer.directory / str(step0))
  return state


def evaluate(run: Run, state: TrainState) -> dict[str, float]:
  """Diagnostics of ``state`` over the whole eval split (see :meth:`Distiller.evaluate`); for token data
  also the exact match of greedy-generated answers, the student's and the teacher's
  (:meth:`Distiller.exact_match`), or, for a language whose distribution is known (``hmm_lm``), the exact
  metrics of :func:`kdjax.engine.evaluation.true_distribution` instead."""
  from kdjax import data as kd_data
  from kdjax.data.builders import hmm

  batches = lambda: kd_data.eval_batches(run.eval_ds, run.cfg.data.eval_batch_size, view=run.view)  # noqa: E731
  res = run.distiller.evaluate(state, batches())
  truth = hmm.truth(run.cfg.data.name)
  if truth is not None:  # a language whose distribution is known: exact metrics instead of exact match
    res.update(evaluation.true_distribution(run.distiller, state, batches(), truth, teacher=True))
  elif run.view.kind == "tokens":
    first = not run.teacher_eval  # the teacher is frozen: generate its answers at the first evaluation only
    em = run.distiller.exact_match(state, batches(), teacher=first)
    if first:
      run.teacher_eval.update({k: v for k, v in em.items() if k.startswith("teacher_")})
    res.update(em, **run.teacher_eval)
  return res


def _hooks(run: Run, checkpointer, record: Record, writer, provenance: dict, fault: Fault | None) -> list[hooks.Hook]:
  """The hooks of a CLI run, in the order they act after each step."""
  cfg, spe = run.cfg, run.loader.steps_per_epoch
  guard = hooks.NonFiniteCheck(cfg.run.log_every, enabled=cfg.run.stop_on_nan)

  def meta(step: int) -> dict:
    drawn_ahead = int(run.distiller.runs_ahead and step < run.total_steps)  # see kdjax.train
    return {
      "data": run.loader.state(behind=drawn_ahead),
      "seconds": record.seconds(),
      "step": step,
      "best_test_accuracy": record.best,
      "best_step": record.best_step,
      "resumed_from": record.resumed_from,
      "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
      "process_count": jax.process_count(),
      **provenance,
    }

  saver = hooks.Checkpoint(checkpointer, meta, guard=guard, before_save=writer.flush if writer else None)
  guard.last_good = lambda: saver.last_good

  def log_train(p: hooks.Progress) -> None:
    if writer:
      row = {k: float(v) for k, v in p.metrics.items()}
      writer.write(p.step, "train", {**row, "lr": float(run.schedule(p.step - 1)), "epoch": p.step / spe})

  def log_eval(p: hooks.Progress) -> None:
    guard.check()
    record.last_eval = evaluate(run, p.state)
    acc = record.last_eval.get("test_accuracy", 0.0)
    if acc > record.best:
      record.best, record.best_step = acc, p.step
    if writer:
      writer.write(p.step, "eval", {**record.last_eval, "epoch": p.step / spe})

  out: list[hooks.Hook] = [hooks.InjectFault(fault, "poison")] if fault else []
  out += [
    guard,
    hooks.ProgressBar(f"train {cfg.name}", quiet=cfg.run.quiet or jax.process_index() != 0),
    hooks.Every(cfg.run.log_every, log_train, at_end=False),
    hooks.Every(cfg.run.eval_every or spe, log_eval),
    saver,
  ]
  out += [hooks.InjectFault(fault, "signal")] if fault else []
  return out + [hooks.Preemption(multihost=jax.process_count() > 1)]


def fit(cfg: Experiment, *, teacher_checkpoint: str | None = None, fault: Fault | None = None) -> dict:
  """Train one run (resuming if its workdir has a checkpoint); returns results.

  Args:
    cfg: the experiment.
    teacher_checkpoint: overrides ``cfg.teacher.checkpoint`` (born-again).
    fault: testing hook (see :class:`~kdjax.engine.faults.Fault`); default:
      read from the ``KDJAX_FAULT_AT_STEP`` environment variable.

  Raises:
    ConfigError: bad input (data, models, method, teacher, workdir), before any
      step runs and before anything in the workdir is written.
    DiskFull: no space left for the checkpoints or the run's other outputs;
      the last complete checkpoint is intact.
    Preempted: SIGTERM/SIGINT arrived; the current step was finished and saved.
    NonFiniteLoss: a loss term became NaN/Inf; nothing after the last good
      checkpoint was saved.
  """
  if teachers.plan(cfg.mode).generations:
    return _born_again(cfg)
  fault = fault if fault is not None else fault_from_env()
  # Everything that can reject the inputs (data, models, method, teacher) runs
  # before the workdir is looked at, so each bad input gets its own message.
  run = build(cfg, teacher_checkpoint=teacher_checkpoint)
  workdir = wd.prepare(cfg.run.workdir)
  wd.check_layout(workdir)  # an odd or unreadable workdir is refused before anything in it is written
  with wd.lock(workdir) as held, _library_log(workdir / LOG_FILE), _full_disk_is_one_error(workdir):
    wd.check_config(workdir, cfg)
    return _fit_locked(run, workdir, fault, held)


@contextlib.contextmanager
def _full_disk_is_one_error(workdir: Path):
  """A full disk while writing any of the run's outputs (metrics, config, export, results) is one
  :class:`~kdjax.checkpoint.DiskFull` naming the last complete checkpoint, as while saving one."""
  try:
    yield
  except ckpt.DiskFull:
    raise
  except OSError as e:
    if not ckpt.is_disk_full(e):
      raise
    log.info("disk full while writing the run's outputs", exc_info=True)
    steps = ckpt.complete_steps(workdir / wd.CHECKPOINTS)
    raise ckpt.DiskFull(workdir, steps[-1] if steps else None, doing="writing the run's outputs") from None


def _fit_locked(run: Run, workdir: Path, fault: Fault | None, held: wd.Lock) -> dict:
  from kdjax import report

  cfg = run.cfg
  provenance = {
    "config": cfg_lib.to_dict(cfg),
    "config_hash": cfg_lib.config_hash(cfg),
    "teacher_hash": run.teacher_hash,
    "versions": ckpt.library_versions(),
    "git_commit": ckpt.git_commit(),
  }
  checkpointer = ckpt.Checkpointer(
    workdir / wd.CHECKPOINTS, save_every=cfg.run.checkpoint_every, max_to_keep=cfg.run.max_to_keep
  )
  record, writer = Record(), None
  try:
    state = _resume(checkpointer, run, provenance, record)
    run.state = None  # donated below; never reuse
    held.claim()  # nothing refuses the run from here on: record it as the lock's holder
    wd.write_json(workdir / wd.CONFIG_FILE, provenance)
    if run.layer_similarity is not None and jax.process_index() == 0:  # layer_map.json and its heat map
      run.layer_similarity.write(workdir)
    record.t0 = time.perf_counter()
    if jax.process_index() == 0:
      writer = report.MetricWriter(workdir, quiet=cfg.run.quiet, start_step=(record.resumed_from or [0])[-1])
    state = hooks.train(
      run.distiller,
      state,
      run.loader,
      steps=run.total_steps,
      init_steps=run.init_steps,
      hooks=_hooks(run, checkpointer, record, writer, provenance, fault),
    )
  finally:
    try:
      if writer:
        writer.close()
    finally:
      checkpointer.close()
  return _finish(run, state, record, provenance, workdir)


@contextlib.contextmanager
def _library_log(path: Path):
  """Send log records (Orbax, TensorStore, absl; kdjax's from INFO, with tracebacks) to ``path``, not stderr.

  What a user must see is printed as one line (warnings, errors); the details
  behind it stay in the run's log file. A log file that cannot be written
  (:class:`~kdjax.report.logging.LogFile`) costs the run nothing but its
  records and one line on stderr — none when the run stops on the full disk
  that made it fail, whose own line says so.
  """
  from kdjax.report.logging import LogFile

  handler, ending = LogFile(path), None
  handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
  root, ours = logging.getLogger(), logging.getLogger("kdjax")
  streams = [
    h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
  ]
  mute, old_level, old_hook = (lambda record: False), ours.level, sys.unraisablehook
  for h in streams:
    h.addFilter(mute)
  root.addHandler(handler)
  ours.setLevel(logging.INFO)
  # Orbax's abandoned read coroutines of a damaged checkpoint end as "unraisable" exceptions.
  sys.unraisablehook = lambda u: log.info(
    "%s: %r", u.err_msg or "exception ignored", u.object, exc_info=(u.exc_type, u.exc_value, u.exc_traceback)
  )
  try:
    yield
  except BaseException as e:
    ending = e
    raise
  finally:
    sys.unraisablehook = old_hook
    ours.setLevel(old_level)
    root.removeHandler(handler)
    handler.close()
    for h in streams:
      h.removeFilter(mute)
    if handler.failure is not None and ckpt.is_disk_full(handler.failure) and not ckpt.is_disk_full(ending):
      handler.report()


def _finish(run: Run, state: TrainState, record: Record, provenance: dict, workdir: Path) -> dict:
  """Export the trained student (a later run can use it as its teacher) and write ``results.json``."""
  cfg, final_step = run.cfg, int(state.step)
  student_bytes = sharding.param_bytes(state.params[0])
  export_path = run.distiller.export(
    state,
    workdir / ckpt.EXPORT_DIR,
    model_name=cfg.student.name,
    dtype=cfg.student.dtype,
    extra={
      "config_hash": provenance["config_hash"],
      "experiment": cfg.name,
      "teacher_hash": run.teacher_hash,
      "steps": final_step,
      "versions": provenance["versions"],
      "git_commit": provenance["git_commit"],
    },
  )
  last = record.last_eval or evaluate(run, state)
  results = {
    **{
      k: last.get(k)
      for k in ("test_accuracy", "teacher_test_accuracy", "agreement", "teacher_student_kl", "ece", "cka")
    },
    **{k: last[k] for k in ("test_nll", "perplexity", "exact_match", "teacher_exact_match") if k in last},
    **{k: last[k] for k in evaluation.TRUTH_METRICS if k in last},
    "best_test_accuracy": max(record.best, last.get("test_accuracy", 0.0)),
    "best_step": record.best_step,
    "steps": final_step,
    "seconds": record.seconds(),
    "process_count": jax.process_count(),
    "student_param_bytes": student_bytes,
    "teacher_param_bytes": run.distiller.teacher_param_bytes(),
    "resumed_from": record.resumed_from,
    "config_hash": provenance["config_hash"],
    "teacher_hash": run.teacher_hash,
    "student_hash": ckpt.file_hash(export_path) if export_path.exists() else None,
    "group": group_name(cfg),
    "seed": cfg.run.seed,
    "method": "teacher" if teachers.plan(cfg.mode).alone else cfg.method.name,
    "mode": cfg.mode,
    "teacher": cfg.teacher.name if run.teacher_hash else None,
    "student": cfg.student.name,
    "experiment": cfg.name,
    "published": cfg.published,
    "versions": provenance["versions"],
    "git_commit": provenance["git_commit"],
    "config": provenance["config"],
  }
  if run.layer_similarity is not None:
    results["layer_map"] = run.layer_similarity.to_json()
  wd.write_json(workdir / "results.json", results)
  return results


def group_name(cfg: Experiment) -> str:
  """The report cell of a run: everything but the seed, in words."""
  plan = teachers.plan(cfg.mode)
  if plan.alone:
    return f"{cfg.student.name} (teacher training)"
  arrow = f"{cfg.teacher.name}→{cfg.student.name}"
  extra = f" {plan.label}" if plan.label else ""
  data = f" +{cfg.data.transfer_split}" if cfg.data.transfer_split else ""
  if cfg.method.name == "ce" and not cfg.responses.active:
    return f"{cfg.student.name} scratch{data}"
  return f"{arrow} {cfg.method.name}{_response_words(cfg.responses)}{extra}{data}"


def _response_words(r) -> str:
  """`` on-policy λ=0.5``, `` seqkd`` or both, for runs that train on generated responses."""
  words = []
  if r.others == "teacher" and r.student_fraction < 1:
    words.append("seqkd")
  if r.student_fraction > 0:
    words.append(f"on-policy λ={r.student_fraction:g}")
  return "".join(" " + w for w in words)


def _born_again(cfg: Experiment) -> dict:
  """Born-again networks: generation g+1 distils from generation g."""
  teacher = cfg.teacher.checkpoint
  results = []
  for g in range(1, cfg.generations + 1):
    gcfg = cfg.replace(
      mode="offline",
      teacher=dataclasses.replace(cfg.teacher, name=cfg.teacher.name if g == 1 else cfg.student.name),
      run=dataclasses.replace(cfg.run, workdir=str(Path(cfg.run.workdir) / f"gen{g}")),
    )
    res = fit(gcfg, teacher_checkpoint=teacher)
    results.append(res)
    teacher = str(Path(gcfg.run.workdir))
  final = dict(results[-1])
  final["generations"] = [{"test_accuracy": r["test_accuracy"], "teacher_hash": r["teacher_hash"]} for r in results]
  Path(cfg.run.workdir).mkdir(parents=True, exist_ok=True)
  wd.write_json(Path(cfg.run.workdir) / "results.json", final)
  return final
