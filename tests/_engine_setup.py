"""Test helper: a tiny distillation problem through the engine's own pieces.

``setup(...)`` mirrors :func:`kdjax.engine.loop.build` without datasets or
checkpoints: it creates small registry models, builds and validates the
method, initialises adapters/method state, places the state with the engine's
shardings and jits the real ``make_train_step`` with
:func:`kdjax.engine.loop.jit_train_step`. It is imported by ``test_engine.py``
and by the subprocess scripts (8 forced devices, two processes).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdjax import methods, models
from kdjax.config import MethodConfig
from kdjax.engine import loop, sharding
from kdjax.engine.state import ModelDef, TeacherState, TrainState, split_model
from kdjax.engine.step import StepSpec
from kdjax.methods.base import InitInfo, ModelInfo

TOKEN_PRESETS = ("forward_kl", "reverse_kl", "gkd", "tvd")
# Narrow student / default teacher: adapters have real work to do (C_s != C_t).
DIGITS_STUDENT = ("cnn_digits", {"widths": (8, 16, 32)})
DIGITS_TEACHER = ("cnn_digits", {})
LM = ("transformer_lm", {"num_layers": 1, "dim": 16, "num_heads": 2, "max_len": 8})
LM_VOCAB = 16
N_EXAMPLES = 64  # training-set size seen by CRD's memory bank


@dataclasses.dataclass
class Setup:
  spec: StepSpec
  state: TrainState
  teacher: TeacherState
  mesh: Any
  step: Any  # jitted train step (donates the state)
  init_step: Any  # jitted init-stage step, or None
  s_info: ModelInfo
  t_info: ModelInfo | None
  initial: Any = None  # host copy of the initial state
  shardings: Any = None

  def fresh(self) -> TrainState:
    """A new copy of the initial state, placed as the engine places it."""
    return loop._global_put(self.initial, self.shardings)


def model_info(model, name: str) -> ModelInfo:
  shapes = models.feature_shapes(model, batch_size=2)
  return ModelInfo(name=name, num_classes=model.num_classes, feature_shapes={k: v[1:] for k, v in shapes.items()})


def _create(name_kw, num_classes, seed, dtype=jnp.float32):
  name, kw = name_kw
  return models.create(name, num_classes=num_classes, rngs=nnx.Rngs(seed), dtype=dtype, **kw)


def setup(method: str | MethodConfig = "kd", *, mode: str = "offline", student=DIGITS_STUDENT,
          teachers=(DIGITS_TEACHER,), num_students: int = 1, num_classes: int = 10, tx=None,
          mesh=None, fsdp: bool = False, grad_accum: int = 1, teacher_weights=(), multi_teacher="average",
          ema_decay: float = 0.9, student_dtype=jnp.float32, seed: int = 0, init_stage: bool = False,
          num_examples: int = N_EXAMPLES, teacher_classes: int | None = None) -> Setup:
  """Everything the jitted step needs, built the way ``loop.build`` does."""
  mcfg = method if isinstance(method, MethodConfig) else MethodConfig(name=method)
  if init_stage and mcfg.init_epochs <= 0:
    mcfg = dataclasses.replace(mcfg, init_epochs=1.0)
  if mode == "teacher":
    mcfg = dataclasses.replace(mcfg, name="ce", terms=())
  mesh = mesh if mesh is not None else sharding.make_mesh()
  students = [_create(student, num_classes, seed * 1000 + i, student_dtype) for i in range(num_students)]
  s_info = model_info(students[0], student[0])
  t_models = []
  if mode in ("offline", "born_again", "multi_teacher"):
    t_models = [_create(t, teacher_classes or num_classes, 100 + i) for i, t in enumerate(teachers)]
  t_info = model_info(t_models[0], teachers[0][0]) if t_models else (s_info if mode in ("dml", "self_ema") else None)
  m = methods.build(mcfg, s_info, t_info)
  m.validate(s_info, t_info)
  tx = tx if tx is not None else optax.adam(3e-3)

  s_defs, s_params, s_rests = [], [], []
  for mod in students:
    g, p, r = split_model(mod)
    s_defs.append(ModelDef(g, s_info, tuple(mod.input_shape)))
    s_params.append(p)
    s_rests.append(r)
  t_defs, t_params, t_rests = [], [], []
  for mod, (tname, _) in zip(t_models, teachers):
    g, p, r = split_model(mod)
    t_defs.append(ModelDef(g, model_info(mod, tname), tuple(mod.input_shape)))
    t_params.append(p)
    t_rests.append(r)

  key = jax.random.key(seed)
  x_abs = models.dummy_input(students[0], 2)
  s_out = jax.eval_shape(lambda mod, x: mod(x, train=False), students[0], x_abs)
  t_out = jax.eval_shape(lambda mod, x: mod(x, train=False), t_models[0], x_abs) if t_models else (
      s_out if mode in ("dml", "self_ema") else None)
  info = InitInfo(student=s_info, teacher=t_info, num_examples=num_examples)
  adapters, mstates = [], []
  for i in range(num_students):
    a, s = m.init(jax.random.fold_in(jax.random.fold_in(key, 7), i), s_out, t_out, info)
    adapters.append(a)
    mstates.append(s)
  ema = (s_params[0], s_rests[0]) if mode == "self_ema" else ()
  trainable = {"students": tuple(s_params), "adapters": tuple(adapters)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=tuple(s_params), model_state=tuple(s_rests),
                     opt_state=tx.init(trainable), adapter_params=tuple(adapters), method_state=tuple(mstates),
                     key=jax.random.key_data(jax.random.fold_in(key, 1)), ema=ema)
  shardings = sharding.state_shardings(state, mesh, fsdp=fsdp)
  initial = jax.tree.map(np.asarray, state)
  state = loop._global_put(state, shardings)
  teacher = TeacherState(params=tuple(t_params), model_state=tuple(t_rests))
  teacher = loop._global_put(teacher, sharding.param_shardings(teacher, mesh, fsdp=fsdp))
  common = dict(students=tuple(s_defs), teachers=tuple(t_defs), method=m, tx=tx, mode=mode, steps_per_epoch=10,
                grad_accum=grad_accum, teacher_weights=tuple(teacher_weights), multi_teacher=multi_teacher,
                ema_decay=ema_decay)
  spec = StepSpec(stage="main", **common)
  run = types.SimpleNamespace(state=state, teacher=teacher, mesh=mesh)
  step = loop.jit_train_step(spec, run)
  init_step = None
  if init_stage and m.stage_terms("init"):
    init_step = loop.jit_train_step(StepSpec(stage="init", **common), run)
  return Setup(spec, state, teacher, mesh, step, init_step, s_info, t_info, initial, shardings)


def digits_batch(seed: int, batch: int = 16, num_classes: int = 10, unlabelled: int = 0) -> dict[str, np.ndarray]:
  """A synthetic 8×8×1 batch whose label is recoverable from the image."""
  rng = np.random.RandomState(seed)
  label = rng.randint(0, num_classes, batch).astype(np.int32)
  image = rng.normal(0, 0.3, (batch, 8, 8, 1)).astype(np.float32)
  image[np.arange(batch), label % 8, label // 8 * 3, 0] += 2.0
  if unlabelled:
    label[-unlabelled:] = -1
  ids = rng.choice(N_EXAMPLES, batch, replace=False).astype(np.int32)
  return {"image": image, "label": label, "id": ids}


def token_batch(seed: int, batch: int = 8, length: int = 8, vocab: int = LM_VOCAB) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (batch, length + 1)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  mask[:, -2:] = rng.rand(batch, 2) > 0.5
  return {"image": tokens[:, :-1], "label": tokens[:, 1:], "mask": mask}


def host(tree):
  """Global arrays → NumPy on every process (gathers sharded leaves)."""
  return jax.tree.map(lambda x: loop._to_host(x) if isinstance(x, jax.Array) else np.asarray(x), tree)


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
    hist.append({k: float(loop._to_host(v)) for k, v in m.items()})
  return state, hist
