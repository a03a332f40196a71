"""bfloat16 language models: float32 master weights and loss math for the student, bfloat16 weights for a
frozen teacher (cast once when placed), named remat policies for the blocks, and a bfloat16 run that tracks
float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kdjax
from kdjax import models
from kdjax.config import ModelConfig
from kdjax.errors import ConfigError
from kdjax.parallel import placement as placement_lib

V, L = 32, 8
TINY_S = {"num_layers": 1, "dim": 16, "num_heads": 2, "max_len": L}
TINY_T = {"num_layers": 2, "dim": 32, "num_heads": 2, "max_len": L}


def _batch(rows: int = 4, seed: int = 0) -> dict:
  """Rows of a deterministic-plus-noise token chain: next = (3·prev + 1 + {0, 1}) mod V."""
  rng = np.random.default_rng(seed)
  t = np.empty((rows, L + 1), np.int32)
  t[:, 0] = rng.integers(0, V, rows)
  for i in range(L):
    t[:, i + 1] = (3 * t[:, i] + 1 + rng.integers(0, 2, rows)) % V
  return {"inputs": t[:, :-1], "label": t[:, 1:]}


def _distiller(dtype, abstract: bool = False) -> kdjax.Distiller:
  """The tiny pair under KD; ``abstract``: models of shapes only (``nnx.eval_shape``), for ``check``."""
  make = nnx.eval_shape if abstract else (lambda f: f())
  student = make(lambda: models.create("transformer_lm", num_classes=V, rngs=nnx.Rngs(0), dtype=dtype, **TINY_S))
  teacher = make(lambda: models.create("transformer_lm", num_classes=V, rngs=nnx.Rngs(1), dtype=dtype, **TINY_T))
  method = kdjax.MethodConfig(name="forward_kl", temperature=1.0, terms=("ce=0.1", "forward_kl=0.9"))
  return kdjax.Distiller(student, teacher, method=method, optimizer=optax.adam(1e-3), mode="offline")


def _floating_dtypes(tree) -> set:
  return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


class _UserTeacher(nnx.Module):
  """A user's model with no compute dtype of its own."""

  def __init__(self, rngs):
    self.emb = nnx.Embed(V, 8, rngs=rngs)
    self.out = nnx.Linear(8, V, rngs=rngs)

  def __call__(self, tokens, *, train=False):
    return self.out(self.emb(tokens))


def test_bfloat16_student_keeps_float32_master_weights_and_its_losses_are_float32():
  d = _distiller(jnp.bfloat16, abstract=True)
  checked = d.check(_batch(), full_step=False)  # the initial state and the method's loss, traced abstractly
  assert _floating_dtypes(checked["state"].params) == {"float32"}  # every parameter leaf of the student
  assert _floating_dtypes(checked["state"].opt_state) == {"float32"}  # Adam's moments follow the master weights
  losses = {k: str(v.dtype) for k, v in checked["metrics"]["main"].items() if k.startswith("loss/")}
  assert "loss/total" in losses and set(losses.values()) == {"float32"}, losses
  g, st = nnx.split(d.students[0])
  logits = jax.eval_shape(lambda st, x: nnx.merge(g, st)(x).logits, st, jnp.asarray(_batch()["inputs"]))
  assert logits.dtype == jnp.bfloat16  # while the model computes in bfloat16


@pytest.mark.parametrize(
  "teacher, teacher_dtype, want",
  [
    ("zoo_bf16", "auto", "bfloat16"),  # a zoo model computing in bfloat16 is held in it
    ("zoo_f32", "auto", "float32"),
    ("user", "auto", "float32"),  # a user's model is left as it is ...
    ("user", "bfloat16", "bfloat16"),  # ... unless asked
    ("zoo_bf16", "float32", "float32"),
  ],
)
def test_a_frozen_teachers_params_are_cast_to_the_placements_dtype(teacher, teacher_dtype, want):
  dtype = jnp.bfloat16 if teacher == "zoo_bf16" else jnp.float32
  model = (  # the user's model with real arrays, the zoo's abstract (shapes and dtypes only)
    _UserTeacher(nnx.Rngs(1))
    if teacher == "user"
    else nnx.eval_shape(lambda: models.create("transformer_lm", num_classes=V, dtype=dtype, **TINY_T))
  )
  params = nnx.state(model, nnx.Param)
  held = placement_lib.cast_floating(
    params, placement_lib.held_dtype(model, kdjax.Placement(teacher_dtype=teacher_dtype))
  )
  assert _floating_dtypes(held) == {want}
  assert jax.tree.structure(held) == jax.tree.structure(params)


