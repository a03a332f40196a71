"""What a Distiller builds before its first step, and the rules it checks.

:func:`build_pieces` splits the models (``nnx.split`` → a static graph and
two states), describes them on example inputs (abstractly), builds and
validates the method against those descriptions, and returns the function
that makes the initial :class:`~kdjax.engine.state.TrainState`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.engine import teachers
from kdjax.engine.split_teacher import RunAhead
from kdjax.engine.state import ModelDef, TeacherState, TrainState, abstract_output, describe
from kdjax.engine.taps import method_taps
from kdjax.engine.step import make_train_step
from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig
from kdjax.methods import build as build_method
from kdjax.methods.base import Context, InitInfo, Method, ModelInfo
from kdjax.models.base import ModelOutput
from kdjax.parallel import placement as placement_lib
from kdjax.parallel import sharding, xla_cpu
from kdjax.parallel.placement import Placement
from kdjax.responses import ResponseConfig


@dataclasses.dataclass(frozen=True)
class Built:
  """A Distiller's pieces for one input shape (nothing placed yet)."""

  student_defs: tuple[ModelDef, ...]
  source: teachers.TeacherSource
  method: Method
  teacher: TeacherState
  params: tuple
  rests: tuple
  make: Callable[[jax.Array, tuple, tuple], TrainState]  # (key, params, rests) -> the initial state
  student_out: ModelOutput
  teacher_out: ModelOutput | None


