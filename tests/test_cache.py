"""Teacher-output cache: cached KD == online KD, resumable atomic
builds, stale caches refused, and each student input is the cached view.

One random (untrained) cnn1d teacher on MNIST-1D, an mlp student, K = 3
"jitter" views; everything compiled is shared through module fixtures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import checkpoint as ckpt
from kdjax import engine, models
from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig
from kdjax.data import cache as cache_lib
from kdjax.data import views
from kdjax.engine.teacher_cache import build_teacher_cache
from kdjax.engine.state import apply_model, split_model

K = 3
SHARD = 1024  # mnist1d train: 4000 examples → 4 shards


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
  d = tmp_path_factory.mktemp("teacher")
  m = models.create("cnn1d", num_classes=10, rngs=nnx.Rngs(3))
  _, params, rest = split_model(m)
  ckpt.export_model(
    d / ckpt.EXPORT_DIR, model_name="cnn1d", num_classes=10, dtype="float32", params=params, model_state=rest, extra={}
  )
  return str(d)


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory) -> str:
  d = tmp_path_factory.mktemp("teacher2")
  m = models.create("cnn1d", num_classes=10, rngs=nnx.Rngs(4))
  _, params, rest = split_model(m)
  ckpt.export_model(
    d / ckpt.EXPORT_DIR, model_name="cnn1d", num_classes=10, dtype="float32", params=params, model_state=rest, extra={}
  )
  return str(d)


@pytest.fixture(scope="module")
def cfg(tfds_dir, teacher_dir, tmp_path_factory) -> Experiment:
  return Experiment(
    name="cache_test",
    mode="offline",
    data=DataConfig(name="mnist1d", data_dir=tfds_dir, batch_size=50, eval_batch_size=500, view="jitter"),
    teacher=ModelConfig(name="cnn1d", checkpoint=teacher_dir),
    student=ModelConfig(name="mlp"),
    method=MethodConfig(name="kd", temperature=4.0),
    optim=OptimConfig(name="sgd", lr=0.1, steps=5),
    run=RunConfig(workdir=str(tmp_path_factory.mktemp("run")), quiet=True),
  )


@pytest.fixture(scope="module")
def cache32(cfg, tmp_path_factory) -> str:
  d = tmp_path_factory.mktemp("cache32")
  res = build_teacher_cache(cfg, d, cache_lib.CacheSpec(views=K, dtype="float32", shard_size=SHARD))
  assert res == {"written": 4, "skipped": 0, "complete": True, "num_shards": 4}
  return str(d)


@pytest.fixture(scope="module")
def teacher_fwd(teacher_dir):
  model, _ = engine.load_teacher(ModelConfig(name="cnn1d", checkpoint=teacher_dir), 10)
  g, p, r = split_model(model)
  f = jax.jit(lambda x: apply_model(g, p, r, x, train=False)[0].logits)
  return lambda x: np.asarray(f(jnp.asarray(x)))


def kd_loss_atol(logits: np.ndarray, temperature: float) -> float:
  """Float32 tolerance of a KD-style loss computed by two different programs.

  XLA:CPU rounds reductions differently per CPU (AVX2 vs AVX-512) and batch
  position, and the two programs' logits may differ by a few ulp. The loss is
  T²·mean_b Σ_c p_c (log p_c − log q_c) over C classes; each log-softmax
  carries ~C ulp of max|z/T|, so |Δloss| ≲ T²·C·eps·max(1, max|z|/T).
  """
  eps, num_classes = float(np.finfo(np.float32).eps), logits.shape[-1]
  return temperature**2 * num_classes * eps * max(1.0, float(np.abs(logits).max()) / temperature)


def _with_cache(cfg: Experiment, d: str) -> Experiment:
  return cfg.replace(data=dataclasses.replace(cfg.data, teacher_cache=d))


def _one_step(cfg: Experiment, batch: dict) -> tuple[dict, dict, dict]:
  run = engine.build(cfg)
  before = jax.tree.map(np.asarray, run.state.params)
  state, metrics = run.distiller.step(run.state, batch)
  return before, jax.tree.map(np.asarray, state.params), {k: np.asarray(v) for k, v in metrics.items()}


# ------------------------------------------------------------------ cached KD == online KD


@pytest.fixture(scope="module")
def cached_batch(cfg, cache32) -> dict:
  run = engine.build(_with_cache(cfg, cache32))
  assert isinstance(run.loader, cache_lib.CachedLoader)
  return run.loader.batch(1, 3)


def _step_teacher_logits(cfg: Experiment, batch: dict) -> np.ndarray:
  """The teacher's logits as the online step computes them (inside jit, on the mesh)."""
  from kdjax.engine import step as step_lib

  run = engine.build(cfg)
  d = run.distiller
  f = jax.jit(lambda st, te, b: step_lib.teacher_outputs(d.spec, st, te, b)[0].logits)
  return np.asarray(f(run.state, d.teacher_state, d.global_batch({"inputs": batch["inputs"]})))


