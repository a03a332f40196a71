"""CIFAR ResNets (He et al. 2016, §4.2) as in the CRD/RepDistiller zoo.

``resnet{depth}`` has a 3×3 stem and three stages of ``(depth - 2) / 6``
basic blocks with widths 16/32/64 (``resnet8x4``/``resnet32x4``: stem 32 and
stages 64/128/256, four times wider). Stages 2 and 3 halve the spatial size;
a 1×1 conv + BN projects the shortcut wherever shape changes. Global average
pooling feeds one linear classifier.

Features (32×32 input; ``w`` = 1 or 4):
  ``stem``           (B, 32, 32, 16w)  conv-BN-ReLU
  ``stage1``         (B, 32, 32, 16w)  after the last block's ReLU (x4: 64)
  ``stage2``         (B, 16, 16, 32w)
  ``stage3``         (B,  8,  8, 64w)
  ``stageK_preact``  same shapes, the last block's sum before its ReLU
  ``pooled``         (B, 64w)          global average of ``stage3``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput


class BasicBlock(nnx.Module):
  """conv3×3-BN-ReLU-conv3×3-BN, + shortcut, ReLU. Returns (out, preact)."""

  def __init__(self, in_planes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv1 = layer_lib.conv(in_planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(planes, planes, 3, 1, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    if stride != 1 or in_planes != planes:
      self.down_conv = layer_lib.conv(in_planes, planes, 1, stride, dtype=dtype, rngs=rngs)
      self.down_bn = layer_lib.batch_norm(planes, dtype=dtype, rngs=rngs)
    else:
      self.down_conv = None
      self.down_bn = None

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    out = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    if self.down_conv is not None:
      x = self.down_bn(self.down_conv(x), use_running_average=ura)
    preact = out + x
    return nnx.relu(preact), preact


class CifarResNet(nnx.Module):
  """ResNet for 32×32 inputs; see the module docstring for the features."""

  input_shape = (32, 32, 3)

  def __init__(
    self,
    depth: int = 20,
    widths: tuple[int, ...] = (16, 16, 32, 64),
    *,
    num_classes: int = 100,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "cifar_resnet",
  ):
    if (depth - 2) % 6:
      raise ConfigError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6
    self.model_name = name
    self.num_classes = num_classes
    self.conv1 = layer_lib.conv(3, widths[0], 3, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(widths[0], dtype=dtype, rngs=rngs)
    stages = []
    in_planes = widths[0]
    for i, planes in enumerate(widths[1:]):
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(BasicBlock(in_planes, planes, stride, dtype=dtype, rngs=rngs))
        in_planes = planes
      stages.append(layer_lib.ModuleList(blocks))
    self.stages = layer_lib.ModuleList(stages)
    self.fc = layer_lib.dense(in_planes, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    feats = {}
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    feats["stem"] = x
    for k, stage in enumerate(self.stages, start=1):
      for block in stage:
        x, preact = block(x, train)
      feats[f"stage{k}"] = x
      feats[f"stage{k}_preact"] = preact
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.fc(pooled), feats)
