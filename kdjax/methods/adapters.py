"""Pure-function adapters on explicit parameter pytrees.

The method layer keeps no NNX modules: an adapter is an ``*_init`` function
that returns a dict of float32 arrays and an ``*_apply`` function of
``(params, x)``. The engine trains these dicts next to the student.

Initialisation follows PyTorch's defaults so RepDistiller's regressors start
where the reference starts: weights ``kaiming_uniform_(a=√5)``, which is
U(−1/√fan_in, 1/√fan_in), and biases U(−1/√fan_in, 1/√fan_in). For a
transposed convolution PyTorch computes fan_in from its ``(C_in, C_out, k,
k)`` weight as ``C_out·k·k``; kdjax does the same. Batch-norm starts at
scale 1, bias 0.

Layout: images are NHWC, conv kernels HWIO, linear weights ``(in, out)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError

Params = dict[str, jax.Array]


def _uniform(key: jax.Array, shape: Sequence[int], bound: float) -> jax.Array:
  return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(‖x‖₂, eps)`` along ``axis`` (torch ``F.normalize``), float32."""
  x = jnp.asarray(x, jnp.float32)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


# ---------------------------------------------------------------- linear


def linear_init(key: jax.Array, in_dim: int, out_dim: int, bias: bool = True) -> Params:
  """``nn.Linear(in_dim, out_dim)``: ``{"w": (in, out), "b": (out,)}``."""
  kw, kb = jax.random.split(key)
  bound = 1.0 / math.sqrt(in_dim)
  p = {"w": _uniform(kw, (in_dim, out_dim), bound)}
  if bias:
    p["b"] = _uniform(kb, (out_dim,), bound)
  return p


def linear_apply(p: Params, x: jax.Array) -> jax.Array:
  """``x @ w + b`` in float32; ``x`` is flattened to ``(B, -1)`` first."""
  x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  y = x @ p["w"]
  return y + p["b"] if "b" in p else y


def dense_apply(p: Params, x: jax.Array) -> jax.Array:
  """``x @ w + b`` over the last axis in float32: ``(..., in)`` → ``(..., out)`` (a token-wise projection of
  ``(B, L, D)`` hidden states, or ``(B, D)`` vectors)."""
  y = jnp.asarray(x, jnp.float32) @ p["w"]
  return y + p["b"] if "b" in p else y


# ---------------------------------------------------------------- conv


def conv_init(
  key: jax.Array, in_ch: int, out_ch: int, kernel: int | tuple[int, int] = 3, bias: bool = True, transpose: bool = False
) -> Params:
  """Conv (or transposed conv) kernel ``{"w": (kh, kw, in, out), "b": (out,)}``."""
  kh, kw_ = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  fan_in = (out_ch if transpose else in_ch) * kh * kw_
  bound = 1.0 / math.sqrt(fan_in)
  k1, k2 = jax.random.split(key)
  p = {"w": _uniform(k1, (kh, kw_, in_ch, out_ch), bound)}
  if bias:
    p["b"] = _uniform(k2, (out_ch,), bound)
  return p


def conv_apply(p: Params, x: jax.Array, stride: int = 1, padding: int = 0, transpose: bool = False) -> jax.Array:
  """NHWC convolution with PyTorch's ``Conv2d``/``ConvTranspose2d`` geometry.

  ``padding`` is PyTorch's integer padding. Regular conv: output size
  ``⌊(H + 2p − k)/s⌋ + 1``. Transposed conv (``transpose=True``): output
  ``(H − 1)·s − 2p + k``, implemented as ``lax.conv_general_dilated`` with
  input dilation ``s`` and padding ``k − 1 − p`` (e.g. k=4, s=2, p=1
  doubles H). The kernel is used as stored (no flip): the parameters are
  kdjax's own, so the flip convention is immaterial.
  """
  w = p["w"]
  x = jnp.asarray(x, jnp.float32)
  kh, kw_ = w.shape[0], w.shape[1]
  dn = ("NHWC", "HWIO", "NHWC")
  if transpose:
    pad = ((kh - 1 - padding,) * 2, (kw_ - 1 - padding,) * 2)
    y = jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=pad, lhs_dilation=(stride, stride), dimension_numbers=dn
    )
  else:
    y = jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)), dimension_numbers=dn
    )
  return y + p["b"] if "b" in p else y


