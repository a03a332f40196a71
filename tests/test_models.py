"""kdjax.models: names, parameter counts, feature names/shapes, BN/dropout
state, the functional (split → jit → merge) path, dtypes, errors, causality.

Big models are only ever built abstractly (``nnx.eval_shape``) and checked
with ``jax.eval_shape``; real forwards run on a handful of small models at
batch 2, so the file stays fast on a 2-core CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdjax.models as km
from kdjax.models import ModelOutput

# ---------------------------------------------------------------------------
# Names and families

CIFAR_RESNET = [
  "resnet8",
  "resnet14",
  "resnet20",
  "resnet32",
  "resnet44",
  "resnet56",
  "resnet110",
  "resnet8x4",
  "resnet32x4",
]
WRN = ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
VGG = ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "mobilenet_v1"]
ALL = (
  CIFAR_RESNET
  + WRN
  + VGG
  + ["mobilenetv2", "shufflenetv1", "shufflenetv2"]
  + IMAGENET
  + [
    "mlp",
    "mlp_dropout",
    "cnn1d",
    "mlp_1200",
    "mlp_800",
    "cnn_digits",
    "transformer_lm",
    "lm_4x64",
    "lm_2x64",
    "lm_2x32",
    "lm_1x64",
    "lm_1x32",
  ]
)


def _stages(n: int, preact: bool = True, stem: bool = True) -> set[str]:
  names = {f"stage{k}" for k in range(1, n + 1)} | {"pooled"}
  if preact:
    names |= {f"stage{k}_preact" for k in range(1, n + 1)}
  if stem:
    names.add("stem")
  return names


def expected_feature_names(name: str) -> set[str]:
  if name in CIFAR_RESNET or name in WRN or name.startswith("shufflenet"):
    return _stages(3)
  if name in VGG or name in IMAGENET:
    return _stages(4)
  if name == "mobilenetv2":
    return _stages(4, preact=False)
  if name in ("mlp", "mlp_dropout", "mlp_1200", "mlp_800"):
    return _stages(2, stem=False)
  if name in ("cnn1d", "cnn_digits"):
    return _stages(2)
  if name == "transformer_lm":
    return {"embed", "block0", "block1", "pooled"}
  if name.startswith("lm_"):
    return {"embed", "pooled"} | {f"block{i}" for i in range(int(name[3]))}
  raise AssertionError(name)


@functools.cache
def abstract(name: str, **overrides) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves: no memory, no real init."""
  return nnx.eval_shape(lambda: km.create(name, rngs=nnx.Rngs(0), **overrides))


def test_available_lists_every_model():
  assert km.available() == ALL
  assert km.available("imagenet") == IMAGENET
  assert set(km.available("cifar")) == set(CIFAR_RESNET + WRN + VGG) | {"mobilenetv2", "shufflenetv1", "shufflenetv2"}


# ---------------------------------------------------------------------------
# Parameter counts (nnx.Param only: BN running statistics are BatchStat, as
# PyTorch's parameters() counts BN weight/bias but not running mean/var).

# Published, in millions, at 100 classes (CRD/RepDistiller) — two decimals.
PUBLISHED_CIFAR_M = {
  "resnet20": 0.28,
  "resnet32": 0.47,
  "resnet56": 0.86,
  "resnet110": 1.74,
  "resnet8x4": 1.23,
  "resnet32x4": 7.43,
  "wrn_16_2": 0.70,
  "wrn_40_1": 0.57,
  "wrn_40_2": 2.26,
  "vgg8": 3.96,
  "vgg13": 9.46,
  "mobilenetv2": 0.81,
  "shufflenetv1": 0.95,
  "shufflenetv2": 1.36,
}