def test_remat_policy_names_are_checked():
  for make in (
    lambda: ModelConfig(name="transformer_lm", remat="everything"),
    lambda: models.create("transformer_lm", remat="everything"),
    lambda: kdjax.Placement(teacher_dtype="int8"),
  ):
    with pytest.raises(ConfigError, match="remat|teacher_dtype"):
      make()


@pytest.mark.parametrize("policy", ["none", "dots_saveable", "nothing_saveable"])
def test_a_remat_policy_puts_the_blocks_under_checkpoint(policy):
  m = nnx.eval_shape(lambda: models.create("transformer_lm", num_classes=V, rngs=nnx.Rngs(0), remat=policy, **TINY_S))
  g, p = nnx.split(m, nnx.Param)
  tokens = jnp.asarray(_batch()["inputs"])
  jaxpr = jax.make_jaxpr(lambda p: nnx.merge(g, p)(tokens).logits)(p)
  names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  remat = sum(n in ("checkpoint", "remat2") for n in names)  # jax.checkpoint's primitive (named remat2 in JAX 0.10)
  assert remat == (0 if policy == "none" else TINY_S["num_layers"]), names


CURVE_STEPS = 20
CURVE_TOL = 0.01  # nats: max |Δloss| of the bfloat16 run from the float32 one (loss 1.0 → 0.67; measured ≤ 0.0012)


def _curve(dtype) -> tuple[list[float], kdjax.Distiller, object]:
  """The loss of each of ``CURVE_STEPS`` KD steps from the same initial weights on the same batches."""
  d = _distiller(dtype)
  state = d.init(jax.random.key(0), _batch())
  losses = []
  for i in range(CURVE_STEPS):
    state, metrics = d.step(state, _batch(seed=i))
    assert metrics["loss/total"].dtype == np.float32
    losses.append(float(metrics["loss/total"]))
  return losses, d, state


@pytest.mark.slow
def test_bfloat16_training_tracks_float32():
  f32, _, _ = _curve(jnp.float32)
  b16, d, state = _curve(jnp.bfloat16)
  assert f32[-1] < 0.8 * f32[0]  # a curve that falls, not a flat line
  diff = np.abs(np.asarray(b16) - np.asarray(f32))
  assert diff.max() <= CURVE_TOL, diff
  assert diff.max() > 0  # the bfloat16 run did compute in bfloat16
  assert _floating_dtypes(state.params) == {"float32"}  # after the updates too
  assert _floating_dtypes(d.teacher_state.params) == {"bfloat16"}  # cast once when placed


def test_a_block_holding_a_tapped_layer_runs_without_remat():
  from kdjax.engine.taps import capture

  m = nnx.eval_shape(
    lambda: models.create("transformer_lm", num_classes=V, rngs=nnx.Rngs(0), remat="nothing_saveable", **TINY_T)
  )
  g, p = nnx.split(m, nnx.Param)
  tokens = jnp.asarray(_batch()["inputs"])

  def forward(p):
    model = nnx.merge(g, p)
    with capture(model, {"probs": "blocks.1.attn.probs"}) as feats:
      model(tokens)
    return feats["probs"]

  jaxpr = jax.make_jaxpr(forward)(p)
  names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert sum(n in ("checkpoint", "remat2") for n in names) == 1  # block 0 only
  assert jaxpr.out_avals[0].shape == (4, 2, L, L)
