"""MobileNet V1 (Howard et al. 2017), 1.0× at 224 px, as used for ImageNet KD
(ResNet-50 → MobileNet in CRD/RepDistiller and later papers).

A 3×3/2 conv-BN-ReLU stem to 32 channels, thirteen depthwise-separable
blocks (depthwise 3×3-BN-ReLU, pointwise 1×1-BN-ReLU) with outputs
64, 128/2, 128, 256/2, 256, 512/2, 512×5, 1024/2, 1024, global average
pooling and a linear classifier: 4,231,976 parameters at 1000 classes.

Features (224×224 input), grouped by resolution like a ResNet's four stages
(the taps RepDistiller uses):
  ``stem``           (B, 112, 112, 32)
  ``stage1``         (B, 56, 56, 128)   after blocks 1-3
  ``stage2``         (B, 28, 28, 256)   after blocks 4-5
  ``stage3``         (B, 14, 14, 512)   after blocks 6-11
  ``stage4``         (B,  7,  7, 1024)  after blocks 12-13
  ``stageK_preact``  the last pointwise BN output before its ReLU
  ``pooled``         (B, 1024)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput

# (out_channels, stride) of the 13 depthwise-separable blocks.
BLOCKS = (
  (64, 1),
  (128, 2),
  (128, 1),
  (256, 2),
  (256, 1),
  (512, 2),
  (512, 1),
  (512, 1),
  (512, 1),
  (512, 1),
  (512, 1),
  (1024, 2),
  (1024, 1),
)
STAGE_ENDS = (3, 5, 11, 13)


class DepthwiseSeparable(nnx.Module):
  def __init__(self, in_c: int, out_c: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.dw = layer_lib.conv(in_c, in_c, 3, stride, groups=in_c, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(in_c, dtype=dtype, rngs=rngs)
    self.pw = layer_lib.conv(in_c, out_c, 1, 1, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(out_c, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    x = nnx.relu(self.bn1(self.dw(x), use_running_average=ura))
    pre = self.bn2(self.pw(x), use_running_average=ura)
    return nnx.relu(pre), pre


class MobileNetV1(nnx.Module):
  """MobileNet V1 1.0×; see the module docstring for the features."""

  input_shape = (224, 224, 3)

  def __init__(self, *, num_classes: int = 1000, dtype=jnp.float32, rngs: nnx.Rngs, name: str = "mobilenet_v1"):
    self.model_name = name
    self.num_classes = num_classes
    self.conv1 = layer_lib.conv(3, 32, 3, 2, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(32, dtype=dtype, rngs=rngs)
    blocks = []
    in_c = 32
    for out_c, stride in BLOCKS:
      blocks.append(DepthwiseSeparable(in_c, out_c, stride, dtype=dtype, rngs=rngs))
      in_c = out_c
    self.blocks = layer_lib.ModuleList(blocks)
    self.fc = layer_lib.dense(in_c, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    feats = {"stem": x}
    for i, block in enumerate(self.blocks, start=1):
      x, pre = block(x, train)
      if i in STAGE_ENDS:
        k = STAGE_ENDS.index(i) + 1
        feats[f"stage{k}"] = x
        feats[f"stage{k}_preact"] = pre
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.fc(pooled), feats)
