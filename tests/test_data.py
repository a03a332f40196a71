"""Tests for kdjax.data: embedded builders, loaders, views, sharding, offline errors."""

import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import data as kd
from kdjax.data import views as V


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _toy(n=40, shape=(32, 32, 3)):
  rng = np.random.default_rng(0)
  return kd.ArrayDataset(
    rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 10, np.arange(n), name="toy", split="train"
  )


# ---------------------------------------------------------------- 1. embedded datasets
def _read(name, split, data_dir):
  """A prepared split read straight through TFDS's ArrayRecord data source (no kdjax code)."""
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  rows = [src[i] for i in range(len(src))]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.slow
def test_mnist1d_prepared_as_array_record_equals_package(data_dir):
  from mnist1d.data import get_dataset_args, make_dataset

  ref = make_dataset(get_dataset_args())
  # small_transfer: the default train/test args, a 2000-example transfer split (fast).
  xt = kd.load_arrays("mnist1d/small_transfer", "transfer", data_dir)  # prepares the dataset
  builder = tfds.builder("mnist1d/small_transfer", data_dir=data_dir)
  assert builder.info.file_format.value == "array_record"
  tr, te = (_read("mnist1d/small_transfer", s, data_dir) for s in ("train", "test"))
  np.testing.assert_array_equal(tr["image"], ref["x"].astype(np.float32))
  np.testing.assert_array_equal(tr["label"], ref["y"])
  np.testing.assert_array_equal(te["image"], ref["x_test"].astype(np.float32))
  np.testing.assert_array_equal(te["label"], ref["y_test"])
  assert tr["image"].dtype == np.float32 and tr["image"].shape == (4000, 40)
  got = kd.load_arrays("mnist1d/small_transfer", "train", data_dir)
  np.testing.assert_array_equal(got.images, tr["image"])
  np.testing.assert_array_equal(got.ids, np.arange(4000))
  assert xt.images.shape == (2000, 40) and (xt.labels == -1).all()
  seen = {r.tobytes() for r in np.concatenate([tr["image"], te["image"]])}
  assert not any(r.tobytes() in seen for r in xt.images)
  # The default config (what plain tfds.builder("mnist1d") builds) generates train/test
  # from exactly the package's default args; it differs from small_transfer only in
  # the transfer size (40k takes ~15 s to build, so the data above is small_transfer's).
  from kdjax.data.builders.mnist1d import Mnist1d, _args

  assert tfds.builder("mnist1d", data_dir=data_dir).builder_config.name == "default"
  cfgs = {c.name: c for c in Mnist1d.BUILDER_CONFIGS}
  d, s = cfgs["default"], cfgs["small_transfer"]
  assert vars(_args(d.num_samples, d.seed, d.train_split)) == get_dataset_args(as_dict=True)
  assert (d.num_samples, d.seed, d.train_split) == (s.num_samples, s.seed, s.train_split)
  assert d.transfer_size == 40_000 and d.transfer_seed not in (d.seed, s.seed)
  assert s.transfer_seed == d.transfer_seed


