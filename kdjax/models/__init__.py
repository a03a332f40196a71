"""kdjax.models: Flax NNX models that return logits and named features.

``create(name, num_classes=..., rngs=nnx.Rngs(seed), dtype=jnp.float32,
**overrides)`` builds one of ``available()``. Calling a model,
``model(x, train=False)``, returns ``ModelOutput(logits, features)``. Every
model carries ``input_shape`` (per example) and ``num_classes``;
``feature_shapes(model)`` and ``count_params(model)`` need no real forward.

Names and features (see each module's docstring for shapes):

* CIFAR (32×32×3 NHWC; any spatial size): ``resnet8/14/20/32/44/56/110``,
  ``resnet8x4``, ``resnet32x4``, ``wrn_16_1/16_2/40_1/40_2``,
  ``vgg8/11/13/16/19`` (BN), ``mobilenetv2``, ``shufflenetv1``,
  ``shufflenetv2``. Features ``stem``, ``stage1`` … ``stageN`` (N = 3 for
  ResNet/WRN/ShuffleNet, 4 for VGG/MobileNetV2), ``stageK_preact`` (not for
  MobileNetV2, whose stage outputs are linear bottlenecks), ``pooled``.
  WRN is pre-activation: ``stageK`` = ReLU(BN(stage sum)) with the BN the
  next layer applies, ``stageK_preact`` the BN output.
* ImageNet (224×224×3): ``resnet18``, ``resnet34``, ``resnet50``,
  ``mobilenet_v1``. Features ``stem``, ``stage1`` … ``stage4``,
  ``stageK_preact``, ``pooled``.
* MNIST-1D (``(B, 40)`` or ``(B, 40, 1)``): ``mlp`` (40-100-100-10; ``mlp_dropout``
  with dropout 0.2) with
  ``stage1``, ``stage2``, ``stageK_preact``, ``pooled``; ``cnn1d`` with
  ``stem``, ``stage1``, ``stage2`` (NWC ``(B, L, C)``), ``stageK_preact``,
  ``pooled`` (125).
* MNIST (``(B, 28, 28, 1)`` or ``(B, 784)``): ``mlp_1200`` (Hinton's teacher,
  dropout), ``mlp_800`` (student); MLP features as above.
* Digits (8×8×1): ``cnn_digits`` with ``stem``, ``stage1``, ``stage2``,
  ``stageK_preact``, ``pooled``.
* Language model (``(B, L)`` int tokens): ``transformer_lm`` with ``embed``,
  ``block0`` … ``block{N-1}``, ``pooled`` (final LayerNorm, ``(B, L, D)``);
  logits ``(B, L, V)``.
* Pretrained language models: ``from_pretrained(directory, dtype=..., mesh=...)``
  reads a Hugging Face checkpoint (Llama, Mistral, Qwen 2/3, Gemma 2/3, GPT-2) into a
  :class:`Decoder` with the same features and generation interface;
  ``load_tokenizer(directory)`` its tokenizer. ``from_pretrained(directory,
  layers=(0, 2))`` keeps some of its layers (a student cut from its teacher),
  :mod:`kdjax.models.prune` narrows MLPs and heads by activation importance,
  and ``to_pretrained(model, directory)`` writes a decoder back as a Hugging
  Face checkpoint that transformers loads.

Functional use (what the engine does)::

  model = create("resnet20", num_classes=100, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  def fwd(params, rest, x, train):
    # copy=True: fresh Variables at this trace level, so BatchNorm statistics
    # can be updated inside jax.grad (without it flax raises TraceContextError).
    m = nnx.merge(graphdef, params, rest, copy=True)
    out = m(x, train=train)
    return out, nnx.split(m, nnx.Param, ...)[2]   # updated BN stats / RNG counts
"""

from kdjax.models.base import ModelOutput
from kdjax.models.cifar_resnet import CifarResNet
from kdjax.models.cnn1d import CNN1D
from kdjax.models.decoder import Decoder, DecoderConfig
from kdjax.models.imagenet_resnet import ImageNetResNet
from kdjax.models.mlp import MLP
from kdjax.models.mobilenet_v1 import MobileNetV1
from kdjax.models.mobilenet_v2 import MobileNetV2
from kdjax.models.hf_export import to_pretrained
from kdjax.models.pretrained import from_pretrained, load_tokenizer, special_token_ids
from kdjax.models.probe import Probe
from kdjax.models.registry import (
  ModelSpec,
  available,
  count_params,
  create,
  dummy_input,
  feature_shapes,
  register,
  spec,
)
from kdjax.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from kdjax.models.small import DigitsCNN
from kdjax.models.transformer import TransformerLM
from kdjax.models.vgg import VGG
from kdjax.models.wide_resnet import WideResNet

__all__ = [
  "CNN1D",
  "CifarResNet",
  "Decoder",
  "DecoderConfig",
  "DigitsCNN",
  "ImageNetResNet",
  "MLP",
  "MobileNetV1",
  "MobileNetV2",
  "ModelOutput",
  "ModelSpec",
  "Probe",
  "ShuffleNetV1",
  "ShuffleNetV2",
  "TransformerLM",
  "VGG",
  "WideResNet",
  "available",
  "count_params",
  "create",
  "dummy_input",
  "feature_shapes",
  "from_pretrained",
  "load_tokenizer",
  "register",
  "spec",
  "special_token_ids",
  "to_pretrained",
]
