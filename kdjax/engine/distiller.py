"""The public distillation core: any Flax NNX student, any teacher source, any method.

    distiller = kdjax.Distiller(student, teacher, method="kd", optimizer=optax.adam(1e-3))
    state = distiller.init(jax.random.key(0), example_batch)   # sharded over the mesh
    for batch in batches:                                        # dicts of NumPy arrays
      state, metrics = distiller.step(state, batch)              # one jitted program, state donated
    kdjax.evaluate(distiller, state, eval_batches)               # accuracy, agreement, KL, ECE, CKA

A batch follows :mod:`kdjax.batch`. ``step`` takes this process's rows of the
global batch (NumPy) or global ``jax.Array``s. The teacher is a jit argument
placed once on the mesh, never a constant folded into the program. The CLI's
``fit``, the benchmarks and the tests build their steps through this class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from kdjax import batch as batch_keys
from kdjax.engine import evaluation, layer_similarity, teachers
from kdjax.engine.setup import Built, build_pieces, check_abstract, check_placement, check_responses, place_teacher
from kdjax.engine.split_teacher import RunAhead
from kdjax.engine.state import TeacherState, TrainState, state_shardings
from kdjax.engine.step import StepSpec, make_train_step, with_responses
from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig
from kdjax.methods.base import Method
from kdjax.parallel import placement as placement_lib
from kdjax.parallel import sharding, xla_cpu
from kdjax.parallel.placement import Placement, placement_meshes
from kdjax.responses import ResponseConfig

FunctionTeacher = teachers.FunctionTeacher


class Distiller:
  """One distillation step for any NNX student(s) and teacher source, sharded over a mesh.

  Args:
    student: a Flax NNX module returning logits or ``ModelOutput`` (several
      for ``mode="dml"``). Its current parameters are the starting point.
    teacher: an NNX module, a :class:`FunctionTeacher`, several of them
      (``multi_teacher``), None (supervised training, ``self_ema``, or
      outputs from a teacher-output cache), or a
      :class:`kdjax.engine.teachers.TeacherSource`.
    method: a preset name (``"kd"``, ``"crd+kd"``, …), a
      :class:`kdjax.methods.MethodConfig` or a built :class:`kdjax.methods.Method`.
    optimizer: an optax transformation over the student and the method's
      adapters (FitNet regressors, CRD heads, …).
    mesh: a ``("data", "fsdp")`` mesh (default: every device on ``data``);
      with ``placement.teacher_devices`` its devices are partitioned into the
      teacher's and the student's sub-meshes.
    mode: ``teacher``, ``offline``, ``multi_teacher``, ``dml``, ``self_ema``
      (inferred from the models when None): which teacher source to build.
    taps / teacher_taps: feature name → module path of the student / the
      teacher(s) (``{"stage2": "layer3.1.conv2"}``): that layer's output becomes
      ``features[name]``, captured without editing the model.
    num_examples: training-set size (rows of CRD's memory bank).
    steps_per_epoch: the epoch clock of schedules inside methods (DKD warm-up).
    grad_accum: micro-batches per optimizer step.
    fsdp: split large parameters over the mesh's ``fsdp`` axis (default: when it has > 1 device).
    teacher_weights / multi_teacher / ema_decay: multi-teacher weights and
      combination (``average``, ``per_teacher``, ``mixture``, or ``route``: each row scored by the
      teacher its ``batch["task"]`` names), the EMA decay of ``self_ema``.
    xla_cpu_conv: CPU convolution kernels (``kdjax.parallel.xla_cpu``).
    responses: for language models, train on generated responses
      (:class:`kdjax.ResponseConfig`): on-policy samples from the student
      (GKD), the teacher's (SeqKD), or the data's (default).
    placement: where the teacher lives (:class:`kdjax.Placement`): with the
      student (default), tensor-parallel over a ``model`` axis, or on its own
      sub-mesh running one batch ahead (:meth:`prefetch`; :func:`kdjax.train` calls it).
    calibration: batches on which ``init`` chooses a ``layer_map=("auto",)`` or ``hint_layer="auto"`` (default:
      its own batch), by :func:`kdjax.auto_layers`; the result is :attr:`layer_similarity`.
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
    calibration: Iterable[Mapping[str, Any]] | None = None,
  ):
    self.students = _as_tuple(student)
    if isinstance(teacher, teachers.TeacherSource):
      self.source = teacher
      teacher.check(len(self.students))
    else:
      weights, combine = tuple(teacher_weights), multi_teacher
      self.source = teachers.from_mode(
        mode, len(self.students), _as_tuple(teacher), weights=weights, combine=combine, ema_decay=ema_decay
      )
    if grad_accum < 1:
      raise ConfigError(f"grad_accum={grad_accum} must be ≥ 1")
    self.method_arg, self.optimizer = method, optimizer
    self.placement = placement if placement is not None else Placement()
    self.mesh, self.teacher_mesh = placement_meshes(mesh, self.placement)
    self.fsdp = bool(self.mesh.shape.get("fsdp", 1) > 1) if fsdp is None else bool(fsdp)
    self.taps = tuple(sorted(dict(taps or {}).items()))
    self.teacher_taps = tuple(sorted(dict(teacher_taps or {}).items()))
    self.num_examples, self.steps_per_epoch, self.grad_accum = int(num_examples), int(steps_per_epoch), grad_accum
    self.xla_cpu_conv = xla_cpu_conv
    self.calibration, self.layer_similarity = calibration, None
    self.responses = responses if responses is not None and responses.active else None
    check_responses(self.responses, self.source, self.students)
    check_placement(self.placement, self.source, self.responses, self.teacher_mesh)
    self.spec: StepSpec | None = None
    self.teacher_state: TeacherState | None = None
    self.state_shardings: Any = None
    self.run_ahead: RunAhead | None = None
    self._compiled: dict = {}

  @property
  def mode(self) -> str:
    """The teacher source's name (``teacher``, ``offline``, ``multi_teacher``, ``dml``, ``self_ema``)."""
    return self.source.mode

  @property
  def runs_ahead(self) -> bool:
    """Whether the teacher runs on its own devices, one batch ahead (``split`` placement)."""
    return self.placement.split

  @property
  def cross_tokenizer(self) -> bool:
    """Whether the teacher reads its own token rows (a method of any vocabulary, such as ULD)."""
    return self.spec is not None and self.spec.method.any_vocab

  def compiled(self, key: Any, make: Callable[[], Any]) -> Any:
    """What ``make()`` returns, built once per Distiller and ``key`` (compiled steps, evaluation, generators)."""
    if key not in self._compiled:
      self._compiled[key] = make()
    return self._compiled[key]

  # ------------------------------------------------------------------ building

  def _build(self, x: jax.ShapeDtypeStruct) -> Built:
    built = build_pieces(self, x)
    self.spec = StepSpec(
      students=built.student_defs,
      source=built.source,
      method=built.method,
      tx=self.optimizer,
      steps_per_epoch=self.steps_per_epoch,
      grad_accum=self.grad_accum,
      responses=self.responses,
    )
    return built

  def init(self, key: jax.Array, batch: Mapping[str, Any]) -> TrainState:
    """The initial train state, placed on the mesh (sharded under ``jit`` with ``out_shardings``).

    Builds the method against the models' outputs on ``batch``'s inputs
    (only their shapes are used) and initialises its adapters and state from
    ``key``; the students start from their current parameters.
    """
    x = batch_keys.inputs(batch)
    if layer_similarity.is_auto(self.method_arg):
      self.method_arg, self.layer_similarity = layer_similarity.for_distiller(self, batch)
    built = self._build(jax.ShapeDtypeStruct(x.shape, x.dtype))
    self.teacher_state, self.spec, self.run_ahead = place_teacher(self, built.teacher)
    abstract = jax.eval_shape(built.make, key, built.params, built.rests)
    self.state_shardings = state_shardings(abstract, self.mesh, fsdp=self.fsdp)
    self.abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings
    )
    placed = sharding.global_put(
      (built.params, built.rests), (self.state_shardings.params, self.state_shardings.model_state)
    )
    return jax.jit(built.make, out_shardings=self.state_shardings)(key, *placed)

  def check(self, batch: Mapping[str, Any], *, full_step: bool = True) -> dict[str, Any]:
    """What ``init`` and ``step`` would do, traced abstractly: nothing is placed or compiled.

    Works on abstract models (``nnx.eval_shape``), so a whole table of
    experiments can be validated in seconds. ``batch`` may hold
    ``jax.ShapeDtypeStruct``s. Returns ``state`` (abstract) and ``metrics``
    (abstract, per stage the method has): of the whole step (forward,
    gradients, optimizer), or with ``full_step=False`` of the method's loss
    on the models' outputs (≈ 10× faster to trace).
    """
    x = batch_keys.inputs(batch)
    return check_abstract(self._build(jax.ShapeDtypeStruct(x.shape, x.dtype)), self.spec, batch, full_step)

  # ------------------------------------------------------------------ running

  def jitted_step(self, stage: str = "main") -> Callable:
    """The compiled pure step ``(state, teacher_state, global_batch) -> (state, metrics)``
    (for ahead-of-time lowering; :meth:`step` calls it)."""
    if self.spec is None:
      raise ConfigError("Distiller.step before Distiller.init: call state = distiller.init(key, batch) first")
    if stage != "main" and not self.spec.method.stage_terms(stage):
      raise ConfigError(f"method {self.spec.method.name!r} has no {stage!r} stage")

    def make():
      spec = dataclasses.replace(self.spec, stage=stage)
      t_shardings = jax.tree.map(lambda a: a.sharding, self.step_teacher())
      return jax.jit(
        make_train_step(spec),
        in_shardings=(self.state_shardings, t_shardings, sharding.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=(0,),
        compiler_options=xla_cpu.compiler_options(self.xla_cpu_conv),
      )

    return self.compiled(("step", stage), make)

  def step_teacher(self) -> TeacherState:
    """What the step receives as its teacher argument: nothing when the teacher runs on its own devices."""
    return TeacherState(params=(), model_state=()) if self.run_ahead is not None else self.teacher_state

  def eval_spec(self) -> StepSpec:
    """The step spec evaluation reads; a teacher of another tokenizer is left out (it needs its own tokens)."""
    if self.cross_tokenizer:
      return dataclasses.replace(self.spec, source=teachers.NoTeacher())
    return self.spec

  def teacher_outputs(self, batch: Mapping[str, Any], *, features: bool | None = None):
    """``split`` placement: the teachers' outputs on ``batch`` (this process's rows), computed on the
    teacher's sub-mesh and moved device to device onto the student's; asynchronous like any JAX call."""
    if self.run_ahead is None:
      raise ConfigError(
        "Distiller.teacher_outputs serves a teacher on its own devices (placement.teacher_devices > "
        "0); other placements run the teacher inside the step"
      )
    return self.run_ahead.outputs(batch, self.spec.method.needs_teacher_features if features is None else features)

  def prefetch(self, batch: Mapping[str, Any]) -> None:
    """Dispatch the teacher's forward on ``batch`` now (``split`` placement; a no-op otherwise), so it runs on
    the teacher's devices while the student trains on the previous batch. :meth:`step` on the same batch
    object then uses these outputs. Keep at most a few batches ahead: each holds its outputs on device."""
    if self.run_ahead is not None:
      self.run_ahead.push(batch, self.teacher_outputs(batch))

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
    fn = self.compiled("responses", lambda: jax.jit(lambda *a: with_responses(self.spec, *a)))
    return fn(state, self.teacher_state, self.global_batch(batch))

  def step(self, state: TrainState, batch: Mapping[str, Any], *, stage: str = "main") -> tuple[TrainState, dict]:
    """One optimizer step; ``state`` is donated (do not reuse it).

    ``stage="init"`` runs a two-stage method's first stage (FitNet hint
    pre-training, AB/FT/FSP initialisation).
    """
    if isinstance(self.source, teachers.Cached):
      self.source.check_batch(batch)
    if self.responses is not None and batch_keys.has_cached_teacher(batch):
      raise ConfigError(
        "responses: this step generates new responses, but the batch carries cached teacher outputs "
        "for the data's responses; run the teacher online (drop the teacher cache)"
      )
    ahead = {}
    if self.run_ahead is not None:
      outputs = self.run_ahead.take(batch)
      ahead = {batch_keys.TEACHER_OUTPUTS: outputs if outputs is not None else self.teacher_outputs(batch)}
    return self.jitted_step(stage)(state, self.step_teacher(), {**self.global_batch(batch), **ahead})

  def check_batch_size(self, rows: int, name: str = "data.batch_size") -> None:
    """A global batch of ``rows`` must split evenly over the student's devices (and the teacher's, ``split``)."""
    if self.placement.split:
      placement_lib.check_split_rows(rows, name, self.mesh, self.teacher_mesh, self.placement)
    sharding.check_batch_size(rows, self.mesh, name)

  def teacher_param_bytes(self) -> dict[str, int]:
    """``{"total", "max_per_device"}`` bytes of the teachers' state (:func:`kdjax.parallel.sharding.param_bytes`)."""
    return sharding.param_bytes(self.teacher_state)

  # ------------------------------------------------------------------ conveniences (kdjax.engine.evaluation)

  def evaluate(self, state: TrainState, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """:func:`kdjax.engine.evaluation.evaluate` of this distiller."""
    return evaluation.evaluate(self, state, batches)

  def exact_match(self, state: TrainState, batches: Iterable[Mapping[str, Any]], *, teacher: bool = False):
    """:func:`kdjax.engine.evaluation.exact_match` of this distiller."""
    return evaluation.exact_match(self, state, batches, teacher=teacher)

  def export(self, state: TrainState, directory, **kwargs):
    """:func:`kdjax.engine.evaluation.export` of this distiller's (first) student."""
    return evaluation.export(self, state, directory, **kwargs)


def _as_tuple(x) -> tuple:
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (list, tuple)) else (x,)