def test_mnist1d_sizes_configurable(data_dir):
  # Any size: pass a builder config (here 500 samples, a 300-example transfer set).
  from mnist1d.data import get_dataset_args, make_dataset

  from kdjax.data.builders.mnist1d import Mnist1dConfig

  cfg = Mnist1dConfig(name="custom_tiny", num_samples=500, transfer_size=300, transfer_seed=7)
  builder = tfds.builder("mnist1d", config=cfg, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  got = {}
  for s in ("train", "test", "transfer"):
    src = builder.as_data_source(split=s)
    got[s] = {k: np.stack([src[i][k] for i in range(len(src))]) for k in ("image", "label")}
  args = get_dataset_args()
  args.num_samples = 500
  ref = make_dataset(args)
  np.testing.assert_array_equal(got["train"]["image"], ref["x"].astype(np.float32))
  np.testing.assert_array_equal(got["test"]["label"], ref["y_test"])
  args.num_samples, args.seed, args.train_split = 300, 7, 1.0
  np.testing.assert_array_equal(got["transfer"]["image"], make_dataset(args)["x"].astype(np.float32))
  assert (got["transfer"]["label"] == -1).all()


def test_digits_prepared_and_normalised_by_16(data_dir):
  te = kd.load_arrays("digits", "test", data_dir)
  tr = _read("digits", "train", data_dir)
  assert tr["image"].shape == (1438, 8, 8, 1) and tr["image"].dtype == np.uint8
  assert len(te) == 359 and te.images.max() == 16 and te.labels.dtype == np.int32
  from sklearn.datasets import load_digits

  from kdjax.data.builders.digits import split_indices

  ref = load_digits()
  np.testing.assert_array_equal(tr["image"][..., 0], ref.images[split_indices()["train"]].astype(np.uint8))
  x = V.normalize(kd.default_view("digits"), te.images)
  assert x.dtype == np.float32 and x.min() == 0 and x.max() == 1  # x / 16, as documented
  np.testing.assert_allclose(x, te.images / 16.0)


def test_concat_offsets_ids(data_dir):
  tr = kd.load_arrays("mnist1d/small_transfer", "train", data_dir)
  xt = kd.load_arrays("mnist1d/small_transfer", "transfer", data_dir)
  both = kd.concat([tr, xt])
  assert len(both) == 6000 and len(np.unique(both.ids)) == 6000
  np.testing.assert_array_equal(both.ids[:4000], tr.ids)
  assert both.ids[4000] == 4000
  spec = kd.get_info("mnist1d", data_dir)
  assert spec.num_classes == 10 and spec.image_shape == (40,)
  # the same rows read lazily from the record files
  lazy = kd.concat([kd.RecordSource("mnist1d/small_transfer", s, data_dir) for s in ("train", "transfer")])
  idx = np.array([5999, 3, 4000, 3999])
  for got, want in zip(lazy.take(idx), both.take(idx)):
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- 2. mocked and streamed TFDS datasets
def test_mock_cifar100_shapes():
  with tfds.testing.mock_data(num_examples=20):
    ds = kd.load_arrays("cifar100", "train", download=True)
  assert ds.images.shape == (20, 32, 32, 3) and ds.images.dtype == np.uint8
  loader = kd.Loader(ds, 8, view=kd.default_view("cifar100"), process_index=0, process_count=1)
  b = next(iter(loader))
  assert b["inputs"].shape == (8, 32, 32, 3) and b["inputs"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["id"].dtype == np.int32
  assert kd.get_info("cifar100").num_classes == 100


def test_mock_imagenet_streams_record_by_record():
  cfg = kd.ViewConfig(kind="imagenet", image_size=64)
  with tfds.testing.mock_data(num_examples=8):
    loader = kd.make_loader(
      "imagenet2012",
      "train",
      4,
      seed=0,
      view=cfg,
      view_mode="independent",
      process_index=0,
      process_count=1,
      download=True,
      shuffle=False,
    )
    assert isinstance(loader.ds, kd.RecordSource)
    b1, b2 = loader.batch(0, 0), loader.batch(0, 0)
    ev = kd.make_loader("imagenet2012", "validation", 4, view=cfg, process_index=0, process_count=1, download=True)
    e = next(kd.eval_batches(ev.ds, 4, view=cfg, process_index=0, process_count=1))
  assert b1["inputs"].shape == (4, 64, 64, 3) and b1["inputs"].dtype == np.float32
  assert b1["teacher_inputs"].shape == (4, 64, 64, 3) and b1["id"].dtype == np.int32
  assert not np.allclose(b1["inputs"], b1["teacher_inputs"])
  np.testing.assert_array_equal(b1["inputs"], b2["inputs"])  # reproducible
  assert e["inputs"].shape == (4, 64, 64, 3)
  assert kd.get_info("imagenet2012", image_size=64).image_shape == (64, 64, 3)


# A tiny on-disk image dataset (variable image sizes, like imagenet2012), read
# record by record: tfds.testing.mock_data gives no real files, so which records a
# process reads can only be checked on prepared ones.
from etils import epath  # noqa: E402

from kdjax.data.builders._base import LocalBuilder  # noqa: E402

N_STREAM = 24


class KdjaxTinyStream(LocalBuilder):
  VERSION = tfds.core.Version("1.0.0")
  # tests/ is not a package, so TFDS cannot infer where builder metadata lives.
  pkg_dir_path = epath.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=10)}
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from PIL import Image  # TFDS encodes PIL images with Pillow (NumPy arrays would need TensorFlow)

    for i, image in enumerate(_tiny_stream_images()):
      yield i, {"image": Image.fromarray(image), "label": i % 10}