# Exact counts of the builds here (regression pins). Each agrees with the
# published figure above within 0.5 %, except resnet20: 278,324 is 0.6 % under
# 280,000, but "0.28M" is rounded to 0.01M, so it stands for [0.275M, 0.285M)
# and the exact build is inside it. The arithmetic (3×3 convs no bias, BN has
# 2 params per channel):
#   stem     27·16 + 32                                   =     464
#   stage1   3 blocks × 2 × (9·16·16 + 32)                =  14,016
#   stage2   (9·16·32 + 64) + (9·32·32 + 64) + (16·32 + 64)
#            + 2 blocks × 2 × (9·32·32 + 64)               =  51,648
#   stage3   (9·32·64 + 128) + (9·64·64 + 128) + (32·64 + 128)
#            + 2 blocks × 2 × (9·64·64 + 128)              = 205,696
#   fc       64·100 + 100                                  =   6,500
#   total                                                  = 278,324
# vgg8 = 3,965,028 is 0.13 % over the published 3.96M (which rounds down).
EXACT = {
  "resnet8": 83_892,
  "resnet14": 181_108,
  "resnet20": 278_324,
  "resnet32": 472_756,
  "resnet44": 667_188,
  "resnet56": 861_620,
  "resnet110": 1_736_564,
  "resnet8x4": 1_233_540,
  "resnet32x4": 7_433_860,
  "wrn_16_1": 180_916,
  "wrn_16_2": 703_284,
  "wrn_40_1": 569_780,
  "wrn_40_2": 2_255_156,
  "vgg8": 3_965_028,
  "vgg11": 9_277_284,
  "vgg13": 9_462_180,
  "vgg16": 14_774_436,
  "vgg19": 20_086_692,
  "mobilenetv2": 812_836,
  "shufflenetv1": 949_258,
  "shufflenetv2": 1_356_104,
  # torchvision at 1000 classes
  "resnet18": 11_689_512,
  "resnet34": 21_797_672,
  "resnet50": 25_557_032,
  "mobilenet_v1": 4_231_976,  # published "4.2M"
  # MNIST-1D paper: 40·100+100 + 100·100+100 + 100·10+10
  "mlp": 15_210,
  "mlp_dropout": 15_210,  # dropout adds no parameters
  # 1·25·5+25 + 2·(25·25·3+25) + 125·10+10 = 150 + 3,800 + 1,260
  "cnn1d": 5_210,
  # 784·1200+1200 + 1200·1200+1200 + 1200·10+10
  "mlp_1200": 2_395_210,
  # 784·800+800 + 800·800+800 + 800·10+10
  "mlp_800": 1_276_810,
  # 9·16+16 + 9·16·32+32 + 9·32·64+64 + 64·10+10
  "cnn_digits": 23_946,
  # tok 256·64 + pos 128·64 + 2·(LN 128 + qkv 64·192+192 + proj 64·64+64
  #  + LN 128 + fc1 64·256+256 + fc2 256·64+64) + LN 128 + head 64·256
  "transformer_lm": 141_056,
  # lm_{n}x{d}: tok 256·d + pos 64·d + LN_f 2d + head d·256 + n blocks of 12d² + 13d
  # (LN 2d, qkv d·3d + 3d, proj d² + d, LN 2d, fc1 d·4d + 4d, fc2 4d·d + d)
  "lm_4x64": 578 * 64 + 4 * (12 * 64**2 + 13 * 64),  # 236,928
  "lm_2x64": 578 * 64 + 2 * (12 * 64**2 + 13 * 64),
  "lm_2x32": 578 * 32 + 2 * (12 * 32**2 + 13 * 32),
  "lm_1x64": 578 * 64 + (12 * 64**2 + 13 * 64),
  "lm_1x32": 578 * 32 + (12 * 32**2 + 13 * 32),  # 31,200
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CIFAR_M))
def test_param_count_matches_published(name):
  n = km.count_params(abstract(name))
  published = PUBLISHED_CIFAR_M[name] * 1e6
  half_unit = 0.005e6  # the published figures carry two decimals of millions
  assert abs(n - published) <= max(0.005 * published, half_unit), (n, published)


@pytest.mark.parametrize("name", ALL)
def test_param_count_exact(name):
  assert km.count_params(abstract(name)) == EXACT[name]


def test_imagenet_counts_match_published():
  # (published, half of its last printed unit). MobileNetV1's "4.2M" (Howard
  # et al.) is printed to 0.1M; the exact 4,231,976 is 0.76 % above 4.2M and
  # inside its rounding interval [4.15M, 4.25M).
  for name, (published, half_unit) in {
    "resnet18": (11.69e6, 0.005e6),
    "resnet34": (21.80e6, 0.005e6),
    "resnet50": (25.56e6, 0.005e6),
    "mobilenet_v1": (4.2e6, 0.05e6),
  }.items():
    n = km.count_params(abstract(name))
    assert abs(n - published) <= max(0.005 * published, half_unit), (name, n)


