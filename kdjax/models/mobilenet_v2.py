"""MobileNetV2 (Sandler et al. 2018), CIFAR variant of the CRD/RepDistiller zoo.

``mobilenetv2`` is RepDistiller's ``mobile_half``: width multiplier 0.5,
expansion t = 6, a stride-2 3×3 conv-BN-ReLU stem, seven inverted-residual
groups (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1)
(6,160,3,2) (6,320,1,1) with c scaled by 0.5, a 1×1 conv-BN-ReLU to 1280,
global average pooling and a linear classifier. As in the reference, every
block has the 1×1 expansion conv (also at t = 1) and uses ReLU (not ReLU6).

Features (32×32 input):
  ``stem``    (B, 16, 16, 16)  stem conv-BN-ReLU
  ``stage1``  (B, 16, 16, 12)  after groups 1-2
  ``stage2``  (B,  8,  8, 16)  after group 3
  ``stage3``  (B,  4,  4, 48)  after groups 4-5
  ``stage4``  (B,  2,  2, 160) after groups 6-7
  ``pooled``  (B, 1280)        after the 1×1 conv-BN-ReLU and pooling
Stage outputs are linear bottlenecks (the block ends in BN, no ReLU), so there
are no ``*_preact`` maps: the stage map already is pre-activation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput

SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Feature taps: stage k ends after this many groups.
STAGE_ENDS = (2, 3, 5, 7)


class InvertedResidual(nnx.Module):
  def __init__(self, inp: int, oup: int, stride: int, expand: int, *, dtype, rngs: nnx.Rngs):
    hidden = inp * expand
    self.use_res = stride == 1 and inp == oup
    self.pw = layer_lib.conv(inp, hidden, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(hidden, dtype=dtype, rngs=rngs)
    self.dw = layer_lib.conv(hidden, hidden, 3, stride, groups=hidden, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(hidden, dtype=dtype, rngs=rngs)
    self.pwl = layer_lib.conv(hidden, oup, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = layer_lib.batch_norm(oup, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    out = nnx.relu(self.bn1(self.pw(x), use_running_average=ura))
    out = nnx.relu(self.bn2(self.dw(out), use_running_average=ura))
    out = self.bn3(self.pwl(out), use_running_average=ura)
    return x + out if self.use_res else out


class MobileNetV2(nnx.Module):
  """CIFAR MobileNetV2; see the module docstring for the features."""

  input_shape = (32, 32, 3)

  def __init__(
    self,
    expansion: int = 6,
    width_mult: float = 0.5,
    *,
    num_classes: int = 100,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "mobilenetv2",
  ):
    self.model_name = name
    self.num_classes = num_classes
    in_c = int(32 * width_mult)
    self.conv1 = layer_lib.conv(3, in_c, 3, 2, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(in_c, dtype=dtype, rngs=rngs)
    groups = []
    for t, c, n, s in SETTINGS:
      t = expansion if t != 1 else 1
      out_c = int(c * width_mult)
      blocks = []
      for i in range(n):
        blocks.append(InvertedResidual(in_c, out_c, s if i == 0 else 1, t, dtype=dtype, rngs=rngs))
        in_c = out_c
      groups.append(layer_lib.ModuleList(blocks))
    self.groups = layer_lib.ModuleList(groups)
    last = _make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280
    self.conv2 = layer_lib.conv(in_c, last, 1, 1, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(last, dtype=dtype, rngs=rngs)
    self.classifier = layer_lib.dense(last, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    ura = not train
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    feats = {"stem": x}
    for g, group in enumerate(self.groups, start=1):
      for block in group:
        x = block(x, train)
      if g in STAGE_ENDS:
        feats[f"stage{STAGE_ENDS.index(g) + 1}"] = x
    x = nnx.relu(self.bn2(self.conv2(x), use_running_average=ura))
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.classifier(pooled), feats)


def _make_divisible(v: float, divisor: int = 8) -> int:
  return int(((v + divisor / 2) // divisor) * divisor)