def _tiny_stream_images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (10 + i % 3, 12 + i % 2, 3), dtype=np.uint8) for i in range(N_STREAM)]


class _Counting:
  """A source that records which rows were read."""

  def __init__(self, src):
    self.src, self.ids, self.read = src, src.ids, []

  def __len__(self):
    return len(self.src)

  def take(self, idx):
    self.read.extend(np.asarray(idx).tolist())
    return self.src.take(idx)


def _stream(data_dir, **kw):
  args = dict(batch_size=4, seed=0, view=kd.ViewConfig(kind="imagenet", image_size=8), process_index=0, process_count=1)
  return kd.Loader(kd.RecordSource("kdjax_tiny_stream", "train", data_dir), **{**args, **kw})


def _ids(batches):
  return np.concatenate([b["id"] for b in batches])


def test_stream_order_shards_views_and_restore(data_dir):
  one = _stream(data_dir)
  assert one.steps_per_epoch == N_STREAM // 4 and one.worker_count == kd.default_workers(one.ds)
  e0 = _ids(one.epoch_batches(0))
  assert sorted(e0.tolist()) == list(range(N_STREAM))  # ids = index in the split
  np.testing.assert_array_equal(_ids(one.epoch_batches(0)), e0)  # order = f(seed, epoch)
  orders = [e0] + [_ids(one.epoch_batches(e)) for e in (1, 2, 3)]
  assert len({o.tobytes() for o in orders}) == 4  # every epoch its own order
  assert not np.array_equal(_ids(_stream(data_dir, seed=1).epoch_batches(0)), e0)
  # two processes read disjoint, equal-sized sets of records that cover the split
  reads = []
  for p in range(2):
    loader = _stream(data_dir, process_index=p, process_count=2)
    loader.ds = _Counting(loader.ds)
    _ids(loader.epoch_batches(0))
    reads.append(loader.ds.read)
  assert len(reads[0]) == len(reads[1]) == N_STREAM // 2
  assert not set(reads[0]) & set(reads[1]) and set(reads[0]) | set(reads[1]) == set(range(N_STREAM))
  # each image is the decoded record; views = views.augment of (seed, id, epoch, stream)
  raw = _tiny_stream_images()
  images, labels, _ = one.ds.take(np.array([5, 2]))
  np.testing.assert_array_equal(images[0], raw[5])
  assert labels.tolist() == [5, 2]
  ind = _stream(data_dir, view_mode="independent")
  b = ind.batch(2, 0)
  for key, stream in (("inputs", V.STREAM_STUDENT), ("teacher_inputs", V.STREAM_TEACHER)):
    want = np.concatenate([V.augment(ind.view, [raw[i]], V.view_key(0, [i], 2, stream)) for i in b["id"]])
    np.testing.assert_array_equal(b[key], want)
  assert not np.allclose(b["inputs"], b["teacher_inputs"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_next_batches(data_dir, workers):
  """Batches after a restore equal the uninterrupted run's, with 0 and 2 Grain workers."""
  one = _stream(data_dir, worker_count=workers)
  it = iter(one)
  for _ in range(one.steps_per_epoch + 2):  # into epoch 1
    next(it)
  state = json.loads(json.dumps(one.state()))  # what a checkpoint stores
  assert state == {"epoch": 1, "step_in_epoch": 2, "seed": 0}
  want = [next(it) for _ in range(one.steps_per_epoch)]  # across the next epoch boundary
  it.close()
  again = _stream(data_dir, worker_count=workers)
  again.restore(state)
  got = iter(again)
  for w in want:
    g = next(got)
    for k in ("inputs", "id", "label", "epoch"):
      np.testing.assert_array_equal(g[k], w[k])
  got.close()
  # ... and whatever the worker count, the same stream
  serial = _stream(data_dir, worker_count=0)
  serial.restore(state)
  np.testing.assert_array_equal(_ids(b for b, _ in zip(serial, range(len(want)))), _ids(want))


# ---------------------------------------------------------------- 3. determinism / resume
def test_same_seed_same_batches_epochs_differ_and_restore():
  ds = _toy()
  cfg = kd.ViewConfig(kind="cifar")
  a = kd.Loader(ds, 8, seed=3, view=cfg, process_index=0, process_count=1)
  b = kd.Loader(ds, 8, seed=3, view=cfg, process_index=0, process_count=1)
  assert a.steps_per_epoch == 5
  ita, itb = iter(a), iter(b)
  first = [next(ita) for _ in range(7)]
  for x in first:
    y = next(itb)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a.order(0), a.order(1))
  e0 = np.concatenate([x["id"] for x in a.epoch_batches(0)])
  assert sorted(e0) == list(range(40))
  np.testing.assert_array_equal(e0, np.concatenate([x["id"] for x in first[:5]]))
  state = json.loads(json.dumps(a.state()))
  assert state == {"epoch": 1, "step_in_epoch": 2, "seed": 3}
  want = [next(ita) for _ in range(4)]
  c = kd.Loader(ds, 8, seed=3, view=cfg, process_index=0, process_count=1)
  c.restore(state)
  itc = iter(c)
  for x in want:
    y = next(itc)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- 4. multi-process sharding
@pytest.mark.parametrize(
  "view", [kd.ViewConfig(kind="cifar"), kd.ViewConfig(kind="cifar", mixup_alpha=1.0, cutmix_alpha=1.0)]
)
def test_two_processes_equal_one(view):
  ds = _toy()
  one = kd.Loader(ds, 8, seed=1, view=view, view_mode="independent", process_index=0, process_count=1)
  two = [
    kd.Loader(ds, 8, seed=1, view=view, view_mode="independent", process_index=p, process_count=2) for p in range(2)
  ]
  seen = [set(), set()]
  for step in range(one.steps_per_epoch):
    g = one.batch(2, step)
    parts = [l.batch(2, step) for l in two]
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([p[k] for p in parts]))
    for p in range(2):
      seen[p] |= set(parts[p]["id"].tolist())
  assert not (seen[0] & seen[1]) and seen[0] | seen[1] == set(range(40))


