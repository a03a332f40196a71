"""Teacher sources: where a step's distillation targets come from.

A :class:`TeacherSource` is asked, inside the jitted step, for the teacher
outputs of a batch (outside the student's gradient) and for the targets each
student distils from; evaluation asks it for the reference it compares the
student with, and it may carry state of its own in ``TrainState.extra``.
The step, the Distiller and the loop ask the source; none of them compares
mode names.

  NoTeacher   the student trains alone (supervised)
  Frozen      frozen teacher models: one, or several combined (averaged logits, a mixture of their
              distributions, one loss per teacher, or each row routed to the teacher of its task); their
              outputs may also arrive in the batch (a teacher-output cache, or a split placement's teacher
              running ahead on its own devices)
  Cached      a teacher known only by the cached outputs every batch carries
  EMA         an exponential moving average of the student (self-distillation)
  Peers       the other students (deep mutual learning: k students in one step)

:func:`from_mode` is the one place a mode name becomes a source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import batch as batch_keys
from kdjax.engine.state import FunctionDef, ModelDef, TeacherState, apply_model, describe
from kdjax.errors import ConfigError
from kdjax.losses import topk_to_logits
from kdjax.methods.base import ModelInfo
from kdjax.models.base import ModelOutput
from kdjax.parallel.placement import on_device

MODES = ("teacher", "offline", "multi_teacher", "dml", "self_ema")
COMBINES = ("average", "per_teacher", "mixture", "route")


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


def stop(out: ModelOutput) -> ModelOutput:
  return jax.tree.map(jax.lax.stop_gradient, out)


def average(outs: Sequence[ModelOutput], weights: jax.Array) -> ModelOutput:
  """Weighted mean of the logits; features are the *first* output's (teachers
  of different architectures have no common feature space to average — use
  one loss per teacher for feature methods)."""
  logits = sum(weights[i] * o.logits.astype(jnp.float32) for i, o in enumerate(outs))
  return ModelOutput(logits, outs[0].features)


def mixture(outs: Sequence[ModelOutput], weights: jax.Array) -> ModelOutput:
  """The weighted mixture of the teachers' distributions, as logits (features: the first output's).

  ``log p(v) = log Σ_t w_t softmax(z_t)(v)`` (logsumexp over teachers of
  ``log w_t + log_softmax(z_t)``): softmax of these logits is the mixture at
  T = 1 (a method's temperature then softens the mixture's log-probabilities).
  ``(B, [L,] V)`` per teacher → ``(B, [L,] V)``.
  """
  logp = jnp.stack([jax.nn.log_softmax(o.logits.astype(jnp.float32), axis=-1) for o in outs])
  logw = jnp.log(weights).reshape((-1,) + (1,) * (logp.ndim - 1))
  return ModelOutput(jax.nn.logsumexp(logp + logw, axis=0), outs[0].features)


def task_ids(batch: dict, num_teachers: int) -> jax.Array:
  """``batch["task"]`` ``(B,)`` int: which teacher scores each row (one clear error line when absent)."""
  if batch_keys.TASK not in batch:
    raise ConfigError(
      f"method.multi_teacher='route' reads each row's teacher from batch[{batch_keys.TASK!r}] (0 … "
      f"{num_teachers - 1}, one int per row); this batch has keys {sorted(batch)}"
    )
  return batch[batch_keys.TASK]


def route(outs: Sequence[ModelOutput], task: jax.Array) -> ModelOutput:
  """Each row's output from the teacher its task names: row b of the result is row b of ``outs[task[b]]``.

  ``outs``: T outputs, each of all B rows (every teacher ran on every row:
  T forwards for one target; a per-row select is exact, so rows of teacher
  t hold teacher t's values bit for bit). ``task`` ``(B,)`` int in [0, T)
  (a row of any other value gets teacher 0's). Features are routed the same
  way when every teacher has the same feature names and shapes, else
  dropped (teachers of different architectures: route logit methods only).
  Returns ``(B, [L,] V)`` logits: the full logits, never a fused head.
  """

  def pick(*leaves):
    out = leaves[0]
    for t, leaf in enumerate(leaves[1:], 1):
      out = jnp.where((task == t).reshape(task.shape + (1,) * (leaf.ndim - 1)), leaf, out)
    return out

  shapes = [jax.tree.map(jnp.shape, o.features) for o in outs]
  features = jax.tree.map(pick, *(o.features for o in outs)) if all(s == shapes[0] for s in shapes) else {}
  return ModelOutput(pick(*(o.logits for o in outs)), features)


def normalized(weights: Sequence[float], n: int) -> jax.Array:
  """``weights`` (or n equal ones) scaled to sum to 1, as a float32 ``(n,)`` array."""
  w = jnp.asarray(tuple(weights) or (1.0,) * n, jnp.float32)
  return w / jnp.sum(w)


def batch_outputs(batch: dict, num_classes: int) -> list[ModelOutput] | None:
  """Teacher outputs the batch already carries, or None.

  A split placement's teacher computed them ahead on its own devices
  (``teacher_outputs``), or a teacher-output cache served them: dense
  ``teacher_logits``, or ``teacher_topk_logp``/``teacher_topk_idx`` (a dense
  view for class-level terms — dropped by XLA when unused — and the exact
  top-k for token terms).
  """
  if batch_keys.TEACHER_OUTPUTS in batch:
    return [stop(o) for o in batch[batch_keys.TEACHER_OUTPUTS]]
  if batch_keys.TEACHER_LOGITS in batch:
    return [ModelOutput(batch[batch_keys.TEACHER_LOGITS].astype(jnp.float32), {})]
  if batch_keys.TEACHER_TOPK_LOGP in batch:
    logp, idx = batch[batch_keys.TEACHER_TOPK_LOGP].astype(jnp.float32), batch[batch_keys.TEACHER_TOPK_IDX]
    return [ModelOutput(topk_to_logits(logp, idx, num_classes), {}, topk_logp=logp, topk_idx=idx)]
  return None


@dataclasses.dataclass(frozen=True)
class TeacherSource:
  """Where the targets come from. Subclasses override what differs; the defaults are "no teacher".

  ``mode`` names the source in messages and results (the Distiller's ``mode``).
  """

  mode = "teacher"
  models: tuple = ()  # frozen teacher modules (NNX or FunctionTeacher), split into ``defs`` when built
  defs: tuple = ()  # their static halves (ModelDef or FunctionDef), once built

  def check(self, num_students: int) -> None:
    """Refuse a student count this source cannot train."""
    if num_students != 1:
      raise ConfigError(f"{num_students} students given for mode={self.mode!r}; only mode='dml' trains several")

  def info(self, student: ModelInfo) -> ModelInfo | None:
    """What the method is built against: the teacher's description, or None."""
    return self.defs[0].info if self.defs else None

  def example_output(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> ModelOutput | None:
    """The teacher output a method's adapters are initialised on (``teacher_out``: the first model's)."""
    return teacher_out

  def outputs(self, spec, state, teacher: TeacherState, batch: dict) -> list[ModelOutput]:
    """Teacher outputs for ``batch`` (traced, outside the student's gradient)."""
    return []

  def targets(self, i: int, student_outs: list[ModelOutput], outputs: list[ModelOutput], batch: dict):
    """``(targets, weights)``: what student ``i`` distils from (a loss per target) and their weights."""
    return [None], jnp.ones((1,), jnp.float32)

  def groups(self, outputs: list[ModelOutput], batch: dict) -> list[tuple[ModelOutput, jax.Array]]:
    """``(teacher output, (B,) bool rows)`` per teacher whose rows the step reports apart (its loss and
    agreement: ``loss/<term>/teacher{t}``, ``train/agreement/teacher{t}``); none by default."""
    return []

  def reference(self, spec, state, teacher: TeacherState, batch: dict) -> ModelOutput | None:
    """What evaluation compares the (first) student with: agreement, KL, CKA."""
    return None

  def init_extra(self, params: tuple, rests: tuple) -> tuple:
    """State the source carries in ``TrainState.ema`` (none by default)."""
    return ()

  def update_extra(self, extra: tuple, params: tuple, rests: tuple) -> tuple:
    """That state after the optimizer step (``params``: the updated students)."""
    return extra


class NoTeacher(TeacherSource):
  """The student trains alone: supervised terms only."""


@dataclasses.dataclass(frozen=True)
class Frozen(TeacherSource):
  """Frozen teacher models in eval mode, stop-gradiented.

  Attributes:
    weights: per-teacher weights (normalised; equal when empty).
    combine: how several teachers make the targets: ``average`` (one loss on
      their weighted mean logits), ``per_teacher`` (one loss per teacher,
      weighted), ``mixture`` (one loss on the weighted mixture of their
      distributions, :func:`mixture`) or ``route`` (each row scored by the
      teacher ``batch["task"]`` names, :func:`route`; weights unused).
    several: a multi-teacher run (``mode="multi_teacher"``).
    teacher_input: the sharding a tensor-parallel teacher reads its inputs with.
    teacher_host: the teacher state's shardings when its weights live in host memory.
  """

  weights: tuple[float, ...] = ()
  combine: str = "average"
  several: bool = False
  teacher_input: Any = None
  teacher_host: Any = None

  @property
  def mode(self) -> str:  # type: ignore[override]
    return "multi_teacher" if self.several else "offline"

  def run(self, teacher: TeacherState, x: jax.Array, extra: dict | None = None) -> list[ModelOutput]:
    """The teacher models' eval-mode outputs on ``x`` (stop-gradiented), as placed; ``extra``: keyword
    arguments of the call (:func:`kdjax.batch.teacher_model_kwargs`)."""
    if self.teacher_input is not None:  # tensor-parallel teacher: whole rows on each model group
      x = jax.lax.with_sharding_constraint(x, self.teacher_input)
    if self.teacher_host is not None:  # weights held in host memory come in for this forward
      teacher = on_device(teacher, self.teacher_host)
    outs = []
    for d, p, r in zip(self.defs, teacher.params, teacher.model_state):
      if isinstance(d, FunctionDef):
        if extra:
          raise ConfigError("a teacher given as a function cannot read packed token rows: use unpacked data")
        out = ModelOutput(d.fn(p, x), {})
      else:
        out, _ = apply_model(d.graphdef, p, r, x, train=False, taps=d.taps, rngs=d.rngs, extra=extra)
      outs.append(stop(out))
    return outs

  def outputs(self, spec, state, teacher, batch):
    carried = batch_outputs(batch, spec.students[0].info.num_classes)
    if carried is not None:
      return carried
    return self.run(teacher, batch_keys.teacher_inputs(batch), batch_keys.teacher_model_kwargs(batch))

  def targets(self, i, student_outs, outputs, batch):
    if self.combine == "per_teacher" and len(outputs) > 1:
      return list(outputs), normalized(self.weights, len(outputs))
    if len(outputs) > 1:
      return [self.combined(outputs, batch)], jnp.ones((1,), jnp.float32)
    return list(outputs), jnp.ones((1,), jnp.float32)

  def combined(self, outputs: list[ModelOutput], batch: dict) -> ModelOutput:
    """Several teachers' outputs as one: routed per row, their mixture, or their (weighted) mean logits."""
    if self.combine == "route":
      return route(outputs, task_ids(batch, len(outputs)))
    if self.combine == "mixture":
      return mixture(outputs, normalized(self.weights, len(outputs)))
    return average(outputs, normalized(self.weights, len(outputs)))

  def groups(self, outputs, batch):
    if self.combine != "route" or len(outputs) < 2:
      return []
    task = task_ids(batch, len(outputs))
    return [(o, task == t) for t, o in enumerate(outputs)]

  def reference(self, spec, state, teacher, batch):
    outs = self.outputs(spec, state, teacher, batch)
    if not outs:  # no model: a student trained alone with a method that needs none
      return None
    return self.combined(outs, batch) if len(outs) > 1 else outs[0]


@dataclasses.dataclass(frozen=True)
class Cached(Frozen):
  """A teacher known only by the outputs a teacher-output cache puts in every batch."""

  def info(self, student):
    return ModelInfo(name="cached_teacher", num_classes=student.num_classes, feature_shapes={})

  def example_output(self, student_out, teacher_out):
    return ModelOutput(student_out.logits, {})

  def check_batch(self, batch) -> None:
    if not batch_keys.has_cached_teacher(batch):
      raise ConfigError(
        "this Distiller has no teacher, so every batch must carry cached teacher outputs "
        f"({', '.join(batch_keys.CACHED_TEACHER)}); got keys {sorted(batch)}"
      )


@dataclasses.dataclass(frozen=True)
class EMA(TeacherSource):
  """The teacher is an exponential moving average of the student's parameters (``decay`` per step)."""

  mode = "self_ema"
  decay: float = 0.999

  def info(self, student):
    return student

  def example_output(self, student_out, teacher_out):
    return student_out

  def outputs(self, spec, state, teacher, batch):
    carried = batch_outputs(batch, spec.students[0].info.num_classes)
    if carried is not None:
      return carried
    params, rest = state.ema
    d = spec.students[0]
    x, extra = batch_keys.teacher_inputs(batch), batch_keys.teacher_model_kwargs(batch)
    out, _ = apply_model(d.graphdef, params, rest, x, train=False, taps=d.taps, rngs=d.rngs, extra=extra)
    return [stop(out)]

  def targets(self, i, student_outs, outputs, batch):
    return list(outputs), jnp.ones((1,), jnp.float32)

  def reference(self, spec, state, teacher, batch):
    return self.outputs(spec, state, teacher, batch)[0]

  def init_extra(self, params, rests):
    return (params[0], rests[0])

  def update_extra(self, extra, params, rests):
    d = self.decay
    return (jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, extra[0], params[0]), rests[0])


@dataclasses.dataclass(frozen=True)
class Peers(TeacherSource):
  """Deep mutual learning (Zhang et al., CVPR 2018): each student distils from the others' averaged outputs."""

  mode = "dml"

  def check(self, num_students):
    if num_students < 2:
      raise ConfigError("mode='dml' (deep mutual learning) needs at least two students")

  def info(self, student):
    return student

  def example_output(self, student_out, teacher_out):
    return student_out

  def targets(self, i, student_outs, outputs, batch):
    k = len(student_outs)
    others = [stop(student_outs[j]) for j in range(k) if j != i]
    return [average(others, jnp.full((k - 1,), 1.0 / (k - 1)))], jnp.ones((1,), jnp.float32)

  def reference(self, spec, state, teacher, batch):
    d = spec.students[1]
    x = batch_keys.inputs(batch)
    return apply_model(d.graphdef, state.params[1], state.model_state[1], x, train=False, taps=d.taps, rngs=d.rngs)[0]


def from_mode(
  mode: str | None,
  num_students: int,
  teachers: Sequence[Any],
  *,
  weights: Sequence[float] = (),
  combine: str = "average",
  ema_decay: float = 0.999,
) -> TeacherSource:
  """The source a mode names (inferred from the models when None), checked against the models given."""
  if mode is None:
    mode = (
      "dml" if num_students > 1 else ("multi_teacher" if len(teachers) > 1 else "offline" if teachers else "teacher")
    )
  if mode not in MODES:
    raise ConfigError(f"mode={mode!r}; expected one of {MODES}")
  if combine not in COMBINES:
    raise ConfigError(f"multi_teacher={combine!r}; expected one of {COMBINES}")
  if mode == "multi_teacher" and len(teachers) < 2:
    raise ConfigError("mode='multi_teacher' needs at least two teachers")
  for t in teachers:
    if not isinstance(t, (nnx.Module, FunctionTeacher)):
      raise TypeError(f"teacher must be an nnx.Module or a kdjax.FunctionTeacher, got {type(t).__name__}")
  if mode == "offline":
    source = Frozen(models=tuple(teachers), weights=tuple(weights)) if teachers else Cached()
  elif mode == "multi_teacher":
    source = Frozen(models=tuple(teachers), weights=tuple(weights), combine=combine, several=True)
  else:
    source = {"teacher": NoTeacher, "dml": Peers, "self_ema": EMA}[mode]()
    source = dataclasses.replace(source, decay=ema_decay) if isinstance(source, EMA) else source
  source.check(num_students)
  return source


def split_teacher(teacher: Any, x: jax.ShapeDtypeStruct, taps) -> tuple[ModelDef | FunctionDef, Any, Any]:
  """``(static half, params, rest)`` of one frozen teacher, described on inputs like ``x``."""
  if isinstance(teacher, FunctionTeacher):
    out = jax.eval_shape(teacher.apply_fn, teacher.params, x)
    info = ModelInfo(name=teacher.name, num_classes=int(out.shape[-1]), feature_shapes={})
    return FunctionDef(teacher.apply_fn, info), teacher.params, {}
  return describe(teacher, x, taps)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What an experiment's mode asks of its teachers, decided before any model is loaded.

  Attributes:
    loads_teachers: frozen teacher models come from checkpoints (``teacher``, then ``extra_teachers``).
    several: every configured teacher is loaded and needed (``multi_teacher``).
    describes_student: the method is built against the student's own description (DML, the EMA teacher).
    one_teacher: one frozen teacher reads the data (a cross-tokenizer method may retokenize for it).
    peers: several students train together (deep mutual learning).
    alone: the student trains on the data alone (teacher training): the method is cross-entropy.
    generations: a loop over runs, each generation taught by the previous one (born-again networks).
    label: the words a report adds to the run's name ("" for one frozen teacher).
  """

  mode: str
  loads_teachers: bool
  several: bool
  describes_student: bool
  one_teacher: bool
  peers: bool
  alone: bool
  generations: bool
  label: str

  def source(
    self, num_students: int, models: Sequence[Any], *, cached: bool, weights=(), combine="average", ema_decay=0.999
  ) -> TeacherSource:
    """The source for the loaded ``models`` (a run whose teacher is absent and not cached trains alone)."""
    mode = self.mode
    if self.one_teacher:
      mode = "offline" if (models or cached) else "teacher"
    return from_mode(mode, num_students, models, weights=weights, combine=combine, ema_decay=ema_decay)


def plan(mode: str) -> Plan:
  """The :class:`Plan` of an experiment's ``mode`` (``born_again`` runs as ``offline`` in each generation)."""
  return Plan(
    mode=mode,
    loads_teachers=mode in ("offline", "born_again", "multi_teacher"),
    several=mode == "multi_teacher",
    describes_student=mode in ("dml", "self_ema"),
    one_teacher=mode in ("offline", "born_again"),
    peers=mode == "dml",
    alone=mode == "teacher",
    generations=mode == "born_again",
    label="" if mode == "offline" else mode,
  )
