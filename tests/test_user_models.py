"""A user's own NNX model as its author wrote it: RNG streams (dropout), Linen via nnx.bridge, mode arguments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kdjax

BATCH = 16


class DropoutNet(nnx.Module):
  """A small CNN with dropout in its blocks, written the standard NNX way (streams held in the module)."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.drop1 = nnx.Dropout(0.3, rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
    self.drop2 = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(2 * width, 10, rngs=rngs)

  def __call__(self, x):
    x = self.drop1(nnx.relu(self.conv1(x)))
    x = self.drop2(nnx.relu(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


class LinenNet(nn.Module):
  """A Linen model taking ``train``, with dropout drawn from the ``dropout`` stream."""

  width: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Conv(self.width, (3, 3))(x)))
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x)))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class CallRngsNet(nnx.Module):
  """A model taking ``deterministic=`` and ``rngs=`` at call time (no stream held in the module)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.drop = nnx.Dropout(0.3)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    x = self.drop(nnx.relu(self.conv(x)), deterministic=deterministic, rngs=rngs)
    return self.head(x.mean(axis=(1, 2)))


def blobs(seed: int, n: int = BATCH) -> dict:
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n).astype(np.int32)
  x = rng.normal(0, 0.3, (n, 8, 8, 1)).astype(np.float32)
  x[np.arange(n), y % 8, y // 8 * 4, 0] += 2.0
  return {"inputs": x, "label": y}


def linen(width: int, seed: int) -> nnx.Module:
  model = nnx.bridge.ToNNX(LinenNet(width), rngs=nnx.Rngs(seed))
  nnx.bridge.lazy_init(model, blobs(0)["inputs"], train=False)
  return model


def _train(distiller, steps: int, key: int = 0):
  state = distiller.init(jax.random.key(key), blobs(0))
  losses = []
  for i in range(steps):
    state, m = distiller.step(state, blobs(i % 4))
    losses.append(float(m["loss/total"]))
  return state, losses


@pytest.mark.parametrize(
  "kind",
  [
    "nnx_dropout",
    pytest.param("linen_bridge", marks=pytest.mark.slow),
    pytest.param("call_rngs", marks=pytest.mark.slow),
  ],
)
def test_a_model_with_rng_streams_distils_and_evaluates_deterministically(kind):
  make = {
    "nnx_dropout": lambda w, s: DropoutNet(w, rngs=nnx.Rngs(s)),
    "linen_bridge": linen,
    "call_rngs": lambda w, s: CallRngsNet(rngs=nnx.Rngs(s)),
  }[kind]
  taps = {"nnx_dropout": {"stage1": "conv1"}, "linen_bridge": {"stage1": "Conv_0"}}.get(kind, {})
  # Distillation terms only (no cross-entropy on the random labels): the student moves toward the teacher.
  method = kdjax.MethodConfig(name="kd+at" if taps else "kd", terms=("ce=0",))
  d = kdjax.Distiller(make(8, 1), make(16, 0), method=method, optimizer=optax.adam(1e-2), taps=taps, teacher_taps=taps)
  state, losses = _train(d, 40)
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  eval_batches = [blobs(10), blobs(11)]
  first, second = kdjax.evaluate(d, state, eval_batches), kdjax.evaluate(d, state, eval_batches)
  assert first == second


def test_dropout_draws_come_from_the_runs_key():
  """The same run key gives the same masks (bit-identical training); another key gives other masks."""

  def params_after(key: int):
    d = kdjax.Distiller(
      DropoutNet(8, rngs=nnx.Rngs(1)), DropoutNet(16, rngs=nnx.Rngs(0)), method="kd", optimizer=optax.sgd(0.1)
    )
    state, _ = _train(d, 3, key=key)
    return jax.tree.map(np.asarray, state.params)

  a, b, c = params_after(0), params_after(0), params_after(1)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_the_trained_student_comes_back_as_a_module():
  student, teacher = DropoutNet(8, rngs=nnx.Rngs(1)), DropoutNet(16, rngs=nnx.Rngs(0))
  d = kdjax.Distiller(student, teacher, method="kd", optimizer=optax.adam(3e-3))
  state, _ = _train(d, 5)
  trained = kdjax.student_model(d, state)
  for mine, theirs in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)), jax.tree.leaves(state.params[0])):
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
  trained.eval()
  x = blobs(3)["inputs"]
  # Eval-mode output by hand: dropout is the identity, so the network is convs, ReLU, mean and the head.
  p = nnx.state(trained, nnx.Param)
  conv = lambda h, c, s: (
    jax.lax.conv_general_dilated(  # noqa: E731
      h, c["kernel"][...], (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + c["bias"][...]
  )
  h = jax.nn.relu(conv(jnp.asarray(x), p["conv1"], 1))
  h = jax.nn.relu(conv(h, p["conv2"], 2)).mean(axis=(1, 2))
  want = h @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(np.asarray(trained(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
  frozen = kdjax.teacher_model(d)
  np.testing.assert_array_equal(np.asarray(frozen.head.kernel[...]), np.asarray(teacher.head.kernel[...]))


@pytest.mark.slow
@pytest.mark.procs
def test_kill_9_and_resume_equals_the_uninterrupted_run(tmp_path):
  """SIGKILL right after a step whose checkpoint save is in flight, then the same script again: the final
  state (parameters, optimizer, step, key) is bit-identical to an uninterrupted run's, for a model holding
  dropout streams and a Linen model with dropout, each with KD + a tapped layer's attention transfer."""
  import subprocess
  import sys
  from pathlib import Path

  script = Path(__file__).resolve().parent / "_user_models_resume.py"

  def run(kind: str, workdir, *kill_at: int):
    return subprocess.Popen([sys.executable, str(script), kind, str(workdir), "8", *map(str, kill_at)])

  runs = {(k, r): tmp_path / f"{k}_{r}" for k in ("dropout", "linen") for r in ("whole", "killed")}
  for w in runs.values():
    w.mkdir()
  first = [run(k, w, *([5] if r == "killed" else [])) for (k, r), w in runs.items()]
  codes = [p.wait(timeout=300) for p in first]
  assert codes == [0, -9, 0, -9], codes
  for kind in ("dropout", "linen"):
    killed = runs[kind, "killed"]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit())[-1] in ("2", "4")
    assert run(kind, killed).wait(timeout=300) == 0
    whole, resumed = np.load(runs[kind, "whole"] / "final.npz"), np.load(killed / "final.npz")
    assert sorted(whole) == sorted(resumed) and len(whole) > 5
    for name in whole:
      np.testing.assert_array_equal(resumed[name], whole[name], err_msg=f"{kind} {name}")


def test_a_linen_submodule_is_tapped_by_its_name_and_the_model_is_left_as_it_was():
  from kdjax.engine import taps
  from kdjax.errors import ConfigError

  model = linen(8, 1)
  before = jax.tree.structure(nnx.state(model))
  x = jnp.asarray(blobs(0)["inputs"])
  with taps.capture(model, {"first": "Conv_0", "second": "Conv_1"}) as got:
    model(x, train=False)
  assert jax.tree.structure(nnx.state(model)) == before
  conv = nnx.state(model)["Conv_0"]
  want = (
    jax.lax.conv_general_dilated(x, conv["kernel"][...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    + conv["bias"][...]
  )
  np.testing.assert_allclose(np.asarray(got["first"]), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert got["second"].shape == (BATCH, 4, 4, 16)
  with pytest.raises(ConfigError, match="no Linen submodule 'Conv_9' in LinenNet; its submodules: Conv_0, Conv_1"):
    with taps.capture(model, {"x": "Conv_9"}):
      model(x, train=False)
