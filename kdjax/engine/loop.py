"""``fit``: one training run from an ``Experiment`` to a workdir of results.

The loop is deliberately thin: it builds data, models, method and optimizer,
jits the pure step once with the mesh's shardings, and then only moves
batches in and metrics out. Everything a resumed run needs is in the Orbax
checkpoint (see :mod:`kdjax.checkpoint`); re-running the same command with the
same workdir continues from the latest good checkpoint, bit for bit.

Exit statuses of the CLI (documented in the README): 0 done, 1 bad input,
``PREEMPTED_EXIT`` (75, EX_TEMPFAIL) after SIGTERM/SIGINT with a checkpoint
saved, ``NONFINITE_EXIT`` (65) when the loss became NaN/Inf.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import checkpoint as ckpt
from kdjax import config as cfg_lib
from kdjax.config import Experiment, ModelConfig
from kdjax.engine import sharding, xla_cpu
from kdjax.engine.optim import make_optimizer
from kdjax.engine.state import ModelDef, TeacherState, TrainState, apply_model, split_model
from kdjax.engine.step import StepSpec, make_eval_step, make_train_step
from kdjax.methods.base import InitInfo, ModelInfo

PREEMPTED_EXIT = 75
NONFINITE_EXIT = 65
CKA_EXAMPLES = 1024

log = logging.getLogger(__name__)


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
      raise ValueError(f"{FAULT_ENV}: step={self.step}, action={self.action!r}; expected a step ≥ 1 and one of "
                       f"{'|'.join(_FAULT_ACTIONS)}, e.g. {FAULT_ENV}=12:TERM")


def fault_from_env(environ: dict[str, str] | None = None) -> Fault | None:
  """The :class:`Fault` named by ``$KDJAX_FAULT_AT_STEP`` (None when unset)."""
  spec = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
  if not spec:
    return None
  parts = spec.split(":", 2)
  try:
    step = int(parts[0])
  except ValueError:
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected N:{'|'.join(_FAULT_ACTIONS)}[:loss term], "
                     f"e.g. {FAULT_ENV}=12:TERM") from None
  return Fault(step, parts[1].upper() if len(parts) > 1 else "KILL", parts[2] if len(parts) > 2 else None)


def _send_signal(action: str) -> None:
  os.kill(os.getpid(), getattr(signal, "SIG" + action))
  if action == "KILL":
    while True:  # SIGKILL cannot be caught; never run another step
      time.sleep(1)


def _is_loss_key(k: str) -> bool:
  return k.startswith("loss/") or "/loss/" in k


def _poison(state: TrainState, metrics: dict, term: str | None) -> tuple[TrainState, dict]:
  """NaN in the student params and in loss ``term`` (None: every non-total term)."""
  terms = [k for k in metrics if _is_loss_key(k) and not k.endswith("loss/total")]
  if term is not None:
    if term not in metrics:
      raise ValueError(f"{FAULT_ENV}: no loss term {term!r} in this run; terms: {', '.join(sorted(terms))}")
    terms = [term]
  nan = lambda x: jax.device_put(jnp.full(x.shape, jnp.nan, x.dtype), x.sharding)  # noqa: E731
  poison = lambda x: nan(x) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  metrics = {k: (nan(v) if k in terms or k.endswith("loss/total") else v) for k, v in metrics.items()}
  return state.replace(params=jax.tree.map(poison, state.params)), metrics


def _preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils

  return multihost_utils.reached_preemption_sync_point(step)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---------------------------------------------------------------------------
# Building blocks


def _create(mcfg: ModelConfig, num_classes: int, seed: int):
  from kdjax import models

  return models.create(mcfg.name, num_classes=num_classes, rngs=nnx.Rngs(seed), dtype=_DTYPES[mcfg.dtype])


def _model_info(model, name: str, num_classes: int) -> ModelInfo:
  from kdjax import models

  shapes = models.feature_shapes(model, batch_size=2)
  return ModelInfo(name=name, num_classes=num_classes, feature_shapes={k: tuple(v[1:]) for k, v in shapes.items()})


def load_teacher(mcfg: ModelConfig, num_classes: int, *, role: str = "teacher") -> tuple[Any, str]:
  """Create ``mcfg.name`` and fill it from ``mcfg.checkpoint``; check it fits.

  Raises ``ValueError`` (before anything is compiled) when the checkpoint's
  architecture or class count differs from the config.
  """
  if not mcfg.checkpoint:
    raise ValueError(f"{role}.checkpoint is not set: the method needs a trained {role}; "
                     f"pass --{role}.checkpoint <teacher workdir> (train one with `kdjax train-teacher`)")
  return load_model(mcfg, num_classes, role=role)


def load_model(mcfg: ModelConfig, num_classes: int, *, role: str, seed: int = 0) -> tuple[Any, str]:
  """``mcfg.name`` filled from the export at ``mcfg.checkpoint``, and that export's content hash."""
  meta, payload, digest = ckpt.load_export(mcfg.checkpoint, what=f"{role} checkpoint")
  if meta.get("model") and meta["model"] != mcfg.name:
    raise ValueError(f"{role}.checkpoint {mcfg.checkpoint!r} holds a {meta['model']!r} but the config asks for "
                     f"{role}.name={mcfg.name!r}")
  if meta.get("num_classes") is not None and int(meta["num_classes"]) != num_classes:
    raise ValueError(f"{role}.checkpoint {mcfg.checkpoint!r} has {meta['num_classes']} classes but the dataset "
                     f"has {num_classes}")
  model = _create(mcfg, num_classes, seed=seed)
  try:
    ckpt.fill_model(model, payload)
  except ValueError as e:  # no model.json, or one that lies: the shapes decide
    raise ValueError(f"{role}.checkpoint {mcfg.checkpoint!r} does not fit {role}.name={mcfg.name!r} with "
                     f"{num_classes} classes ({e}); point --{role}.checkpoint at a matching run") from None
  return model, digest