def _describe(model: nnx.Module, x: jax.ShapeDtypeStruct, taps) -> tuple[ModelDef, Any, Any]:
  """A student's static half (described on inputs like ``x``), params and other state."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"student must be an nnx.Module, got {type(model).__name__}")
  return describe(model, x, taps)


def _bind_teachers(
  source: teachers.TeacherSource, x, taps, method, placement: Placement
) -> tuple[teachers.TeacherSource, TeacherState]:
  """The source with its teachers' static halves (tapped where ``taps`` and the method's layer map say), and
  their (unplaced) state, floating parameters cast once to ``placement.teacher_dtype``."""
  defs, params, rests = [], [], []
  for t in source.models:
    d, p, r = teachers.split_teacher(t, x, method_taps(method, t, taps, student=False))
    defs.append(d)
    params.append(placement_lib.cast_floating(p, placement_lib.held_dtype(t, placement)))
    rests.append(r)
  return dataclasses.replace(source, defs=tuple(defs)), TeacherState(params=tuple(params), model_state=tuple(rests))


def _method(method_arg, source: teachers.TeacherSource, s_info: ModelInfo, t_info: ModelInfo | None) -> Method:
  """The method, built and validated against the models; feature methods refused for a logits-only teacher."""
  m = MethodConfig(name=method_arg) if isinstance(method_arg, str) else method_arg
  function_teacher = any(isinstance(t, teachers.FunctionTeacher) for t in source.models)
  logits_only = function_teacher or isinstance(source, teachers.Cached)
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


def _first_teacher_output(source: teachers.TeacherSource, teacher: TeacherState, x) -> ModelOutput | None:
  if not source.defs:
    return None
  d = source.defs[0]
  if isinstance(d, ModelDef):
    return abstract_output(d.graphdef, teacher.params[0], teacher.model_state[0], x, d.taps, d.rngs)
  return jax.eval_shape(lambda p, x: ModelOutput(d.fn(p, x), {}), teacher.params[0], x)


def build_pieces(distiller, x: jax.ShapeDtypeStruct) -> Built:
  """Everything ``distiller`` needs for inputs like ``x``: model halves, the method, the initial-state maker."""
  described = [_describe(m, x, method_taps(distiller.method_arg, m, distiller.taps, True)) for m in distiller.students]
  defs = tuple(d for d, _, _ in described)
  params, rests = tuple(p for _, p, _ in described), tuple(r for _, _, r in described)
  source, teacher = _bind_teachers(
    distiller.source, x, distiller.teacher_taps, distiller.method_arg, distiller.placement
  )
  s_info = defs[0].info
  t_info = source.info(s_info)
  method = _method(distiller.method_arg, source, s_info, t_info)
  s_out = abstract_output(defs[0].graphdef, params[0], rests[0], x, defs[0].taps, defs[0].rngs)
  t_out = source.example_output(s_out, _first_teacher_output(source, teacher, x))
  info = InitInfo(student=s_info, teacher=t_info, num_examples=distiller.num_examples)
  tx, n = distiller.optimizer, len(defs)

  def make(key, params, rests):
    pieces = [method.init(jax.random.fold_in(jax.random.fold_in(key, 7), i), s_out, t_out, info) for i in range(n)]
    adapters, mstates = tuple(a for a, _ in pieces), tuple(s for _, s in pieces)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state=rests,
      opt_state=tx.init({"students": params, "adapters": adapters}),
      adapter_params=adapters,
      method_state=mstates,
      key=jax.random.key_data(jax.random.fold_in(key, 1)),
      ema=source.init_extra(params, rests),
    )

  return Built(defs, source, method, teacher, params, rests, make, s_out, t_out)


def _generates(model) -> bool:
  return hasattr(model, "decode") and hasattr(model, "init_cache")


def check_responses(responses: ResponseConfig | None, source: teachers.TeacherSource, students: tuple) -> None:
  """Generated responses need one student that generates, scored by frozen teacher models (several only
  on the student's samples; for SeqKD, one that generates)."""
  if responses is None:
    return
  if not isinstance(source, teachers.Frozen) or len(students) != 1:
    raise ConfigError(
      f"responses (on-policy / SeqKD) train one student from frozen teachers (mode='offline' or "
      f"'multi_teacher'), not mode={source.mode!r}"
    )
  if source.several and responses.needs_teacher:
    raise ConfigError(
      "responses.others='teacher' (SeqKD) generates with one teacher; several teachers score the "
      "student's own samples (responses.student_fraction=1, or others='data')"
    )
  if not _generates(students[0]):
    raise ConfigError(
      f"responses: the student ({type(students[0]).__name__}) cannot generate; it needs "
      "init_cache/decode (see kdjax.generate)"
    )
  if not source.models:
    raise ConfigError(
      "responses: generated responses are scored by a teacher model; a teacher-output cache "
      "holds outputs for the data's responses only"
    )
  if responses.needs_teacher and not _generates(source.models[0]):
    raise ConfigError(
      "responses.others='teacher' (SeqKD) needs a teacher that generates (an NNX model with init_cache/decode)"
    )


def check_placement(placement: Placement, source: teachers.TeacherSource, responses, teacher_mesh) -> None:
  """A placement other than the default places teacher models: the run needs some, and a split teacher
  cannot score responses generated inside the step."""
  if placement.kind == "colocated" and placement.teacher_memory == "device":
    return
  if not source.models:
    raise ConfigError(
      f"placement={placement} places a teacher model, but this run has none (mode={source.mode!r}); use "
      "the default placement"
    )
  if placement.split and responses is not None:
    raise ConfigError(
      "placement.teacher_devices: the teacher runs ahead on the data's batches on its own devices, "
      "but generated responses are scored inside the step; use 0 (placement.model may still shard "
      "the teacher)"
    )
  placement_lib.check_memory_kind(teacher_mesh, placement.teacher_memory)


def check_abstract(built: Built, spec, batch, full_step: bool) -> dict[str, Any]:
  """``Distiller.check``: the initial state and the metrics of every stage, traced abstractly."""
  state = jax.eval_shape(built.make, jax.random.key(0), built.params, built.rests)
  stages = [st for st in ("init", "main") if spec.method.stage_terms(st)]
  if full_step:
    step = lambda st: make_train_step(dataclasses.replace(spec, stage=st))  # noqa: E731
    return {"state": state, "metrics": {st: jax.eval_shape(step(st), state, built.teacher, batch)[1] for st in stages}}
  ctx = Context(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.float32), key=jax.random.key(1))

  def metrics(stage):
    def loss(adapters, method_state, student_out, teacher_out, batch):
      return spec.method.loss(adapters, method_state, student_out, teacher_out, batch, ctx, stage=stage)[2]

    args = (state.adapter_params[0], state.method_state[0], built.student_out, built.teacher_out, batch)
    return jax.eval_shape(loss, *args)

  return {"state": state, "metrics": {st: metrics(st) for st in stages}}


def place_teacher(distiller, teacher: TeacherState):
  """The teachers' state placed where ``distiller.placement`` says, the step spec whose source reads it so
  (tensor-parallel inputs, weights in host memory), and a split teacher's :class:`RunAhead` (or None)."""
  p, mesh, spec = distiller.placement, distiller.teacher_mesh, distiller.spec
  if p.kind == "colocated":
    shard = sharding.param_shardings(teacher, mesh, fsdp=distiller.fsdp)
    if p.teacher_memory != "device":
      shard = jax.tree.map(lambda s: s.with_memory_kind(p.teacher_memory), shard)
  else:
    shard = placement_lib.teacher_shardings(distiller.source.models, teacher, mesh, p)
  state = sharding.global_put(teacher, shard)
  if isinstance(spec.source, teachers.Frozen):
    source = dataclasses.replace(
      spec.source,
      teacher_host=shard if p.teacher_memory != "device" else None,
      teacher_input=sharding.teacher_batch_sharding(mesh) if mesh.shape.get("model", 1) > 1 else None,
    )
    spec = dataclasses.replace(spec, source=source)
  run_ahead = None
  if p.split:
    options = xla_cpu.compiler_options(distiller.xla_cpu_conv)
    run_ahead = RunAhead(spec.source, state, mesh, distiller.mesh, distiller.check_batch_size, options)
  return state, spec, run_ahead
