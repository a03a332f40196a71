"""Rematerialisation of a language model's blocks: a named ``jax.checkpoint`` policy (``model.remat``).

With a policy other than ``none``, each block's forward runs under
``nnx.remat`` (JAX's ``jax.checkpoint`` lifted to NNX modules, Chen et al.,
2016, "Training Deep Nets with Sublinear Memory Cost"): the backward pass
recomputes what the policy does not save, trading FLOPs for the activation
memory of the step.

  ``none``                              every activation is kept (no recomputation)
  ``dots_saveable``                     matmul outputs kept; norms, GELU, softmax recomputed
  ``dots_with_no_batch_dims_saveable``  only the weight matmuls kept (attention's batched dots recomputed)
  ``nothing_saveable``                  only the block's input kept; the whole block recomputed

A block holding a tapped layer (:mod:`kdjax.engine.taps`) runs without
remat, so the tap reads the value where it is made.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models.probe import tapped

POLICIES = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


def check_policy(name: str, field: str = "remat") -> str:
  """``name`` if it is one of :data:`POLICIES`, else one ``ConfigError`` line naming ``field``."""
  if name not in POLICIES:
    raise ConfigError(f"{field}={name!r}: expected one of {', '.join(POLICIES)}")
  return name


def block_call(block: nnx.Module, policy: str, static_argnums: tuple[int, ...] = ()) -> Callable:
  """``type(block).__call__`` (called as ``f(block, *args)``), under ``nnx.remat`` with ``policy`` unless it
  is ``none`` or a layer of ``block`` is tapped; ``static_argnums`` count ``block`` as argument 0."""
  call = type(block).__call__
  if policy == "none" or any(tapped(m) for _, m in nnx.iter_graph(block) if isinstance(m, nnx.Module)):
    return call
  return nnx.remat(call, policy=getattr(jax.checkpoint_policies, policy), static_argnums=static_argnums)