def _global_put(tree: Any, shardings: Any) -> Any:
  """Place host values (identical on every process) as global arrays."""
  def one(x, s):
    x = np.asarray(x) if not jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key) else x
    if isinstance(x, np.ndarray):
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.device_put(x, s)
  return jax.tree.map(one, tree, shardings)


def _to_host(x) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@dataclasses.dataclass
class Run:
  """Everything ``fit`` builds before the first step (useful in tests)."""

  cfg: Experiment
  mesh: Any
  loader: Any
  eval_ds: Any
  view: Any
  spec: StepSpec
  init_spec: StepSpec | None
  state: TrainState
  teacher: TeacherState
  teacher_hash: str | None
  total_steps: int
  init_steps: int
  schedule: Any
  num_classes: int
  student_model: Any


def build(cfg: Experiment, *, teacher_checkpoint: str | None = None) -> Run:
  """Data, models, method, optimizer and the initial (sharded) state."""
  from kdjax import data as kd_data
  from kdjax import methods

  mesh = sharding.make_mesh(cfg.run.mesh_data, cfg.run.mesh_fsdp)
  sharding.check_batch_size(cfg.data.batch_size, mesh)
  sharding.check_batch_size(cfg.data.eval_batch_size, mesh, "data.eval_batch_size")

  info = kd_data.get_info(cfg.data.name, data_dir=cfg.data.data_dir)
  num_classes = int(info.num_classes)
  train_ds = kd_data.cache.training_set(cfg)
  eval_ds = kd_data.load_arrays(cfg.data.name, cfg.data.eval_split, data_dir=cfg.data.data_dir,
                                download=cfg.data.download)
  view = kd_data.cache.experiment_view(cfg)
  loader = kd_data.Loader(train_ds, batch_size=cfg.data.batch_size, seed=cfg.run.seed, shuffle=True,
                          drop_remainder=True, view=view, view_mode=cfg.data.view_mode,
                          process_index=jax.process_index(), process_count=jax.process_count())
  spe = loader.steps_per_epoch
  init_steps = int(round(cfg.method.init_epochs * spe))
  main_steps = cfg.optim.steps or int(math.ceil(cfg.optim.epochs * spe))
  total_steps = init_steps + main_steps

  # Models. Students get distinct seeds (DML needs different initialisations).
  n_students = cfg.num_students if cfg.mode == "dml" else 1
  if cfg.student.checkpoint:  # start from a trained model (its RNG streams still come from the run's seed)
    students = [load_model(cfg.student, num_classes, role="student", seed=cfg.run.seed * 1000)[0]]
  else:
    students = [_create(cfg.student, num_classes, seed=cfg.run.seed * 1000 + i) for i in range(n_students)]
  s_info = _model_info(students[0], cfg.student.name, num_classes)

  method_cfg = cfg.method if cfg.mode != "teacher" else dataclasses.replace(cfg.method, name="ce", terms=())
  teacher_cfgs: list[ModelConfig] = []
  if cfg.mode in ("offline", "born_again", "multi_teacher"):
    teacher_cfgs = [cfg.teacher] + (list(cfg.extra_teachers) if cfg.mode == "multi_teacher" else [])
    if teacher_checkpoint:
      teacher_cfgs[0] = dataclasses.replace(teacher_cfgs[0], checkpoint=teacher_checkpoint)
  # Build the method against the (first) teacher's description to validate
  # feature names before any teacher is loaded or any step compiled.
  t_info = None
  if cfg.mode in ("offline", "born_again", "multi_teacher"):
    t_model_abstract = nnx.eval_shape(lambda: _create(teacher_cfgs[0], num_classes, seed=0))
    t_info = _model_info(t_model_abstract, teacher_cfgs[0].name, num_classes)
  elif cfg.mode in ("dml", "self_ema"):
    t_info = s_info
  method = methods.build(method_cfg, s_info, t_info)
  method.validate(s_info, t_info)
  if cfg.method.init_epochs > 0 and not method.stage_terms("init"):
    raise ValueError(f"method.init_epochs={cfg.method.init_epochs}: method {method.name!r} has no init stage "
                     f"(two-stage methods: fitnet, ab, ft, fsp); set --method.init_epochs 0")

  teachers, hashes = [], []
  needs = method.needs_teacher or cfg.mode in ("multi_teacher",)
  for i, tcfg in enumerate(teacher_cfgs):
    if not tcfg.checkpoint and not needs:
      continue  # e.g. `ce` baseline with no teacher: no diagnostics vs teacher
    role = "teacher" if i == 0 else f"extra_teachers[{i - 1}]"
    m, h = load_teacher(tcfg, num_classes, role=role)
    teachers.append(m)
    hashes.append(h)
  teacher_hash = "+".join(hashes) if hashes else None
  if cfg.data.teacher_cache:  # cached teacher logits ride in the batch
    loader = kd_data.cache.loader_for_experiment(cfg, loader, teacher_hash=teacher_hash,
                                                 needs_teacher_features=method.needs_teacher_features,
                                                 method_name=method.name)

  tx, schedule = make_optimizer(cfg.optim, spe, total_steps, init_steps)

  # Split models into (graphdef, params, rest).
  s_defs, s_params, s_rests = [], [], []
  for m in students:
    g, p, r = split_model(m)
    s_defs.append(ModelDef(g, s_info, tuple(m.input_shape)))
    s_params.append(p)
    s_rests.append(r)
  t_defs, t_params, t_rests = [], [], []
  for m, tcfg in zip(teachers, teacher_cfgs):
    g, p, r = split_model(m)
    ti = _model_info(m, tcfg.name, num_classes)
    t_defs.append(ModelDef(g, ti, tuple(m.input_shape)))
    t_params.append(p)
    t_rests.append(r)

  # Method adapters/state from abstract example outputs.
  key = jax.random.key(cfg.run.seed)
  x_shape = (2, *students[0].input_shape)
  x_dtype = jnp.int32 if cfg.student.name == "transformer_lm" else jnp.float32
  x_abs = jax.ShapeDtypeStruct(x_shape, x_dtype)
  s_out = jax.eval_shape(lambda p, r, x: apply_model(s_defs[0].graphdef, p, r, x, train=False)[0], s_params[0], s_rests[0], x_abs)
  if t_defs:
    t_out = jax.eval_shape(lambda p, r, x: apply_model(t_defs[0].graphdef, p, r, x, train=False)[0], t_params[0], t_rests[0], x_abs)
  elif cfg.mode in ("dml", "self_ema"):
    t_out = s_out
  else:
    t_out = None
  init_info = InitInfo(student=s_info, teacher=t_info, num_examples=len(train_ds))
  adapters, mstates = [], []
  for i in range(n_students):
    a, s = method.init(jax.random.fold_in(jax.random.fold_in(key, 7), i), s_out, t_out, init_info)
    adapters.append(a)
    mstates.append(s)

  ema = ()
  if cfg.mode == "self_ema":
    ema = (jax.tree.map(lambda x: x, s_params[0]), jax.tree.map(lambda x: x, s_rests[0]))
  trainable = {"students": tuple(s_params), "adapters": tuple(adapters)}
  opt_state = tx.init(trainable)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=tuple(s_params), model_state=tuple(s_rests),
                     opt_state=opt_state, adapter_params=tuple(adapters), method_state=tuple(mstates),
                     key=jax.random.key_data(jax.random.fold_in(key, 1)), ema=ema)
  fsdp = cfg.run.mesh_fsdp > 1
  state = _global_put(state, sharding.state_shardings(state, mesh, fsdp=fsdp))
  teacher = TeacherState(params=tuple(t_params), model_state=tuple(t_rests))
  teacher = _global_put(teacher, sharding.param_shardings(teacher, mesh, fsdp=fsdp))

  common = dict(students=tuple(s_defs), teachers=tuple(t_defs), method=method, tx=tx, mode=cfg.mode,
                steps_per_epoch=spe, grad_accum=cfg.optim.grad_accum, teacher_weights=cfg.method.teacher_weights,
                multi_teacher=cfg.method.multi_teacher, ema_decay=cfg.method.ema_decay)
  spec = StepSpec(stage="main", **common)
  init_spec = StepSpec(stage="init", **common) if init_steps > 0 and method.stage_terms("init") else None
  return Run(cfg=cfg, mesh=mesh, loader=loader, eval_ds=eval_ds, view=view, spec=spec, init_spec=init_spec,
             state=state, teacher=teacher, teacher_hash=teacher_hash, total_steps=total_steps,
             init_steps=init_steps if init_spec else 0, schedule=schedule, num_classes=num_classes,
             student_model=students[0])


def shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def jit_train_step(spec: StepSpec, run: Run, state_shardings: Any = None, xla_cpu_conv: str = "eigen"):
  """Jit once with explicit in/out shardings; the state is donated.

  ``xla_cpu_conv`` picks the CPU convolution kernels (``kdjax.engine.xla_cpu``).
  """
  st = state_shardings if state_shardings is not None else shardings_of(run.state)
  return jax.jit(make_train_step(spec), in_shardings=(st, shardings_of(run.teacher), sharding.batch_sharding(run.mesh)),
                 out_shardings=(st, sharding.replicated(run.mesh)), donate_argnums=(0,),
                 compiler_options=xla_cpu.compiler_options(xla_cpu_conv))


def evaluate(run: Run, state: TrainState, eval_fn) -> dict[str, float]:
  """Diagnostics over the whole eval split (student acc., teacher acc.,
  agreement, KL(teacher‖student), ECE, linear CKA of pooled features)."""
  from kdjax import data as kd_data
  from kdjax import report

  sums: dict[str, float] = {}
  s_pool, t_pool = [], []
  n_pool = 0
  # Each process reads its own rows of every global eval batch; the global
  # arrays assembled from them hold the whole batch.
  for b in kd_data.eval_batches(run.eval_ds, run.cfg.data.eval_batch_size, view=run.view):
    gb = sharding.shard_batch({k: b[k] for k in ("image", "label", "mask")}, run.mesh)
    out, sp, tp = eval_fn(state, run.teacher, gb)
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + np.asarray(_to_host(v), np.float64)
    if n_pool < CKA_EXAMPLES and tp is not None:
      m = _to_host(gb["mask"])
      s_pool.append(_to_host(sp).reshape(len(m), -1)[m])
      t_pool.append(_to_host(tp).reshape(len(m), -1)[m])
      n_pool += int(m.sum())
  res = {k: float(v) for k, v in report.finalize_eval_stats(sums).items()}
  if s_pool:
    x = np.concatenate(s_pool)[:CKA_EXAMPLES].astype(np.float64)
    y = np.concatenate(t_pool)[:CKA_EXAMPLES].astype(np.float64)
    res["cka"] = float(report.linear_cka(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  return res


def _prepare_workdir(cfg: Experiment) -> Path:
  workdir = Path(cfg.run.workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"run.workdir {str(workdir)!r} is not writable ({e.strerror}); choose another --run.workdir") from None
  cfg_path = workdir / "config.json"
  h = cfg_lib.config_hash(cfg)
  if cfg_path.exists():
    try:
      old_hash = json.loads(cfg_path.read_text()).get("config_hash")
    except (ValueError, AttributeError):
      raise ValueError(f"run.workdir {str(workdir)!r} has an unreadable config.json; move it away (the checkpoints "
                       f"carry the config too) or use a new --run.workdir") from None
    if old_hash and old_hash != h:
      raise ValueError(f"run.workdir {str(workdir)!r} holds a different experiment (config hash {old_hash}, this one "
                       f"{h}); use a new --run.workdir to keep both")
  return workdir


def _write_json(path: Path, obj: Any) -> None:
  if jax.process_index() != 0:
    return
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  os.replace(tmp, path)


def fit(cfg: Experiment, *, teacher_checkpoint: str | None = None, fault: Fault | None = None) -> dict:
  """Train one run (resuming if its workdir has a checkpoint); returns results.

  Args:
    cfg: the experiment.
    teacher_checkpoint: overrides ``cfg.teacher.checkpoint`` (born-again).
    fault: testing hook (see :class:`Fault`); default: read from the
      ``KDJAX_FAULT_AT_STEP`` environment variable.

  Raises:
    ValueError: bad input (data, models, method, teacher, workdir), before any
      step runs and before anything in the workdir is touched.
    Preempted: SIGTERM/SIGINT arrived; the current step was finished and saved.
    NonFiniteLoss: a loss term became NaN/Inf; nothing after the last good
      checkpoint was saved.
  """
  if cfg.mode == "born_again":
    return _born_again(cfg)
  from kdjax import report

  fault = fault if fault is not None else fault_from_env()
  # Everything that can reject the inputs (data, models, method, teacher) runs
  # before the workdir is looked at, so each bad input gets its own message.
  run = build(cfg, teacher_checkpoint=teacher_checkpoint)
  workdir = _prepare_workdir(cfg)
  h = cfg_lib.config_hash(cfg)
  provenance = {"config": cfg_lib.to_dict(cfg), "config_hash": h, "teacher_hash": run.teacher_hash,
                "versions": ckpt.library_versions(), "git_commit": ckpt.git_commit()}

  checkpointer = ckpt.Checkpointer(workdir / "checkpoints", save_every=cfg.run.checkpoint_every,
                                   max_to_keep=cfg.run.max_to_keep)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
  try:
    restored = checkpointer.restore_latest(abstract)
  except BaseException:
    checkpointer.close()
    raise
  state = run.state
  elapsed_before, best, history_best_step, resumed_from = 0.0, -1.0, None, []
  if restored is not None:
    step0, state, meta = restored
    if meta.get("config_hash") != h:
      checkpointer.close()
      raise ValueError(f"the checkpoint {str(checkpointer.directory / str(step0))!r} belongs to another experiment "
                       f"(config hash {meta.get('config_hash')}, this one {h}); use a new --run.workdir")
    if meta.get("teacher_hash") != run.teacher_hash:
      checkpointer.close()
      raise ValueError(f"the checkpoint in {str(workdir)!r} was trained with teacher {meta.get('teacher_hash')} but "
                       f"the configured teacher is {run.teacher_hash}; use a new --run.workdir")
    run.loader.restore(meta["data"])
    elapsed_before = float(meta.get("seconds", 0.0))
    best = float(meta.get("best_test_accuracy", -1.0))
    history_best_step = meta.get("best_step")
    resumed_from = [*meta.get("resumed_from", []), step0]
    log.info("resuming %s from step %d (%s)", workdir, step0, checkpointer.directory / str(step0))
  _write_json(workdir / "config.json", provenance)
  state_shardings = shardings_of(run.state)
  run.state = None  # donated below; never reuse

  conv = cfg.run.xla_cpu_conv
  step_main = jit_train_step(run.spec, run, state_shardings, conv)
  step_init = jit_train_step(run.init_spec, run, state_shardings, conv) if run.init_spec else None
  eval_fn = jax.jit(make_eval_step(run.spec, report.eval_batch_stats),
                    compiler_options=xla_cpu.compiler_options(conv))

  writer = report.MetricWriter(workdir, quiet=cfg.run.quiet) if jax.process_index() == 0 else None
  spe = run.loader.steps_per_epoch
  eval_every = cfg.run.eval_every or spe
  start = int(state.step)
  stop = {"flag": False}
  multihost = jax.process_count() > 1

  def on_signal(signum, frame):  # finish the step, save, exit
    del signum, frame
    stop["flag"] = True

  # Multi-host: JAX's preemption service owns SIGTERM and agrees on a step
  # (`reached_preemption_sync_point`); a local handler would desynchronise hosts.
  signals = (signal.SIGINT,) if multihost else (signal.SIGTERM, signal.SIGINT)
  old_handlers = {s: signal.signal(s, on_signal) for s in signals}
  t0 = time.perf_counter()
  pending: list[tuple[int, dict]] = []
  last_good: int | None = checkpointer.all_steps()[-1] if checkpointer.all_steps() else None
  last_eval: dict[str, float] = {}

  def meta(step: int) -> dict:
    return {"data": run.loader.state(), "seconds": elapsed_before + time.perf_counter() - t0, "step": step,
            "best_test_accuracy": best, "best_step": history_best_step, "resumed_from": resumed_from,
            "mesh": {k: int(v) for k, v in run.mesh.shape.items()}, "process_count": jax.process_count(), **provenance}

  def check_pending() -> None:
    """Raise on the first non-finite loss among steps not yet checked
    (nothing is checked with ``run.stop_on_nan=False``)."""
    nonlocal pending
    if not cfg.run.stop_on_nan:
      pending = []
      return
    for s, m in pending:
      bad = sorted(k for k, v in m.items() if _is_loss_key(k) and not np.isfinite(np.asarray(v)).all())
      if bad:
        terms = [k for k in bad if not k.endswith("loss/total")] or bad
        raise NonFiniteLoss(s, terms, last_good)
    pending = []

  def save(step: int, *, force: bool = False) -> None:
    nonlocal last_good
    if cfg.run.stop_on_nan:
      check_pending()  # never write a state that a non-finite step produced
    if checkpointer.save(step, state, meta(step), force=force):
      last_good = step

  it = iter(run.loader)
  bar = report.progress(range(start, run.total_steps), total=run.total_steps - start, desc=f"train {cfg.name}",
                        quiet=cfg.run.quiet or jax.process_index() != 0)
  try:
    for step in bar:
      batch = next(it)
      gb = sharding.shard_batch(batch, run.mesh)
      fn = step_init if (step_init is not None and step < run.init_steps) else step_main
      state, metrics = fn(state, run.teacher, gb)
      done = step + 1
      if fault is not None and fault.action == "NAN" and done == fault.step:
        state, metrics = _poison(state, metrics, fault.term)
      pending.append((done, metrics))
      if cfg.run.stop_on_nan and (done % cfg.run.log_every == 0 or len(pending) >= 64):
        check_pending()
      if done % cfg.run.log_every == 0 and writer:
        row = {k: float(np.asarray(v)) for k, v in metrics.items()}
        row["lr"] = float(run.schedule(step))
        row["epoch"] = done / spe
        writer.write(done, "train", row)
      if done % eval_every == 0 or done == run.total_steps:
        check_pending()
        last_eval = evaluate(run, state, eval_fn)
        acc = last_eval.get("test_accuracy", 0.0)
        if acc > best:
          best, history_best_step = acc, done
        if writer:
          writer.write(done, "eval", {**last_eval, "epoch": done / spe})
      if cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0 and done < run.total_steps:
        save(done)
      if fault is not None and fault.action != "NAN" and done == fault.step:
        _send_signal(fault.action)
      if stop["flag"] or (multihost and _preemption_sync_point(done)):
        check_pending()
        save(done, force=True)
        checkpointer.close()
        raise Preempted(done)
    check_pending()
    final_step = int(state.step)
    save(final_step, force=True)
    checkpointer.close()
  finally:
    checkpointer.close()  # waits for an in-flight save: the last good checkpoint is complete
    for s, hnd in old_handlers.items():
      signal.signal(s, hnd)
    if writer:
      writer.close()

  # Export the trained student (a later run can use it as its teacher).
  student_bytes = sharding.param_bytes(state.params[0])
  rest0 = state.model_state[0]
  bstats = ckpt.batch_stats(rest0)
  export_path = ckpt.export_model(workdir / ckpt.EXPORT_DIR, model_name=cfg.student.name, num_classes=run.num_classes,
                                  dtype=cfg.student.dtype, params=state.params[0], model_state=bstats,
                                  extra={"config_hash": h, "experiment": cfg.name, "teacher_hash": run.teacher_hash,
                                         "steps": final_step, "versions": provenance["versions"],
                                         "git_commit": provenance["git_commit"]})
  if not last_eval:
    last_eval = evaluate(run, state, eval_fn)
  seconds = elapsed_before + time.perf_counter() - t0
  results = {
      "test_accuracy": last_eval.get("test_accuracy"),
      "best_test_accuracy": max(best, last_eval.get("test_accuracy", 0.0)),
      "best_step": history_best_step,
      "teacher_test_accuracy": last_eval.get("teacher_test_accuracy"),
      "agreement": last_eval.get("agreement"),
      "teacher_student_kl": last_eval.get("teacher_student_kl"),
      "ece": last_eval.get("ece"),
      "cka": last_eval.get("cka"),
      "steps": final_step,
      "seconds": seconds,
      "process_count": jax.process_count(),
      "student_param_bytes": student_bytes,
      "resumed_from": resumed_from,
      "config_hash": h,
      "teacher_hash": run.teacher_hash,
      "student_hash": ckpt.file_hash(export_path) if export_path.exists() else None,
      "group": group_name(cfg),
      "seed": cfg.run.seed,
      "method": cfg.method.name if cfg.mode != "teacher" else "teacher",
      "mode": cfg.mode,
      "teacher": cfg.teacher.name if run.teacher_hash else None,
      "student": cfg.student.name,
      "experiment": cfg.name,
      "published": cfg.published,
      "versions": provenance["versions"],
      "git_commit": provenance["git_commit"],
      "config": provenance["config"],
  }
  _write_json(workdir / "results.json", results)
  return results


def group_name(cfg: Experiment) -> str:
  """The report cell of a run: everything but the seed, in words."""
  if cfg.mode == "teacher":
    return f"{cfg.student.name} (teacher training)"
  arrow = f"{cfg.teacher.name}→{cfg.student.name}"
  extra = f" {cfg.mode}" if cfg.mode != "offline" else ""
  data = f" +{cfg.data.transfer_split}" if cfg.data.transfer_split else ""
  if cfg.method.name == "ce":
    return f"{cfg.student.name} scratch{data}"
  return f"{arrow} {cfg.method.name}{extra}{data}"


def _born_again(cfg: Experiment) -> dict:
  """Born-again networks: generation g+1 distils from generation g."""
  teacher = cfg.teacher.checkpoint
  results = []
  for g in range(1, cfg.generations + 1):
    gcfg = cfg.replace(mode="offline", teacher=dataclasses.replace(cfg.teacher, name=cfg.teacher.name if g == 1 else cfg.student.name),
                       run=dataclasses.replace(cfg.run, workdir=str(Path(cfg.run.workdir) / f"gen{g}")))
    res = fit(gcfg, teacher_checkpoint=teacher)
    results.append(res)
    teacher = str(Path(gcfg.run.workdir))
  final = dict(results[-1])
  final["generations"] = [{"test_accuracy": r["test_accuracy"], "teacher_hash": r["teacher_hash"]} for r in results]
  Path(cfg.run.workdir).mkdir(parents=True, exist_ok=True)
  _write_json(Path(cfg.run.workdir) / "results.json", final)
  return final


def build_teacher_cache(cfg: Experiment, directory: str | Path, spec: Any = None, *,
                        max_shards: int | None = None, progress: Any = None) -> dict:
  """``kdjax cache``: the teacher of ``cfg`` over its training set, K views each.

  Lives in the engine, not in ``kdjax.data.cache``, because it loads and runs
  a model (data never imports the engine). ``spec`` is a
  :class:`kdjax.data.cache.CacheSpec` (default: one view, float16).

  Loads ``cfg.teacher`` from ``cfg.teacher.checkpoint`` (its content hash keys
  the cache) and runs it jitted in eval mode, one fixed batch shape.
  """
  from kdjax.data import cache as C
  from kdjax.data.tfds import get_info

  spec = C.CacheSpec() if spec is None else spec
  view = C.experiment_view(cfg)
  C.check_view(view)
  num_classes = int(get_info(cfg.data.name, data_dir=cfg.data.data_dir).num_classes)
  model, teacher_hash = load_teacher(cfg.teacher, num_classes)
  graphdef, params, rest = split_model(model)
  ds = C.training_set(cfg)
  example = C.view_images(view, ds.images[:1], ds.ids[:1], 0, 0)
  return C.build_cache(directory, ds, teacher_predict_fn(graphdef, params, rest, spec.top_k, cfg.run.xla_cpu_conv),
                       teacher_hash=teacher_hash, num_classes=num_classes, view=view, spec=spec,
                       output_shape=_output_shape(graphdef, params, rest, example),
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       max_shards=max_shards, progress=progress)


def teacher_predict_fn(graphdef, params, rest, top_k: int = 0, xla_cpu_conv: str = "eigen"):
  """The jitted eval-mode teacher forward a cache build calls on each batch.

  ``top_k = 0``: ``x → logits``. ``top_k > 0``: ``x → (log-probs, ids)`` of
  the k most likely classes / tokens at T = 1, selected on the device
  (:func:`kdjax.losses.teacher_topk`), so a language model's ``(B, L, V)``
  logits never travel to the host. Compiled with the online step's CPU
  convolution kernels, so a float32 cache holds the online teacher's logits
  up to XLA:CPU's shape- and batch-position-dependent rounding (a few ulp on
  CPUs without AVX-512, none on the AVX-512 machine measured).
  """
  from kdjax.losses import teacher_topk

  def fwd(p, r, x):
    z = apply_model(graphdef, p, r, x, train=False)[0].logits
    if top_k:
      return teacher_topk(z, min(top_k, z.shape[-1]))
    return z

  jitted = jax.jit(fwd, compiler_options=xla_cpu.compiler_options(xla_cpu_conv))
  return lambda x: jax.device_get(jitted(params, rest, x))


def _output_shape(graphdef, params, rest, x: np.ndarray) -> tuple[int, ...]:
  """The teacher's output per example for inputs like ``x`` (``(C,)``, or ``(L, V)`` for a language model)."""
  x_abs = jax.ShapeDtypeStruct(x.shape, x.dtype)
  out = jax.eval_shape(lambda p, r, x: apply_model(graphdef, p, r, x, train=False)[0].logits, params, rest, x_abs)
  return tuple(out.shape[1:])