def test_eval_batches_pad_and_mask():
  ds = _toy(n=10)
  bs = list(kd.eval_batches(ds, 4, view=kd.ViewConfig(kind="cifar"), process_index=0, process_count=1))
  assert [b["inputs"].shape[0] for b in bs] == [4, 4, 4]
  assert bs[-1]["mask"].tolist() == [True, True, False, False]
  np.testing.assert_array_equal(np.concatenate([b["id"][b["mask"]] for b in bs]), np.arange(10))


def test_to_global_single_process():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  b = next(iter(kd.Loader(_toy(), 8, process_index=0, process_count=1)))
  g = kd.to_global(b, NamedSharding(mesh, P("data")))
  np.testing.assert_array_equal(np.asarray(g["inputs"]), b["inputs"])


# ---------------------------------------------------------------- 5. views
def test_consistent_vs_independent_views():
  ds = _toy()
  cfg = kd.ViewConfig(kind="cifar")
  cons = next(iter(kd.Loader(ds, 8, seed=0, view=cfg, process_index=0, process_count=1)))
  assert "teacher_inputs" not in cons  # the teacher uses "inputs"
  ind = next(iter(kd.Loader(ds, 8, seed=0, view=cfg, view_mode="independent", process_index=0, process_count=1)))
  np.testing.assert_array_equal(cons["inputs"], ind["inputs"])
  assert not np.array_equal(ind["inputs"], ind["teacher_inputs"])
  # reproducible from (seed, id, epoch)
  ids = ind["id"]
  again = V.augment(cfg, ds.images[ids], V.view_key(0, ids, 0, V.STREAM_TEACHER))
  np.testing.assert_array_equal(again, ind["teacher_inputs"])
  again = V.augment(cfg, ds.images[ids], V.view_key(0, ids, 0, V.STREAM_STUDENT))
  np.testing.assert_array_equal(again, ind["inputs"])
  # ... whatever batch or position the example lands in (epoch 0, another step)
  later = kd.Loader(ds, 8, seed=0, view=cfg, view_mode="independent", process_index=0, process_count=1).batch(0, 3)
  np.testing.assert_array_equal(
    later["teacher_inputs"], V.augment(cfg, ds.images[later["id"]], V.view_key(0, later["id"], 0, V.STREAM_TEACHER))
  )
  other_epoch = V.augment(cfg, ds.images[ids], V.view_key(0, ids, 1, V.STREAM_STUDENT))
  assert not np.array_equal(other_epoch, ind["inputs"])


