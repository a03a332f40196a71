"""Token-level teacher-output caches: a language-model teacher's
``(L, V)`` outputs per example, stored in full or as top-k log-probs, fed to
the token divergences (forward_kl, reverse_kl, gkd, tvd) through the real
jitted step.

A one-layer ``transformer_lm`` teacher and a smaller student over V = 64 on
48 random token sequences of length 8 (``view="tokens"``).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _engine_setup as engine_setup
from kdjax import losses as kdl
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
  spec = cache_lib.CacheSpec(
    views=1,
    dtype=dtype,
    top_k=top_k,
    encoding=kw.pop("encoding", "plain"),
    shard_size=kw.pop("shard_size", 16),
    batch_size=8,
  )
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
@pytest.mark.usefixtures("production_compile")
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


# ---------------------------------------------------------------------------------------------------------------------
# Packed top-k rows (encoding="packed"): exact ids, log-probs within LOGP_BOUND, the tail mass kept.

QWEN_VOCAB = 151936


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _random_rows(kind: str, rows: int, vocab: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """Top-k log-probs (decreasing) and ids of ``rows`` softmaxes over ``vocab`` random logits."""
  z = rng.normal(size=(rows, vocab)) * {"flat": 0.3, "peaked": 6.0}.get(kind, 1.5)
  if kind == "zipf":  # a frequency-ordered vocabulary: the prior −log(id + 1) under the context's noise
    z -= np.log(np.arange(vocab) + 1.0)
  lp = _log_softmax(z)
  idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
  top = np.take_along_axis(lp, idx, -1)
  order = np.argsort(-top, axis=-1, kind="stable")
  return np.take_along_axis(top, order, -1), np.take_along_axis(idx, order, -1)


def _by_id(logp: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  order = np.argsort(idx, axis=-1)
  return np.take_along_axis(logp, order, -1), np.take_along_axis(idx, order, -1)


@pytest.mark.parametrize(
  "kind, vocab, k", [("zipf", 4096, 128), ("uniform", 262144, 64), ("peaked", 1000, 32), ("flat", 512, 512)]
)
def test_packed_rows_keep_ids_exact_and_log_probs_within_the_bound(kind, vocab, k):
  """Every id comes back with its own log-prob, within LOGP_BOUND (s/2 rounding + s/2 shift + 2^-10); the
  rows' top-k mass is kept to 2^-10 relative; order: decreasing decoded log-prob, ties by id."""
  rng = np.random.default_rng(len(kind) + k)
  lp, idx = _random_rows(kind, 8, vocab, k, rng)
  data, nbytes = cache_lib.pack_rows(lp, idx)
  assert data.dtype == np.uint8 and nbytes.dtype == np.uint16 and len(data) == nbytes.sum()
  starts = np.cumsum(nbytes.astype(np.int64)) - nbytes
  back, ids = cache_lib.unpack_rows(data, starts, k)
  assert back.dtype == np.float32 and ids.dtype == np.int32
  want_lp, want_ids = _by_id(lp, idx)
  got_lp, got_ids = _by_id(back.astype(np.float64), ids)
  np.testing.assert_array_equal(got_ids, want_ids)
  err = np.abs(got_lp - want_lp).max()
  assert 0 < err <= cache_lib.LOGP_BOUND
  mass = np.exp(lp).sum(-1)
  np.testing.assert_allclose(np.exp(got_lp).sum(-1), mass, rtol=2**-10)
  assert np.all(np.diff(back, axis=-1) <= 0)
  tied = np.diff(back, axis=-1) == 0
  assert np.all(np.diff(ids, axis=-1)[tied] > 0)
  # without the per-row shift every value is the grid point nearest the true one
  plain, ids2 = cache_lib.unpack_rows(data, starts, k, renormalise=False)
  assert np.abs(_by_id(plain.astype(np.float64), ids2)[0] - want_lp).max() <= cache_lib.LOGP_STEP / 2 + 1e-6
  # a row read alone decodes the same
  one, one_ids = cache_lib.unpack_rows(data[starts[5] : starts[5] + nbytes[5]], np.zeros(1, np.int64), k)
  np.testing.assert_array_equal(one_ids[0], ids[5])
  np.testing.assert_array_equal(one[0], back[5])


