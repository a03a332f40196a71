"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018), CIFAR variants of
the CRD/RepDistiller zoo.

``shufflenetv1`` (g = 3): a 1×1 conv-BN-ReLU stem to 24 channels (no pooling,
full 32×32 resolution), three stages of 4/8/4 bottlenecks with outputs
240/480/960. A bottleneck is grouped 1×1 (ungrouped on the 24-channel stem
output) → BN-ReLU → channel shuffle → depthwise 3×3 → BN-ReLU → grouped 1×1 →
BN; the first block of a stage has stride 2 and concatenates a 3×3/2 average
pool of its input, the others add the input; then ReLU.

``shufflenetv2`` (1×): a 3×3 conv-BN-ReLU stem to 24 channels, three stages of
one down-sampling block + 3/7/3 basic blocks with outputs 116/232/464, a 1×1
conv-BN-ReLU to 1024, global average pooling and a linear classifier. A
basic block splits the channels in half, runs 1×1-BN-ReLU, depthwise 3×3-BN,
1×1-BN-ReLU on one half, concatenates and shuffles (2 groups).

Features (32×32 input):
  v1: ``stem`` (B,32,32,24), ``stage1`` (B,16,16,240), ``stage2`` (B,8,8,480),
      ``stage3`` (B,4,4,960), ``pooled`` (B,960)
  v2: ``stem`` (B,32,32,24), ``stage1`` (B,16,16,116), ``stage2`` (B,8,8,232),
      ``stage3`` (B,4,4,464), ``pooled`` (B,1024)
  ``stageK_preact``: the last block of stage K before its final ReLU, same
  shape as ``stageK``, with ``stageK == relu(stageK_preact)``. (For v2 the
  preact is shuffled like the output so the two align channel by channel;
  the untouched half is already non-negative.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """NHWC channel shuffle: (g, C/g) → (C/g, g)."""
  if groups == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, groups, c // groups)
  return jnp.swapaxes(x, 3, 4).reshape(b, h, w, c)


class V1Bottleneck(nnx.Module):
  def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, *, dtype, rngs: nnx.Rngs):
    mid = out_planes // 4
    g1 = 1 if in_planes == 24 else groups
    self.stride = stride
    self.g1 = g1
    self.conv1 = layer_lib.conv(in_planes, mid, 1, 1, groups=g1, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(mid, mid, 3, stride, groups=mid, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv3 = layer_lib.conv(mid, out_planes, 1, 1, groups=groups, dtype=dtype, rngs=rngs)
    self.bn3 = layer_lib.batch_norm(out_planes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    out = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = channel_shuffle(out, self.g1)
    out = nnx.relu(self.bn2(self.conv2(out), use_running_average=ura))
    out = self.bn3(self.conv3(out), use_running_average=ura)
    if self.stride == 2:
      pre = jnp.concatenate([out, layer_lib.avg_pool(x, 3, 2, 1).astype(out.dtype)], -1)
    else:
      pre = out + x
    return nnx.relu(pre), pre


class ShuffleNetV1(nnx.Module):
  """CIFAR ShuffleNetV1; see the module docstring for the features."""

  input_shape = (32, 32, 3)

  def __init__(
    self,
    out_planes: tuple[int, ...] = (240, 480, 960),
    num_blocks: tuple[int, ...] = (4, 8, 4),
    groups: int = 3,
    *,
    num_classes: int = 100,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "shufflenetv1",
  ):
    self.model_name = name
    self.num_classes = num_classes
    self.conv1 = layer_lib.conv(3, 24, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(24, dtype=dtype, rngs=rngs)
    in_planes = 24
    stages = []
    for planes, n in zip(out_planes, num_blocks):
      blocks = []
      for i in range(n):
        cat = in_planes if i == 0 else 0  # stride-2 blocks concatenate the input
        blocks.append(V1Bottleneck(in_planes, planes - cat, 2 if i == 0 else 1, groups, dtype=dtype, rngs=rngs))
        in_planes = planes
      stages.append(layer_lib.ModuleList(blocks))
    self.stages = layer_lib.ModuleList(stages)
    self.linear = layer_lib.dense(in_planes, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    feats = {"stem": x}
    for k, stage in enumerate(self.stages, start=1):
      for block in stage:
        x, pre = block(x, train)
      feats[f"stage{k}"] = x
      feats[f"stage{k}_preact"] = pre
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.linear(pooled), feats)


class V2Basic(nnx.Module):
  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    c = channels // 2
    self.conv1 = layer_lib.conv(c, c, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(c, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(c, c, 3, 1, groups=c, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(c, dtype=dtype, rngs=rngs)
    self.conv3 = layer_lib.conv(c, c, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = layer_lib.batch_norm(c, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    c = x.shape[-1] // 2
    x1, x2 = x[..., :c], x[..., c:]
    out = nnx.relu(self.bn1(self.conv1(x2), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    pre = self.bn3(self.conv3(out), use_running_average=ura)
    x1 = x1.astype(pre.dtype)
    out = channel_shuffle(jnp.concatenate([x1, nnx.relu(pre)], -1), 2)
    pre = channel_shuffle(jnp.concatenate([x1, pre], -1), 2)
    return out, pre


class V2Down(nnx.Module):
  def __init__(self, in_c: int, out_c: int, *, dtype, rngs: nnx.Rngs):
    mid = out_c // 2
    # left branch: depthwise 3×3/2 - BN - 1×1 - BN - ReLU
    self.conv1 = layer_lib.conv(in_c, in_c, 3, 2, groups=in_c, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(in_c, dtype=dtype, rngs=rngs)
    self.conv2 = layer_lib.conv(in_c, mid, 1, 1, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(mid, dtype=dtype, rngs=rngs)
    # right branch: 1×1 - BN - ReLU - depthwise 3×3/2 - BN - 1×1 - BN - ReLU
    self.conv3 = layer_lib.conv(in_c, mid, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = layer_lib.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv4 = layer_lib.conv(mid, mid, 3, 2, groups=mid, dtype=dtype, rngs=rngs)
    self.bn4 = layer_lib.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv5 = layer_lib.conv(mid, mid, 1, 1, dtype=dtype, rngs=rngs)
    self.bn5 = layer_lib.batch_norm(mid, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    a = self.bn1(self.conv1(x), use_running_average=ura)
    a = nnx.relu(self.bn2(self.conv2(a), use_running_average=ura))
    b = nnx.relu(self.bn3(self.conv3(x), use_running_average=ura))
    b = self.bn4(self.conv4(b), use_running_average=ura)
    b = nnx.relu(self.bn5(self.conv5(b), use_running_average=ura))
    return channel_shuffle(jnp.concatenate([a, b], -1), 2)


class ShuffleNetV2(nnx.Module):
  """CIFAR ShuffleNetV2 (1×); see the module docstring for the features."""

  input_shape = (32, 32, 3)

  def __init__(
    self,
    out_channels: tuple[int, ...] = (116, 232, 464, 1024),
    num_blocks: tuple[int, ...] = (3, 7, 3),
    *,
    num_classes: int = 100,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "shufflenetv2",
  ):
    self.model_name = name
    self.num_classes = num_classes
    self.conv1 = layer_lib.conv(3, 24, 3, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layer_lib.batch_norm(24, dtype=dtype, rngs=rngs)
    in_c = 24
    stages = []
    for c, n in zip(out_channels[:3], num_blocks):
      blocks = [V2Down(in_c, c, dtype=dtype, rngs=rngs)]
      blocks += [V2Basic(c, dtype=dtype, rngs=rngs) for _ in range(n)]
      stages.append(layer_lib.ModuleList(blocks))
      in_c = c
    self.stages = layer_lib.ModuleList(stages)
    self.conv2 = layer_lib.conv(in_c, out_channels[3], 1, 1, dtype=dtype, rngs=rngs)
    self.bn2 = layer_lib.batch_norm(out_channels[3], dtype=dtype, rngs=rngs)
    self.linear = layer_lib.dense(out_channels[3], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    ura = not train
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    feats = {"stem": x}
    for k, stage in enumerate(self.stages, start=1):
      x = stage[0](x, train)
      for block in stage[1:]:
        x, pre = block(x, train)
      feats[f"stage{k}"] = x
      feats[f"stage{k}_preact"] = pre
    x = nnx.relu(self.bn2(self.conv2(x), use_running_average=ura))
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.linear(pooled), feats)