def test_count_params_excludes_batch_stats():
  m = abstract("resnet8")
  stats = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.BatchStat)))
  assert stats > 0
  assert km.count_params(m) == EXACT["resnet8"]


# ---------------------------------------------------------------------------
# Shapes of every model, abstractly

EXPECTED_SHAPES = {
  "resnet20": {
    "stem": (2, 32, 32, 16),
    "stage1": (2, 32, 32, 16),
    "stage2": (2, 16, 16, 32),
    "stage3": (2, 8, 8, 64),
    "pooled": (2, 64),
  },
  "resnet32x4": {"stem": (2, 32, 32, 32), "stage1": (2, 32, 32, 64), "stage3": (2, 8, 8, 256), "pooled": (2, 256)},
  "wrn_40_2": {
    "stem": (2, 32, 32, 16),
    "stage1": (2, 32, 32, 32),
    "stage2": (2, 16, 16, 64),
    "stage3": (2, 8, 8, 128),
    "pooled": (2, 128),
  },
  "vgg13": {
    "stem": (2, 32, 32, 64),
    "stage1": (2, 16, 16, 128),
    "stage2": (2, 8, 8, 256),
    "stage3": (2, 4, 4, 512),
    "stage4": (2, 4, 4, 512),
    "pooled": (2, 512),
  },
  "mobilenetv2": {
    "stem": (2, 16, 16, 16),
    "stage1": (2, 16, 16, 12),
    "stage2": (2, 8, 8, 16),
    "stage3": (2, 4, 4, 48),
    "stage4": (2, 2, 2, 160),
    "pooled": (2, 1280),
  },
  "shufflenetv1": {"stem": (2, 32, 32, 24), "stage1": (2, 16, 16, 240), "stage3": (2, 4, 4, 960), "pooled": (2, 960)},
  "shufflenetv2": {"stem": (2, 32, 32, 24), "stage1": (2, 16, 16, 116), "stage3": (2, 4, 4, 464), "pooled": (2, 1024)},
  "resnet50": {"stem": (2, 56, 56, 64), "stage1": (2, 56, 56, 256), "stage4": (2, 7, 7, 2048), "pooled": (2, 2048)},
  "mobilenet_v1": {
    "stem": (2, 112, 112, 32),
    "stage1": (2, 56, 56, 128),
    "stage4": (2, 7, 7, 1024),
    "pooled": (2, 1024),
  },
  # MNIST-1D CNN: 40 → 19 → 10 → 5 with those paddings; 5 × 25 = 125.
  "cnn1d": {"stem": (2, 19, 25), "stage1": (2, 10, 25), "stage2": (2, 5, 25), "pooled": (2, 125)},
  "mlp": {"stage1": (2, 100), "stage2": (2, 100), "pooled": (2, 100)},
  "cnn_digits": {"stem": (2, 8, 8, 16), "stage2": (2, 4, 4, 64), "pooled": (2, 64)},
  "transformer_lm": {"embed": (2, 128, 64), "block1": (2, 128, 64), "pooled": (2, 128, 64)},
}


def _abstract_forward(model, batch_size=2, train=False):
  graphdef, state = nnx.split(model)

  def f(state, x):
    return nnx.merge(graphdef, state)(x, train=train)

  return jax.eval_shape(f, state, km.dummy_input(model, batch_size))


@pytest.mark.parametrize("name", ALL)
def test_output_and_feature_shapes(name):
  model = abstract(name)
  assert model.num_classes == km.spec(name).defaults["num_classes"]
  assert model.input_shape == km.spec(name).input_shape
  out = _abstract_forward(model, train=True)  # train mode (feature_shapes: eval)
  assert isinstance(out, ModelOutput)
  if km.spec(name).family == "lm":
    assert out.logits.shape == (2, *model.input_shape, model.num_classes)
  else:
    assert out.logits.shape == (2, model.num_classes)
  shapes = km.feature_shapes(model)
  assert set(shapes) == expected_feature_names(name)
  assert {k: tuple(v.shape) for k, v in out.features.items()} == shapes
  for k, v in shapes.items():
    assert v[0] == 2
    if k.endswith("_preact"):
      assert v == shapes[k[: -len("_preact")]]
  for k, v in EXPECTED_SHAPES.get(name, {}).items():
    assert shapes[k] == v, (k, shapes[k], v)