@pytest.mark.slow
def test_packed_topk_cache_step_matches_the_float32_cache_step(tmp_path, ds, fkl):
  """The real jitted step on a packed k = 8 cache: the same ids as the float32 cache, forward KL within
  LOGP_BOUND-sized error of it, and an SGD update within 1 % of the update's scale."""
  plain, packed = (_build(tmp_path / e, ds, fkl, 8, "float32", encoding=e) for e in ("plain", "packed"))
  assert plain["complete"] and packed["complete"]
  caches = [cache_lib.TeacherCache.open(tmp_path / e) for e in ("plain", "packed")]
  batches = [cache_lib.CachedLoader(ds, c, batch_size=BATCH, seed=4).batch(0, 1) for c in caches]
  np.testing.assert_array_equal(batches[0]["id"], batches[1]["id"])
  np.testing.assert_array_equal(*(np.sort(b["teacher_topk_idx"], -1) for b in batches))
  assert 0 < np.abs(batches[0]["teacher_topk_logp"] - batches[1]["teacher_topk_logp"]).max() <= cache_lib.LOGP_BOUND
  (p_a, m_a), (p_b, m_b) = (_one_step(fkl, b) for b in batches)
  assert m_a["loss/forward_kl"] > 0.01
  np.testing.assert_allclose(m_b["loss/forward_kl"], m_a["loss/forward_kl"], atol=cache_lib.LOGP_BOUND / 4)
  p0 = jax.tree.map(np.asarray, fkl.initial.params)
  for a, b, z in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b), jax.tree.leaves(p0)):
    np.testing.assert_allclose(b - z, a - z, atol=1e-6 + 1e-2 * np.abs(a - z).max())


def _zipf_ds(n: int, length: int):
  """``n`` examples whose input names their row in the teacher-logit table."""
  rows = np.repeat(np.arange(n, dtype=np.int32)[:, None], length, 1)
  return ArrayDataset(rows, rows, np.arange(n) * 3 + 1, name="zipf_lm", split="train")


def _build_table(directory, ds, logits, spec) -> cache_lib.TeacherCache:
  predict = lambda x: logits[x[:, 0]]  # noqa: E731
  cache_lib.build_cache(
    directory,
    ds,
    predict,
    teacher_hash="zipf",
    num_classes=logits.shape[-1],
    view=VIEW,
    spec=spec,
    output_shape=logits.shape[1:],
  )
  return cache_lib.TeacherCache.open(directory, teacher_hash="zipf", view=VIEW, num_examples=len(ds))


@pytest.fixture(scope="module")
def qwen_caches(tmp_path_factory):
  """k = 128 at Qwen's vocabulary, 2 × 8 positions of Zipf-spectrum teacher logits, stored plain (float32)
  and packed."""
  n, length = 2, 8
  rng = np.random.default_rng(7)
  logits = (rng.normal(size=(n, length, QWEN_VOCAB)) * 1.5 - np.log(np.arange(QWEN_VOCAB) + 1.0)).astype(np.float32)
  ds = _zipf_ds(n, length)
  d = tmp_path_factory.mktemp("qwen")
  spec = cache_lib.CacheSpec(dtype="float32", top_k=128, shard_size=1, batch_size=1)
  plain = _build_table(d / "plain", ds, logits, spec)
  packed = _build_table(d / "packed", ds, logits, dataclasses.replace(spec, encoding="packed"))
  return ds, logits, plain, packed


def _bucket_terms(student: np.ndarray, lp: np.ndarray, idx: np.ndarray):
  """NumPy (k + 1)-bucket rows (student, teacher) of :func:`kdjax.losses.topk_buckets` at T = 1."""
  ls = _log_softmax(student)
  in_top = np.zeros(ls.shape, bool)
  np.put_along_axis(in_top, idx, True, axis=-1)
  s_tail = np.log(np.where(in_top, 0, np.exp(ls)).sum(-1, keepdims=True))
  t_tail = np.log(np.maximum(1 - np.exp(lp).sum(-1, keepdims=True), 1e-12))
  return np.concatenate([np.take_along_axis(ls, idx, -1), s_tail], -1), np.concatenate([lp, t_tail], -1)


