"""The public core on models kdjax has never seen: user-defined NNX modules,
layers tapped by path, a function teacher, a loop of the user's own with
checkpoint/resume, and the CLI reproduced bit for bit through ``kdjax.Distiller``.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kdjax
from kdjax import checkpoint as ckpt


class ConvNet(nnx.Module):
  """A user's CNN for 8×8×1 images: returns bare logits, has no ``train`` argument."""

  def __init__(self, widths=(8, 16), embed=32, *, rngs: nnx.Rngs):
    a, b = widths
    self.blocks = nnx.List([nnx.Conv(1, a, (3, 3), rngs=rngs), nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs)])
    self.embed = nnx.Linear(b, embed, rngs=rngs)
    self.head = nnx.Linear(embed, 10, rngs=rngs)

  def __call__(self, x):
    for conv in self.blocks:
      x = nnx.relu(conv(x))
    return self.head(nnx.relu(self.embed(x.mean(axis=(1, 2)))))


TAPS = {"stage1": "blocks.0", "stage2": "blocks.1", "pooled": "embed"}


def numpy_batches(seed: int, n: int = 16):
  """A plain NumPy iterator: an 8×8 blob whose position is the label."""
  rng = np.random.default_rng(seed)
  i = 0
  while True:
    y = rng.integers(0, 10, n).astype(np.int32)
    x = rng.normal(0, 0.3, (n, 8, 8, 1)).astype(np.float32)
    x[np.arange(n), y % 8, (y // 8) * 4, 0] += 2.0
    yield {"inputs": x, "label": y, "id": (np.arange(n) + i * n).astype(np.int32) % 64}
    i += 1


def _pair(seed=0):
  return ConvNet((8, 16), rngs=nnx.Rngs(seed)), ConvNet((16, 32), embed=48, rngs=nnx.Rngs(seed + 100))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fitnet", "at", "crd+kd"])
def test_feature_methods_on_user_layers_named_by_path(method):
  student, teacher = _pair()
  d = kdjax.Distiller(
    student,
    teacher,
    method=kdjax.MethodConfig(name=method, hint_layer="stage2"),
    optimizer=optax.adam(3e-3),
    taps=TAPS,
    teacher_taps=TAPS,
    num_examples=64,
  )
  it = numpy_batches(0)
  state = d.init(jax.random.key(0), next(it))
  term = {"at": "loss/at", "fitnet": "loss/hint", "crd+kd": "loss/kd"}[method]
  bank0 = jax.tree.map(np.asarray, state.method_state)
  losses = []
  for _ in range(25):
    state, m = d.step(state, next(it))
    losses.append(float(m[term]))
    assert np.isfinite(float(m["loss/total"]))
  assert losses[-1] < losses[0], losses
  if method == "crd+kd":  # CRD's memory bank holds the tapped 32-d (student) / 48-d (teacher) embeddings' projections
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.method_state, bank0)
    assert max(jax.tree.leaves(moved)) > 0
    assert d.spec.students[0].info.feature_shapes["pooled"] == (32,)
    assert d.spec.teachers[0].info.feature_shapes["pooled"] == (48,)
  # the tapped features are the layers' real outputs: check one against a direct call
  x = jnp.asarray(next(numpy_batches(1))["inputs"])
  model = nnx.merge(d.spec.students[0].graphdef, state.params[0], state.model_state[0])
  from kdjax.engine.state import apply_model

  out, _ = apply_model(
    d.spec.students[0].graphdef, state.params[0], state.model_state[0], x, train=False, taps=d.spec.students[0].taps
  )
  np.testing.assert_allclose(out.features["stage1"], model.blocks[0](x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.logits, model(x), rtol=1e-6, atol=1e-6)


def test_a_misspelt_layer_path_lists_the_valid_ones():
  student, teacher = _pair()
  d = kdjax.Distiller(
    student,
    teacher,
    method="at",
    optimizer=optax.sgd(0.1),
    taps={"stage1": "blocks.0", "stage2": "block.1"},
    teacher_taps=TAPS,
  )
  with pytest.raises(
    ValueError,
    match=r"no layer 'block.1' in ConvNet; valid layer paths: blocks, blocks.0, "
    r"blocks.1, embed, head",
  ):
    d.init(jax.random.key(0), next(numpy_batches(0)))


@pytest.mark.slow
def test_function_teacher_teaches_logit_methods_and_is_refused_for_feature_methods():
  student, teacher = _pair()
  graphdef, params = nnx.split(teacher)

  def apply_fn(p, x):  # e.g. a model converted from another framework
    return nnx.merge(graphdef, p)(x)

  fn_teacher = kdjax.FunctionTeacher(apply_fn, params)
  d = kdjax.Distiller(
    student, fn_teacher, method=kdjax.MethodConfig(name="kd", temperature=2.0), optimizer=optax.sgd(0.0)
  )
  b = next(numpy_batches(0))
  state = d.init(jax.random.key(0), b)
  s_logits = np.asarray(student(jnp.asarray(b["inputs"])))
  t_logits = np.asarray(teacher(jnp.asarray(b["inputs"])))
  _, m = d.step(state, b)

  def log_softmax(z):
    z = z.astype(np.float64) / 2.0
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lp, lq = log_softmax(t_logits), log_softmax(s_logits)
  ref = 4.0 * np.mean(np.sum(np.exp(lp) * (lp - lq), -1))
  # float32 in the step: each log-softmax carries ~C ulp of max|z/T| (C = 10 classes, T = 2)
  atol = 4.0 * 10 * np.finfo(np.float32).eps * max(1.0, np.abs(np.r_[t_logits, s_logits]).max() / 2.0)
  np.testing.assert_allclose(m["loss/kd"], ref, rtol=0, atol=atol)
  assert ref > 10 * atol
  bad = kdjax.Distiller(student, fn_teacher, method="at", optimizer=optax.sgd(0.1), taps=TAPS)
  with pytest.raises(ValueError, match="the teacher is a function returning logits only"):
    bad.init(jax.random.key(0), b)


@pytest.mark.slow
def test_user_loop_checkpoints_and_resumes_bit_exact(tmp_path):
  def run(steps, resume_dir=None, stop_at=None):
    student, teacher = _pair()
    d = kdjax.Distiller(student, teacher, method="kd", optimizer=optax.adam(1e-2), taps=TAPS, teacher_taps=TAPS)
    batches = [b for b, _ in zip(numpy_batches(3), range(steps))]
    state = d.init(jax.random.key(1), batches[0])
    start = 0
    saver = kdjax.Checkpointer(tmp_path / "ckpt", async_save=False) if resume_dir else None
    if saver is not None:
      restored = saver.restore_latest(d.abstract_state)
      if restored is not None:
        start, state, meta = restored
        assert meta["note"] == "mine"
    for i in range(start, steps):
      state, _ = d.step(state, batches[i])
      if saver is not None and i + 1 == stop_at:
        saver.save(i + 1, state, {"note": "mine"}, force=True)
        saver.close()
        return None
    if saver is not None:
      saver.close()
    return jax.tree.map(np.asarray, state.params[0])

  straight = run(12)
  assert run(12, resume_dir=True, stop_at=5) is None
  resumed = run(12, resume_dir=True)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), straight, jax.tree.map(np.asarray, nnx.state(_pair()[0], nnx.Param))
  )
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_cli_run_equals_the_same_run_through_the_public_core(tfds_dir, tmp_path):
  """``kdjax distill`` and a user loop over the public core (same models, data, seed) end bit-identical."""
  from kdjax import cli, data, engine
  from kdjax.config import ModelConfig

  steps = 12
  teacher_dir, run_dir = tmp_path / "teacher", tmp_path / "cli"
  m = kdjax.models.create("cnn1d", num_classes=10, rngs=nnx.Rngs(5))
  _, tp, tr = kdjax.engine.split_model(m)
  ckpt.export_model(
    teacher_dir / ckpt.EXPORT_DIR,
    model_name="cnn1d",
    num_classes=10,
    dtype="float32",
    params=tp,
    model_state=tr,
    extra={},
  )
  assert (
    cli.main(
      [
        "distill",
        "mnist1d_kd",
        "kd_labelled",
        "--workdir",
        str(run_dir),
        "--teacher.checkpoint",
        str(teacher_dir),
        "--optim.steps",
        str(steps),
        "--data.batch_size",
        "50",
        "--data.data_dir",
        tfds_dir,
        "--run.quiet",
      ]
    )
    == 0
  )
  via_cli = ckpt.load_export(run_dir)[1]["params"]

  # The same run, written as a user would: the zoo student at the run's seed, the exported teacher,
  # a NumPy loader, optax's Adam and the thin loop.
  train = data.load_arrays("mnist1d", "train", data_dir=tfds_dir)
  loader = data.Loader(train, batch_size=50, seed=0)
  student = kdjax.models.create("mlp", num_classes=10, rngs=nnx.Rngs(0))
  teacher, _ = engine.load_teacher(ModelConfig(name="cnn1d", checkpoint=str(teacher_dir)), 10)
  d = kdjax.Distiller(
    student,
    teacher,
    method=kdjax.MethodConfig(name="kd", temperature=4.0),
    optimizer=optax.adam(1e-2),
    num_examples=len(train),
    steps_per_epoch=loader.steps_per_epoch,
  )
  state = d.init(jax.random.key(0), loader.batch(0, 0))
  state = kdjax.train(d, state, loader, steps=steps)
  via_core = ckpt.pure_dict(state.params[0])
  flat_cli = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(via_cli)}
  flat_core = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(via_core)}
  assert flat_cli.keys() == flat_core.keys() and flat_cli
  for k in flat_cli:
    np.testing.assert_array_equal(flat_core[k], flat_cli[k], err_msg=k)


@pytest.mark.slow
def test_a_tf_data_pipeline_feeds_the_step_like_numpy():
  """Batches from ``tf.data`` (``as_numpy_iterator``) train exactly as the same NumPy batches."""
  tf = pytest.importorskip("tensorflow")
  batches = [b for b, _ in zip(numpy_batches(4), range(6))]
  stacked = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  pipeline = tf.data.Dataset.from_tensor_slices(stacked).batch(16).as_numpy_iterator()

  def run(source):
    student, teacher = _pair()
    d = kdjax.Distiller(student, teacher, method="kd", optimizer=optax.adam(1e-2))
    state = d.init(jax.random.key(0), batches[0])
    return jax.tree.map(np.asarray, kdjax.train(d, state, source, steps=6).params[0])

  jax.tree.map(np.testing.assert_array_equal, run(pipeline), run(iter(batches)))