# ---------------------------------------------------------------- batch norm


def batchnorm_init(channels: int) -> Params:
  """Learnable affine of a batch-norm: ``{"scale": 1, "bias": 0}``."""
  return {"scale": jnp.ones((channels,), jnp.float32), "bias": jnp.zeros((channels,), jnp.float32)}


def batchnorm_apply(p: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Train-mode batch norm: normalise with *this batch's* statistics.

  Mean and (biased) variance are taken over every axis but the last
  (channels), then ``scale·x̂ + bias``. There are no running statistics:
  adapters only ever run inside the training loss (they are discarded at
  evaluation), which is exactly when PyTorch's BN uses batch statistics.
  Under ``jit`` with a batch sharded over devices the statistics are global
  (XLA inserts the reductions), i.e. sync-BN.
  """
  x = jnp.asarray(x, jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


# ---------------------------------------------------------------- RepDistiller's ConvReg


def conv_reg_geometry(s_shape: Sequence[int], t_shape: Sequence[int]) -> dict:
  """The conv RepDistiller's ``ConvReg`` uses to map ``s_shape`` to ``t_shape``.

  Shapes are ``(H, W, C)`` (no batch). Cases, as in the reference:
    * ``H_s == 2·H_t``: conv 3×3, stride 2, padding 1;
    * ``2·H_s == H_t``: transposed conv 4×4, stride 2, padding 1;
    * ``H_s ≥ H_t``: conv ``(1 + H_s − H_t) × (1 + W_s − W_t)``, stride 1,
      no padding (1×1 when the sizes are equal);
    * otherwise ``ValueError``.
  """
  (hs, ws, cs), (ht, wt, ct) = tuple(s_shape), tuple(t_shape)
  if hs == 2 * ht:
    return dict(kernel=(3, 3), stride=2, padding=1, transpose=False, in_ch=cs, out_ch=ct)
  if 2 * hs == ht:
    return dict(kernel=(4, 4), stride=2, padding=1, transpose=True, in_ch=cs, out_ch=ct)
  if hs >= ht and ws >= wt:
    return dict(kernel=(1 + hs - ht, 1 + ws - wt), stride=1, padding=0, transpose=False, in_ch=cs, out_ch=ct)
  raise ConfigError(
    f"ConvReg cannot map a student feature of shape {tuple(s_shape)} to a teacher "
    f"feature of shape {tuple(t_shape)} (student H must be 2×, ½× or ≥ the teacher's)"
  )


def conv_reg_init(key: jax.Array, s_shape: Sequence[int], t_shape: Sequence[int]) -> Params:
  """Conv + BN parameters of RepDistiller's ``ConvReg`` (shapes ``(H, W, C)``)."""
  g = conv_reg_geometry(s_shape, t_shape)
  return {
    "conv": conv_init(key, g["in_ch"], g["out_ch"], g["kernel"], transpose=g["transpose"]),
    "bn": batchnorm_init(g["out_ch"]),
  }


def conv_reg_apply(
  p: Params, x: jax.Array, s_shape: Sequence[int], t_shape: Sequence[int], relu: bool = True
) -> jax.Array:
  """conv → train-mode BN (→ ReLU): student ``(B, *s_shape)`` to ``(B, *t_shape)``."""
  g = conv_reg_geometry(s_shape, t_shape)
  y = batchnorm_apply(p["bn"], conv_apply(p["conv"], x, g["stride"], g["padding"], g["transpose"]))
  return jax.nn.relu(y) if relu else y
