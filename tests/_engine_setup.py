"""Test helper: a tiny distillation problem through the public core.

``setup(...)`` creates small registry models and hands them to
:class:`kdjax.Distiller` — the same assembly ``kdjax distill`` uses — without
datasets or checkpoints. It is imported by ``test_engine.py`` and by the
subprocess scripts (8 forced devices, two processes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import kdjax
from kdjax import models
from kdjax.parallel import sharding
from kdjax.engine.state import TeacherState, TrainState
from kdjax.engine.step import StepSpec
from kdjax.methods import MethodConfig
from kdjax.methods.base import ModelInfo

TOKEN_PRESETS = ("forward_kl", "reverse_kl", "gkd", "tvd", "skew_kl", "skew_reverse_kl")
# Narrow student / default teacher: adapters have real work to do (C_s != C_t).
DIGITS_STUDENT = ("cnn_digits", {"widths": (8, 16, 32)})
DIGITS_TEACHER = ("cnn_digits", {})
LM = ("transformer_lm", {"num_layers": 1, "dim": 16, "num_heads": 2, "max_len": 8})
LM_VOCAB = 16
N_EXAMPLES = 64  # training-set size seen by CRD's memory bank


@dataclasses.dataclass
class Setup:
  distiller: kdjax.Distiller
  state: TrainState
  s_info: ModelInfo
  t_info: ModelInfo | None
  initial: Any = None  # host copy of the initial state

  @property
  def spec(self) -> StepSpec:
    return self.distiller.spec

  @property
  def teacher(self) -> TeacherState:
    return self.distiller.teacher_state

  @property
  def mesh(self):
    return self.distiller.mesh

  @property
  def shardings(self):
    return self.distiller.state_shardings

  @property
  def step(self):
    """The jitted pure step ``(state, teacher, global batch) -> (state, metrics)``."""
    return self.distiller.jitted_step("main")

  @property
  def init_step(self):
    return self.distiller.jitted_step("init") if self.spec.method.stage_terms("init") else None

  def fresh(self) -> TrainState:
    """A new copy of the initial state, placed as the engine places it."""
    return sharding.global_put(self.initial, self.shardings)


def _create(name_kw, num_classes, seed, dtype=jnp.float32):
  name, kw = name_kw
  return models.create(name, num_classes=num_classes, rngs=nnx.Rngs(seed), dtype=dtype, **kw)


def setup(
  method: str | MethodConfig = "kd",
  *,
  mode: str = "offline",
  student=DIGITS_STUDENT,
  teachers=(DIGITS_TEACHER,),
  num_students: int = 1,
  num_classes: int = 10,
  tx=None,
  mesh=None,
  fsdp: bool = False,
  grad_accum: int = 1,
  teacher_weights=(),
  multi_teacher="average",
  ema_decay: float = 0.9,
  student_dtype=jnp.float32,
  seed: int = 0,
  init_stage: bool = False,
  num_examples: int = N_EXAMPLES,
  teacher_classes: int | None = None,
  placement=None,
  batch_rows: int = 2,
) -> Setup:
  """A tiny problem through the public core, :class:`kdjax.Distiller`."""
  mcfg = method if isinstance(method, MethodConfig) else MethodConfig(name=method)
  if init_stage and mcfg.init_epochs <= 0:
    mcfg = dataclasses.replace(mcfg, init_epochs=1.0)
  if mode == "teacher":
    mcfg = dataclasses.replace(mcfg, name="ce", terms=())
  students = [_create(student, num_classes, seed * 1000 + i, student_dtype) for i in range(num_students)]
  t_models = []
  if mode in ("offline", "born_again", "multi_teacher"):
    t_models = [_create(t, teacher_classes or num_classes, 100 + i) for i, t in enumerate(teachers)]
  d = kdjax.Distiller(
    students if mode == "dml" else students[0],
    t_models,
    method=mcfg,
    optimizer=tx if tx is not None else optax.adam(3e-3),
    mesh=mesh,
    mode="offline" if mode == "born_again" else mode,
    num_examples=num_examples,
    steps_per_epoch=10,
    grad_accum=grad_accum,
    fsdp=fsdp,
    teacher_weights=tuple(teacher_weights),
    multi_teacher=multi_teacher,
    ema_decay=ema_decay,
    placement=placement,
  )
  x = models.dummy_input(students[0], batch_rows)
  state = d.init(jax.random.key(seed), {"inputs": np.zeros(x.shape, x.dtype)})
  initial = host(state)
  s_info = d.spec.students[0].info
  t_info = d.spec.teachers[0].info if d.spec.teachers else (s_info if mode in ("dml", "self_ema") else None)
  return Setup(d, state, s_info, t_info, initial)


def digits_batch(seed: int, batch: int = 16, num_classes: int = 10, unlabelled: int = 0) -> dict[str, np.ndarray]:
  """A synthetic 8×8×1 batch whose label is recoverable from the image."""
  rng = np.random.RandomState(seed)
  label = rng.randint(0, num_classes, batch).astype(np.int32)
  image = rng.normal(0, 0.3, (batch, 8, 8, 1)).astype(np.float32)
  image[np.arange(batch), label % 8, label // 8 * 3, 0] += 2.0
  if unlabelled:
    label[-unlabelled:] = -1
  ids = rng.choice(N_EXAMPLES, batch, replace=False).astype(np.int32)
  return {"inputs": image, "label": label, "id": ids}


def token_batch(seed: int, batch: int = 8, length: int = 8, vocab: int = LM_VOCAB) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (batch, length + 1)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  mask[:, -2:] = rng.rand(batch, 2) > 0.5
  return {"inputs": tokens[:, :-1], "label": tokens[:, 1:], "mask": mask}


def host(tree):
  """Global arrays → NumPy on every process (gathers sharded leaves)."""
  return jax.tree.map(lambda x: sharding.to_host(x) if isinstance(x, jax.Array) else np.asarray(x), tree)


def run_steps(s: Setup, batches, n: int, step=None, state=None):
  """``n`` steps cycling over ``batches`` (this process's rows) from ``state``
  (default: ``s.state``, which is then donated); returns (state, metrics per step)."""
  step = step or s.step
  if state is None:
    state, s.state = s.state, None
  hist = []
  for i in range(n):
    b = batches[i % len(batches)]
    state, m = step(state, s.teacher, sharding.shard_batch(b, s.mesh))
    hist.append({k: float(sharding.to_host(v)) for k, v in m.items()})
  return state, hist


def local_rows(batch: dict, mesh) -> dict:
  """This process's rows of a global batch, in the order of its devices."""
  n = len(batch["label"])
  idx = sharding.batch_sharding(mesh).addressable_devices_indices_map((n,))
  rows = np.concatenate([np.arange(n)[idx[d][0]] for d in sorted(idx, key=lambda d: idx[d][0].start or 0)])
  return {k: v[rows] for k, v in batch.items()}


class Record(kdjax.hooks.Hook):
  """Every step's metrics, on the host (read after the step's dispatch, outside the transfer guard)."""

  def __init__(self):
    self.metrics = []

  def after_step(self, progress):
    self.metrics.append({k: float(sharding.to_host(v)) for k, v in progress.metrics.items()})


def cycle(batches, start: int = 0):
  """``batches`` over and over, from index ``start``."""
  i = start
  while True:
    yield batches[i % len(batches)]
    i += 1


def train(s: Setup, batches, steps: int, state=None):
  """``steps`` through :func:`kdjax.train` (the loop ``kdjax distill`` runs); returns (state, metrics per step)."""
  rec = Record()
  state = kdjax.train(s.distiller, s.state if state is None else state, batches, steps=steps, hooks=[rec])
  return state, rec.metrics
