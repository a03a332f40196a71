"""Wide ResNets (Zagoruyko & Komodakis 2016) as in the CRD/RepDistiller zoo.

``wrn_{depth}_{k}``: a 3×3 conv stem (16 channels, no BN/ReLU: the blocks are
pre-activation), three stages of ``(depth - 4) / 6`` blocks of widths
16k/32k/64k (BN-ReLU-conv3×3-BN-ReLU-conv3×3, identity shortcut or a 1×1
conv on the activated input where the shape changes), a final BN-ReLU, global
average pooling and a linear classifier. Dropout between the convs is off by
default (``drop_rate=0``, as in the reference zoo).

In a pre-activation net a stage's raw output is a residual sum; the map the
next layer actually sees is BN-ReLU of it. So, as in RepDistiller's
``preact=True`` taps:
  ``stem``           (B, 32, 32, 16)   the stem conv output
  ``stageK_preact``  BN(stage K sum), BN being the next block's first BN (the
                     final BN for stage 3), i.e. the pre-ReLU map
  ``stageK``         ReLU(``stageK_preact``) — shapes (B, 32, 32, 16k),
                     (B, 16, 16, 32k), (B, 8, 8, 64k)
  ``pooled``         (B, 64k) global average of ``stage3``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput


class WideBlock(nnx.Module):
  """Pre-activation basic block. Returns (out, BN1(x)) — BN1(x) is the input's
  pre-ReLU map, which the network reports as the previous stage's preact."""

  def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float, *, dtype, rngs: nnx.Rngs):
    self.bn1 = layer_lib.batch_norm(in_planes, dtype=dtype, rngs=rngs)
    self.conv1 = layer_lib.conv(in_planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(planes, planes, 3, 1, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None
    self.equal_in_out = in_planes == planes and stride == 1
    self.shortcut = (
      None if self.equal_in_out else layer_lib.conv(in_planes, planes, 1, stride, padding=0, dtype=dtype, rngs=rngs)
    )

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    pre = self.bn1(x, use_running_average=ura)
    act = nnx.relu(pre)
    out = nnx.relu(self.bn2(self.conv1(act), use_running_average=ura))
    if self.dropout is not None:
      out = self.dropout(out, deterministic=not train)
    out = self.conv2(out)
    short = x if self.equal_in_out else self.shortcut(act)
    return out + short, pre


class WideResNet(nnx.Module):
  """WRN-depth-k for 32×32 inputs; see the module docstring for the features."""

  input_shape = (32, 32, 3)

  def __init__(
    self,
    depth: int = 16,
    widen_factor: int = 1,
    drop_rate: float = 0.0,
    *,
    num_classes: int = 100,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "wide_resnet",
  ):
    if (depth - 4) % 6:
      raise ConfigError(f"Wide ResNet depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.model_name = name
    self.num_classes = num_classes
    self.conv1 = layer_lib.conv(3, widths[0], 3, 1, dtype=dtype, rngs=rngs)
    blocks = []
    in_planes = widths[0]
    for i, planes in enumerate(widths[1:]):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(WideBlock(in_planes, planes, stride, drop_rate, dtype=dtype, rngs=rngs))
        in_planes = planes
    self.blocks = layer_lib.ModuleList(blocks)
    self.blocks_per_stage = n
    self.bn = layer_lib.batch_norm(in_planes, dtype=dtype, rngs=rngs)
    self.fc = layer_lib.dense(in_planes, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    n = self.blocks_per_stage
    x = self.conv1(x)
    feats = {"stem": x}
    for i, block in enumerate(self.blocks):
      x, pre = block(x, train)
      if i > 0 and i % n == 0:  # first block of stage 2 or 3: BN of stage i/n
        k = i // n
        feats[f"stage{k}_preact"] = pre
        feats[f"stage{k}"] = nnx.relu(pre)
    pre = self.bn(x, use_running_average=not train)
    x = nnx.relu(pre)
    feats["stage3_preact"] = pre
    feats["stage3"] = x
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.fc(pooled), feats)
