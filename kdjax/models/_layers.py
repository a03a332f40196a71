"""Shared layer factories and input checks for kdjax models (private).

Every layer computes in ``dtype`` and keeps its parameters in float32, and
BatchNorm follows PyTorch's defaults (running-average momentum 0.1, which is
0.9 in Flax's convention; epsilon 1e-5), so counts and statistics match the
reference zoos.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError

# ``nnx.List`` (flax >= 0.12) marks a list of sub-modules as data; on older
# flax a plain list is already traversed.
ModuleList = getattr(nnx, "List", list)

PARAM_DTYPE = jnp.float32
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# He-normal, fan-out: the init the reference PyTorch zoos use for convolutions.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
  in_features: int,
  out_features: int,
  kernel: int,
  stride: int = 1,
  padding: int | None = None,
  groups: int = 1,
  bias: bool = False,
  *,
  dtype,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """A square 2-D convolution with PyTorch-style symmetric zero padding."""
  p = kernel // 2 if padding is None else padding
  return nnx.Conv(
    in_features,
    out_features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((p, p), (p, p)),
    feature_group_count=groups,
    use_bias=bias,
    kernel_init=CONV_INIT,
    dtype=dtype,
    param_dtype=PARAM_DTYPE,
    rngs=rngs,
  )


def batch_norm(num_features: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm over the last axis; ``use_running_average`` is set per call."""
  return nnx.BatchNorm(
    num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs
  )


def dense(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, C)."""
  return jnp.mean(x, axis=(1, 2))


def avg_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """PyTorch ``AvgPool2d`` (zero padding counted in the average)."""
  pad = ((padding, padding), (padding, padding))
  return nnx.avg_pool(x, (window, window), strides=(stride, stride), padding=pad, count_include_pad=True)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """PyTorch ``MaxPool2d`` (padding never wins the max)."""
  pad = ((padding, padding), (padding, padding))
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


def check_image(name: str, x: jax.Array, input_shape: Sequence[int]) -> None:
  """Rank-4 NHWC with the right channel count; spatial size may vary."""
  if x.ndim != 4 or x.shape[-1] != input_shape[-1]:
    expected = ", ".join(str(d) for d in input_shape)
    raise ConfigError(f"{name} expects input (B, {expected}) NHWC, got {tuple(x.shape)}")
