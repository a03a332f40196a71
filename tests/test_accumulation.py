"""Gradient accumulation averages over the whole batch's tokens (and labelled examples), not per micro-batch.

Masks and labels are made deliberately uneven across micro-batches: a mean of
micro-batch means would weight the few tokens of a sparse micro-batch like
the many of a dense one, and the update would differ from the full-batch one.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import kdjax
from kdjax import models
from kdjax.methods.config import MethodConfig

V, L, BATCH = 17, 12, 8


def _lm(layers: int, dim: int, seed: int):
  return models.create(
    "transformer_lm", num_classes=V, num_layers=layers, dim=dim, num_heads=2, max_len=L, rngs=nnx.Rngs(seed)
  )


def _token_batch() -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, (BATCH, L)).astype(np.int32)
  mask = np.zeros((BATCH, L), bool)
  # Micro-batch m (of 4) holds rows m and m+4: rows 0/4 get 1 token each, rows 3/7 all 12.
  for row, n in enumerate([1, 3, 6, 12, 1, 2, 5, 12]):
    mask[row, L - n :] = True
  labels = np.where(mask, np.roll(tokens, -1, axis=1), -1).astype(np.int32)
  return {"inputs": tokens, "label": labels, "mask": mask}


def _one_step(method: MethodConfig, accum: int, batch: dict, student_fn, teacher_fn):
  d = kdjax.Distiller(
    student_fn(),
    [teacher_fn()] if teacher_fn else [],
    method=method,
    optimizer=optax.sgd(0.5),
    grad_accum=accum,
    num_examples=BATCH,
    mode=None if teacher_fn else "teacher",
  )
  state = d.init(jax.random.key(0), batch)
  state, metrics = d.step(state, batch)
  return jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}


TOKEN_TERMS = ("forward_kl", "reverse_kl", "gkd", "tvd")


@pytest.mark.slow
def test_token_terms_accumulate_to_the_full_batch_update():
  """Every token divergence and the token CE in one method: accumulation over 4 micro-batches gives
  the full batch's losses (forward KL also checked against NumPy) and the same update."""
  batch = _token_batch()
  method = MethodConfig(name="+".join(TOKEN_TERMS), terms=("ce=0.5",))
  runs = {a: _one_step(method, a, batch, lambda: _lm(1, 16, 1), lambda: _lm(2, 24, 2)) for a in (1, 4)}
  (p1, m1), (p4, m4) = runs[1], runs[4]
  for k in [f"loss/{t}" for t in TOKEN_TERMS] + ["loss/ce", "loss/total"]:
    assert m1[k] > 0
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float32 grads summed in another order
  # The value itself: the mean over all response tokens, from the models' initial logits.
  s = np.asarray(_lm(1, 16, 1)(batch["inputs"]).logits, np.float64)
  t = np.asarray(_lm(2, 24, 2)(batch["inputs"]).logits, np.float64)
  logp = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))  # noqa: E731
  per_token = (np.exp(logp(t)) * (logp(t) - logp(s))).sum(-1)
  np.testing.assert_allclose(m4["loss/forward_kl"], per_token[batch["mask"]].mean(), rtol=2e-5)


def test_cross_entropy_with_unevenly_unlabelled_examples_accumulates_exactly():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(BATCH, 40)).astype(np.float32)
  labels = rng.integers(0, 10, BATCH).astype(np.int32)
  labels[[0, 4, 1]] = -1  # micro-batch 0 (rows 0, 4) has no labelled example, micro-batch 1 one
  batch = {"inputs": x, "label": labels}
  mlp = lambda: models.create("mlp", num_classes=10, rngs=nnx.Rngs(3))  # noqa: E731
  (p1, m1), (p4, m4) = (_one_step(MethodConfig(name="ce"), a, batch, mlp, None) for a in (1, 4))
  np.testing.assert_allclose(m4["loss/ce"], m1["loss/ce"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