def test_num_classes_and_overrides():
  m = abstract("resnet8", num_classes=10)
  assert _abstract_forward(m).logits.shape == (2, 10)
  lm = nnx.eval_shape(
    lambda: km.create("transformer_lm", num_classes=50, num_layers=3, dim=32, num_heads=2, max_len=16, rngs=nnx.Rngs(0))
  )
  assert lm.input_shape == (16,)
  out = _abstract_forward(lm)
  assert out.logits.shape == (2, 16, 50)
  assert set(out.features) == {"embed", "block0", "block1", "block2", "pooled"}
  assert out.features["pooled"].shape == (2, 16, 32)


def test_cifar_models_accept_other_spatial_sizes():
  m = abstract("resnet8")
  graphdef, state = nnx.split(m)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.features["stage3"].shape == (2, 16, 16, 64)


# ---------------------------------------------------------------------------
# Real forwards on small models

SMALL = ["resnet8", "wrn_16_1", "mobilenetv2", "mlp", "cnn1d", "mlp_800", "cnn_digits", "transformer_lm"]
TINY_LM = dict(num_layers=2, dim=32, num_heads=4, max_len=16)


def make(name, seed=0, **kw):
  if name == "transformer_lm":
    kw = {**TINY_LM, **kw}
  return km.create(name, rngs=nnx.Rngs(seed), **kw)


def sample_input(model, seed=1, batch_size=2):
  key = jax.random.key(seed)
  shape = (batch_size, *model.input_shape)
  if getattr(model, "input_dtype", jnp.float32) == jnp.int32:
    return jax.random.randint(key, shape, 0, model.num_classes)
  return jax.random.normal(key, shape)


@pytest.mark.parametrize(
  "name", [n if n not in ("mobilenetv2", "wrn_16_1") else pytest.param(n, marks=pytest.mark.slow) for n in SMALL]
)
def test_real_forward_train_and_eval(name):
  # Through the jitted functional path: one compile per mode is much faster
  # on CPU than op-by-op eager dispatch for the deeper nets.
  model = make(name)
  x = sample_input(model)
  expected = km.feature_shapes(model)
  fwd, params, rest = _functional(model)
  for train in (True, False):
    out, rest = fwd(params, rest, x, train)
    assert set(out.features) == expected_feature_names(name)
    assert {k: v.shape for k, v in out.features.items()} == expected
    assert np.all(np.isfinite(out.logits))
    assert out.logits.dtype == jnp.float32


def test_preact_relu_consistency():
  for name in ("resnet8", "wrn_16_1", "cnn1d", "mlp"):
    out = make(name)(sample_input(make(name)))
    for k, v in out.features.items():
      if k.endswith("_preact"):
        np.testing.assert_allclose(out.features[k[:-7]], jax.nn.relu(v), err_msg=f"{name}:{k}")


def test_mnist1d_models_accept_trailing_channel():
  for name in ("mlp", "cnn1d"):
    m = make(name)
    x = sample_input(m)
    np.testing.assert_array_equal(m(x).logits, m(x[..., None]).logits)


def test_mnist_mlps_accept_flat_and_image_inputs():
  m = make("mlp_800")
  x = sample_input(m)
  assert x.shape == (2, 28, 28, 1)
  np.testing.assert_array_equal(m(x).logits, m(x.reshape(2, 784)).logits)


def test_cnn1d_flatten_is_channel_major_like_pytorch():
  m = make("cnn1d")
  f = m(sample_input(m)).features
  np.testing.assert_array_equal(f["pooled"].reshape(2, 25, 5), np.swapaxes(f["stage2"], 1, 2))


# ---------------------------------------------------------------------------
# BatchNorm statistics, dropout, and the functional (split/merge/jit) path


def _batch_stats(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))