@pytest.mark.slow
def test_cached_kd_equals_online_with_float32(cfg, cache32, cached_batch, teacher_fwd):
  """Same view, float32 storage: the cache stores the teacher's logits
  exactly, and the cached step reads them exactly.

  (a) Fed the very logits the online step computes, the cached step is the
  online step bit for bit (loss, gradient → SGD update, metrics). (b) The
  stored logits equal the online teacher's to the teacher forward's own
  float32 reproducibility: XLA:CPU's kernels round by shape and batch
  position (within a few ulp on CPUs without AVX-512; bit-identical on
  others), so the step from the cache matches the online one to ~1e-6.
  """
  online = {k: v for k, v in cached_batch.items() if k not in ("teacher_logits", "view_index")}
  z_step = _step_teacher_logits(cfg, cached_batch)
  b0, p_on, m_on = _one_step(cfg, online)
  b1, p_ex, m_ex = _one_step(_with_cache(cfg, cache32), dict(cached_batch, teacher_logits=z_step))
  jax.tree.map(np.testing.assert_array_equal, b0, b1)  # same start
  assert float(m_on["loss/kd"]) > 0
  for k in ("loss/kd", "loss/total", "train/grad_norm"):
    np.testing.assert_array_equal(m_ex[k], m_on[k], err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, p_ex, p_on)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(b0)))  # it moved
  # (b) storage is exact: the cache holds the teacher's float32 output on the cached view …
  z = cached_batch["teacher_logits"]
  assert z.dtype == np.float32
  np.testing.assert_allclose(z, teacher_fwd(cached_batch["inputs"]), rtol=0, atol=8 * 2.0**-23 * np.abs(z).max())
  np.testing.assert_allclose(z, z_step, rtol=0, atol=8 * 2.0**-23 * np.abs(z).max())
  # … so the step from the cache is the online step to float32 rounding
  _, p_ca, m_ca = _one_step(_with_cache(cfg, cache32), cached_batch)
  np.testing.assert_allclose(m_ca["loss/kd"], m_on["loss/kd"], rtol=0, atol=kd_loss_atol(z, 4.0))
  for a, b, c in zip(jax.tree.leaves(p_ca), jax.tree.leaves(p_on), jax.tree.leaves(b0)):
    np.testing.assert_allclose(a - c, b - c, rtol=1e-3, atol=1e-4 * np.abs(b - c).max())  # updates agree to 1e-4


@pytest.mark.slow
def test_cached_kd_matches_online_to_float16_rounding(cfg, cached_batch, tmp_path, teacher_fwd):
  d = tmp_path / "c16"
  build_teacher_cache(cfg, d, cache_lib.CacheSpec(views=K, dtype="float16", shard_size=SHARD))
  cache = cache_lib.TeacherCache.open(d)
  ids, k = cached_batch["id"], cached_batch["view_index"]
  z16 = cache.logits(ids, k)
  z32 = teacher_fwd(cached_batch["inputs"])
  # storage error = float16 rounding only (≤ half an ulp: relative 2⁻¹¹)
  np.testing.assert_allclose(z16, z32, rtol=2.0**-11 * 1.01, atol=1e-7)
  assert np.abs(z16 - z32).max() > 0  # it is rounded
  b16 = dict(cached_batch, teacher_logits=z16)
  online = {k_: v for k_, v in cached_batch.items() if k_ not in ("teacher_logits", "view_index")}
  b0, p_on, m_on = _one_step(cfg, online)
  _, p_16, m_16 = _one_step(_with_cache(cfg, str(d)), b16)
  np.testing.assert_allclose(m_16["loss/kd"], m_on["loss/kd"], rtol=2e-3)
  g_on = jax.tree.map(lambda a, b: a - b, p_on, b0)
  g_16 = jax.tree.map(lambda a, b: a - b, p_16, b0)
  for a, b in zip(jax.tree.leaves(g_16), jax.tree.leaves(g_on)):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3 * np.abs(b).max())


