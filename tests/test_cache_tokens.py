"""Token-level teacher-output caches: a language-model teacher's
``(L, V)`` outputs per example, stored in full or as top-k log-probs, fed to
the token divergences (forward_kl, reverse_kl, gkd, tvd) through the real
jitted step.

A one-layer ``transformer_lm`` teacher and a smaller student over V = 64 on
48 random token sequences of length 8 (``view="tokens"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _engine_setup as engine_setup
from kdjax.data import cache as cache_lib
from kdjax.data import views
from kdjax.data.tfds import ArrayDataset
from kdjax.parallel import sharding
from kdjax.engine.teacher_cache import teacher_predict_fn
from kdjax.engine.state import apply_model

VOCAB, LEN, N, BATCH = 64, 8, 48, 8
STUDENT = ("transformer_lm", {"num_layers": 1, "dim": 16, "num_heads": 2, "max_len": LEN})
TEACHER = ("transformer_lm", {"num_layers": 1, "dim": 32, "num_heads": 2, "max_len": LEN})
VIEW = views.ViewConfig(kind="tokens")


def _setup(method: str):
  return engine_setup.setup(method, student=STUDENT, teachers=(TEACHER,), num_classes=VOCAB, tx=optax.sgd(0.5))


@pytest.fixture(scope="module")
def ds() -> ArrayDataset:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (N, LEN + 1)).astype(np.int32)
  return ArrayDataset(tokens[:, :-1], tokens[:, 1:], np.arange(N) * 2 + 5, name="toy_lm", split="train")


@pytest.fixture(scope="module")
def fkl():
  return _setup("forward_kl")


def _teacher(s: engine_setup.Setup, top_k: int = 0):
  return teacher_predict_fn(s.spec.teachers[0].graphdef, s.teacher.params[0], s.teacher.model_state[0], top_k)


def _teacher_logits(s: engine_setup.Setup, tokens: np.ndarray) -> np.ndarray:
  return np.asarray(_teacher(s)(jnp.asarray(tokens)), np.float64)


def _build(directory, ds, s, top_k, dtype, **kw):
  spec = cache_lib.CacheSpec(views=1, dtype=dtype, top_k=top_k, shard_size=kw.pop("shard_size", 16), batch_size=8)
  return cache_lib.build_cache(
    directory,
    ds,
    _teacher(s, top_k),
    teacher_hash="lm-teacher",
    num_classes=VOCAB,
    view=VIEW,
    spec=spec,
    output_shape=(LEN, VOCAB),
    **kw,
  )


@pytest.fixture(scope="module")
def full_topk_cache(tmp_path_factory, ds, fkl) -> cache_lib.TeacherCache:
  d = tmp_path_factory.mktemp("lm_topk_all")
  assert _build(d, ds, fkl, VOCAB, "float32")["complete"]
  return cache_lib.TeacherCache.open(d, teacher_hash="lm-teacher", view=VIEW, num_examples=N)


def _one_step(s: engine_setup.Setup, batch: dict):
  state, metrics = s.step(s.fresh(), s.teacher, sharding.shard_batch(batch, s.mesh))
  return jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}


def _online(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if not k.startswith("teacher_") and k != "view_index"}


@pytest.mark.slow
@pytest.mark.parametrize("method", engine_setup.TOKEN_PRESETS)
def test_topk_cache_with_k_equal_vocab_equals_online_step(method, ds, full_topk_cache):
  """k = V in float32: the cached step's loss and gradient (→ SGD update)
  equal the online teacher's up to float32 summation order."""
  s = _setup(method)
  batch = cache_lib.CachedLoader(ds, full_topk_cache, batch_size=BATCH, seed=3).batch(1, 2)
  assert batch["teacher_topk_logp"].shape == (BATCH, LEN, VOCAB) and "teacher_logits" not in batch
  p_ca, m_ca = _one_step(s, batch)
  p_on, m_on = _one_step(s, _online(batch))
  term = f"loss/{s.spec.method.terms[0].name}"
  assert m_on[term] > 1e-3
  np.testing.assert_allclose(m_ca[term], m_on[term], rtol=1e-5)
  p0 = jax.tree.map(np.asarray, s.initial.params)
  d_ca = jax.tree.map(lambda a, b: a - b, p_ca, p0)
  d_on = jax.tree.map(lambda a, b: a - b, p_on, p0)
  moved = [np.abs(b).max() for b in jax.tree.leaves(d_on)]
  assert max(moved) > 1e-4
  for a, b in zip(jax.tree.leaves(d_ca), jax.tree.leaves(d_on)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 + 1e-4 * np.abs(b).max())


