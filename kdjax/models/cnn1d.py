"""The MNIST-1D paper's 1-D CNN (Greydanus & Kobak 2020), 5,210 parameters.

Conv1d 1→25 (k5, s2, p1) → ReLU → 25→25 (k3, s2, p1) → ReLU → 25→25 (k3, s2,
p1) → ReLU → flatten → Linear 125→10. Lengths for the 40-sample input:
⌊(40+2−5)/2⌋+1 = 19, ⌊(19+2−3)/2⌋+1 = 10, ⌊(10+2−3)/2⌋+1 = 5, so the flat
embedding is 5 × 25 = 125. Layout is NWC ``(B, L, C)``; the flatten is
channel-major (as PyTorch's ``view`` of ``(B, C, L)``) so weights port 1:1.

Input ``(B, 40)`` or ``(B, 40, 1)``. Features:
  ``stem``           (B, 19, 25)  first conv after ReLU
  ``stage1``         (B, 10, 25)  second conv after ReLU
  ``stage2``         (B,  5, 25)  third conv after ReLU
  ``stageK_preact``  the same before the ReLU
  ``pooled``         (B, 125)     flattened ``stage2``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput


def _conv1d(in_f: int, out_f: int, k: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(
    in_f, out_f, (k,), strides=(2,), padding=((1, 1),), dtype=dtype, param_dtype=layer_lib.PARAM_DTYPE, rngs=rngs
  )


class CNN1D(nnx.Module):
  """MNIST-1D CNN; see the module docstring for the features."""

  def __init__(
    self,
    length: int = 40,
    channels: int = 25,
    *,
    num_classes: int = 10,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "cnn1d",
  ):
    self.model_name = name
    self.num_classes = num_classes
    self.input_shape = (length,)
    self.conv1 = _conv1d(1, channels, 5, dtype=dtype, rngs=rngs)
    self.conv2 = _conv1d(channels, channels, 3, dtype=dtype, rngs=rngs)
    self.conv3 = _conv1d(channels, channels, 3, dtype=dtype, rngs=rngs)
    n = length
    for k in (5, 3, 3):
      n = (n + 2 - k) // 2 + 1
    self.flat = n * channels
    self.linear = layer_lib.dense(self.flat, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    del train  # no BN or dropout
    n = self.input_shape[0]
    if x.ndim == 2 and x.shape[1] == n:
      x = x[..., None]
    if x.ndim != 3 or x.shape[1:] != (n, 1):
      raise ConfigError(f"{self.model_name} expects input (B, {n}) or (B, {n}, 1), got {tuple(x.shape)}")
    feats = {}
    for name, conv in (("stem", self.conv1), ("stage1", self.conv2), ("stage2", self.conv3)):
      pre = conv(x)
      x = nnx.relu(pre)
      if name != "stem":
        feats[f"{name}_preact"] = pre
      feats[name] = x
    pooled = jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)
    feats["pooled"] = pooled
    return ModelOutput(self.linear(pooled), feats)