# ------------------------------------------------------------------ resumable builds, stale caches refused


def _read_all(d) -> dict:
  out = {}
  for p in sorted(Path(d).glob("shard-*")):
    out[p.name] = cache_lib.read_shard(p, mmap=False)
  return out


@pytest.mark.slow
def test_interrupted_build_in_two_halves_equals_one_go(cfg, cache32, tmp_path):
  d = tmp_path / "halves"
  spec = cache_lib.CacheSpec(views=K, dtype="float32", shard_size=SHARD)
  first = build_teacher_cache(cfg, d, spec, max_shards=2)
  assert first["written"] == 2 and not first["complete"]
  with pytest.raises(ValueError, match="incomplete .*re-run"):
    cache_lib.TeacherCache.open(d)
  # a crash mid-write leaves only a temp file, never a half shard
  (d / ".shard-00002-of-00004.tmp999").mkdir()
  (d / ".shard-00002-of-00004.tmp999" / "logits.npy").write_bytes(b"garbage")
  second = build_teacher_cache(cfg, d, spec)
  assert second == {"written": 2, "skipped": 2, "complete": True, "num_shards": 4}
  assert not list(d.glob(".*tmp*"))  # the interrupted write's leftovers are gone
  a, b = _read_all(d), _read_all(cache32)
  assert a.keys() == b.keys() and len(a) == 4
  for name in a:
    for k in b[name]:
      np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}:{k}")
  assert json.loads((d / cache_lib.META_FILE).read_text()) == json.loads(
    (Path(cache32) / cache_lib.META_FILE).read_text()
  )


@pytest.mark.slow
def test_cache_of_another_teacher_is_refused(cfg, cache32, other_teacher_dir):
  other = cfg.replace(teacher=dataclasses.replace(cfg.teacher, checkpoint=other_teacher_dir))
  with pytest.raises(ValueError, match=r"stale: built for teacher \w+ but the configured teacher is \w+"):
    engine.build(_with_cache(other, cache32))
  # building into it with another teacher is refused too (no mixed caches)
  with pytest.raises(ValueError, match="teacher_hash"):
    build_teacher_cache(other, cache32, cache_lib.CacheSpec(views=K, dtype="float32", shard_size=SHARD))


@pytest.mark.slow
def test_cache_of_another_view_config_is_refused(cfg, cache32):
  flip = cfg.replace(data=dataclasses.replace(cfg.data, view="none"))
  with pytest.raises(ValueError, match=r"stale: built for another view config \(differs in \['kind'\]"):
    engine.build(_with_cache(flip, cache32))


# ------------------------------------------------------------------ student inputs are the cached views


