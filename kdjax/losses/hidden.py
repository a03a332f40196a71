"""Losses on a sequence model's hidden states and attention, masked by the token mask.

Hidden states are ``(B, L, D)`` (or ``(B, D)`` vectors); attention
probabilities ``(B, H, L, L)`` (query, then key position); ``mask`` is
``(B, L)`` (1 or True for a real token; None: every position). A masked
position counts neither as a query nor, in the attention terms, as a key.
The student's hidden state is expected projected to the teacher's width
already (the learned projection belongs to the method). Every loss is the
mean over the real tokens (and heads), so its value does not depend on how
much padding a batch holds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks

Array = jax.Array
_TINY = 1e-12  # probabilities are clipped here before the log: a zero student probability gives a large, finite KL


def _weights(mask: Array | None, shape: tuple[int, ...]) -> Array:
  """``mask`` as float32 ``shape`` (the leading ``(B,)`` or ``(B, L)`` of the features); ones when None."""
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  m = jnp.asarray(mask).astype(jnp.float32)
  if m.shape != shape[: m.ndim] or m.ndim > len(shape):
    raise ConfigError(f"mask of shape {m.shape} does not match features of leading shape {shape}")
  return jnp.broadcast_to(m.reshape(m.shape + (1,) * (len(shape) - m.ndim)), shape)


def _pair(student: Array, teacher: Array) -> tuple[Array, Array]:
  _checks.check_rank(student, "student", (2, 3))
  _checks.check_same_shape(student, teacher, "student", "teacher")
  return _checks.as_f32(student), _checks.as_f32(teacher)


def _masked_mean(per_token: Array, mask: Array | None) -> Array:
  w = _weights(mask, per_token.shape)
  return jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), 1.0)


def hidden_mse(student: Array, teacher: Array, mask: Array | None = None) -> Array:
  """Hidden-state MSE (TinyBERT): the mean over real tokens of ``mean_d (h_s − h_t)²``.

  loss = Σ_{b,l} m_bl · (1/D) Σ_d (s_bld − t_bld)² / Σ_{b,l} m_bl. TinyBERT
  applies it to ``W_h·H_s`` and ``H_t`` of each mapped layer pair (and the
  embeddings), ``W_h`` a learned linear map from the student's width to the
  teacher's.

  Paper: Jiao et al., "TinyBERT: Distilling BERT for Natural Language
  Understanding", Findings of EMNLP 2020.

  Args:
    student: ``(B, L, D)`` or ``(B, D)``, already projected to the teacher's width.
    teacher: the same shape.
    mask: ``(B, L)`` (or ``(B,)``) real-token mask; None: all.

  Returns:
    float32 scalar.
  """
  s, t = _pair(student, teacher)
  return _masked_mean(jnp.mean((s - t) ** 2, axis=-1), mask)


def hidden_cosine(student: Array, teacher: Array, mask: Array | None = None, eps: float = 1e-8) -> Array:
  """Cosine-embedding loss (DistilBERT): the mean over real tokens of ``1 − cos(h_s, h_t)``.

  cos(x, y) = x·y / max(‖x‖‖y‖, eps), as ``torch.nn.CosineEmbeddingLoss``
  with target 1, which DistilBERT applies to the last hidden states of the
  real tokens. Scale-free: only the direction of each hidden state is matched.

  Paper: Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of
  BERT: smaller, faster, cheaper and lighter", NeurIPS 2019 EMC² workshop.

  Args:
    student: ``(B, L, D)`` or ``(B, D)``, already projected to the teacher's width.
    teacher: the same shape.
    mask: ``(B, L)`` (or ``(B,)``) real-token mask; None: all.

  Returns:
    float32 scalar.
  """
  s, t = _pair(student, teacher)
  dot = jnp.sum(s * t, axis=-1)
  norms = jnp.sqrt(jnp.sum(s * s, axis=-1) * jnp.sum(t * t, axis=-1))
  return _masked_mean(1.0 - dot / jnp.maximum(norms, eps), mask)


def _row_kl(t_logp: Array, s_logp: Array, t_p: Array, mask: Array | None) -> Array:
  """Mean over heads and real queries of Σ_{real keys j} p_t (log p_t − log p_s); all ``(B, H, L, L)``."""
  b, h, l, _ = t_p.shape
  keys = _weights(mask, (b, l))[:, None, None, :]
  kl = jnp.sum(jnp.where(t_p > 0, t_p * (t_logp - s_logp), 0.0) * keys, axis=-1)  # (B, H, L)
  return _masked_mean(jnp.moveaxis(kl, 1, -1), mask)


def attention_kl(student_probs: Array, teacher_probs: Array, mask: Array | None = None) -> Array:
  """Attention-distribution transfer (MiniLM): KL(teacher ‖ student) of each head's attention rows.

  loss = Σ_{b,h,i} m_bi · Σ_j m_bj · A_t[b,h,i,j] (log A_t − log A_s)[b,h,i,j] / (H · Σ_{b,i} m_bi),
  the forward KL from the teacher's attention distribution of query i over
  the keys to the student's, averaged over heads and real queries
  (probabilities clipped at 1e-12 before the log). Both models need the same
  number of heads; the sequence lengths must match.

  Paper: Wang, Wei, Dong, Bao, Yang & Zhou, "MiniLM: Deep Self-Attention
  Distillation for Task-Agnostic Compression of Pre-Trained Transformers",
  NeurIPS 2020.

  Args:
    student_probs: ``(B, H, L, L)`` attention probabilities (rows sum to 1).
    teacher_probs: the same shape.
    mask: ``(B, L)`` real-token mask; None: all.

  Returns:
    float32 scalar.
  """
  _checks.check_rank(student_probs, "student_probs", 4)
  _checks.check_same_shape(student_probs, teacher_probs, "student_probs", "teacher_probs")
  s, t = _checks.as_f32(student_probs), _checks.as_f32(teacher_probs)
  return _row_kl(jnp.log(jnp.maximum(t, _TINY)), jnp.log(jnp.maximum(s, _TINY)), t, mask)


def self_relation(x: Array, num_heads: int, mask: Array | None = None) -> Array:
  """Log-probabilities ``(B, R, L, L)`` of a self-attention relation: ``log softmax_j(x_i·x_j / √d_r)``.

  ``x`` ``(B, L, D)`` (queries, keys or values of a layer, heads
  concatenated) is split into ``R = num_heads`` relation heads of width
  ``d_r = D / R``; masked key positions get no probability.
  """
  b, l, d = x.shape
  if d % num_heads:
    raise ConfigError(f"relation heads ({num_heads}) must divide the feature width ({d})")
  xr = _checks.as_f32(x).reshape(b, l, num_heads, d // num_heads)
  scores = jnp.einsum("bird,bjrd->brij", xr, xr) / math.sqrt(d // num_heads)
  keys = _weights(mask, (b, l))[:, None, None, :] > 0
  return jax.nn.log_softmax(jnp.where(keys, scores, -1e30), axis=-1)


def relation_kl(student: Array, teacher: Array, num_heads: int, mask: Array | None = None) -> Array:
  """Self-attention relation transfer (MiniLM value relation, MiniLMv2 Q-Q/K-K/V-V relations).

  R(x) = softmax(x_r x_rᵀ / √d_r) per relation head r (:func:`self_relation`);
  loss = KL(R(teacher) ‖ R(student)) of each row, averaged over relation heads
  and real queries, masked keys excluded. The widths may differ (each is split
  into the same ``num_heads``), so a student with fewer or narrower heads can
  match a teacher's relations. MiniLM's value relation is the values with
  ``num_heads`` = the attention heads; MiniLMv2 concatenates the heads and
  re-splits them into ``num_heads`` relation heads, for queries, keys and values.

  Papers: Wang et al., "MiniLM", NeurIPS 2020; Wang, Bao, Huang, Dong & Wei,
  "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
  Pretrained Transformers", Findings of ACL 2021.

  Args:
    student: ``(B, L, D_s)``.
    teacher: ``(B, L, D_t)``.
    num_heads: relation heads R (dividing D_s and D_t).
    mask: ``(B, L)`` real-token mask; None: all.

  Returns:
    float32 scalar.
  """
  _checks.check_rank(student, "student", 3)
  _checks.check_rank(teacher, "teacher", 3)
  if student.shape[:2] != teacher.shape[:2]:
    raise ConfigError(f"student {student.shape} and teacher {teacher.shape} must share (B, L)")
  s_logp, t_logp = self_relation(student, num_heads, mask), self_relation(teacher, num_heads, mask)
  return _row_kl(t_logp, s_logp, jnp.exp(t_logp), mask)