def test_view_kinds_and_mixing():
  x = _toy(16).images
  k = V.view_key(0, np.arange(16), 0)
  none = V.augment(kd.ViewConfig(kind="none"), x, k)
  np.testing.assert_allclose(none, V.normalize(kd.ViewConfig(), x))
  crop = V.augment(kd.ViewConfig(kind="cifar", normalize=False), x, k)
  # every crop is a zero-padded shift (maybe flipped) of the image
  for i in range(16):
    xi = np.pad(x[i], ((4, 4), (4, 4), (0, 0))).astype(np.float32) / 255
    ok = any(
      np.allclose(crop[i], w[:, ::f], atol=1e-6)
      for dy in range(9)
      for dx in range(9)
      for w in [xi[dy : dy + 32, dx : dx + 32]]
      for f in (1, -1)
    )
    assert ok
  j = V.augment(kd.ViewConfig(kind="jitter", normalize=False), np.ones((16, 40), np.float32), k)
  assert j.shape == (16, 40) and (j.sum(1) >= 36).all()
  cfg = kd.ViewConfig(kind="none", cutmix_alpha=1.0, normalize=False)
  w, lam = V.mix_weights(cfg, k, (32, 32, 3))
  mixed = V.apply_mix(w, np.zeros((16, 32, 32, 3), np.float32), np.ones((16, 32, 32, 3), np.float32))
  np.testing.assert_allclose(1 - mixed.mean(axis=(1, 2, 3)), lam, rtol=1e-6)
  w, lam = V.mix_weights(kd.ViewConfig(mixup_alpha=0.2), k, (40,))
  assert ((lam >= 0) & (lam <= 1)).all() and np.allclose(w[:, 0], lam)


def test_loader_mixup_pairs_and_beta_moments():
  # Each mixed row is λ·x_i + (1 − λ)·x_j for a partner j of the same global batch,
  # with label_b = label_j; the teacher (consistent mode) sees that same mixed image.
  ds = _toy(16, (4, 4, 1))
  cfg = kd.ViewConfig(kind="none", mixup_alpha=0.4)
  loader = kd.Loader(ds, 8, seed=5, view=cfg, process_index=0, process_count=1)
  b = loader.batch(0, 1)
  batch_ids = loader.global_indices(0, 1)[0]
  x = ds.images.astype(np.float64) / 255
  assert "teacher_inputs" not in b
  for i, lam in zip(b["id"], b["mix_lambda"]):
    row = b["inputs"][b["id"] == i][0]
    ok = [j for j in batch_ids if np.allclose(row, lam * x[i] + (1 - lam) * x[j], atol=1e-6)]
    assert ok and ds.labels[ok[0]] == b["label_b"][b["id"] == i][0]
  # λ ~ Beta(α, α): mean 1/2, variance 1/(4(2α + 1)) (independent of the inverse-CDF code)
  for alpha in (0.4, 1.0, 2.0):
    lam = V.beta(V.view_key(0, np.arange(20000), 0, V.STREAM_MIX), 1, alpha)
    assert abs(lam.mean() - 0.5) < 0.01
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01 / (2 * alpha + 1)