@pytest.mark.slow
def test_packed_k128_cache_at_qwen_vocabulary_is_under_240_bytes_per_token_and_keeps_the_top_k_losses(qwen_caches):
  """k = 128 of V = 151,936 packed: ≤ 240 B per token (cache.json's measured bytes_per_token, = the shards'
  bytes); the top-k forward and reverse KL from it are within their stated tolerance of the float32 cache's:
  with every teacher log-prob moved by δ_j, |δ_j| ≤ ε = LOGP_BOUND (tail: ≤ 2^-10), reverse KL moves by
  ≤ Σ_j S_j |δ_j| ≤ ε and forward KL by ≤ Σ_j P_j ((e^ε − 1)|log P_j/S_j| + e^ε ε) per token."""
  ds, logits, plain, packed = qwen_caches
  meta = packed.meta
  assert meta["format"] == 4 and meta["encoding"] == "packed" and meta["logp_bound"] == cache_lib.LOGP_BOUND
  assert plain.meta["format"] == 3 and "encoding" not in plain.meta  # plain caches keep the older layout
  stored = sum(np.asarray(p).nbytes for p in packed.arrays["topk"].parts) + packed.arrays["topk"].bounds.nbytes
  stored += packed.arrays["topk"].rowbytes.nbytes
  assert meta["bytes_per_token"] == pytest.approx(stored / (2 * 8), abs=0.01)
  assert meta["bytes_per_token"] <= 240 < plain.meta["bytes_per_token"] == 128 * 8
  ids, view = ds.ids[[1, 0]], np.zeros(2, np.int64)
  a, b = plain.outputs(ids, view), packed.outputs(ids, view)
  np.testing.assert_array_equal(np.sort(a["teacher_topk_idx"], -1), np.sort(b["teacher_topk_idx"], -1))
  student = np.random.default_rng(1).normal(size=(2, 8, QWEN_VOCAB)).astype(np.float32) * 2
  s_rows, p_rows = _bucket_terms(student, a["teacher_topk_logp"].astype(np.float64), a["teacher_topk_idx"])
  eps = np.full(p_rows.shape, cache_lib.LOGP_BOUND)
  eps[..., -1] = 2.0**-10
  p, ratio = np.exp(p_rows), np.abs(p_rows - s_rows)
  tol_fkl = np.mean((p * (np.expm1(eps) * ratio + np.exp(eps) * eps)).sum(-1))
  for fn, tol in ((kdl.topk_forward_kl, tol_fkl), (kdl.topk_reverse_kl, cache_lib.LOGP_BOUND)):
    exact = float(fn(jnp.asarray(student), a["teacher_topk_logp"], a["teacher_topk_idx"]))
    quantised = float(fn(jnp.asarray(student), b["teacher_topk_logp"], b["teacher_topk_idx"]))
    assert exact > 0.1 and abs(quantised - exact) <= tol
  want = np.mean((p * (p_rows - s_rows)).sum(-1))  # NumPy reference of the exact forward KL
  np.testing.assert_allclose(float(kdl.topk_forward_kl(jnp.asarray(student), *a.values())), want, rtol=1e-4)


def test_packed_cache_resumes_refuses_damage_and_stays_class_level_too(tmp_path):
  """A packed build in two halves equals one go, byte for byte; a flipped byte is refused naming its shard;
  (C,) class outputs pack one row per example; packed needs top_k; older formats are refused in one line."""
  n, vocab = 6, 1000
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(n, vocab)) * 3).astype(np.float32)
  ds = _zipf_ds(n, 1)
  spec = cache_lib.CacheSpec(top_k=16, encoding="packed", shard_size=2, batch_size=2)
  one = _build_table(tmp_path / "one", ds, logits, spec)
  predict = lambda x: logits[x[:, 0]]  # noqa: E731
  kw = dict(teacher_hash="zipf", num_classes=vocab, view=VIEW, spec=spec)
  assert not cache_lib.build_cache(tmp_path / "two", ds, predict, max_shards=1, **kw)["complete"]
  assert cache_lib.build_cache(tmp_path / "two", ds, predict, **kw)["complete"]
  assert json.loads((tmp_path / "two" / "cache.json").read_text()) == one.meta
  for s in ("shard-00000-of-00003", "shard-00002-of-00003"):
    x, y = cache_lib.read_shard(tmp_path / "one" / s), cache_lib.read_shard(tmp_path / "two" / s)
    assert x.keys() == {"ids", "topk_packed", "topk_rowbytes", "topk_bounds"} and x.keys() == y.keys()
    for f in x:
      np.testing.assert_array_equal(x[f], y[f])
  out = one.outputs(ds.ids, np.zeros(n, np.int64))
  assert out["teacher_topk_logp"].shape == (n, 16)
  lp = _log_softmax(logits)
  assert np.abs(np.take_along_axis(lp, out["teacher_topk_idx"], -1) - out["teacher_topk_logp"]).max() <= 0.033
  np.testing.assert_array_equal(np.sort(out["teacher_topk_idx"]), np.sort(np.argsort(-lp, -1)[:, :16]))
  f = tmp_path / "two" / "shard-00001-of-00003" / "topk_packed.npy"
  raw = bytearray(f.read_bytes())
  raw[-1] ^= 0xFF
  f.write_bytes(bytes(raw))
  damaged = cache_lib.TeacherCache.open(tmp_path / "two")
  damaged.outputs(ds.ids[:2], np.zeros(2, np.int64))  # shard 0 reads fine
  with pytest.raises(ValueError, match=r"shard shard-00001-of-00003 is damaged \(topk_packed.npy"):
    damaged.outputs(ds.ids[2:3], np.zeros(1, np.int64))
  with pytest.raises(ValueError, match=r"cache.encoding='packed' stores top-k rows: set cache.top_k"):
    cache_lib.CacheSpec(encoding="packed")
  meta = json.loads((tmp_path / "one" / "cache.json").read_text())
  (tmp_path / "one" / "cache.json").write_text(json.dumps({**meta, "format": 2}))
  with pytest.raises(
    ValueError, match=r"has format 2, this kdjax reads formats \[3, 4\]; rebuild it with `kdjax cache"
  ):
    cache_lib.TeacherCache.open(tmp_path / "one")
