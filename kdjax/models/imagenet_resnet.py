"""ImageNet ResNets (He et al. 2016), torchvision-equivalent architecture.

7×7/2 conv-BN-ReLU stem + 3×3/2 max pool, four stages of basic blocks
(resnet18: 2-2-2-2, resnet34: 3-4-6-3) or bottlenecks (resnet50: 3-4-6-3,
1×1-3×3-1×1 with expansion 4, stride on the 3×3 as in torchvision ≥ 0.5),
widths 64/128/256/512, a 1×1/stride conv + BN projection shortcut where the
shape changes, global average pooling and a linear classifier. Parameter
counts at 1000 classes: 11,689,512 / 21,797,672 / 25,557,032.

Features (224×224 input; e = 1 for basic blocks, 4 for bottlenecks):
  ``stem``           (B, 56, 56, 64)      after conv-BN-ReLU and the max pool
  ``stage1``         (B, 56, 56, 64e)     after the last block's ReLU
  ``stage2``         (B, 28, 28, 128e)
  ``stage3``         (B, 14, 14, 256e)
  ``stage4``         (B,  7,  7, 512e)
  ``stageK_preact``  the last block's residual sum before its ReLU
  ``pooled``         (B, 512e)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput


class Basic(nnx.Module):
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv1 = layer_lib.conv(in_planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(planes, planes, 3, 1, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.down = _Projection.maybe(in_planes, planes, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    out = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    pre = out + (x if self.down is None else self.down(x, train))
    return nnx.relu(pre), pre


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    out = planes * 4
    self.conv1 = layer_lib.conv(in_planes, planes, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = layer_lib.conv(planes, out, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = layer_lib.batch_norm(out, dtype=dtype, rngs=rngs)
    self.down = _Projection.maybe(in_planes, out, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    out = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = nnx.relu(self.bn2(self.conv2(out), use_running_average=ura))
    out = self.bn3(self.conv3(out), use_running_average=ura)
    pre = out + (x if self.down is None else self.down(x, train))
    return nnx.relu(pre), pre


class _Projection(nnx.Module):
  def __init__(self, in_planes: int, out_planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv = layer_lib.conv(in_planes, out_planes, 1, stride, padding=0, dtype=dtype, rngs=rngs)
    self.bn = layer_lib.batch_norm(out_planes, dtype=dtype, rngs=rngs)

  @classmethod
  def maybe(cls, in_planes, out_planes, stride, *, dtype, rngs):
    if stride == 1 and in_planes == out_planes:
      return None
    return cls(in_planes, out_planes, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.bn(self.conv(x), use_running_average=not train)


BLOCKS = {"basic": Basic, "bottleneck": Bottleneck}


class ImageNetResNet(nnx.Module):
  """torchvision-style ResNet; see the module docstring for the features."""

  input_shape = (224, 224, 3)

  def __init__(
    self,
    block: str = "basic",
    layers: tuple[int, ...] = (2, 2, 2, 2),
    *,
    num_classes: int = 1000,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "imagenet_resnet",
  ):
    if block not in BLOCKS:
      raise ConfigError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
    cls = BLOCKS[block]
    self.model_name = name
    self.num_classes = num_classes
    self.conv1 = layer_lib.conv(3, 64, 7, 2, padding=3, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(64, dtype=dtype, rngs=rngs)
    in_planes = 64
    stages = []
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(cls(in_planes, planes, stride, dtype=dtype, rngs=rngs))
        in_planes = planes * cls.expansion
      stages.append(layer_lib.ModuleList(blocks))
    self.stages = layer_lib.ModuleList(stages)
    self.fc = layer_lib.dense(in_planes, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    x = layer_lib.max_pool(x, 3, 2, 1)
    feats = {"stem": x}
    for k, stage in enumerate(self.stages, start=1):
      for block in stage:
        x, pre = block(x, train)
      feats[f"stage{k}"] = x
      feats[f"stage{k}_preact"] = pre
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.fc(pooled), feats)