def test_batchnorm_stats_update_in_train_mode_only():
  model = make("resnet8")
  x = sample_input(model)
  call = nnx.jit(lambda m, x, train: m(x, train=train).logits, static_argnums=2)
  before = _batch_stats(model)
  a = call(model, x, False)
  b = call(model, x, False)
  np.testing.assert_array_equal(a, b)  # eval is deterministic
  jax.tree.map(np.testing.assert_array_equal, before, _batch_stats(model))
  call(model, x, True)
  after = _batch_stats(model)
  changed = jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.any(u != v)), before, after))
  assert changed and all(changed)
  call(model, x, False)  # eval after train still leaves the stats alone
  jax.tree.map(np.testing.assert_array_equal, after, _batch_stats(model))


def test_batchnorm_momentum_is_pytorch_default():
  # Flax momentum 0.9 == PyTorch momentum 0.1: mean ← 0.9·0 + 0.1·batch_mean.
  model = make("resnet8")
  x = sample_input(model)
  conv_out = model.conv1(x)
  model(x, train=True)
  np.testing.assert_allclose(model.bn1.mean[...], 0.1 * np.mean(conv_out, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  assert model.bn1.epsilon == 1e-5


def _assert_state_close(a, b):
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _functional(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fwd(params, rest, x, train):
    m = nnx.merge(graphdef, params, rest)
    out = m(x, train=train)
    _, _, new_rest = nnx.split(m, nnx.Param, ...)
    return out, new_rest

  return jax.jit(fwd, static_argnums=3), params, rest


@pytest.mark.parametrize("name", ["resnet8", "mlp_1200"])
def test_jit_functional_path_equals_eager(name):
  model = make(name)
  x = sample_input(model)
  fwd, params, rest = _functional(model)
  for train in (False, True):
    out, new_rest = fwd(params, rest, x, train)
    eager_model = make(name)  # same seed → same params and RNG state
    eager = eager_model(x, train=train)
    np.testing.assert_allclose(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for k in eager.features:
      np.testing.assert_allclose(out.features[k], eager.features[k], rtol=1e-5, atol=1e-5)
    _, _, eager_rest = nnx.split(eager_model, nnx.Param, ...)
    jax.tree.map(_assert_state_close, new_rest, eager_rest)


@pytest.mark.slow
def test_grad_through_functional_path_updates_bn_stats():
  # What a train step does: value_and_grad of a loss over the merged model in
  # train mode, inside jit, returning the updated BatchNorm statistics. (A
  # merge without copy=True raises TraceContextError here.) 8×8 inputs keep it
  # cheap; CIFAR nets accept any spatial size.
  model = make("resnet8", num_classes=5)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest):
    m = nnx.merge(graphdef, params, rest, copy=True)
    out = m(x, train=True)
    return jnp.mean(jnp.tanh(out.logits) ** 2), nnx.split(m, nnx.Param, ...)[2]

  f = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, new_rest), grads = f(params, rest)
  eager = make("resnet8", num_classes=5)
  nnx.jit(lambda m: m(x, train=True))(eager)  # NNX's own stateful path (statistics updated in place)
  jax.tree.map(_assert_state_close, nnx.state(new_rest, nnx.BatchStat), nnx.state(eager, nnx.BatchStat))
  # the gradient agrees with a central finite difference along a random direction
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  d = [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
  norm = np.sqrt(sum(float(jnp.vdot(v, v)) for v in d))
  d = jax.tree.unflatten(treedef, [v / norm for v in d])  # a unit direction
  # (a) the functional-path gradient equals NNX's own gradient of the module
  ref_model = make("resnet8", num_classes=5)
  ref_grads = nnx.jit(nnx.grad(lambda m: jnp.mean(jnp.tanh(m(x, train=True).logits) ** 2)))(
    ref_model
  )  # w.r.t. nnx.Param
  assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(ref_grads)) > 10
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
  # (b) and a central finite difference along a random direction. float32 and
  # ReLU kinks bound the agreement: ~2 % at eps = 1e-3 (rounding of f grows as
  # eps shrinks, kinks crossed as it grows), so 5 % still catches a wrong term.
  eps = 1e-3
  fval = jax.jit(lambda p: loss(p, rest)[0])
  plus = fval(jax.tree.map(lambda p, v: p + eps * v, params, d))
  minus = fval(jax.tree.map(lambda p, v: p - eps * v, params, d))
  directional = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
  np.testing.assert_allclose((plus - minus) / (2 * eps), directional, rtol=5e-2)
  assert np.isfinite(value) and abs(directional) > 0


def test_dropout_rng_advances_through_functional_state():
  model = make("mlp_1200")
  x = sample_input(model)
  fwd, params, rest = _functional(model)
  out1, rest1 = fwd(params, rest, x, True)
  out2, rest2 = fwd(params, rest1, x, True)
  out3, _ = fwd(params, rest, x, True)
  assert not np.array_equal(out1.logits, out2.logits)  # fresh masks each step
  np.testing.assert_array_equal(out1.logits, out3.logits)  # same state, same mask
  e1, _ = fwd(params, rest2, x, False)
  e2, _ = fwd(params, rest, x, False)
  np.testing.assert_array_equal(e1.logits, e2.logits)  # eval: no dropout


@pytest.mark.slow
def test_bf16_compute_keeps_f32_params():
  for name in ("resnet8", "cnn_digits", "transformer_lm", "mlp"):
    model = make(name, dtype=jnp.bfloat16)
    out = model(sample_input(model), train=True)
    assert out.logits.dtype == jnp.bfloat16, name
    assert all(v.dtype == jnp.bfloat16 for v in out.features.values()), name
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params), name
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert all(s.dtype == jnp.float32 for s in stats), name


# ---------------------------------------------------------------------------
# The language model is causal


def test_transformer_lm_is_causal():
  model = make("transformer_lm", num_classes=50)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
  positions = (0, 7, 14)
  changed = [tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 50) for t in positions]
  logits = nnx.jit(lambda m, x: m(x).logits)(model, jnp.concatenate([tokens, *changed]))  # one call, 4 variants
  base, outs = logits[:2], logits[2:].reshape(len(positions), 2, 16, 50)
  for t, out in zip(positions, outs):
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
    assert not np.allclose(out[:, t + 1], base[:, t + 1])


