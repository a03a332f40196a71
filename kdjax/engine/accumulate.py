"""Gradient accumulation as a function transform.

:func:`microbatched` turns a per-batch gradient function into one that splits
the batch into micro-batches, runs it on each in a ``lax.scan`` and returns
the mean gradient and metrics, so the step is written once for any number of
micro-batches (as levanter's ``microbatched`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def split_rows(batch: PyTree, num_micro: int) -> PyTree:
  """``(B, …)`` leaves → ``(num_micro, B / num_micro, …)``: micro-batch m holds rows m, m + A, m + 2A, …

  Interleaved rows keep every device's share of each micro-batch equal, so
  no row moves between devices.
  """
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1), batch)


def microbatched(
  grad_fn: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, PyTree]], num_micro: int
) -> Callable[[PyTree, PyTree], tuple[PyTree, PyTree, PyTree]]:
  """Accumulate ``grad_fn`` over ``num_micro`` micro-batches.

  Args:
    grad_fn: ``(carry, batch, index) -> (carry, grads, metrics)``; ``carry``
      threads state from one micro-batch to the next (BatchNorm statistics,
      a memory bank), ``index`` is the micro-batch number (0 when whole).
    num_micro: micro-batches per call; 1 calls ``grad_fn`` on the whole batch.

  Returns:
    ``(carry, batch) -> (carry, grads, metrics)`` with the mean of the
    gradients and of the metrics over the micro-batches:
    ``g = (Σ_m g_m) / num_micro``.
  """
  if num_micro == 1:
    return lambda carry, batch: grad_fn(carry, batch, jnp.zeros((), jnp.int32))

  def accumulated(carry, batch):
    micro = split_rows(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro)
    _, grads_shape, metrics_shape = jax.eval_shape(grad_fn, carry, first, jnp.zeros((), jnp.int32))
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731

    def body(acc, micro_and_index):
      c, g_sum, m_sum = acc
      c, g, m = grad_fn(c, *micro_and_index)
      return (c, jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, m)), None

    init = (carry, zeros(grads_shape), zeros(metrics_shape))
    (carry, g_sum, m_sum), _ = jax.lax.scan(body, init, (micro, jnp.arange(num_micro)))
    mean = lambda tree: jax.tree.map(lambda x: x / num_micro, tree)  # noqa: E731
    return carry, mean(g_sum), mean(m_sum)

  return accumulated
