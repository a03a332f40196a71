"""Teachers whose vocabulary is not the student's.

Two cases:

* **Same tokenizer, padded vocabulary.** Checkpoints often pad the embedding
  and output head to a multiple of 64 or 128 (the extra ids are never
  produced by the tokenizer). :func:`align_vocab` keeps the first ``V``
  logits of the longer side, so every token-level loss compares the same
  ``V`` tokens; the softmax over them renormalises away the padding.
* **Different tokenizers.** No token-to-token correspondence exists.
  :func:`uld` (Universal Logit Distillation, Boizard et al. 2024) compares
  the two next-token distributions as sorted probability vectors — the
  closed form of the Wasserstein-1 distance when the transport cost between
  any two distinct tokens is 1 and the supports are matched by rank — and
  pairs the i-th response token of the student with the i-th of the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks

Array = jax.Array


def align_vocab(student_logits: Array, teacher_logits: Array) -> tuple[Array, Array]:
  """Cut both ``(..., V_s)`` / ``(..., V_t)`` logits to their shared first ``min(V_s, V_t)`` entries.

  For one tokenizer whose vocabulary one model pads: ids ≥ the true
  vocabulary size are padding and carry no probability a tokenizer can use.

  Returns:
    ``(student_logits, teacher_logits)``, both ``(..., min(V_s, V_t))``.
  """
  if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
    raise ConfigError(
      f"student and teacher logits must agree up to the vocabulary axis, got "
      f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
    )
  v = min(student_logits.shape[-1], teacher_logits.shape[-1])
  return student_logits[..., :v], teacher_logits[..., :v]


def _sorted_probs(logits: Array, temperature: float, size: int) -> Array:
  """Probabilities sorted in descending order, zero-padded to ``size`` entries: ``(..., size)``."""
  p = jax.nn.softmax(_checks.as_f32(logits) / temperature, axis=-1)
  p = -jnp.sort(-p, axis=-1)
  return jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, size - p.shape[-1])])


def _response_positions(mask: Array, n: int) -> tuple[Array, Array]:
  """For each row of ``mask`` ``(B, L)``: the positions of its first ``n`` set entries ``(B, n)``, and which exist."""
  m = mask.astype(bool)
  pos = jnp.argsort(~m, axis=1, stable=True)[:, :n]  # set entries first, each group in position order
  return pos.astype(jnp.int32), jnp.arange(n)[None, :] < m.sum(axis=1, keepdims=True)


def uld_pairs(student_mask: Array, teacher_mask: Array) -> Array:
  """Student/teacher token pairs :func:`uld` averages over: Σ_b min(n_S(b), n_T(b)), float32 scalar.

  ``n_S(b)`` / ``n_T(b)`` count the set entries of row b of the ``(B, L_s)`` /
  ``(B, L_t)`` masks, each capped at ``min(L_s, L_t)``.
  """
  n = min(student_mask.shape[1], teacher_mask.shape[1])
  ns = jnp.minimum(jnp.sum(student_mask.astype(bool), axis=1), n)
  nt = jnp.minimum(jnp.sum(teacher_mask.astype(bool), axis=1), n)
  return jnp.sum(jnp.minimum(ns, nt)).astype(jnp.float32)


def uld(
  student_logits: Array, teacher_logits: Array, student_mask: Array, teacher_mask: Array, temperature: float = 1.0
) -> Array:
  """Universal Logit Distillation: a distance between next-token distributions over different vocabularies.

  The student's and the teacher's response tokens are paired in order (the
  i-th set entry of ``student_mask`` with the i-th of ``teacher_mask``, up
  to the shorter response of each example); for each pair

    ℓ = Σ_i |p_S^↓(i) − p_T^↓(i)|,

  with p^↓ a distribution's probabilities sorted in descending order, the
  shorter vocabulary padded with zeros. The loss is the mean of ℓ over all
  pairs of the batch (0 when there is none).

  Paper: Boizard, El Haddad, Hudelot & Colombo, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs", 2024.

  Args:
    student_logits: ``(B, L_s, V_s)``.
    teacher_logits: ``(B, L_t, V_t)``.
    student_mask / teacher_mask: ``(B, L_s)`` / ``(B, L_t)``, the response
      positions (bool or 0/1).
    temperature: T > 0 applied to both.

  Returns:
    float32 scalar.
  """
  _checks.check_rank(student_logits, "student_logits", 3)
  _checks.check_rank(teacher_logits, "teacher_logits", 3)
  _checks.check_mask(student_mask, student_logits.shape[:2], "student_mask")
  _checks.check_mask(teacher_mask, teacher_logits.shape[:2], "teacher_mask")
  _checks.check_positive(temperature, "temperature")
  if student_logits.shape[0] != teacher_logits.shape[0]:
    raise ConfigError(f"student and teacher batch sizes differ: {student_logits.shape[0]} vs {teacher_logits.shape[0]}")
  n = min(student_logits.shape[1], teacher_logits.shape[1])
  size = max(student_logits.shape[-1], teacher_logits.shape[-1])
  s_pos, s_ok = _response_positions(student_mask, n)
  t_pos, t_ok = _response_positions(teacher_mask, n)
  take = lambda logits, pos: jnp.take_along_axis(logits, pos[:, :, None], axis=1)  # noqa: E731
  ps = _sorted_probs(take(student_logits, s_pos), temperature, size)
  pt = _sorted_probs(take(teacher_logits, t_pos), temperature, size)
  per_pair = jnp.sum(jnp.abs(ps - pt), axis=-1)
  paired = (s_ok & t_ok).astype(jnp.float32)
  return jnp.sum(per_pair * paired) / jnp.maximum(jnp.sum(paired), 1.0)