@pytest.mark.slow
def test_epoch_inputs_are_the_views_whose_teacher_outputs_are_fed(cfg, cache32, teacher_fwd):
  from kdjax import data as kd_data

  ds = kd_data.load_arrays("mnist1d", "train", data_dir=cfg.data.data_dir)
  cache = cache_lib.TeacherCache.open(cache32)
  loader = cache_lib.CachedLoader(ds, cache, batch_size=500, seed=7)
  by_id = {int(i): r for r, i in enumerate(ds.ids)}
  chosen = {}
  for epoch in (0, 1):
    seen = []
    for b in loader.epoch_batches(epoch):
      rows = np.array([by_id[int(i)] for i in b["id"]])
      k = b["view_index"].astype(np.int64)
      # the input is exactly view k of the example, regenerated independently here:
      # the Loader's jitter view at "epoch" k with the cache's view seed
      expect = Loader_view(ds.images[rows], ds.ids[rows], k, cache.view_seed)
      np.testing.assert_array_equal(b["inputs"], expect)
      # … and the fed teacher output is the teacher's output on that very input
      np.testing.assert_allclose(b["teacher_logits"], teacher_fwd(b["inputs"]), rtol=1e-5, atol=1e-5)
      seen.append(b["id"])
      chosen.setdefault(epoch, []).append(k)
    assert sorted(np.concatenate(seen).tolist()) == sorted(ds.ids.tolist())  # one epoch = every example once
  k0, k1 = np.concatenate(chosen[0]), np.concatenate(chosen[1])
  assert set(k0.tolist()) == set(range(K))  # every cached view gets used
  assert 0.5 < np.mean(np.bincount(k0, minlength=K) / len(k0) * K) < 1.5
  ids0 = np.concatenate([b["id"] for b in loader.epoch_batches(0)])
  ids1 = np.concatenate([b["id"] for b in loader.epoch_batches(1)])
  k_by_id0 = dict(zip(ids0.tolist(), k0.tolist()))
  k_by_id1 = dict(zip(ids1.tolist(), k1.tolist()))
  assert np.mean([k_by_id0[i] != k_by_id1[i] for i in k_by_id0]) > 0.4  # re-drawn per epoch
  # the Grain pipeline with two worker processes (each reopens the memory-mapped cache) feeds these batches
  it = iter(cache_lib.CachedLoader(ds, cache, batch_size=500, seed=7, worker_count=2))
  for want in loader.epoch_batches(0):
    got = next(it)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  it.close()


def Loader_view(images, ids, k, view_seed):  # noqa: N802 - reads as "the Loader's view"
  """Independent reference: the default jitter view (max shift 2) written out in NumPy."""
  return Loader_view_shift(images, ids, k, view_seed, shift=2)


def test_view_choice_is_reproducible_and_seeded():
  ids = np.arange(200)
  a = cache_lib.choose_views(1, ids, 5, 4)
  np.testing.assert_array_equal(a, cache_lib.choose_views(1, ids, 5, 4))
  assert (a != cache_lib.choose_views(2, ids, 5, 4)).mean() > 0.5
  assert a.min() >= 0 and a.max() == 3
  np.testing.assert_array_equal(cache_lib.choose_views(1, ids, 5, 1), 0)


# ------------------------------------------------------------------ storage formats and errors


def test_topk_storage_reconstructs_log_probs():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 2, 20)).astype(np.float32) * 3
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  enc = cache_lib.encode(z, cache_lib.CacheSpec(views=2, top_k=4))
  assert enc["topk_logp"].dtype == np.float16 and enc["topk_idx"].shape == (6, 2, 4)
  meta = {"views": 2, "view_seed": 0, "num_classes": 20, "view": cache_lib.view_fingerprint(views.ViewConfig())}
  cache = cache_lib.TeacherCache(meta, np.arange(6), enc)
  out = cache.logits(np.array([4, 0]), np.array([1, 0]))
  for row, (i, k) in enumerate([(4, 1), (0, 0)]):
    top = np.argsort(-logp[i, k])[:4]
    np.testing.assert_allclose(out[row, top], logp[i, k, top], atol=2e-3)
    rest = np.setdiff1d(np.arange(20), top)
    tail = (1 - np.exp(logp[i, k, top]).sum()) / 16
    np.testing.assert_allclose(out[row, rest], np.log(tail), rtol=2e-3)
    np.testing.assert_allclose(np.exp(out[row]).sum(), 1.0, rtol=2e-3)


@pytest.mark.slow
def test_float16_storage_halves_bytes(cfg, cache32, tmp_path):
  z = np.random.default_rng(1).normal(size=(3, 2, 10)).astype(np.float32)
  assert cache_lib.encode(z, cache_lib.CacheSpec(dtype="float16"))["logits"].dtype == np.float16
  np.testing.assert_array_equal(cache_lib.encode(z, cache_lib.CacheSpec(dtype="float32"))["logits"], z)


@pytest.mark.slow
def test_feature_methods_and_mixup_are_refused(cfg, cache32):
  with pytest.raises(ValueError, match="reads teacher \\*features\\*.*online teacher"):
    cache_lib.check_method(True, "offline", "fitnet")
  with pytest.raises(ValueError, match="mode='offline'"):
    cache_lib.check_method(False, "dml", "kd")
  mix = cfg.replace(data=dataclasses.replace(cfg.data, mixup_alpha=1.0))
  with pytest.raises(ValueError, match="cannot be cached per example"):
    build_teacher_cache(mix, cache32)
  with pytest.raises(ValueError, match="cache.views=0"):
    cache_lib.CacheSpec(views=0)
  with pytest.raises(ValueError, match="cache.dtype='bf16'"):
    cache_lib.CacheSpec(dtype="bf16")