@pytest.mark.slow
def test_float32_logit_cache_is_bit_identical_to_online(tmp_path, ds, fkl):
  """Full (L, V) logits in float32: same batch, same step, bit for bit."""
  _build(tmp_path / "dense", ds, fkl, 0, "float32")
  cache = cache_lib.TeacherCache.open(tmp_path / "dense")
  assert cache.arrays["logits"].shape == (N, 1, LEN, VOCAB)
  batch = cache_lib.CachedLoader(ds, cache, batch_size=BATCH, seed=1).batch(0, 0)
  p_ca, m_ca = _one_step(fkl, batch)
  p_on, m_on = _one_step(fkl, _online(batch))
  assert m_ca["loss/forward_kl"] == m_on["loss/forward_kl"] > 0
  jax.tree.map(np.testing.assert_array_equal, p_ca, p_on)


@pytest.mark.slow
def test_topk_cache_step_equals_numpy_bucket_kl(tmp_path, ds, fkl):
  """k = 8 of 64 in float16: the cached step's forward KL is the (k+1)-bucket
  KL(teacher ‖ student) computed here in NumPy from the online teacher's
  logits (its own top-8, float16 rounding) and the student's logits."""
  k = 8
  _build(tmp_path / "top8", ds, fkl, k, "float16")
  cache = cache_lib.TeacherCache.open(tmp_path / "top8")
  batch = cache_lib.CachedLoader(ds, cache, batch_size=BATCH, seed=2).batch(0, 1)
  assert batch["teacher_topk_idx"].shape == (BATCH, LEN, k)
  # the cached entries are the teacher's top-8 on exactly this batch's tokens
  t = _teacher_logits(fkl, batch["inputs"])
  lp_t = t - t.max(-1, keepdims=True)
  lp_t -= np.log(np.exp(lp_t).sum(-1, keepdims=True))
  idx = np.argsort(-lp_t, axis=-1, kind="stable")[..., :k]
  np.testing.assert_array_equal(batch["teacher_topk_idx"], idx)
  a = np.take_along_axis(lp_t, idx, -1).astype(np.float16).astype(np.float64)
  np.testing.assert_array_equal(batch["teacher_topk_logp"], a.astype(np.float32))
  # NumPy bucket KL against the student's own logits
  sd = fkl.spec.students[0]
  z = np.asarray(
    apply_model(
      sd.graphdef, fkl.initial.params[0], fkl.initial.model_state[0], jnp.asarray(batch["inputs"]), train=True
    )[0].logits,
    np.float64,
  )
  ls = z - z.max(-1, keepdims=True)
  ls -= np.log(np.exp(ls).sum(-1, keepdims=True))
  in_top = np.zeros(ls.shape, bool)
  np.put_along_axis(in_top, idx, True, axis=-1)
  ps = np.concatenate([np.take_along_axis(np.exp(ls), idx, -1), np.where(in_top, 0, np.exp(ls)).sum(-1)[..., None]], -1)
  pt = np.concatenate([np.exp(a), np.maximum(1 - np.exp(a).sum(-1), 1e-12)[..., None]], -1)
  pt /= pt.sum(-1, keepdims=True)
  want = np.mean((pt * np.log(pt / ps)).sum(-1))
  _, m = _one_step(fkl, batch)
  np.testing.assert_allclose(m["loss/forward_kl"], want, rtol=1e-4)
  # a top-8 cache is 8·(2 + 2) bytes per token (float16 log-probs, uint16 ids) instead of 64·2 for float16 logits
  stored = cache.arrays["topk_logp"].nbytes + cache.arrays["topk_idx"].nbytes
  assert stored == N * LEN * 32 == N * LEN * cache.meta["bytes_per_token"]


@pytest.mark.slow
def test_token_cache_in_two_interrupted_halves_equals_one_go(tmp_path, ds, fkl):
  one = _build(tmp_path / "one", ds, fkl, 8, "float16")
  first = _build(tmp_path / "two", ds, fkl, 8, "float16", max_shards=1)
  assert first["written"] == 1 and not first["complete"]
  with pytest.raises(ValueError, match="incomplete"):
    cache_lib.TeacherCache.open(tmp_path / "two")
  second = _build(tmp_path / "two", ds, fkl, 8, "float16")
  assert second == {"written": 2, "skipped": 1, "complete": True, "num_shards": 3} and one["num_shards"] == 3
  for name in ("shard-00000-of-00003", "shard-00001-of-00003", "shard-00002-of-00003"):
    x, y = cache_lib.read_shard(tmp_path / "one" / name), cache_lib.read_shard(tmp_path / "two" / name)
    assert x.keys() == y.keys() == {"ids", "topk_logp", "topk_idx"}
    for f in x:
      np.testing.assert_array_equal(x[f], y[f])
  # top-k on the device == top-k of host logits (the same cache either way)
  dense_predict = _teacher(fkl, 0)
  cache_lib.build_cache(
    tmp_path / "host",
    ds,
    dense_predict,
    teacher_hash="lm-teacher",
    num_classes=VOCAB,
    view=VIEW,
    spec=cache_lib.CacheSpec(dtype="float16", top_k=8, shard_size=16, batch_size=8),
    output_shape=(LEN, VOCAB),
  )
  dev, host = cache_lib.TeacherCache.open(tmp_path / "one"), cache_lib.TeacherCache.open(tmp_path / "host")
  np.testing.assert_array_equal(np.asarray(dev.arrays["topk_idx"]), np.asarray(host.arrays["topk_idx"]))
  np.testing.assert_allclose(
    np.asarray(dev.arrays["topk_logp"], np.float32),
    np.asarray(host.arrays["topk_logp"], np.float32),
    rtol=2e-3,
    atol=2e-3,
  )


