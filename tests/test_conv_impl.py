"""CPU convolution kernels (``run.xla_cpu_conv``, ``kdjax.parallel.xla_cpu``).

kdjax compiles its steps with XLA's own (Eigen) convolutions instead of
jaxlib's default YNNPACK fusions because they are faster on the measured CPU
(``results/bench.md``). These tests check that the option really changes the
compiled program, that results agree with a NumPy convolution and with the
YNN kernels to float32 rounding for every convolution shape the zoo uses, and
that whole models (logits, features, BN statistics, gradients) agree.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import models
from kdjax.config import Experiment, RunConfig, config_hash
from kdjax.parallel import xla_cpu
from kdjax.engine.state import apply_model, split_model

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compile options")

DN = ("NHWC", "HWIO", "NHWC")


def _ynn_convolutions(hlo: str) -> int:
  """Convolutions inside YNNPACK library fusions of a compiled HLO text."""
  bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, flags=re.S | re.M))
  callees = re.findall(r'calls=%?([\w.\-]+)[^\n]*"__ynn_fusion"', hlo)
  return sum(bodies.get(c, "").count(" convolution(") for c in callees)


def _compile(fn, *args, conv: str):
  return jax.jit(fn, compiler_options=xla_cpu.compiler_options(conv)).lower(*args).compile()


# ------------------------------------------------------------------ option plumbing


def test_options_per_backend_and_value():
  opts = xla_cpu.compiler_options("eigen")
  assert opts == {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  }
  assert xla_cpu.compiler_options("ynn") is None
  assert xla_cpu.compiler_options("eigen", backend="gpu") is None
  with pytest.raises(ValueError, match=r"run.xla_cpu_conv .*'winograd'"):
    xla_cpu.compiler_options("winograd")
  with pytest.raises(ValueError, match=r"run.xla_cpu_conv.*'onednn'"):
    RunConfig(xla_cpu_conv="onednn")
  assert RunConfig().xla_cpu_conv == "eigen"
  # a speed knob: the same experiment has one hash (resume/cache keys unchanged)
  e = Experiment()
  e_ynn = dataclasses.replace(e, run=dataclasses.replace(e.run, xla_cpu_conv="ynn"))
  assert config_hash(e) == config_hash(e_ynn)
  assert config_hash(e) != config_hash(dataclasses.replace(e, run=dataclasses.replace(e.run, seed=1)))


def test_eigen_takes_convolutions_out_of_ynn_fusions():
  x = jnp.ones((4, 16, 16, 32))  # YNN skips tiny convolutions (cost model)
  w = jnp.ones((3, 3, 32, 32))

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
    return jnp.sum(y * y)

  g = jax.grad(loss, argnums=(0, 1))
  ynn = _compile(g, x, w, conv="ynn").as_text()
  eig = _compile(g, x, w, conv="eigen").as_text()
  assert _ynn_convolutions(ynn) == 3  # forward, input grad, kernel grad
  assert _ynn_convolutions(eig) == 0
  assert eig.count(" convolution(") >= 3  # still convolutions, now XLA's own


# ------------------------------------------------------------------ numerics per conv shape


def _np_conv(x, w, stride, pad, groups):
  """Direct convolution in float64: x (B, H, W, C), w (k, k, C/groups, O)."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.float64)
  ho = (x.shape[1] + 2 * pad - k) // stride + 1
  wo = (x.shape[2] + 2 * pad - k) // stride + 1
  cg, og = x.shape[-1] // groups, w.shape[-1] // groups
  y = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(k):
    for j in range(k):
      tap = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      for g in range(groups):
        y[..., g * og : (g + 1) * og] += tap[..., g * cg : (g + 1) * cg] @ w[i, j, :, g * og : (g + 1) * og]
  return y


# (H, C_in, C_out, kernel, stride, padding, groups): the zoo's convolution kinds,
# big enough that jaxlib's cost model hands the "ynn" variant to YNNPACK
CASES = [
  (16, 32, 32, 3, 1, 1, 1),  # resnet / wrn 3×3
  (16, 32, 64, 3, 2, 1, 1),  # strided 3×3 (stage entry)
  (16, 32, 64, 1, 2, 0, 1),  # 1×1 downsample shortcut
  (16, 32, 64, 1, 1, 0, 1),  # 1×1 pointwise (mobilenet, shufflenet)
  (16, 32, 32, 3, 1, 1, 4),  # grouped 3×3 (shufflenet v1)
  (16, 32, 32, 3, 2, 1, 32),  # depthwise 3×3, strided
  (17, 3, 16, 7, 2, 3, 1),  # imagenet stem 7×7/2
]


