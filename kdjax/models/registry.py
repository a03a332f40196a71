"""Model registry: name → (constructor, defaults, family, input_shape).

``create(name, num_classes=..., rngs=..., dtype=..., **overrides)`` builds a
model; ``available()`` lists the names; ``feature_shapes`` and
``count_params`` answer shape/size questions without running a real forward.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models.cifar_resnet import CifarResNet
from kdjax.models.cnn1d import CNN1D
from kdjax.models.imagenet_resnet import ImageNetResNet
from kdjax.models.mlp import MLP
from kdjax.models.mobilenet_v1 import MobileNetV1
from kdjax.models.mobilenet_v2 import MobileNetV2
from kdjax.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from kdjax.models.small import DigitsCNN
from kdjax.models.transformer import TransformerLM
from kdjax.models.vgg import VGG
from kdjax.models.wide_resnet import WideResNet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build one named model.

  Attributes:
    constructor: the model class.
    defaults: constructor keywords (``num_classes`` included) that ``create``
      overrides are applied on top of.
    family: ``"cifar"``, ``"imagenet"``, ``"mnist1d"``, ``"mnist"``,
      ``"digits"`` or ``"lm"``.
    input_shape: per-example input shape with the default settings.
  """

  constructor: Callable[..., nnx.Module]
  defaults: dict[str, Any]
  family: str
  input_shape: tuple[int, ...]


_CIFAR = (32, 32, 3)
_REGISTRY: dict[str, ModelSpec] = {}


def register(
  name: str, constructor: Callable[..., nnx.Module], family: str, input_shape: tuple[int, ...], /, **defaults: Any
) -> None:
  """Add a model under ``name`` (``ValueError`` if the name is taken)."""
  if name in _REGISTRY:
    raise ConfigError(f"model name {name!r} is already registered")
  _REGISTRY[name] = ModelSpec(constructor, defaults, family, tuple(input_shape))


for _d in (8, 14, 20, 32, 44, 56, 110):
  register(f"resnet{_d}", CifarResNet, "cifar", _CIFAR, depth=_d, widths=(16, 16, 32, 64), num_classes=100)
for _d in (8, 32):
  register(f"resnet{_d}x4", CifarResNet, "cifar", _CIFAR, depth=_d, widths=(32, 64, 128, 256), num_classes=100)
for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
  register(f"wrn_{_d}_{_k}", WideResNet, "cifar", _CIFAR, depth=_d, widen_factor=_k, num_classes=100)
for _d in (8, 11, 13, 16, 19):
  register(f"vgg{_d}", VGG, "cifar", _CIFAR, depth=_d, num_classes=100)
register("mobilenetv2", MobileNetV2, "cifar", _CIFAR, num_classes=100)
register("shufflenetv1", ShuffleNetV1, "cifar", _CIFAR, num_classes=100)
register("shufflenetv2", ShuffleNetV2, "cifar", _CIFAR, num_classes=100)

register("resnet18", ImageNetResNet, "imagenet", (224, 224, 3), block="basic", layers=(2, 2, 2, 2), num_classes=1000)
register("resnet34", ImageNetResNet, "imagenet", (224, 224, 3), block="basic", layers=(3, 4, 6, 3), num_classes=1000)
register(
  "resnet50", ImageNetResNet, "imagenet", (224, 224, 3), block="bottleneck", layers=(3, 4, 6, 3), num_classes=1000
)
register("mobilenet_v1", MobileNetV1, "imagenet", (224, 224, 3), num_classes=1000)

