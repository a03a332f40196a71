"""A layer that exists to be tapped: a model's attention probabilities, queries, keys and values.

A model calls a :class:`Probe` on an intermediate array a distillation term
may read; tapping the probe's path (``"blocks.3.attn.probs"``) captures that
array during the forward, as any tapped layer (:mod:`kdjax.engine.taps`).
The probe is the identity and holds no state, so it changes neither the
model's parameters nor its checkpoints. While a probe is tapped,
:func:`tapped` is true for it: a model that has a faster path which never
forms the array (a fused attention kernel) takes the explicit one only then.
"""

from __future__ import annotations

import jax
from flax import nnx

# The attribute a tap sets on the module it records (1: a plain layer, 2: a layer of an nnx.scan/vmap stack).
TAP_MARK = "_kdjax_tap"


class Probe(nnx.Module):
  """The identity: ``Probe()(x) is x``; its path names ``x`` for the taps."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def tapped(module: nnx.Module) -> bool:
  """Whether a tap records ``module``'s output in the current forward."""
  return bool(getattr(module, TAP_MARK, 0))
