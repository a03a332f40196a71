"""Relational losses on embeddings: RKD, PKT, correlation congruence.

Embeddings are ``(B, D)``; inputs of higher rank are flattened per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks

Array = jax.Array


def _flat_pair(s: Array, t: Array, name_s: str, name_t: str):
  _checks.check_min_rank(s, name_s, 2)
  _checks.check_min_rank(t, name_t, 2)
  _checks.check_same_batch(s, t, name_s, name_t)
  bsz = s.shape[0]
  return (_checks.as_f32(s).reshape(bsz, -1), _checks.as_f32(t).reshape(bsz, -1))


def _safe_sqrt(x: Array) -> Array:
  """sqrt with a zero (not infinite) gradient at x = 0."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _pairwise_distance(e: Array) -> Array:
  """Euclidean distances ``(B, B)`` from explicit differences (diag = 0)."""
  diff = e[:, None, :] - e[None, :, :]
  return _safe_sqrt(jnp.sum(diff * diff, axis=-1))


def _normalized_distance(e: Array) -> Array:
  """Pairwise distances divided by the mean off-diagonal distance."""
  b = e.shape[0]
  d = _pairwise_distance(e)
  off = 1.0 - jnp.eye(b, dtype=d.dtype)
  mean = jnp.sum(d * off) / jnp.maximum(b * (b - 1), 1)
  return d / jnp.maximum(mean, 1e-12)


def _angles(e: Array) -> Array:
  """cos∠(e_i, e_j, e_k) = <ê_ij, ê_kj> for all triplets: ``(B, B, B)``.

  Index order ``[j, i, k]`` (anchor j first); ê_ij = normalize(e_i − e_j),
  which is 0 when i = j.
  """
  diff = e[None, :, :] - e[:, None, :]  # [j, i] = e_i - e_j
  norm = _safe_sqrt(jnp.sum(diff * diff, axis=-1, keepdims=True))
  unit = diff / jnp.maximum(norm, 1e-12)
  return jnp.einsum("jid,jkd->jik", unit, unit)


def _smooth_l1(x: Array, y: Array) -> Array:
  """Huber / smooth-L1 with δ = 1, mean over elements."""
  d = jnp.abs(x - y)
  return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def rkd(
  student_embedding: Array, teacher_embedding: Array, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Array:
  """Relational KD: match normalised pairwise distances and triplet angles.

  ψ_D(i, j) = ‖e_i − e_j‖ / μ, μ = mean of the B·(B−1) off-diagonal
  distances (the reference's "mean of the non-zero entries", ``d[d > 0]``:
  it clamps squared distances at 1e-12, so only the diagonal is zero there
  and duplicated rows still count; here they count as 0, and an all-equal
  batch gives ψ_D = 0 instead of a 0/0); ψ_A(i, j, k) = <ê_ij, ê_kj> with ê_ij = (e_i − e_j)/‖e_i − e_j‖
  for every anchor j (0 when a difference vanishes). Both terms use
  smooth-L1 (Huber, δ = 1) averaged over all B² resp. B³ entries (the
  zero diagonal entries included, as in RepDistiller):

    loss = w_d · huber(ψ_D(s), ψ_D(t)) + w_a · huber(ψ_A(s), ψ_A(t)).

  The teacher side is under ``stop_gradient``; distances and norms are
  gradient-safe at 0 (the diagonal), so gradients stay finite.

  Paper: Park, Kim, Lu & Cho, "Relational Knowledge Distillation",
  CVPR 2019.

  Args:
    student_embedding: ``(B, D_s)`` (higher ranks are flattened).
    teacher_embedding: ``(B, D_t)``; widths may differ.
    distance_weight: w_d.
    angle_weight: w_a.

  Returns:
    float32 scalar.
  """
  s, t = _flat_pair(student_embedding, teacher_embedding, "student_embedding", "teacher_embedding")
  t = jax.lax.stop_gradient(t)
  loss_d = _smooth_l1(_normalized_distance(s), _normalized_distance(t))
  loss_a = _smooth_l1(_angles(s), _angles(t))
  return jnp.asarray(distance_weight, jnp.float32) * loss_d + jnp.asarray(angle_weight, jnp.float32) * loss_a


def _pkt_probs(e: Array, eps: float) -> Array:
  e = e / (_safe_sqrt(jnp.sum(e * e, axis=1, keepdims=True)) + eps)
  k = (e @ e.T + 1.0) / 2.0
  return k / jnp.sum(k, axis=1, keepdims=True)


def pkt(student_embedding: Array, teacher_embedding: Array, eps: float = 1e-7) -> Array:
  """Probabilistic knowledge transfer: match cosine-kernel neighbour laws.

  Rows are L2-normalised (x / (‖x‖ + eps)); K = (cos + 1)/2 ``(B, B)``;
  P = K / row sums (conditional probabilities); then

    loss = mean_{i,j} P_t,ij · log((P_t,ij + eps) / (P_s,ij + eps)),

  an eps-smoothed KL(teacher ‖ student) per row, averaged over all B×B
  entries, i.e. (1/B) × the batch mean of the per-row KL. (RepDistiller's
  ``cosine_similarity_loss`` uses the same ``torch.mean``; multiply by B
  for the per-row-KL convention.)

  Paper: Passalis & Tefas, "Learning Deep Representations with
  Probabilistic Knowledge Transfer", ECCV 2018.

  Args:
    student_embedding: ``(B, D_s)`` (higher ranks are flattened).
    teacher_embedding: ``(B, D_t)``; widths may differ.
    eps: smoothing constant.

  Returns:
    float32 scalar.
  """
  s, t = _flat_pair(student_embedding, teacher_embedding, "student_embedding", "teacher_embedding")
  ps = _pkt_probs(s, eps)
  pt = _pkt_probs(t, eps)
  return jnp.mean(pt * (jnp.log(pt + eps) - jnp.log(ps + eps)))


def correlation_congruence(student_embedding: Array, teacher_embedding: Array) -> Array:
  """Correlation congruence, as in the CC authors' reference code.

  δ_i = |e_s,i − e_t,i| ``(B, D)``; loss = mean_{i<B−1} Σ_d δ_i,d · δ_{i+1},d
  (products of consecutive examples in the batch). Both embeddings must
  have the same width (the method's adapter makes them equal).

  Paper: Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation
  Congruence for Knowledge Distillation", ICCV 2019.

  Args:
    student_embedding: ``(B, D)``, B >= 2.
    teacher_embedding: ``(B, D)``.

  Returns:
    float32 scalar.
  """
  _checks.check_rank(student_embedding, "student_embedding", 2)
  _checks.check_rank(teacher_embedding, "teacher_embedding", 2)
  _checks.check_same_shape(student_embedding, teacher_embedding, "student_embedding", "teacher_embedding")
  if student_embedding.shape[0] < 2:
    raise ConfigError(
      f"student_embedding needs a batch of at least 2 for correlation_congruence, got shape {student_embedding.shape}."
    )
  delta = jnp.abs(_checks.as_f32(student_embedding) - _checks.as_f32(teacher_embedding))
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))