register("mlp", MLP, "mnist1d", (40,), input_shape=(40,), hidden=(100, 100), num_classes=10)
register("mlp_dropout", MLP, "mnist1d", (40,), input_shape=(40,), hidden=(100, 100), dropout=0.2, num_classes=10)
register("cnn1d", CNN1D, "mnist1d", (40,), length=40, num_classes=10)
register(
  "mlp_1200",
  MLP,
  "mnist",
  (28, 28, 1),
  input_shape=(28, 28, 1),
  hidden=(1200, 1200),
  dropout=0.5,
  input_dropout=0.2,
  num_classes=10,
)
register("mlp_800", MLP, "mnist", (28, 28, 1), input_shape=(28, 28, 1), hidden=(800, 800), num_classes=10)
register("cnn_digits", DigitsCNN, "digits", (8, 8, 1), num_classes=10)
register("transformer_lm", TransformerLM, "lm", (128,), num_layers=2, dim=64, num_heads=4, max_len=128, num_classes=256)
# Named sizes lm_{layers}x{dim} (head width 16, 64 positions) for small token tasks such as
# the embedded ``arithmetic`` dataset; the vocabulary comes from the data.
for _l, _d in ((4, 64), (2, 64), (2, 32), (1, 64), (1, 32)):
  register(
    f"lm_{_l}x{_d}", TransformerLM, "lm", (64,), num_layers=_l, dim=_d, num_heads=_d // 16, max_len=64, num_classes=256
  )


def available(family: str | None = None) -> list[str]:
  """Registered model names (optionally of one family), in registration order."""
  return [n for n, s in _REGISTRY.items() if family is None or s.family == family]


def spec(name: str) -> ModelSpec:
  """The :class:`ModelSpec` for ``name``; ``ValueError`` naming the choices."""
  if name not in _REGISTRY:
    raise ConfigError(f"unknown model {name!r}; available: {', '.join(available())}")
  return _REGISTRY[name]


def create(
  name: str, num_classes: int | None = None, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32, **overrides: Any
) -> nnx.Module:
  """Build the registered model ``name``.

  Args:
    name: one of :func:`available`.
    num_classes: classifier outputs (vocabulary size for ``transformer_lm``);
      ``None`` keeps the family default (CIFAR 100, ImageNet 1000, small
      models 10, LM 256).
    rngs: parameter (and dropout) randomness; ``nnx.Rngs(0)`` if omitted.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    **overrides: constructor keywords replacing the registered defaults,
      e.g. ``num_layers=4`` for ``transformer_lm`` or ``dropout=0.0``.

  Returns:
    The model, with ``input_shape`` (per example) and ``num_classes`` set.
  """
  s = spec(name)
  allowed = set(inspect.signature(s.constructor.__init__).parameters) - {"self", "num_classes", "dtype", "rngs", "name"}
  bad = sorted(set(overrides) - allowed)
  if bad:
    raise ConfigError(f"{name}: unknown option(s) {bad}; allowed: {sorted(allowed)}")
  kwargs = {**s.defaults, **overrides}
  if num_classes is not None:
    kwargs["num_classes"] = num_classes
  return s.constructor(**kwargs, dtype=dtype, rngs=nnx.Rngs(0) if rngs is None else rngs, name=name)


def dummy_input(model: nnx.Module, batch_size: int = 2) -> jax.ShapeDtypeStruct:
  """An abstract input batch for ``model`` (int32 tokens for LMs, else float32)."""
  dtype = getattr(model, "input_dtype", jnp.float32)
  return jax.ShapeDtypeStruct((batch_size, *model.input_shape), dtype)


def feature_shapes(model: nnx.Module, batch_size: int = 2) -> dict[str, tuple[int, ...]]:
  """Shapes of ``model(x).features`` for a batch of ``batch_size`` default inputs.

  Runs no computation (``jax.eval_shape`` over the split model), so it works
  on abstract models from ``nnx.eval_shape`` too.
  """
  graphdef, state = nnx.split(model)

  def features(state, x):
    return nnx.merge(graphdef, state)(x, train=False).features

  out = jax.eval_shape(features, state, dummy_input(model, batch_size))
  return {k: tuple(v.shape) for k, v in out.items()}


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param``; BN statistics excluded)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
