"""Losses on class logits: KD, DKD, DIST.

All functions cast their inputs to float32, work in log space and return a
float32 scalar. Logits are ``(B, C)``; ``kd`` also accepts ``(..., C)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks
from kdjax.losses import divergences

Array = jax.Array


def kd(student_logits: Array, teacher_logits: Array, temperature: float = 4.0, *, per_example: bool = False) -> Array:
  """Hinton knowledge distillation: temperature-softened KL, scaled by T².

  loss = T² · mean_b KL(softmax(t_b/T) ‖ softmax(s_b/T))
       = T² · mean_b Σ_c p_t,c (log p_t,c − log p_s,c),

  i.e. KL(teacher ‖ student). The T² factor keeps the gradient magnitude
  roughly independent of T (RepDistiller / mdistiller convention:
  ``F.kl_div(..., reduction="sum") * T**2 / B``).

  Paper: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
  Network", NIPS Deep Learning Workshop 2015.

  Args:
    student_logits: ``(B, C)`` or ``(..., C)``.
    teacher_logits: same shape as ``student_logits``.
    temperature: softening temperature T > 0.
    per_example: return T² · KL per leading index instead of their mean
      (for masking and weighting, as optax's losses do).

  Returns:
    float32 scalar (the mean over all leading dimensions), or ``(...,)``
    with ``per_example=True``.
  """
  _checks.check_min_rank(student_logits, "student_logits", 2)
  _checks.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
  _checks.check_positive(temperature, "temperature")
  t = jnp.asarray(temperature, jnp.float32)
  log_ps, log_pt = divergences.log_probs(student_logits, t), divergences.log_probs(teacher_logits, t)
  per = divergences.forward_kl(log_ps, log_pt) * t**2
  return per if per_example else jnp.mean(per)


def _binary_and_nontarget(logits: Array, gt: Array):
  """Log-probabilities of the DKD decomposition, computed in log space.

  Returns ``(log p_gt, log(1 − p_gt), log p̂)`` where ``p̂`` is the softmax
  over the non-target classes (the gt entry of ``log p̂`` is set to 0 and
  must be masked by the caller). log(1 − p_gt) is the logsumexp of the
  non-target log-probabilities, so there is no log of a difference (or a
  sum) of probabilities. log p̂ is a log-softmax of the logits with the gt
  entry set to −inf: shifting by the non-target maximum keeps it accurate
  when that maximum is far below the gt logit (±1e4), and the gt entry never
  reaches an ``exp`` (left as x_gt − lse_nt it overflows for a confident
  teacher, and masking the product afterwards back-propagates 0·inf = NaN).
  """
  log_p = jax.nn.log_softmax(logits, axis=-1)
  log_p_gt = jnp.sum(jnp.where(gt, log_p, 0.0), axis=-1)
  log_p_other = jax.nn.logsumexp(jnp.where(gt, -jnp.inf, log_p), axis=-1)
  log_p_hat = jax.nn.log_softmax(jnp.where(gt, -jnp.inf, logits), axis=-1)
  return log_p_gt, log_p_other, jnp.where(gt, 0.0, log_p_hat)


def _check_dkd(student_logits: Array, teacher_logits: Array, labels: Array, beta: Any, temperature: Any) -> int:
  """Checks the inputs of :func:`dkd`; returns the number of classes C."""
  _checks.check_rank(student_logits, "student_logits", 2)
  _checks.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
  bsz, num_classes = jnp.shape(student_logits)
  if num_classes < 2:
    raise ConfigError(f"student_logits must have at least 2 classes for dkd, got shape {jnp.shape(student_logits)}.")
  _checks.check_labels(labels, (bsz,), num_classes, "labels")
  _checks.check_positive(temperature, "temperature")
  if jnp.ndim(beta) not in (0, 1) or (jnp.ndim(beta) == 1 and jnp.shape(beta)[0] != bsz):
    raise ConfigError(f"beta must be a scalar or have shape ({bsz},), got shape {jnp.shape(beta)}.")
  return num_classes


def _tckd_nckd(zs: Array, zt: Array, gt: Array) -> tuple[Array, Array]:
  """DKD's two KL(teacher ‖ student) terms per example, from tempered logits ``(B, C)`` and a one-hot ``gt``.

  TCKD on the binary [p_gt, 1 − p_gt], NCKD on the non-target softmax p̂
  (whose gt entries, log p̂ = 0 on both sides, contribute exactly 0):
  ``(tckd, nckd)``, each ``(B,)``.
  """
  s_gt, s_other, s_hat = _binary_and_nontarget(zs, gt)
  t_gt, t_other, t_hat = _binary_and_nontarget(zt, gt)
  tckd = jnp.exp(t_gt) * (t_gt - s_gt) + jnp.exp(t_other) * (t_other - s_other)
  nckd_terms = jnp.where(gt, 0.0, jnp.exp(t_hat) * (t_hat - s_hat))
  return tckd, jnp.sum(nckd_terms, axis=-1)


def dkd(
  student_logits: Array,
  teacher_logits: Array,
  labels: Array,
  alpha: float = 1.0,
  beta: float | Array = 8.0,
  temperature: float = 4.0,
  *,
  per_example: bool = False,
) -> Array:
  """Decoupled knowledge distillation: α·TCKD + β·NCKD, each scaled by T².

  With p = softmax(z/T), gt the label and p̂ the softmax over the
  non-target classes only (the gt logit removed exactly, not by the −1000
  trick):

    TCKD_b = KL(b_t ‖ b_s),   b = [p_gt, 1 − p_gt]      (teacher ‖ student)
    NCKD_b = KL(p̂_t ‖ p̂_s)                              (teacher ‖ student)
    loss   = T² · mean_b (α·TCKD_b + β_b·NCKD_b)

  ``beta`` may be a scalar or a per-example ``(B,)`` array. With α = 1 and
  β_b = 1 − p_t,gt (teacher, at temperature T) this equals ``kd`` exactly
  (the paper's identity KD = TCKD + (1 − p_t,gt)·NCKD). All log-probs come
  from logsumexp differences, so logits up to ±1e4 stay finite.

  Paper: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation",
  CVPR 2022 (reference code: mdistiller).

  Args:
    student_logits: ``(B, C)``, C >= 2.
    teacher_logits: ``(B, C)``.
    labels: ``(B,)`` integer class indices in ``[0, C)``.
    alpha: weight of the target-class term.
    beta: weight of the non-target term, scalar or ``(B,)``.
    temperature: softening temperature T > 0.
    per_example: return ``(B,)`` values T²·(α·TCKD_b + β_b·NCKD_b) instead
      of their mean (e.g. to leave out unlabelled examples).

  Returns:
    float32 scalar, or ``(B,)`` with ``per_example=True``.
  """
  num_classes = _check_dkd(student_logits, teacher_logits, labels, beta, temperature)
  t = jnp.asarray(temperature, jnp.float32)
  zs = _checks.as_f32(student_logits) / t
  zt = _checks.as_f32(teacher_logits) / t
  tckd, nckd = _tckd_nckd(zs, zt, jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_))
  a = jnp.asarray(alpha, jnp.float32)
  b = jnp.asarray(beta, jnp.float32)
  per = (a * tckd + b * nckd) * t**2
  return per if per_example else jnp.mean(per)


def _safe_norm(x: Array, axis: int) -> Array:
  """L2 norm with a zero (not NaN) gradient at x = 0."""
  sq = jnp.sum(x * x, axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _pearson_rows(a: Array, b: Array, eps: float = 1e-8) -> Array:
  """Pearson correlation between matching rows, with eps in the denominator."""
  a = a - jnp.mean(a, axis=1, keepdims=True)
  b = b - jnp.mean(b, axis=1, keepdims=True)
  num = jnp.sum(a * b, axis=1)
  return num / (_safe_norm(a, 1) * _safe_norm(b, 1) + eps)


def dist(
  student_logits: Array, teacher_logits: Array, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0
) -> Array:
  """DIST: match inter- and intra-class Pearson correlations of predictions.

  With Y_s = softmax(s/T), Y_t = softmax(t/T) (both ``(B, C)``) and ρ the
  Pearson correlation (eps = 1e-8 added to the denominator, as in the
  reference code):

    inter = 1 − mean_b ρ(Y_s[b, :], Y_t[b, :])     (rows: per example)
    intra = 1 − mean_c ρ(Y_s[:, c], Y_t[:, c])     (columns: per class)
    loss  = T² · (β·inter + γ·intra)

  Symmetric in student and teacher (not a divergence); ≈ 0 when they are
  equal (the eps leaves a residue of order T²·(β + γ)·eps/variance), at most
  2·T²·(β + γ). Rows or columns with zero variance contribute ρ = 0.

  Paper: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A
  Stronger Teacher", NeurIPS 2022.

  Args:
    student_logits: ``(B, C)``.
    teacher_logits: ``(B, C)``.
    beta: weight of the inter-class (per-row) term.
    gamma: weight of the intra-class (per-column) term.
    temperature: softening temperature T > 0.

  Returns:
    float32 scalar. There is no per-example form: the intra-class term
    correlates each class's column across the whole batch.
  """
  _checks.check_rank(student_logits, "student_logits", 2)
  _checks.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
  _checks.check_positive(temperature, "temperature")
  t = jnp.asarray(temperature, jnp.float32)
  ys = jax.nn.softmax(_checks.as_f32(student_logits) / t, axis=-1)
  yt = jax.nn.softmax(_checks.as_f32(teacher_logits) / t, axis=-1)
  inter = 1.0 - jnp.mean(_pearson_rows(ys, yt))
  intra = 1.0 - jnp.mean(_pearson_rows(ys.T, yt.T))
  return t**2 * (jnp.asarray(beta, jnp.float32) * inter + jnp.asarray(gamma, jnp.float32) * intra)


__all__ = ["kd", "dkd", "dist"]
