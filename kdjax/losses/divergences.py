"""Per-token divergences between two distributions given as log-probabilities.

Each function here is written once and serves every token loss of kdjax: the
full-vocabulary losses (:func:`kdjax.losses.forward_kl` …) call it on
log_softmax(logits / T), the top-k forms (:func:`kdjax.losses.topk_forward_kl`
…) on the k + 1 buckets of :func:`kdjax.losses.topk_buckets`, and
:func:`kdjax.losses.chunked_token_loss` on one chunk of positions at a time.

Every function takes ``(student_logp, teacher_logp)``: float32 arrays
``(..., N)`` of the same shape, each normalised over the last axis (N is the
vocabulary or the number of buckets), and returns the per-position values
``(...,)``. None of them reduces over positions, so a caller may apply them
to any slice of a sequence and weight or sum the results as it likes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.losses import _checks

Array = jax.Array


def log_probs(logits: Array, temperature: Any = 1.0) -> Array:
  """log_softmax(logits / T) over the last axis, in float32: the log-probabilities fed to the divergences.

  Args:
    logits: ``(..., V)``, any float dtype.
    temperature: T > 0, a number or a traced scalar.
  """
  t = jnp.asarray(temperature, jnp.float32)
  return jax.nn.log_softmax(_checks.as_f32(logits) / t, axis=-1)


def kl(logp: Array, logq: Array) -> Array:
  """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) over the last axis, from log-probabilities: ``(...,)``."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def forward_kl(student_logp: Array, teacher_logp: Array) -> Array:
  """Forward KL, KL(teacher ‖ student) = Σ_v p_T,v (log p_T,v − log p_S,v): ``(...,)``.

  Mass-covering: it penalises the student for missing teacher modes.

  Args:
    student_logp: ``(..., N)`` student log-probabilities.
    teacher_logp: ``(..., N)`` teacher log-probabilities.
  """
  return kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Array, teacher_logp: Array) -> Array:
  """Reverse KL, KL(student ‖ teacher) = Σ_v p_S,v (log p_S,v − log p_T,v): ``(...,)``.

  Mode-seeking: it penalises student mass where the teacher has little (as
  in MiniLLM, Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of
  Large Language Models", ICLR 2024).

  Args:
    student_logp: ``(..., N)`` student log-probabilities.
    teacher_logp: ``(..., N)`` teacher log-probabilities.
  """
  return kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: Array, teacher_logp: Array, beta: Any = 0.5) -> Array:
  """Generalized Jensen–Shannon divergence of GKD (TRL's β): ``(...,)``.

  With M = (1 − β)·p_S + β·p_T (log M = logaddexp(log(1 − β) + log p_S,
  log β + log p_T)):

    ℓ = β·KL(teacher ‖ M) + (1 − β)·KL(student ‖ M)   for 0 < β < 1,
    ℓ = KL(teacher ‖ student)  (forward KL)           for β = 0,
    ℓ = KL(student ‖ teacher)  (reverse KL)           for β = 1.

  β = 0.5 is the symmetric JSD. This is TRL's
  ``GKDTrainer.generalized_jsd_loss``; EasyDeL names β the other way round
  (its β is TRL's 1 − β).

  Paper: Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem,
  "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes", ICLR 2024.

  Args:
    student_logp: ``(..., N)`` student log-probabilities.
    teacher_logp: ``(..., N)`` teacher log-probabilities.
    beta: β in [0, 1], a Python number (the endpoints then skip the
      mixture) or a traced scalar (endpoints selected with ``where``).
  """
  b = _checks.concrete_value(beta)
  if b is not None and b.ndim == 0:
    b = float(b)
    if b == 0.0:
      return kl(teacher_logp, student_logp)
    if b == 1.0:
      return kl(student_logp, teacher_logp)
    log_m = jnp.logaddexp(math.log1p(-b) + student_logp, math.log(b) + teacher_logp)
    return b * kl(teacher_logp, log_m) + (1.0 - b) * kl(student_logp, log_m)
  beta_f = jnp.asarray(beta, jnp.float32)
  log_m = jnp.logaddexp(jnp.log1p(-beta_f) + student_logp, jnp.log(beta_f) + teacher_logp)
  jsd = beta_f * kl(teacher_logp, log_m) + (1.0 - beta_f) * kl(student_logp, log_m)
  return jnp.where(
    beta_f == 0.0, kl(teacher_logp, student_logp), jnp.where(beta_f == 1.0, kl(student_logp, teacher_logp), jsd)
  )


def tvd(student_logp: Array, teacher_logp: Array) -> Array:
  """Total variation distance ½ Σ_v |p_T,v − p_S,v| ∈ [0, 1] (symmetric): ``(...,)``.

  Args:
    student_logp: ``(..., N)`` student log-probabilities.
    teacher_logp: ``(..., N)`` teacher log-probabilities.
  """
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(teacher_logp) - jnp.exp(student_logp)), axis=-1)


def skew_kl(student_logp: Array, teacher_logp: Array, alpha: Any = 0.1, reverse: bool = False) -> Array:
  """Skew KL divergence of DistiLLM: ``(...,)``.

    skew forward KL:  ℓ = KL(teacher ‖ α·p_T + (1 − α)·p_S),
    skew reverse KL:  ℓ = KL(student ‖ α·p_S + (1 − α)·p_T)   (``reverse=True``).

  Mixing a little of the first distribution into the second keeps the
  divergence bounded (≤ −log α) and its gradient stable when the student
  puts almost no mass where the teacher does. α = 0 recovers the forward
  (reverse) KL.

  Paper: Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation
  for Large Language Models", ICML 2024 (α = 0.1 there).

  Args:
    student_logp: ``(..., N)`` student log-probabilities.
    teacher_logp: ``(..., N)`` teacher log-probabilities.
    alpha: skew α in [0, 1).
    reverse: the skew reverse KL (the student's distribution is skewed).
  """
  first, second = (student_logp, teacher_logp) if reverse else (teacher_logp, student_logp)
  a = jnp.asarray(alpha, jnp.float32)
  log_mix = jnp.logaddexp(jnp.log(a) + first, jnp.log1p(-a) + second)
  return kl(first, log_mix)


__all__ = ["log_probs", "kl", "forward_kl", "reverse_kl", "generalized_jsd", "tvd", "skew_kl"]
