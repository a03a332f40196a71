"""``cnn_digits``: a small CNN for the 8×8 scikit-learn digits.

conv3×3 1→16 → ReLU → conv3×3 16→32 → ReLU → 2×2 max pool → conv3×3 32→64 →
ReLU → global average pool → Linear 64→10 (23,946 parameters at 10 classes).
No BatchNorm, no dropout.

Input ``(B, 8, 8, 1)`` NHWC. Features:
  ``stem``           (B, 8, 8, 16)
  ``stage1``         (B, 8, 8, 32)  (before the pool)
  ``stage2``         (B, 4, 4, 64)
  ``stageK_preact``  the same before the ReLU
  ``pooled``         (B, 64)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput


class DigitsCNN(nnx.Module):
  """Small CNN for 8×8×1 digits; see the module docstring for the features."""

  input_shape = (8, 8, 1)

  def __init__(
    self,
    widths: tuple[int, int, int] = (16, 32, 64),
    *,
    num_classes: int = 10,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "cnn_digits",
  ):
    self.model_name = name
    self.num_classes = num_classes
    a, b, c = widths
    self.conv1 = layer_lib.conv(1, a, 3, 1, bias=True, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(a, b, 3, 1, bias=True, dtype=dtype, rngs=rngs)
    self.conv3 = layer_lib.conv(b, c, 3, 1, bias=True, dtype=dtype, rngs=rngs)
    self.linear = layer_lib.dense(c, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    del train  # no BN or dropout
    layer_lib.check_image(self.model_name, x, self.input_shape)
    x = nnx.relu(self.conv1(x))
    feats = {"stem": x}
    pre = self.conv2(x)
    x = nnx.relu(pre)
    feats["stage1_preact"], feats["stage1"] = pre, x
    pre = self.conv3(layer_lib.max_pool(x, 2, 2))
    x = nnx.relu(pre)
    feats["stage2_preact"], feats["stage2"] = pre, x
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.linear(pooled), feats)