@pytest.mark.slow
def test_cli_cache_command(cfg, teacher_dir, tmp_path, capsys):
  from kdjax import cli

  d = tmp_path / "cli_cache"
  flags = ["--data.data_dir", cfg.data.data_dir, "--teacher.checkpoint", teacher_dir, "--data.view", "jitter"]
  rc = cli.main(
    [
      "cache",
      "mnist1d_kd",
      "kd_labelled",
      *flags,
      "--cache.dir",
      str(d),
      "--cache.views",
      "2",
      "--cache.shard-size",
      "2500",
      "--cache.batch-size",
      "500",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0 and "2 shards written" in out and "complete" in out
  cache = cache_lib.TeacherCache.open(d)
  assert cache.arrays["logits"].shape == (4000, 2, 10) and cache.arrays["logits"].dtype == np.float16
  assert cli.main(["cache", "mnist1d_kd", "kd_labelled", *flags]) == 1
  assert "needs --cache.dir" in capsys.readouterr().err
  assert cli.main(["cache", "mnist1d_kd", "kd_labelled", *flags, "--cache.dir", str(d), "--cache.views", "two"]) == 1
  assert "--cache.views expects int, got 'two'" in capsys.readouterr().err


@pytest.mark.slow
def test_feature_method_with_cache_is_refused_by_build(cfg, cache32):
  with pytest.raises(ValueError, match="method 'pkt' reads teacher \\*features\\*"):
    engine.build(_with_cache(cfg.replace(method=MethodConfig(name="pkt")), cache32))


def _exported_params(workdir) -> list[np.ndarray]:
  from kdjax import export

  return [np.asarray(x) for x in jax.tree.leaves(export.load(workdir)["params"])]


@pytest.mark.slow
def test_plain_logit_cache_fit_equals_online_fit(cfg, tmp_path):
  """K = 1, views off, float32 storage: a whole `fit` from the cache follows
  the online run (same student to float32 rounding of the teacher forward, same
  accuracy), and it really reads the cache."""
  plain = cfg.replace(data=dataclasses.replace(cfg.data, view="none"), optim=dataclasses.replace(cfg.optim, steps=8))
  d = tmp_path / "plain"
  build_teacher_cache(plain, d, cache_lib.CacheSpec(views=1, dtype="float32"))
  res_on = engine.fit(plain.replace(run=dataclasses.replace(plain.run, workdir=str(tmp_path / "on"))))
  cached = _with_cache(plain, str(d)).replace(run=dataclasses.replace(plain.run, workdir=str(tmp_path / "ca")))
  res_ca = engine.fit(cached)
  p_on, p_ca = _exported_params(tmp_path / "on"), _exported_params(tmp_path / "ca")
  for a, b in zip(p_ca, p_on):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert res_ca["test_accuracy"] == res_on["test_accuracy"]
  # … and the cached run really read the cache: doubled cached logits (digests rewritten
  # to match, as a rebuild would) change the student
  for p in d.glob("shard-*"):
    np.save(p / "logits.npy", np.load(p / "logits.npy") * 2)
    digests = json.loads((p / cache_lib.DIGEST_FILE).read_text())
    digests["logits.npy"] = hashlib.sha256((p / "logits.npy").read_bytes()).hexdigest()
    (p / cache_lib.DIGEST_FILE).write_text(json.dumps(digests))
  engine.fit(cached.replace(run=dataclasses.replace(plain.run, workdir=str(tmp_path / "ca2"))))
  p_2x = _exported_params(tmp_path / "ca2")
  rounding = max(np.abs(a - b).max() for a, b in zip(p_ca, p_on))
  assert max(np.abs(a - b).max() for a, b in zip(p_2x, p_on)) > max(100 * rounding, 1e-4)


@pytest.mark.slow
def test_processes_build_disjoint_shards_that_together_equal_one_build(tmp_path):
  """Process p of P writes shards ≡ p (mod P); the union is the 1-process cache."""
  from kdjax.data.tfds import ArrayDataset

  rng = np.random.default_rng(0)
  ds = ArrayDataset(
    rng.normal(size=(50, 12)).astype(np.float32), rng.integers(0, 5, 50), np.arange(50) * 3, name="toy", split="train"
  )
  w = rng.normal(size=(12, 5)).astype(np.float32)
  predict = lambda x: x @ w  # noqa: E731  (a linear "teacher" in NumPy)
  view = views.ViewConfig(kind="jitter", max_shift=1)
  spec = cache_lib.CacheSpec(views=2, dtype="float32", shard_size=8, batch_size=4)
  kw = dict(teacher_hash="t0", num_classes=5, view=view, spec=spec)
  one = cache_lib.build_cache(tmp_path / "one", ds, predict, **kw)
  parts = [cache_lib.build_cache(tmp_path / "two", ds, predict, process_index=p, process_count=2, **kw) for p in (0, 1)]
  assert one["written"] == 7 and [p["written"] for p in parts] == [4, 3] and parts[1]["complete"]
  a, b = _read_all(tmp_path / "one"), _read_all(tmp_path / "two")
  assert a.keys() == b.keys()
  for name in a:
    for k in a[name]:
      np.testing.assert_array_equal(a[name][k], b[name][k])
  # the stored logits are the teacher on view k of each example (independent NumPy reference)
  cache = cache_lib.TeacherCache.open(tmp_path / "one", teacher_hash="t0", view=view)
  ids = ds.ids[[0, 17, 49]]
  for k in (0, 1):
    x = Loader_view_shift(ds.images[[0, 17, 49]], ids, k, 0, shift=1)
    np.testing.assert_allclose(cache.logits(ids, np.full(3, k)), x @ w, rtol=1e-5, atol=1e-5)


def Loader_view_shift(images, ids, k, view_seed, shift):  # noqa: N802
  """Zero-pad by ``shift`` and take the window at the key's first integer draw in [0, 2·shift]."""
  keys = views.view_key(view_seed, ids, k, views.STREAM_STUDENT)
  off = views.randint(keys, 1, 2 * shift + 1)
  padded = np.pad(images, ((0, 0), (shift, shift)))
  return np.stack([padded[i, o : o + images.shape[1]] for i, o in enumerate(off)]).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dist"])
@pytest.mark.usefixtures("production_compile")
def test_class_level_terms_read_a_topk_cache_as_its_dense_reconstruction(cfg, tmp_path, method):
  """A top-k cache reaches the step as k log-probs + ids per example; class-level
  terms see :func:`kdl.topk_to_logits` of them, which equals the reader's NumPy
  reconstruction (top-k exact, tail mass spread evenly) fed as dense logits."""
  d = tmp_path / "top4"
  m_cfg = cfg.replace(method=MethodConfig(name=method, temperature=4.0))
  build_teacher_cache(m_cfg, d, cache_lib.CacheSpec(views=K, dtype="float32", top_k=4, shard_size=SHARD))
  run = engine.build(_with_cache(m_cfg, str(d)))
  batch = run.loader.batch(0, 1)
  assert batch["teacher_topk_logp"].shape == (50, 4) and "teacher_logits" not in batch
  dense = run.loader.cache.logits(batch["id"], batch["view_index"])
  assert np.ptp(np.sort(dense, -1)[:, :6], axis=-1).max() < 1e-5  # the 6 tail classes share one value
  _, p_topk, m_topk = _one_step(_with_cache(m_cfg, str(d)), batch)
  ref = {k: v for k, v in batch.items() if not k.startswith("teacher_topk")}
  _, p_dense, m_dense = _one_step(_with_cache(m_cfg, str(d)), dict(ref, teacher_logits=dense))
  term = f"loss/{method}"
  assert m_dense[term] > 0
  # Two programs compute the same loss from logits that differ by a few ulp
  # (device vs NumPy reconstruction): see kd_loss_atol.
  np.testing.assert_allclose(m_topk[term], m_dense[term], rtol=0, atol=kd_loss_atol(dense, 4.0))
  for a, b in zip(jax.tree.leaves(p_topk), jax.tree.leaves(p_dense)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_shards_are_memory_mapped_and_a_corrupt_one_is_named(cfg, cache32, tmp_path):
  """Reading maps the shard files (a cache larger than host memory works) and a
  batch reads only its rows; a damaged shard is one clear error naming it."""
  import shutil

  cache = cache_lib.TeacherCache.open(cache32)
  rows = cache.arrays["logits"]
  assert isinstance(rows, cache_lib.ShardedRows) and all(isinstance(p, np.memmap) for p in rows.parts)
  r, k = np.array([0, 1023, 1024, 3999]), np.array([0, 2, 1, 2])  # across shard boundaries
  full = np.asarray(rows)
  np.testing.assert_array_equal(rows.take(r, k), full[r, k])
  d = tmp_path / "broken"
  shutil.copytree(cache32, d)
  (d / "shard-00001-of-00004" / "logits.npy").write_bytes(b"\x93NUMPY garbage")
  with pytest.raises(ValueError, match=r"shard shard-00001-of-00004 is unreadable .*delete that shard directory"):
    cache_lib.TeacherCache.open(d)


def test_open_file_limit_is_raised_for_many_shards_or_named(monkeypatch):
  import resource

  calls = []
  monkeypatch.setattr(resource, "getrlimit", lambda _: (512, 4096))
  monkeypatch.setattr(resource, "setrlimit", lambda _, lim: calls.append(lim))
  cache_lib.read.allow_open_files(100)
  assert calls == []  # 100 + 256 spare fit under 512
  cache_lib.read.allow_open_files(900)
  assert calls == [(1156, 4096)]
  with pytest.raises(ValueError, match=r"at most 4096 files; rebuild with a larger --cache.shard-size"):
    cache_lib.read.allow_open_files(5000)


# ------------------------------------------------------------------ the cache as a Loader transform

TOY_SHIFT, TOY_K, TOY_VIEW_SEED = 2, 2, 5  # the default jitter view


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """A toy training set with integer signals and an integer linear "teacher": its float32 outputs are exact."""
  from kdjax.data.tfds import ArrayDataset

  rng = np.random.default_rng(2)
  ds = ArrayDataset(
    rng.integers(-4, 5, (30, 12)).astype(np.float32), rng.integers(0, 5, 30), np.arange(30) * 7 + 1, "toy", "train"
  )
  w = rng.integers(-3, 4, (12, 5)).astype(np.float32)
  view = views.ViewConfig(kind="jitter")
  d = tmp_path_factory.mktemp("toy_cache")
  spec = cache_lib.CacheSpec(views=TOY_K, view_seed=TOY_VIEW_SEED, dtype="float32", shard_size=8, batch_size=4)
  cache_lib.build_cache(d, ds, lambda x: x @ w, teacher_hash="t0", num_classes=5, view=view, spec=spec)
  return ds, w, view, cache_lib.TeacherCache.open(d, teacher_hash="t0", view=view)


def _expected_batch(ds, w, *, seed, epoch, step, batch_size, view_mode="consistent", padded=False) -> dict:
  """A cached batch written out from the Loader's order, the view draw and the teacher, without the cache code."""
  order = np.random.default_rng([seed, epoch]).permutation(len(ds))
  rows = order[step * batch_size : (step + 1) * batch_size]
  rows = np.concatenate([rows, order[: batch_size - len(rows)]])  # a short last batch wraps to the start
  ids = ds.ids[rows]
  k = views.randint(views.view_key(seed, ids, epoch, 3), 0, TOY_K)  # stream 3: the per-epoch choice of view
  cached_view = Loader_view_shift(ds.images[rows], ids, k, TOY_VIEW_SEED, shift=TOY_SHIFT)
  own_view = Loader_view_shift(ds.images[rows], ids, epoch, seed, shift=TOY_SHIFT)
  out = {
    "inputs": cached_view if view_mode == "consistent" else own_view,
    "teacher_logits": cached_view @ w,
    "view_index": k.astype(np.int32),
    "label": ds.labels[rows],
    "id": ids.astype(np.int32),
    "epoch": np.full(batch_size, epoch, np.int32),
  }
  if padded:
    out["mask"] = step * batch_size + np.arange(batch_size) < len(ds)
  return out


def _assert_same_batch(got: dict, want: dict) -> None:
  assert list(got) == list(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _with_inputs_sum(batch: dict) -> dict:
  """A transform that runs after the cache's (it sees the cached view as the inputs)."""
  return dict(batch, inputs_sum=batch["inputs"].sum(-1))


@pytest.mark.parametrize("view_mode", ["consistent", "independent"])
def test_cached_batches_are_the_loader_order_the_drawn_view_and_its_teacher_output(toy, view_mode):
  from kdjax.data import Loader

  ds, w, view, cache = toy
  transform = cache_lib.CachedOutputs(ds, cache, seed=3, view_mode=view_mode)
  plain = Loader(ds, 8, seed=3, view=view, view_mode=view_mode, process_count=1, process_index=0, transform=transform)
  named = cache_lib.CachedLoader(ds, cache, 8, seed=3, view_mode=view_mode, process_count=1, process_index=0)
  for epoch, step in ((0, 0), (1, 2), (4, 3)):
    want = _expected_batch(ds, w, seed=3, epoch=epoch, step=step, batch_size=8, view_mode=view_mode)
    _assert_same_batch(plain.batch(epoch, step), want)
    _assert_same_batch(named.batch(epoch, step), want)
  padded = cache_lib.CachedLoader(ds, cache, 8, seed=3, view_mode=view_mode, drop_remainder=False, process_count=1)
  want = _expected_batch(ds, w, seed=3, epoch=2, step=3, batch_size=8, view_mode=view_mode, padded=True)
  _assert_same_batch(padded.batch(2, 3), want)


def test_cached_loader_resumes_exactly_and_runs_an_existing_transform_after_the_cache(toy):
  import pickle

  ds, w, _, cache = toy
  kw = dict(seed=4, process_count=1, process_index=0, transform=_with_inputs_sum)
  loader = cache_lib.CachedLoader(ds, cache, 6, **kw)
  for _ in range(7):  # into the second epoch
    next(loader)
  state = loader.state()
  resumed = cache_lib.CachedLoader(ds, cache, 6, **kw)
  resumed.restore(state)
  shipped = pickle.loads(pickle.dumps(loader))  # as a Grain worker receives it: the cache reopened from disk
  want = _expected_batch(ds, w, seed=4, epoch=1, step=2, batch_size=6)
  want["inputs_sum"] = want["inputs"].sum(-1)
  for got in (next(loader), next(resumed), shipped.batch(1, 2)):
    _assert_same_batch(got, want)


def test_loader_for_experiment_serves_the_cache_then_the_loaders_own_transform(toy):
  from types import SimpleNamespace

  from kdjax.data import Loader

  ds, w, _, cache = toy
  data = SimpleNamespace(
    teacher_cache=str(cache.directory), view="jitter", mixup_alpha=0.0, cutmix_alpha=0.0, name="toy", image_size=None
  )
  cfg = SimpleNamespace(mode="offline", data=data)
  view = cache_lib.experiment_view(cfg)
  loader = Loader(ds, 6, seed=4, view=view, process_count=1, process_index=0, transform=_with_inputs_sum)
  kw = dict(needs_teacher_features=False, method_name="kd")
  cached = cache_lib.loader_for_experiment(cfg, loader, teacher_hash="t0", **kw)
  want = _expected_batch(ds, w, seed=4, epoch=0, step=1, batch_size=6)
  want["inputs_sum"] = want["inputs"].sum(-1)
  _assert_same_batch(cached.batch(0, 1), want)
  with pytest.raises(ValueError, match="stale: built for teacher t0 but the configured teacher is t1"):
    cache_lib.loader_for_experiment(cfg, loader, teacher_hash="t1", **kw)


def test_ids_that_batches_cannot_carry_are_refused(toy):
  from kdjax.data.tfds import ArrayDataset

  _, _, view, _ = toy
  big = ArrayDataset(np.zeros((2, 12), np.float32), np.zeros(2), np.array([0, 2**31]), "toy", "train")
  meta = {"views": 1, "view_seed": 0, "num_classes": 5, "view": cache_lib.view_fingerprint(view)}
  cache = cache_lib.TeacherCache(meta, big.ids, {"logits": np.zeros((2, 1, 5), np.float32)})
  with pytest.raises(ValueError, match=r"example ids span \[0, 2147483648\] but batches carry them as int32"):
    cache_lib.CachedOutputs(big, cache)
