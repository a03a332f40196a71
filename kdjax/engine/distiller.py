"""The public distillation core: any Flax NNX student, any teacher(s), any method.

    distiller = kdjax.Distiller(student, teacher, method="kd", optimizer=optax.adam(1e-3))
    state = distiller.init(jax.random.key(0), example_batch)   # sharded over the mesh
    for batch in batches:                                        # dicts of NumPy arrays
      state, metrics = distiller.step(state, batch)              # one jitted program, state donated
    distiller.evaluate(state, eval_batches)                      # accuracy, agreement, KL, ECE, CKA
    distiller.export(state, "exported/")

A batch follows :mod:`kdjax.batch`. ``step`` takes this process's rows of the
global batch (NumPy) or global ``jax.Array``s. The teacher is a jit argument
placed once on the mesh, never a constant folded into the program. The CLI's
``fit``, the benchmarks and the tests build their steps through this class.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdjax import batch as B
from kdjax.engine import sharding, xla_cpu
from kdjax.engine import teacher_placement as TP
from kdjax.errors import ConfigError
from kdjax.placement import Placement
from kdjax.responses import ResponseConfig
from kdjax.engine.taps import resolve
from kdjax.engine.state import FunctionDef, ModelDef, TeacherState, TrainState, apply_model, split_model
from kdjax.engine.step import StepSpec, make_eval_step, make_train_step, run_teachers, with_responses
from kdjax.methods import MethodConfig
from kdjax.methods import build as build_method
from kdjax.methods.base import Context, InitInfo, Method, ModelInfo
from kdjax.models.base import ModelOutput

MODES = ("teacher", "offline", "multi_teacher", "dml", "self_ema")
CKA_EXAMPLES = 1024


@dataclasses.dataclass(frozen=True)
class FunctionTeacher:
  """A teacher given as a pure function ``apply_fn(params, inputs) -> logits``.

  For a teacher converted from another framework, a Linen model's ``apply``
  or an exported kdjax model. It serves logit methods (KD, DKD, DIST, token
  divergences); feature methods need an NNX teacher whose layers they can tap.
  """

  apply_fn: Callable[[Any, jax.Array], jax.Array]
  params: Any
  name: str = "function_teacher"


def abstract_output(graphdef, params, rest, x, taps=()) -> ModelOutput:
  """The eval-mode output of a split model on inputs like ``x``, as shapes (traced once per shape)."""
  leaves, treedef = jax.tree.flatten((params, rest))
  shapes = tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in leaves)
  return _abstract_output(graphdef, treedef, shapes, jax.ShapeDtypeStruct(x.shape, x.dtype), tuple(taps))


@functools.lru_cache(maxsize=256)
def _abstract_output(graphdef, treedef, shapes, x, taps) -> ModelOutput:
  params, rest = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
  return jax.eval_shape(lambda p, r, x: apply_model(graphdef, p, r, x, train=False, taps=taps)[0], params, rest, x)


def _as_tuple(x) -> tuple:
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _infer_mode(mode: str | None, students: tuple, teachers: tuple) -> str:
  if mode is None:
    mode = (
      "dml" if len(students) > 1 else ("multi_teacher" if len(teachers) > 1 else "offline" if teachers else "teacher")
    )
  if mode not in MODES:
    raise ConfigError(f"mode={mode!r}; expected one of {MODES}")
  if mode == "dml" and len(students) < 2:
    raise ConfigError("mode='dml' (deep mutual learning) needs at least two students")
  if mode != "dml" and len(students) != 1:
    raise ConfigError(f"{len(students)} students given for mode={mode!r}; only mode='dml' trains several")
  if mode == "multi_teacher" and len(teachers) < 2:
    raise ConfigError("mode='multi_teacher' needs at least two teachers")
  return mode


class Distiller:
  """One distillation step for any NNX student(s) and teacher(s), sharded over a mesh.

  Args:
    student: a Flax NNX module returning logits or ``ModelOutput`` (several
      for ``mode="dml"``). Its current parameters are the starting point.
    teacher: an NNX module, a :class:`FunctionTeacher`, several of them
      (``multi_teacher``), or None (supervised training, or ``self_ema``).
    method: a preset name (``"kd"``, ``"crd+kd"``, …), a
      :class:`kdjax.methods.MethodConfig` (hyper-parameters, term weights) or
      a built :class:`kdjax.methods.Method`.
    optimizer: an optax transformation over the student and the method's
      adapters (FitNet regressors, CRD heads, …).
    mesh: a ``("data", "fsdp")`` mesh (default: every device on ``data``);
      with ``placement.teacher_devices`` the devices it holds are partitioned
      into the teacher's and the student's sub-meshes.
    mode: ``teacher``, ``offline``, ``multi_teacher``, ``dml``, ``self_ema``;
      inferred from the models when None.
    taps: feature name → module path of the *student* (e.g. ``{"stage2":
      "layer3.1.conv2"}``): the output of that layer becomes
      ``features[name]`` for the method, captured without editing the model.
    teacher_taps: the same for the teacher(s).
    num_examples: training-set size (rows of CRD's memory bank).
    steps_per_epoch: the epoch clock of schedules inside methods (DKD warm-up).
    grad_accum: micro-batches per optimizer step.
    fsdp: split large parameters over the mesh's ``fsdp`` axis (default:
      when that axis has more than one device).
    teacher_weights / multi_teacher / ema_decay: multi-teacher weights and
      combination (``average`` or ``per_teacher``), EMA decay of ``self_ema``.
    xla_cpu_conv: CPU convolution kernels (``kdjax.engine.xla_cpu``).
    responses: for language models, train on generated responses
      (:class:`kdjax.ResponseConfig`): on-policy samples from the student
      (GKD), the teacher's (SeqKD), or the data's (default).
    placement: where the teacher lives (:class:`kdjax.Placement`): with the
      student (default), tensor-parallel over a ``model`` axis, or on its own
      sub-mesh running one batch ahead (then :meth:`prefetch` dispatches its
      forward for the next batch; :func:`kdjax.train` does so).
  """

  def __init__(
    self,
    student: nnx.Module | Sequence[nnx.Module],
    teacher: Any = None,
    *,
    method: str | MethodConfig | Method = "kd",
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh | None = None,
    mode: str | None = None,
    taps: Mapping[str, str] | None = None,
    teacher_taps: Mapping[str, str] | None = None,
    num_examples: int = 0,
    steps_per_epoch: int = 1,
    grad_accum: int = 1,
    fsdp: bool | None = None,
    teacher_weights: Sequence[float] = (),
    multi_teacher: str = "average",
    ema_decay: float = 0.999,
    xla_cpu_conv: str = "eigen",
    responses: ResponseConfig | None = None,
    placement: Placement | None = None,
  ):
    self.students = _as_tuple(student)
    self.teachers = _as_tuple(teacher)
    self.mode = _infer_mode(mode, self.students, self.teachers)
    self.method_arg = method
    self.optimizer = optimizer
    self.placement = placement if placement is not None else Placement()
    self.mesh, self.teacher_mesh = placement_meshes(mesh, self.placement)
    self.fsdp = bool(self.mesh.shape.get("fsdp", 1) > 1) if fsdp is None else bool(fsdp)
    self.taps = tuple(sorted(dict(taps or {}).items()))
    self.teacher_taps = tuple(sorted(dict(teacher_taps or {}).items()))
    if grad_accum < 1:
      raise ConfigError(f"grad_accum={grad_accum} must be ≥ 1")
    self.num_examples, self.steps_per_epoch, self.grad_accum = int(num_examples), int(steps_per_epoch), grad_accum
    self.teacher_weights, self.multi_teacher, self.ema_decay = tuple(teacher_weights), multi_teacher, ema_decay
    self.xla_cpu_conv = xla_cpu_conv
    self.responses = responses if responses is not None and responses.active else None
    self._check_responses()
    self._check_placement()
    self.spec: StepSpec | None = None
    self.cross_tokenizer = False
    self.teacher_state: TeacherState | None = None
    self.state_shardings: Any = None
    self._steps: dict[str, Callable] = {}
    self._eval: Callable | None = None
    self._generators: dict = {}
    self._responses_fn: Callable | None = None
    self._teacher_fns: dict[bool, Callable] = {}
    self._ahead: collections.deque = collections.deque()  # (batch, teacher outputs) dispatched ahead

  # ------------------------------------------------------------------ building

  @staticmethod
  def _check_taps(model: nnx.Module, taps) -> None:
    for _, path in taps:  # eagerly, so a misspelt path is one clean error before anything is traced
      resolve(model, path)

  def _describe(self, graphdef, params, rest, x, name: str, taps) -> ModelInfo:
    out = abstract_output(graphdef, params, rest, x, taps)
    return ModelInfo(
      name=name,
      num_classes=int(out.logits.shape[-1]),
      feature_shapes={k: tuple(v.shape[1:]) for k, v in out.features.items()},
    )

  def _teacher_def(self, t, x) -> tuple[ModelDef | FunctionDef, Any, Any]:
    if isinstance(t, FunctionTeacher):
      out = jax.eval_shape(t.apply_fn, t.params, x)
      info = ModelInfo(name=t.name, num_classes=int(out.shape[-1]), feature_shapes={})
      return FunctionDef(t.apply_fn, info), t.params, {}
    if not isinstance(t, nnx.Module):
      raise TypeError(f"teacher must be an nnx.Module or a kdjax.FunctionTeacher, got {type(t).__name__}")
    self._check_taps(t, self.teacher_taps)
    g, p, r = split_model(t)
    info = self._describe(g, p, r, x, getattr(t, "model_name", type(t).__name__), self.teacher_taps)
    return ModelDef(g, info, tuple(x.shape[1:]), self.teacher_taps), p, r

  def _method(self, s_info: ModelInfo, t_info: ModelInfo | None) -> Method:
    m = self.method_arg
    if isinstance(m, str):
      m = MethodConfig(name=m)
    function_teacher = any(isinstance(t, FunctionTeacher) for t in self.teachers)
    logits_only = function_teacher or (self.mode == "offline" and not self.teachers)
    what = "a function returning logits only" if function_teacher else "known only by its cached outputs"
    refusal = (
      "method {!r} reads teacher features, but the teacher is " + what + "; use an NNX teacher (its "
      "layers can be tapped by path with teacher_taps=...) or a logit method"
    )
    try:
      method = m if isinstance(m, Method) else build_method(m, s_info, t_info)
    except ValueError:
      if logits_only:
        raise ConfigError(refusal.format(getattr(m, "name", m))) from None
      raise
    if logits_only and method.needs_teacher_features:
      raise ConfigError(refusal.format(method.name))
    method.validate(s_info, t_info)
    return method

  def _build(self, x) -> tuple[TrainState, TeacherState, Any]:
    """Step spec and the unplaced initial pieces, from example inputs ``x``."""
    s_defs, s_params, s_rests = [], [], []
    for m in self.students:
      if not isinstance(m, nnx.Module):
        raise TypeError(f"student must be an nnx.Module, got {type(m).__name__}")
      self._check_taps(m, self.taps)
      g, p, r = split_model(m)
      info = self._describe(g, p, r, x, getattr(m, "model_name", type(m).__name__), self.taps)
      s_defs.append(ModelDef(g, info, tuple(x.shape[1:]), self.taps))
      s_params.append(p)
      s_rests.append(r)
    t_defs, t_params, t_rests = [], [], []
    for t in self.teachers:
      d, p, r = self._teacher_def(t, x)
      t_defs.append(d)
      t_params.append(p)
      t_rests.append(r)
    s_info = s_defs[0].info
    if t_defs:
      t_info = t_defs[0].info
    elif self.mode in ("dml", "self_ema"):
      t_info = s_info
    elif self.mode == "offline":  # a teacher known only by the cached outputs its batches carry
      t_info = ModelInfo(name="cached_teacher", num_classes=s_info.num_classes, feature_shapes={})
    else:
      t_info = None
    self._teacher_info = t_info
    method = self._method(s_info, t_info)
    # A teacher of another tokenizer reads its own token rows: student-side figures compare it with nothing.
    self.cross_tokenizer = method.any_vocab
    self.spec = StepSpec(
      students=tuple(s_defs),
      teachers=tuple(t_defs),
      method=method,
      tx=self.optimizer,
      mode=self.mode,
      steps_per_epoch=self.steps_per_epoch,
      grad_accum=self.grad_accum,
      teacher_weights=self.teacher_weights,
      multi_teacher=self.multi_teacher,
      ema_decay=self.ema_decay,
      responses=self.responses,
    )
    return tuple(s_params), tuple(s_rests), TeacherState(params=tuple(t_params), model_state=tuple(t_rests))

  def _example_outputs(self, s_params, s_rests, teacher: TeacherState, x):
    spec = self.spec
    s_out = abstract_output(spec.students[0].graphdef, s_params[0], s_rests[0], x, spec.students[0].taps)
    if spec.teachers:
      td = spec.teachers[0]
      if isinstance(td, FunctionDef):
        t_out = jax.eval_shape(lambda p, x: ModelOutput(td.fn(p, x), {}), teacher.params[0], x)
      else:
        t_out = abstract_output(td.graphdef, teacher.params[0], teacher.model_state[0], x, td.taps)
    elif self.mode in (
      "dml",
      "self_ema",
      "offline",
    ):  # offline without a teacher: cached logits, shaped like the student's
      t_out = s_out if self.mode != "offline" else ModelOutput(s_out.logits, {})
    else:
      t_out = None
    return s_out, t_out

  def _check_responses(self) -> None:
    """Generated responses need a generating student and, for SeqKD, a generating NNX teacher."""
    r = self.responses
    if r is None:
      return
    if self.mode != "offline" or len(self.students) != 1:
      raise ConfigError(
        f"responses (on-policy / SeqKD) train one student from one teacher (mode='offline'), not mode={self.mode!r}"
      )
    gens = lambda m: hasattr(m, "decode") and hasattr(m, "init_cache")  # noqa: E731
    if not gens(self.students[0]):
      raise ConfigError(
        f"responses: the student ({type(self.students[0]).__name__}) cannot generate; it needs "
        "init_cache/decode (see kdjax.generate)"
      )
    if not self.teachers:
      raise ConfigError(
        "responses: generated responses are scored by a teacher model; a teacher-output cache "
        "holds outputs for the data's responses only"
      )
    if r.needs_teacher and not gens(self.teachers[0]):
      raise ConfigError(
        "responses.others='teacher' (SeqKD) needs a teacher that generates (an NNX model with init_cache/decode)"
      )

  def _check_placement(self) -> None:
    p = self.placement
    if p.kind == "colocated" and p.teacher_memory == "device":
      return
    if not self.teachers:
      raise ConfigError(
        f"placement={p} places a teacher model, but this run has none (mode={self.mode!r}); use the default placement"
      )
    if p.split and self.responses is not None:
      raise ConfigError(
        "placement.teacher_devices: the teacher runs ahead on the data's batches on its own devices, "
        "but generated responses are scored inside the step; use 0 (placement.model may still shard "
        "the teacher)"
      )
    TP.check_memory_kind(self.teacher_mesh, p.teacher_memory)

  @property
  def runs_ahead(self) -> bool:
    """Whether the teacher runs on its own devices, one batch ahead (``split`` placement)."""
    return self.placement.split

  def _place_teacher(self, teacher: TeacherState) -> None:
    """Put the teachers' state where the placement says, and tell the step how to read it."""
    p, mesh = self.placement, self.teacher_mesh
    if p.kind == "colocated":
      shard = sharding.param_shardings(teacher, mesh, fsdp=self.fsdp)
      if p.teacher_memory != "device":
        shard = jax.tree.map(lambda s: s.with_memory_kind(p.teacher_memory), shard)
    else:
      shard = TP.teacher_shardings(self.teachers, teacher, mesh, p)
    self.teacher_state = sharding.global_put(teacher, shard)
    self.spec = dataclasses.replace(
      self.spec,
      teacher_host=shard if p.teacher_memory != "device" else None,
      teacher_input=sharding.teacher_batch_sharding(mesh) if mesh.shape.get("model", 1) > 1 else None,
    )

  def check_batch_size(self, rows: int, name: str = "data.batch_size") -> None:
    """A global batch of ``rows`` must split evenly over the student's devices (and the teacher's, ``split``)."""
    if not self.placement.split:
      return sharding.check_batch_size(rows, self.mesh, name)
    t = self.teacher_mesh.size // self.teacher_mesh.shape.get("model", 1)
    total = self.teacher_mesh.size + self.mesh.size
    for n, whose in ((t, "teacher"), (self.mesh.size, "student")):
      if rows % n:
        raise ConfigError(
          f"{name}={rows} does not split over the {whose}'s {n} data-parallel devices (placement."
          f"teacher_devices={self.placement.teacher_devices} of {total}); "
          f"use a multiple of {n} or another placement.teacher_devices"
        )
    sharding.check_batch_size(rows, self.mesh, name)

  def teacher_param_bytes(self) -> dict[str, int]:
    """``{"total", "max_per_device"}`` bytes of the teachers' state (see :func:`kdjax.engine.sharding.param_bytes`)."""
    return sharding.param_bytes(self.teacher_state)

  def _initializer(self, x) -> tuple[Callable, tuple, tuple, TeacherState]:
    """``make(key, params, rests) -> TrainState`` and its unplaced inputs, for example inputs ``x``."""
    s_params, s_rests, teacher = self._build(x)
    s_out, t_out = self._example_outputs(s_params, s_rests, teacher, x)
    info = InitInfo(student=self.spec.students[0].info, teacher=self._teacher_info, num_examples=self.num_examples)
    method, tx, n, ema = self.spec.method, self.optimizer, len(self.students), self.mode == "self_ema"

    def make(key, params, rests):
      pieces = [method.init(jax.random.fold_in(jax.random.fold_in(key, 7), i), s_out, t_out, info) for i in range(n)]
      adapters, mstates = tuple(a for a, _ in pieces), tuple(s for _, s in pieces)
      trainable = {"students": params, "adapters": adapters}
      return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=rests,
        opt_state=tx.init(trainable),
        adapter_params=adapters,
        method_state=mstates,
        key=jax.random.key_data(jax.random.fold_in(key, 1)),
        ema=(params[0], rests[0]) if ema else (),
      )

    return make, s_params, s_rests, teacher

  def init(self, key: jax.Array, batch: Mapping[str, Any]) -> TrainState:
    """The initial train state, placed on the mesh (sharded under ``jit`` with ``out_shardings``).

    Builds the method against the models' outputs on ``batch``'s inputs
    (only their shapes are used) and initialises its adapters and state from
    ``key``; the students start from their current parameters.
    """
    x = B.inputs(batch)
    make, s_params, s_rests, teacher = self._initializer(jax.ShapeDtypeStruct(x.shape, x.dtype))
    self._place_teacher(teacher)
    abstract = jax.eval_shape(make, key, s_params, s_rests)
    self.state_shardings = sharding.state_shardings(abstract, self.mesh, fsdp=self.fsdp)
    self.abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings
    )
    placed = sharding.global_put((s_params, s_rests), (self.state_shardings.params, self.state_shardings.model_state))
    return jax.jit(make, out_shardings=self.state_shardings)(key, *placed)

  def check(self, batch: Mapping[str, Any], *, full_step: bool = True) -> dict[str, Any]:
    """What ``init`` and ``step`` would do, traced abstractly: nothing is placed or compiled.

    Works on abstract models (``nnx.eval_shape``), so a whole table of
    experiments can be validated in seconds. ``batch`` may hold
    ``jax.ShapeDtypeStruct``s. Returns ``state`` (abstract) and ``metrics``
    (abstract, per stage the method has): of the whole step (forward,
    gradients, optimizer), or with ``full_step=False`` of the method's loss
    on the models' outputs (≈ 10× faster to trace).
    """
    x = B.inputs(batch)
    make, s_params, s_rests, teacher = self._initializer(jax.ShapeDtypeStruct(x.shape, x.dtype))
    state = jax.eval_shape(make, jax.random.key(0), s_params, s_rests)
    stages = [st for st in ("init", "main") if self.spec.method.stage_terms(st)]
    if full_step:
      metrics = {
        st: jax.eval_shape(make_train_step(dataclasses.replace(self.spec, stage=st)), state, teacher, batch)[1]
        for st in stages
      }
    else:
      s_out, t_out = self._example_outputs(s_params, s_rests, teacher, x)
      ctx = Context(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.float32), key=jax.random.key(1))
      loss = self.spec.method.loss
      metrics = {
        st: jax.eval_shape(
          lambda p, m, so, to, b, st=st: loss(p, m, so, to, b, ctx, stage=st)[2],
          state.adapter_params[0],
          state.method_state[0],
          s_out,
          t_out,
          batch,
        )
        for st in stages
      }
    return {"state": state, "metrics": metrics}

  # ------------------------------------------------------------------ running

  def jitted_step(self, stage: str = "main") -> Callable:
    """The compiled pure step ``(state, teacher_state, global_batch) -> (state, metrics)``
    (for ahead-of-time lowering; :meth:`step` calls it)."""
    if self.spec is None:
      raise ConfigError("Distiller.step before Distiller.init: call state = distiller.init(key, batch) first")
    if stage not in self._steps:
      if stage != "main" and not self.spec.method.stage_terms(stage):
        raise ConfigError(f"method {self.spec.method.name!r} has no {stage!r} stage")
      spec = dataclasses.replace(self.spec, stage=stage)
      t_shardings = jax.tree.map(lambda a: a.sharding, self._step_teacher())
      self._steps[stage] = jax.jit(
        make_train_step(spec),
        in_shardings=(self.state_shardings, t_shardings, sharding.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=(0,),
        compiler_options=xla_cpu.compiler_options(self.xla_cpu_conv),
      )
    return self._steps[stage]

  def _step_teacher(self) -> TeacherState:
    """What the step receives as its teacher argument: nothing when the teacher runs on its own devices."""
    return TeacherState(params=(), model_state=()) if self.placement.split else self.teacher_state

  def _teacher_fn(self, features: bool) -> Callable:
    """The teachers' forward compiled on their sub-mesh: ``(teacher_state, x) -> tuple of ModelOutput``
    (features only when asked: they cross to the student's devices)."""
    if features not in self._teacher_fns:
      spec, rows = self.spec, sharding.batch_sharding(self.teacher_mesh)

      def forward(teacher, x):
        return tuple(ModelOutput(o.logits, o.features if features else {}) for o in run_teachers(spec, teacher, x))

      t_shardings = jax.tree.map(lambda a: a.sharding, self.teacher_state)
      self._teacher_fns[features] = jax.jit(
        forward,
        in_shardings=(t_shardings, rows),
        out_shardings=rows,
        compiler_options=xla_cpu.compiler_options(self.xla_cpu_conv),
      )
    return self._teacher_fns[features]

  def teacher_outputs(self, batch: Mapping[str, Any], *, features: bool | None = None) -> tuple[ModelOutput, ...]:
    """``split`` placement: the teachers' outputs on ``batch`` (this process's rows), computed on the teacher's
    sub-mesh and moved device to device onto the student's; asynchronous like any JAX call."""
    if not self.placement.split:
      raise ConfigError(
        "Distiller.teacher_outputs serves a teacher on its own devices (placement.teacher_devices > "
        "0); other placements run the teacher inside the step"
      )
    if features is None:
      features = self.spec.method.needs_teacher_features
    x = B.teacher_inputs(batch)
    self.check_batch_size(x.shape[0] * (1 if isinstance(x, jax.Array) else jax.process_count()), "batch rows")
    rows = sharding.batch_sharding(self.teacher_mesh)
    x = TP.move_rows(x, rows) if isinstance(x, jax.Array) else sharding.shard_batch({"x": x}, self.teacher_mesh)["x"]
    outs = self._teacher_fn(features)(self.teacher_state, x)
    return TP.move_tree(outs, sharding.batch_sharding(self.mesh))

  def prefetch(self, batch: Mapping[str, Any]) -> None:
    """Dispatch the teacher's forward on ``batch`` now (``split`` placement; a no-op otherwise), so it runs on
    the teacher's devices while the student trains on the previous batch. :meth:`step` on the same batch
    object then uses these outputs. Keep at most a few batches ahead: each holds its outputs on device."""
    if self.placement.split:
      self._ahead.append((batch, self.teacher_outputs(batch)))

  def _take_ahead(self, batch) -> tuple[ModelOutput, ...]:
    while self._ahead:
      b, outs = self._ahead.popleft()
      if b is batch:
        return outs
    return self.teacher_outputs(batch)

  def global_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's rows (NumPy) → global arrays split over the mesh; ``jax.Array``s pass through."""
    host = {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, jax.Array)}
    placed = sharding.shard_batch(host, self.mesh) if host else {}
    return {k: placed.get(k, v) for k, v in batch.items()}

  def train_batch(self, state: TrainState, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The rows :meth:`step` would train on from ``state`` (global arrays): with ``responses``, the
    prompts followed by the responses it samples at this step — to inspect on-policy samples."""
    if self.spec is None:
      raise ConfigError("Distiller.train_batch before Distiller.init: call state = distiller.init(key, batch) first")
    if self._responses_fn is None:
      self._responses_fn = jax.jit(functools.partial(with_responses, self.spec))
    return self._responses_fn(state, self.teacher_state, self.global_batch(batch))

  def step(self, state: TrainState, batch: Mapping[str, Any], *, stage: str = "main") -> tuple[TrainState, dict]:
    """One optimizer step; ``state`` is donated (do not reuse it).

    ``stage="init"`` runs a two-stage method's first stage (FitNet hint
    pre-training, AB/FT/FSP initialisation).
    """
    if self.mode == "offline" and not self.spec.teachers and not B.has_cached_teacher(batch):
      raise ConfigError(
        "this Distiller has no teacher, so every batch must carry cached teacher outputs "
        f"({', '.join(B.CACHED_TEACHER)}); got keys {sorted(batch)}"
      )
    if self.responses is not None and B.has_cached_teacher(batch):
      raise ConfigError(
        "responses: this step generates new responses, but the batch carries cached teacher outputs "
        "for the data's responses; run the teacher online (drop the teacher cache)"
      )
    ahead = {B.TEACHER_OUTPUTS: self._take_ahead(batch)} if self.placement.split else {}
    return self.jitted_step(stage)(state, self._step_teacher(), {**self.global_batch(batch), **ahead})

  def evaluate(self, state: TrainState, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Diagnostics over ``batches`` (this process's rows of each, with a ``mask``):
    student and teacher accuracy, agreement, KL(teacher‖student), ECE, linear CKA of pooled features."""
    from kdjax import report

    if self._eval is None:
      spec = dataclasses.replace(self.spec, teachers=()) if self.cross_tokenizer else self.spec
      self._eval = jax.jit(
        make_eval_step(spec, report.eval_batch_stats), compiler_options=xla_cpu.compiler_options(self.xla_cpu_conv)
      )
    sums: dict[str, Any] = {}
    s_pool, t_pool, n_pool = [], [], 0
    for b in batches:
      b = {k: b[k] for k in (B.INPUTS, B.LABEL, B.MASK) if k in b}
      if B.MASK not in b:
        b[B.MASK] = np.ones(np.shape(b[B.LABEL]), bool)
      gb = self.global_batch(b)
      if self.placement.split and self.mode != "teacher" and not self.cross_tokenizer:
        gb[B.TEACHER_OUTPUTS] = self.teacher_outputs(b, features=True)
      out, sp, tp = self._eval(state, self._step_teacher(), gb)
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + np.asarray(sharding.to_host(v), np.float64)
      if n_pool < CKA_EXAMPLES and tp is not None:
        m = sharding.to_host(gb[B.MASK]).reshape(-1)
        s_pool.append(sharding.to_host(sp).reshape(len(m), -1)[m])
        t_pool.append(sharding.to_host(tp).reshape(len(m), -1)[m])
        n_pool += int(m.sum())
    res = {k: float(v) for k, v in report.finalize_eval_stats(sums).items()}
    if s_pool:
      x = np.concatenate(s_pool)[:CKA_EXAMPLES]
      y = np.concatenate(t_pool)[:CKA_EXAMPLES]
      res["cka"] = float(report.linear_cka(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    return res

  def exact_match(
    self, state: TrainState, batches: Iterable[Mapping[str, Any]], *, teacher: bool = False
  ) -> dict[str, float]:
    """Exact match of greedy-generated answers over token ``batches`` (``inputs``, ``targets`` with −1 on
    prompt positions, ``mask``), the generation-time counterpart of teacher-forced token accuracy.

    Each row's prompt is its inputs up to its first scored target; the (first)
    student continues it with the KV cache (:class:`kdjax.generate.Generator`,
    temperature 0) for as many tokens as the longest answer, and the row
    counts when every answer token (the stop token included) is reproduced.
    Returns ``{"exact_match": fraction}`` (plus ``teacher_exact_match`` with
    ``teacher=True`` and a teacher that generates), or ``{}`` when the student
    cannot generate (no ``decode``).
    """
    from kdjax import generate as G

    sd = self.spec.students[0]
    student = nnx.merge(sd.graphdef, state.params[0], state.model_state[0])
    models = {"exact_match": student}
    if teacher and self.spec.teachers and not self.cross_tokenizer:  # its prompts would need its own tokens
      td = self.spec.teachers[0]
      models["teacher_exact_match"] = nnx.merge(
        td.graphdef, self.teacher_state.params[0], self.teacher_state.model_state[0]
      )
    models = {k: m for k, m in models.items() if hasattr(m, "decode") and hasattr(m, "init_cache")}
    if not models:
      return {}
    hits, total = dict.fromkeys(models, 0.0), 0.0
    for b in batches:
      prompts, lengths, answers = G.prompts_and_answers(b[B.INPUTS], b[B.LABEL])
      mask = np.asarray(b.get(B.MASK, np.ones(len(prompts), bool)), bool).reshape(len(prompts), -1).all(1)
      if answers.shape[1] == 0:
        continue
      rows = {"prompts": prompts, "lengths": lengths, "answers": answers, "mask": mask}
      gb = self.global_batch(rows)
      total += float(sharding.to_host(jnp.sum(gb["mask"])))
      for name, model in models.items():
        on_teacher = name.startswith("teacher") and self.placement.split  # the teacher generates on its sub-mesh
        gen = self._generator(name, model, answers.shape[1], self.teacher_mesh if on_teacher else self.mesh)
        if on_teacher:
          gb = sharding.shard_batch(rows, self.teacher_mesh)
        out = gen(gb["prompts"], gb["lengths"], jax.random.key(0), state=nnx.state(model))
        hits[name] += float(sharding.to_host(jnp.sum(G.answers_match(out.tokens, gb["answers"]) & gb["mask"])))
    return {k: (v / total if total else float("nan")) for k, v in hits.items()}

  def _generator(self, name: str, model: nnx.Module, max_new_tokens: int, mesh):
    """One compiled greedy :class:`~kdjax.generate.Generator` per (model role, answer length)."""
    from kdjax import generate as G

    key = (name, max_new_tokens)
    if key not in self._generators:
      self._generators[key] = G.Generator(model, G.Sampling(max_new_tokens=max_new_tokens, temperature=0.0), mesh=mesh)
    return self._generators[key]

  def export(
    self,
    state: TrainState,
    directory,
    *,
    model_name: str | None = None,
    dtype: str = "float32",
    extra: dict | None = None,
  ):
    """Write the (first) student's params and BatchNorm statistics (``kdjax.export.load`` reads them).

    Every process must call it (parameters split across processes are
    gathered); process 0 writes. Returns the params file's path.
    """
    from kdjax import checkpoint as ckpt

    info = self.spec.students[0].info
    return ckpt.export_model(
      directory,
      model_name=model_name or info.name,
      num_classes=info.num_classes,
      dtype=dtype,
      params=state.params[0],
      model_state=ckpt.batch_stats(state.model_state[0]),
      extra=extra,
    )


def placement_meshes(
  mesh: jax.sharding.Mesh | None, placement: Placement
) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh]:
  """``(student mesh, teacher mesh)`` for ``placement`` (the same mesh unless it is ``split``); a teacher
  loaded onto the teacher mesh (``from_pretrained(..., mesh=)``) is placed without moving."""
  if placement.kind == "sharded":
    mesh = mesh if mesh is not None else sharding.make_mesh(model=placement.model)
    if mesh.shape.get("model", 1) != placement.model:
      raise ConfigError(
        f"placement.model={placement.model} but the mesh's 'model' axis has "
        f"{mesh.shape.get('model', 1)} devices; build it with kdjax.make_mesh(model={placement.model})"
      )
    return mesh, mesh
  mesh = mesh if mesh is not None else sharding.make_mesh()
  if not placement.split:
    return mesh, mesh
  teacher, student = TP.split_devices(list(mesh.devices.flat), placement.teacher_devices)
  fsdp = mesh.shape.get("fsdp", 1)
  if len(student) % fsdp:
    raise ConfigError(
      f"placement.teacher_devices={placement.teacher_devices} leaves {len(student)} student devices, "
      f"which run.mesh_fsdp={fsdp} does not divide"
    )
  return (
    sharding.make_mesh(0, fsdp, devices=student),
    sharding.make_mesh(0, 1, devices=teacher, model=placement.model),
  )