def test_transformer_lm_accepts_shorter_sequences():
  model = make("transformer_lm", num_classes=50)
  out = model(jnp.zeros((2, 5), jnp.int32))
  assert out.logits.shape == (2, 5, 50)
  assert out.features["pooled"].shape == (2, 5, 32)


# ---------------------------------------------------------------------------
# Errors


def test_unknown_model_name_lists_available():
  with pytest.raises(ValueError, match="unknown model 'resnet21'") as e:
    km.create("resnet21", num_classes=10)
  for name in ALL:
    assert name in str(e.value)


def test_unknown_override_is_named():
  with pytest.raises(ValueError, match="num_layer"):
    km.create("transformer_lm", num_layer=3)


@pytest.mark.parametrize(
  "name,shape,message",
  [
    ("resnet20", (2, 3, 32, 32), "resnet20 expects input (B, 32, 32, 3) NHWC, got (2, 3, 32, 32)"),
    ("resnet20", (32, 32, 3), "resnet20 expects input (B, 32, 32, 3) NHWC, got (32, 32, 3)"),
    ("resnet50", (2, 224, 224, 1), "resnet50 expects input (B, 224, 224, 3) NHWC, got (2, 224, 224, 1)"),
    ("cnn_digits", (2, 8, 8), "cnn_digits expects input (B, 8, 8, 1) NHWC, got (2, 8, 8)"),
    ("mlp", (2, 41), "mlp expects input (B, 40), got (2, 41)"),
    ("mlp_1200", (2, 28, 28, 3), "mlp_1200 expects input (B, 784) or (B, 28, 28, 1), got (2, 28, 28, 3)"),
    ("cnn1d", (2, 40, 2), "cnn1d expects input (B, 40) or (B, 40, 1), got (2, 40, 2)"),
    (
      "transformer_lm",
      (2, 200),
      "transformer_lm expects input (B, L) integer tokens with L <= 128, got (2, 200) int32",
    ),
  ],
)
def test_wrong_input_shape_is_one_line_error(name, shape, message):
  model = abstract(name)
  graphdef, state = nnx.split(model)
  dtype = getattr(model, "input_dtype", jnp.float32)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(shape, dtype))
  assert str(e.value) == message
  assert "\n" not in str(e.value)


def test_transformer_lm_rejects_float_input():
  model = make("transformer_lm")
  with pytest.raises(ValueError, match="integer tokens"):
    model(jnp.zeros((2, 8)))