@pytest.mark.slow
def test_token_cache_refuses_another_teacher_and_wrong_shapes(tmp_path, ds, fkl):
  _build(tmp_path / "c", ds, fkl, 4, "float16")
  with pytest.raises(ValueError, match=r"stale: built for teacher lm-teacher but the configured teacher is other"):
    cache_lib.TeacherCache.open(tmp_path / "c", teacher_hash="other")
  with pytest.raises(ValueError, match="teacher_hash"):
    cache_lib.build_cache(
      tmp_path / "c",
      ds,
      _teacher(fkl, 4),
      teacher_hash="other",
      num_classes=VOCAB,
      view=VIEW,
      spec=cache_lib.CacheSpec(top_k=4, shard_size=16, batch_size=8),
      output_shape=(LEN, VOCAB),
    )
  with pytest.raises(ValueError, match=r"teacher outputs \(8, 64\) per example, the cache expects \(64,\)"):
    cache_lib.build_cache(
      tmp_path / "d",
      ds,
      _teacher(fkl, 0),
      teacher_hash="t",
      num_classes=VOCAB,
      view=VIEW,
      spec=cache_lib.CacheSpec(shard_size=16, batch_size=8),
    )
  with pytest.raises(ValueError, match="integer token ids"):
    views.augment(VIEW, np.zeros((2, 3), np.float32), np.zeros(2, np.uint64))
  with pytest.raises(ValueError, match="cannot mix token ids"):
    views.ViewConfig(kind="tokens", mixup_alpha=1.0)


@pytest.mark.slow
def test_token_views_pass_ids_through(ds, full_topk_cache):
  """Over an epoch every example comes once, its student input is its own
  tokens (int32, unchanged) and its labels are the next tokens."""
  loader = cache_lib.CachedLoader(ds, full_topk_cache, batch_size=BATCH, seed=5)
  seen = []
  by_id = {int(i): r for r, i in enumerate(ds.ids)}
  for b in loader.epoch_batches(0):
    rows = [by_id[int(i)] for i in b["id"]]
    assert b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"], ds.images[rows])
    np.testing.assert_array_equal(b["label"], ds.labels[rows])
    seen += b["id"].tolist()
  assert sorted(seen) == sorted(ds.ids.tolist())


@pytest.mark.parametrize("vocab, k, index_dtype, per_token", [(1000, 64, "uint16", 256), (70000, 4, "int32", 24)])
def test_topk_token_cache_records_the_bytes_per_token_it_stores(tmp_path, vocab, k, index_dtype, per_token):
  """float16 log-probs with uint16 ids while ids fit (V ≤ 65,536): k·4 bytes per token, 256 at k = 64."""
  n, length = 8, 4
  ds = ArrayDataset(np.zeros((n, length), np.int32), np.zeros((n, length), np.int32), np.arange(n), "toy", "train")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(n, length, vocab)).astype(np.float32)
  predict = lambda x: logits[: len(x)]  # noqa: E731  (one batch of 8 covers the split)
  cache_lib.build_cache(
    tmp_path / "c",
    ds,
    predict,
    teacher_hash="t",
    num_classes=vocab,
    view=VIEW,
    spec=cache_lib.CacheSpec(dtype="float16", top_k=k, shard_size=8, batch_size=8),
    output_shape=(length, vocab),
  )
  cache = cache_lib.TeacherCache.open(tmp_path / "c")
  assert cache.meta["bytes_per_token"] == per_token and cache.meta["index_dtype"] == index_dtype
  assert np.asarray(cache.arrays["topk_idx"]).dtype == np.dtype(index_dtype)
  stored = sum(np.asarray(cache.arrays[a]).nbytes for a in ("topk_logp", "topk_idx"))
  assert stored == n * length * per_token
  out = cache.outputs(np.arange(n), np.zeros(n, np.int64))
  want = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
  np.testing.assert_array_equal(out["teacher_topk_idx"], want)  # ids read back as int32, unchanged
  assert out["teacher_topk_idx"].dtype == np.int32
