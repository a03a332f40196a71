"""VGG with BatchNorm (Simonyan & Zisserman 2015) as in the CRD/RepDistiller zoo.

Five blocks of conv3×3(bias)-BN-ReLU layers; widths 64/128/256/512/512 and
layers per block:
  vgg8  1-1-1-1-1   vgg11 1-1-2-2-2   vgg13 2-2-2-2-2
  vgg16 2-2-3-3-3   vgg19 2-2-4-4-4
A 2×2 max pool follows blocks 0, 1, 2 (and block 3 only for inputs of 64 px
or more, as in the reference), then global average pooling and one linear
layer 512 → classes.

Features (32×32 input):
  ``stem``           (B, 32, 32, 64)   block 0 after ReLU (before its pool)
  ``stage1``         (B, 16, 16, 128)  block 1 after ReLU
  ``stage2``         (B,  8,  8, 256)
  ``stage3``         (B,  4,  4, 512)
  ``stage4``         (B,  4,  4, 512)
  ``stageK_preact``  the same maps before their last ReLU
  ``pooled``         (B, 512)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput

CONFIGS: dict[int, tuple[int, ...]] = {
  8: (1, 1, 1, 1, 1),
  11: (1, 1, 2, 2, 2),
  13: (2, 2, 2, 2, 2),
  16: (2, 2, 3, 3, 3),
  19: (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)


class ConvBN(nnx.Module):
  def __init__(self, in_f: int, out_f: int, *, dtype, rngs: nnx.Rngs):
    self.conv = layer_lib.conv(in_f, out_f, 3, 1, bias=True, dtype=dtype, rngs=rngs)
    self.bn = layer_lib.batch_norm(out_f, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.bn(self.conv(x), use_running_average=not train)


class VGG(nnx.Module):
  """VGG-BN for 32×32 inputs; see the module docstring for the features."""

  input_shape = (32, 32, 3)

  def __init__(self, depth: int = 13, *, num_classes: int = 100, dtype=jnp.float32, rngs: nnx.Rngs, name: str = "vgg"):
    if depth not in CONFIGS:
      raise ConfigError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
    self.model_name = name
    self.num_classes = num_classes
    blocks = []
    in_f = 3
    for width, n in zip(WIDTHS, CONFIGS[depth]):
      layers = []
      for _ in range(n):
        layers.append(ConvBN(in_f, width, dtype=dtype, rngs=rngs))
        in_f = width
      blocks.append(layer_lib.ModuleList(layers))
    self.blocks = layer_lib.ModuleList(blocks)
    self.classifier = layer_lib.dense(in_f, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    layer_lib.check_image(self.model_name, x, self.input_shape)
    big = x.shape[1] >= 64
    feats = {}
    for b, block in enumerate(self.blocks):
      if b in (1, 2, 3) or (b == 4 and big):
        x = layer_lib.max_pool(x, 2, 2)
      for i, layer in enumerate(block):
        if i:
          x = nnx.relu(x)
        x = layer(x, train)
      pre, x = x, nnx.relu(x)
      if b == 0:
        feats["stem"] = x
      else:
        feats[f"stage{b}_preact"] = pre
        feats[f"stage{b}"] = x
    pooled = layer_lib.global_avg_pool(x)
    feats["pooled"] = pooled
    return ModelOutput(self.classifier(pooled), feats)