@pytest.mark.parametrize("h,cin,cout,k,s,p,groups", CASES)
def test_conv_and_grads_match_numpy_and_ynn(h, cin, cout, k, s, p, groups):
  rng = np.random.default_rng(h * cin + k + groups)
  x = rng.standard_normal((4, h, h, cin)).astype(np.float32)
  w = (rng.standard_normal((k, k, cin // groups, cout)) * 0.2).astype(np.float32)
  ho = (h + 2 * p - k) // s + 1
  gy = rng.standard_normal((4, ho, ho, cout)).astype(np.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN, feature_group_count=groups
    )

  def fwd_and_grads(x, w):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(gy))

  ref = _np_conv(x, w, s, p, groups)
  exe = {c: _compile(fwd_and_grads, x, w, conv=c) for c in ("eigen", "ynn")}
  assert _ynn_convolutions(exe["eigen"].as_text()) == 0
  if groups == 1 and cin > 3:  # YNN takes these; grouped and 3-channel ones may stay with XLA anyway
    assert _ynn_convolutions(exe["ynn"].as_text()) > 0
  out = {c: [np.asarray(a) for a in e(x, w)] for c, e in exe.items()}
  scale = np.abs(ref).max()
  np.testing.assert_allclose(out["eigen"][0], ref, rtol=0, atol=2e-6 * scale * k * k)
  for a, b in zip(out["eigen"], out["ynn"]):  # forward, dx, dW of two different kernel libraries
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
  # dW independently: dW[i, j] = tap_ij(x)^T gy (groups=1 only; grouped checked against ynn above)
  if groups == 1:
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).astype(np.float64)
    dw = np.stack(
      [
        np.stack(
          [
            np.einsum("bhwc,bhwo->co", xp[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (ho - 1) + 1 : s], gy)
            for j in range(k)
          ]
        )
        for i in range(k)
      ]
    )
    np.testing.assert_allclose(out["eigen"][2], dw, rtol=0, atol=1e-5 * np.abs(dw).max())


# ------------------------------------------------------------------ whole models


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("resnet8", (16, 16, 3)), ("wrn_16_2", (16, 16, 3))])
def test_model_forward_features_bn_and_grads_match(name, shape):
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  g, params, rest = split_model(model)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, *shape)), jnp.float32)

  def loss(params, rest, x):
    out, new_rest = apply_model(g, params, rest, x, train=True)
    return jnp.mean(out.logits**2), (out, new_rest)

  f = jax.value_and_grad(loss, has_aux=True)
  exe = {c: _compile(f, params, rest, x, conv=c) for c in ("eigen", "ynn")}
  assert _ynn_convolutions(exe["ynn"].as_text()) > 0 and _ynn_convolutions(exe["eigen"].as_text()) == 0
  res = {c: jax.tree.map(np.asarray, e(params, rest, x)) for c, e in exe.items()}
  (l_e, (o_e, r_e)), gr_e = res["eigen"]
  (l_y, (o_y, r_y)), gr_y = res["ynn"]
  assert o_e.features.keys() == o_y.features.keys() and "pooled" in o_e.features
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(np.abs(b).max(), 1e-3))
  close(l_e, l_y)
  jax.tree.map(close, o_e, o_y)  # logits and every feature map
  jax.tree.map(close, r_e, r_y)  # BN running statistics after a train step
  jax.tree.map(close, gr_e, gr_y)
  # same model object, same parameter layout (HWIO kernels) and count for both
  assert sum(a.size for a in jax.tree.leaves(gr_e)) == n_params


# ------------------------------------------------------------------ engine wiring


@pytest.mark.slow
def test_engine_step_uses_the_option(bench):
  """``loop.jit_train_step`` (what ``fit`` runs) compiles the KD step with the
  chosen kernels; both give the same loss to float32 rounding."""
  cases = {c: bench.JaxCase("kd_cached", "resnet32x4-resnet8x4", 2, "float32", xla_conv=c) for c in ("eigen", "ynn")}
  texts = {c: k.compiled.as_text() for c, k in cases.items()}
  assert _ynn_convolutions(texts["ynn"]) > 0
  assert _ynn_convolutions(texts["eigen"]) == 0 and " convolution(" in texts["eigen"]
  assert texts["eigen"].count('"__ynn_fusion"') > 0  # YNN still runs the dots / reductions
  losses = {}
  for c, k in cases.items():
    _, m = k.compiled(k.state, k.teacher, k.batch_arrays)
    losses[c] = float(m["loss/total"])
  assert losses["eigen"] == pytest.approx(losses["ynn"], rel=1e-5)
