"""The contract every kdjax model follows.

A model is a Flax NNX module. Calling it returns a :class:`ModelOutput`:
``model(x, train=...) -> ModelOutput(logits, features)`` where ``features``
is a dict of named intermediate arrays, so any loss can tap any layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class ModelOutput(NamedTuple):
  """What every kdjax model returns.

  Attributes:
    logits: ``(B, C)`` for classifiers, ``(B, L, V)`` for language models.
    features: named intermediate arrays. Image models: ``"stem"``,
      ``"stage1"`` … ``"stageN"`` (NHWC, after ReLU), ``"stageK_preact"``
      (before the last ReLU of stage K, where the architecture has one) and
      ``"pooled"`` ``(B, D)``, the embedding fed to the classifier.
    topk_logp / topk_idx: a teacher read from a top-k output cache:
      ``(..., k)`` log-probabilities at T = 1 of its k most likely classes or
      tokens and their ids (``logits`` is then their dense reconstruction,
      ``kdjax.losses.topk_to_logits``). None for a model that ran.
    head: a language model's output head unapplied (``kdjax.losses.TokenHead``: final hidden states and
      unembedding), from which the token losses compute the logits chunk by chunk instead of reading
      ``logits`` (XLA then drops the unread full logits). None for other models.
  """

  logits: jax.Array
  features: dict[str, jax.Array]
  topk_logp: jax.Array | None = None
  topk_idx: jax.Array | None = None
  head: Any = None
