"""Multi-layer perceptrons: MNIST-1D's MLP and Hinton et al.'s (2015) MNIST pair.

  ``mlp``       40-100-100-10 (MNIST-1D paper), 15,210 parameters; input
                ``(B, 40)`` or ``(B, 40, 1)``.
  ``mlp_dropout``  the same with dropout 0.2 on both hidden layers.
  ``mlp_1200``  784-1200-1200-10, Hinton's teacher, 2,395,210 parameters;
                dropout 0.5 on both hidden layers and 0.2 on the input
                (``input_dropout=0`` to turn the latter off).
  ``mlp_800``   784-800-800-10, Hinton's student, 1,276,810 parameters, no
                dropout. Both MNIST models take ``(B, 28, 28, 1)`` or ``(B, 784)``.

Any input whose trailing dimensions flatten to the input size is accepted.

Features:
  ``stageK_preact``  (B, hidden_K)  hidden layer K before its ReLU
  ``stageK``         (B, hidden_K)  after the ReLU (before dropout)
  ``pooled``         (B, hidden_last) = the last ``stageK``
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models import _layers as layer_lib
from kdjax.models.base import ModelOutput


class MLP(nnx.Module):
  """ReLU MLP; see the module docstring for the features."""

  def __init__(
    self,
    input_shape: Sequence[int] = (40,),
    hidden: Sequence[int] = (100, 100),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    *,
    num_classes: int = 10,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "mlp",
  ):
    self.model_name = name
    self.num_classes = num_classes
    self.input_shape = tuple(input_shape)
    self.in_features = math.prod(self.input_shape)
    sizes = (self.in_features, *hidden)
    self.layers = layer_lib.ModuleList(
      [layer_lib.dense(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
    )
    self.head = layer_lib.dense(sizes[-1], num_classes, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.input_dropout = nnx.Dropout(input_dropout, rngs=rngs) if input_dropout > 0 else None

  def __call__(self, x: jax.Array, *, train: bool = False) -> ModelOutput:
    if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
      shapes = f"(B, {self.in_features})"
      if self.input_shape != (self.in_features,):
        shapes += f" or (B, {', '.join(map(str, self.input_shape))})"
      raise ConfigError(f"{self.model_name} expects input {shapes}, got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], self.in_features)
    if self.input_dropout is not None:
      x = self.input_dropout(x, deterministic=not train)
    feats = {}
    for k, layer in enumerate(self.layers, start=1):
      pre = layer(x)
      x = nnx.relu(pre)
      feats[f"stage{k}_preact"] = pre
      feats[f"stage{k}"] = x
      if self.dropout is not None:
        x = self.dropout(x, deterministic=not train)
    feats["pooled"] = feats[f"stage{len(self.layers)}"]
    return ModelOutput(self.head(x), feats)