# ---------------------------------------------------------------- 6. offline errors
def test_missing_dataset_one_line_error(tmp_path):
  t = time.perf_counter()
  with pytest.raises(kd.DatasetUnavailableError) as e:
    kd.load_arrays("cifar10", "train", str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg and "cifar10" in msg and str(tmp_path) in msg and "kdjax prepare cifar10" in msg
  assert isinstance(e.value, ValueError) and time.perf_counter() - t < 30
  with pytest.raises(kd.DatasetUnavailableError):
    kd.load_arrays("no_such_dataset_xyz", "train", str(tmp_path))


def test_downloadable_dataset_without_tensorflow_is_one_line(tmp_path):
  import importlib.util

  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed here: preparing cifar100 would try the network")
  with pytest.raises(kd.DatasetUnavailableError) as e:
    kd.prepare.tfds("cifar100", str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg and "pip install 'kdjax[tfds]'" in msg and "kdjax prepare cifar100" in msg
  assert not list(tmp_path.glob("cifar100/*/*.array_record*"))  # nothing half-written


def test_the_default_install_requires_no_tensorflow():
  from importlib.metadata import requires

  reqs = requires("kdjax")
  plain = [r for r in reqs if "extra ==" not in r]
  assert any(r.startswith("grain") for r in plain) and any(r.startswith("array_record") for r in plain)
  assert not [r for r in plain if r.startswith("tensorflow") and not r.startswith("tensorflow-datasets")]
  assert [r for r in reqs if r.startswith("tensorflow-cpu") and 'extra == "tfds"' in r]


# ---------------------------------------------------------------- 7. imagenet views (NumPy + Pillow)
def test_inception_boxes_follow_their_ranges_and_keys():
  keys = V.view_key(0, np.arange(2000), 0)
  boxes = np.array([V.inception_box(k, 300, 400, 0.08) for k in keys])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
  area, aspect = h * w / (300 * 400), w / h
  assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
  assert len({tuple(b) for b in boxes}) > 1900  # keyed: ~one box per example
  assert (boxes == np.array([V.inception_box(k, 300, 400, 0.08) for k in keys])).all()


def test_imagenet_views_resize_crop_and_normalise():
  cfg = kd.ViewConfig(kind="imagenet", image_size=16, normalize=False)
  flat = np.full((30, 50, 3), 200, np.uint8)
  out = V.augment(cfg, [flat, flat[:20]], V.view_key(0, np.arange(2), 0))
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 200 / 255, atol=1e-6)  # any crop of a flat image is flat
  # eval: short side -> 16 / 0.875 = 18 px, then the centre 16x16; a horizontal ramp stays a
  # ramp, mirrored neither way
  ramp = np.tile(np.linspace(0, 255, 36).astype(np.uint8)[None, :, None], (18, 1, 3))
  ev = V.normalize(cfg, [ramp])[0]
  assert ev.shape == (16, 16, 3) and (np.diff(ev[8, :, 0]) > 0).all()
  full = kd.ViewConfig(kind="imagenet", image_size=16)  # ImageNet mean/std
  np.testing.assert_allclose(V.normalize(full, [ramp])[0], (ev - V.IMAGENET_MEAN) / V.IMAGENET_STD, atol=1e-5)


def test_prepare_command_stores_an_embedded_dataset_and_refuses_bad_input(tmp_path, capsys):
  from kdjax import cli

  assert cli.main(["prepare", "digits", "--data_dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "digits: prepared in" in out and list(tmp_path.glob("digits/*/digits-train.array_record-*"))
  assert cli.main(["prepare", "--data_dir", str(tmp_path)]) == 1
  assert "usage: kdjax prepare NAME" in capsys.readouterr().err
  assert cli.main(["prepare", "no_such_dataset_xyz", "--data_dir", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown TFDS dataset 'no_such_dataset_xyz'" in err


ORPHAN_SCRIPT = """
import time
import numpy as np
from kdjax import data as kd
if __name__ == "__main__":
  ds = kd.ArrayDataset(np.zeros((64, 4), np.float32), np.zeros(64), np.arange(64))
  it = iter(kd.Loader(ds, 8, process_index=0, process_count=1, worker_count=2))
  next(it)
  print("ready", flush=True)
  time.sleep(300)
"""


@pytest.mark.slow
def test_input_workers_die_with_a_killed_training_process(tmp_path):
  import os
  import signal
  import subprocess
  import sys

  script = tmp_path / "train.py"
  script.write_text(ORPHAN_SCRIPT)
  proc = subprocess.Popen(
    [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
  )
  try:
    assert proc.stdout.readline().strip() == "ready"
    children = subprocess.run(
      ["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2  # the two Grain workers
    time.sleep(1.0)
    assert all(os.path.exists(f"/proc/{c}") for c in children)  # alive while their parent is
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(c) for c in children):
      time.sleep(0.2)
    assert not any(_alive(c) for c in children), "orphaned input workers"
  finally:
    proc.kill()


def _alive(pid: str) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False
