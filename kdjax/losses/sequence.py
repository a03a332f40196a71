"""Token-level (LLM) distillation losses on ``(B, L, V)`` logits.

Every loss is a masked mean over tokens:

  loss = Σ_{b,l} ℓ_{b,l} · mask_{b,l} / max(Σ mask, 1),

with ``mask`` ``(B, L)`` (bool or 0/1; ``None`` means all tokens). The
temperature divides both logit tensors; unlike :func:`kdjax.losses.kd`
there is no T² factor (TRL / GKD convention).

For large vocabularies, :func:`chunked_token_loss` computes the same value
with a ``lax.scan`` over sequence chunks (re-materialised in the backward
pass), so the ``(B, L, V)`` probabilities never exist at once; it can also
build the student logits chunk by chunk from hidden states and an
unembedding matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks

Array = jax.Array


# --------------------------------------------------------------------------
# Validation and reduction helpers.


def _check_token_pair(student_logits: Array, teacher_logits: Array, mask: Array | None) -> None:
  _checks.check_rank(student_logits, "student_logits", 3)
  _checks.check_rank(teacher_logits, "teacher_logits", 3)
  _checks.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
  _checks.check_mask(mask, student_logits.shape[:2], "mask")


def _mask_f32(mask: Array | None, shape: tuple[int, ...]) -> Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.asarray(mask).astype(jnp.float32)


def _masked_mean(per_token: Array, mask: Array | None) -> Array:
  m = _mask_f32(mask, per_token.shape)
  return jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)


def _log_probs(logits: Array, temperature: Any) -> Array:
  t = jnp.asarray(temperature, jnp.float32)
  return jax.nn.log_softmax(_checks.as_f32(logits) / t, axis=-1)


def _kl(logp: Array, logq: Array) -> Array:
  """KL(p ‖ q) over the last axis from log-probabilities."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


# --------------------------------------------------------------------------
# Per-token values: (B, L, V) logits -> (B, L). Shared by the plain and the
# chunked losses.


def _tok_forward_kl(s: Array, t: Array, temperature: Any = 1.0) -> Array:
  return _kl(_log_probs(t, temperature), _log_probs(s, temperature))


def _tok_reverse_kl(s: Array, t: Array, temperature: Any = 1.0) -> Array:
  return _kl(_log_probs(s, temperature), _log_probs(t, temperature))


def _tok_generalized_jsd(s: Array, t: Array, beta: Any = 0.5, temperature: Any = 1.0) -> Array:
  log_ps = _log_probs(s, temperature)
  log_pt = _log_probs(t, temperature)
  b = _checks.concrete_value(beta)
  if b is not None and b.ndim == 0:
    b = float(b)
    if b == 0.0:
      return _kl(log_pt, log_ps)
    if b == 1.0:
      return _kl(log_ps, log_pt)
    log_m = jnp.logaddexp(math.log1p(-b) + log_ps, math.log(b) + log_pt)
    return b * _kl(log_pt, log_m) + (1.0 - b) * _kl(log_ps, log_m)
  # Traced (or array) beta: general formula, endpoints selected with where.
  beta_f = jnp.asarray(beta, jnp.float32)
  log_m = jnp.logaddexp(jnp.log1p(-beta_f) + log_ps, jnp.log(beta_f) + log_pt)
  jsd = beta_f * _kl(log_pt, log_m) + (1.0 - beta_f) * _kl(log_ps, log_m)
  jsd = jnp.where(beta_f == 0.0, _kl(log_pt, log_ps), jnp.where(beta_f == 1.0, _kl(log_ps, log_pt), jsd))
  return jsd


def _tok_tvd(s: Array, t: Array, temperature: Any = 1.0) -> Array:
  ps = jnp.exp(_log_probs(s, temperature))
  pt = jnp.exp(_log_probs(t, temperature))
  return 0.5 * jnp.sum(jnp.abs(pt - ps), axis=-1)


def _tok_skew_kl(s: Array, t: Array, alpha: Any = 0.1, temperature: Any = 1.0, reverse: bool = False) -> Array:
  log_ps, log_pt = _log_probs(s, temperature), _log_probs(t, temperature)
  if reverse:
    log_ps, log_pt = log_pt, log_ps  # SRKL: the student's distribution is the one being skewed
  a = jnp.asarray(alpha, jnp.float32)
  log_mix = jnp.logaddexp(jnp.log(a) + log_pt, jnp.log1p(-a) + log_ps)
  return _kl(log_pt, log_mix)


_PER_TOKEN: dict[str, Callable[..., Array]] = {
  "forward_kl": _tok_forward_kl,
  "reverse_kl": _tok_reverse_kl,
  "generalized_jsd": _tok_generalized_jsd,
  "tvd": _tok_tvd,
  "skew_kl": _tok_skew_kl,
}


# --------------------------------------------------------------------------
# Public losses.


def forward_kl(
  student_logits: Array, teacher_logits: Array, mask: Array | None = None, temperature: float = 1.0
) -> Array:
  """Token-level forward KL: KL(teacher ‖ student), masked mean over tokens.

  ℓ_{b,l} = Σ_v p_T,v (log p_T,v − log p_S,v), p = softmax(logits/T).
  Mass-covering: penalises the student for missing teacher modes.

  Args:
    student_logits: ``(B, L, V)``.
    teacher_logits: ``(B, L, V)``.
    mask: optional ``(B, L)`` bool or 0/1; tokens with 0 are ignored.
    temperature: T > 0 (no T² factor).

  Returns:
    float32 scalar.
  """
  _check_token_pair(student_logits, teacher_logits, mask)
  _checks.check_positive(temperature, "temperature")
  return _masked_mean(_tok_forward_kl(student_logits, teacher_logits, temperature), mask)


def reverse_kl(
  student_logits: Array, teacher_logits: Array, mask: Array | None = None, temperature: float = 1.0
) -> Array:
  """Token-level reverse KL: KL(student ‖ teacher), masked mean over tokens.

  ℓ_{b,l} = Σ_v p_S,v (log p_S,v − log p_T,v), p = softmax(logits/T).
  Mode-seeking: penalises student mass where the teacher has little (as in
  MiniLLM, Gu et al., ICLR 2024).

  Args:
    student_logits: ``(B, L, V)``.
    teacher_logits: ``(B, L, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 (no T² factor).

  Returns:
    float32 scalar.
  """
  _check_token_pair(student_logits, teacher_logits, mask)
  _checks.check_positive(temperature, "temperature")
  return _masked_mean(_tok_reverse_kl(student_logits, teacher_logits, temperature), mask)


def generalized_jsd(
  student_logits: Array, teacher_logits: Array, beta: float = 0.5, mask: Array | None = None, temperature: float = 1.0
) -> Array:
  """Generalized Jensen–Shannon divergence of GKD (TRL convention).

  With M = (1 − β)·p_S + β·p_T (log M computed as
  logaddexp(log(1 − β) + log p_S, log β + log p_T)):

    ℓ = β·KL(teacher ‖ M) + (1 − β)·KL(student ‖ M)   for 0 < β < 1,
    ℓ = KL(teacher ‖ student)  (forward KL)           for β = 0,
    ℓ = KL(student ‖ teacher)  (reverse KL)           for β = 1.

  So β slides from forward KL (teacher ‖ student) at 0 to reverse KL
  (student ‖ teacher) at 1; β = 0.5 is the symmetric JSD. This is TRL's
  ``GKDTrainer.generalized_jsd_loss``; EasyDeL names β the other way round
  (its β is TRL's 1 − β), so always check the direction in words.

  Paper: Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem,
  "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes", ICLR 2024.

  Args:
    student_logits: ``(B, L, V)``.
    teacher_logits: ``(B, L, V)``.
    beta: interpolation β in [0, 1] (a Python number or a traced scalar).
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 (no T² factor).

  Returns:
    float32 scalar.
  """
  _check_token_pair(student_logits, teacher_logits, mask)
  _checks.check_positive(temperature, "temperature")
  _checks.check_in_unit_interval(beta, "beta")
  return _masked_mean(_tok_generalized_jsd(student_logits, teacher_logits, beta, temperature), mask)


def tvd(student_logits: Array, teacher_logits: Array, mask: Array | None = None, temperature: float = 1.0) -> Array:
  """Token-level total variation distance, masked mean over tokens.

  ℓ_{b,l} = ½ Σ_v |p_T,v − p_S,v| ∈ [0, 1] (symmetric).

  Args:
    student_logits: ``(B, L, V)``.
    teacher_logits: ``(B, L, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0.

  Returns:
    float32 scalar.
  """
  _check_token_pair(student_logits, teacher_logits, mask)
  _checks.check_positive(temperature, "temperature")
  return _masked_mean(_tok_tvd(student_logits, teacher_logits, temperature), mask)


def skew_kl(
  student_logits: Array,
  teacher_logits: Array,
  alpha: float = 0.1,
  mask: Array | None = None,
  temperature: float = 1.0,
  reverse: bool = False,
) -> Array:
  """Skew KL divergence of DistiLLM, masked mean over tokens.

    skew forward KL:  ℓ = KL(p_T ‖ α·p_T + (1 − α)·p_S),
    skew reverse KL:  ℓ = KL(p_S ‖ α·p_S + (1 − α)·p_T)   (``reverse=True``).

  Mixing a little of the first distribution into the second keeps the
  divergence bounded (≤ −log α) and its gradient stable when the student puts
  almost no mass where the teacher does (early training, on-policy samples).
  α = 0 recovers forward (reverse) KL.

  Paper: Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation for
  Large Language Models", ICML 2024 (α = 0.1 there).

  Args:
    student_logits: ``(B, L, V)``.
    teacher_logits: ``(B, L, V)``.
    alpha: skew α in [0, 1).
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 (no T² factor).
    reverse: skew reverse KL instead of skew forward KL.

  Returns:
    float32 scalar.
  """
  _check_token_pair(student_logits, teacher_logits, mask)
  _checks.check_positive(temperature, "temperature")
  _checks.check_in_unit_interval(alpha, "alpha")
  if _checks.concrete_value(alpha) is not None and float(alpha) >= 1.0:
    raise ConfigError(f"alpha must be < 1 (α = 1 compares a distribution with itself), got {alpha}")
  return _masked_mean(_tok_skew_kl(student_logits, teacher_logits, alpha, temperature, reverse), mask)


def teacher_topk(teacher_logits: Array, k: int, temperature: float = 1.0) -> tuple[Array, Array]:
  """The teacher's top-k log-probabilities and token ids (for caching).

  Log-probs are log_softmax(teacher_logits/T) over the *full* vocabulary,
  then the k largest are kept (not renormalised).

  Args:
    teacher_logits: ``(B, L, V)`` (any ``(..., V)`` works).
    k: number of entries kept, 1 <= k <= V.
    temperature: T > 0.

  Returns:
    ``(logprobs, indices)``, float32 ``(B, L, k)`` and int32 ``(B, L, k)``,
    sorted by decreasing probability.
  """
  _checks.check_min_rank(teacher_logits, "teacher_logits", 1)
  vocab = teacher_logits.shape[-1]
  if not 1 <= k <= vocab:
    raise ConfigError(f"k must lie in [1, {vocab}], got {k!r}.")
  _checks.check_positive(temperature, "temperature")
  logp = _log_probs(teacher_logits, temperature)
  vals, idx = jax.lax.top_k(logp, k)
  return vals, idx.astype(jnp.int32)


def sparse_kl(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """Forward KL restricted to the teacher's cached top-k tokens.

  ℓ_{b,l} = Σ_k p_T,k · (log p_T,k − log p_S,k), with log p_T,k the given
  teacher log-probs (not renormalised) and log p_S the student's
  log_softmax(student_logits/T) over the full vocabulary, gathered at the
  teacher's indices. This is KL(teacher ‖ student) truncated to the
  teacher's top-k support (not a true divergence: it can be slightly
  negative when the top-k mass is small).

  Args:
    student_logits: ``(B, L, V)``.
    teacher_topk_logprobs: ``(B, L, K)`` teacher log-probabilities (e.g.
      from :func:`teacher_topk`, computed at the same temperature).
    teacher_topk_indices: ``(B, L, K)`` int token ids in ``[0, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 applied to the student logits.

  Returns:
    float32 scalar.
  """
  _checks.check_rank(student_logits, "student_logits", 3)
  _checks.check_rank(teacher_topk_logprobs, "teacher_topk_logprobs", 3)
  _checks.check_same_batch(student_logits, teacher_topk_logprobs, "student_logits", "teacher_topk_logprobs")
  if teacher_topk_logprobs.shape[:2] != student_logits.shape[:2]:
    raise ConfigError(
      "teacher_topk_logprobs must have shape (B, L, K) matching "
      f"student_logits {student_logits.shape}, got "
      f"{teacher_topk_logprobs.shape}."
    )
  if jnp.shape(teacher_topk_indices) != teacher_topk_logprobs.shape:
    raise ConfigError(
      "teacher_topk_indices must have the shape of teacher_topk_logprobs "
      f"{teacher_topk_logprobs.shape}, got "
      f"{jnp.shape(teacher_topk_indices)}."
    )
  _checks.check_indices(teacher_topk_indices, student_logits.shape[-1], "teacher_topk_indices")
  _checks.check_mask(mask, student_logits.shape[:2], "mask")
  _checks.check_positive(temperature, "temperature")
  log_ps = _log_probs(student_logits, temperature)
  log_ps_k = jnp.take_along_axis(log_ps, teacher_topk_indices, axis=-1)
  log_pt_k = _checks.as_f32(teacher_topk_logprobs)
  per_tok = jnp.sum(jnp.exp(log_pt_k) * (log_pt_k - log_ps_k), axis=-1)
  return _masked_mean(per_tok, mask)


# --------------------------------------------------------------------------
# Top-k teacher distributions (teacher-output caches for large vocabularies).
#
# A cache that keeps only the teacher's top-k log-probabilities a_j at token
# ids i_j (j = 1..k, at T = 1) still knows the teacher's total tail mass
# r = 1 − Σ_j exp(a_j). The losses below compare teacher and student on the
# (k + 1)-bucket partition {i_1}, …, {i_k}, {every other token}: each bucket
# probability is known exactly at T = 1, every divergence keeps its meaning
# (non-negative, zero iff the two agree on the partition), and by the
# data-processing inequality it is ≤ the full-vocabulary divergence, with
# equality when the student spreads its tail mass like the teacher.
#
# At T ≠ 1 the tempered tail mass depends on how the teacher spreads r over
# the other V − k tokens, which the cache does not store; kdjax assumes an even
# spread (each gets log-prob u = log(r / (V − k))), the same assumption as
# :func:`topk_to_logits`, so a dense method on the reconstructed logits and a
# top-k loss see the same teacher at every temperature.

_TAIL_FLOOR = 1e-12  # smallest teacher tail mass (float16 top-k can sum past 1)


def _check_topk(teacher_topk_logprobs: Array, teacher_topk_indices: Array, vocab_size: int) -> int:
  lp_shape = jnp.shape(teacher_topk_logprobs)
  if len(lp_shape) < 1:
    raise ConfigError("teacher_topk_logprobs must have shape (..., k), got a scalar.")
  if jnp.shape(teacher_topk_indices) != lp_shape:
    raise ConfigError(
      "teacher_topk_indices must have the shape of teacher_topk_logprobs "
      f"{lp_shape}, got {jnp.shape(teacher_topk_indices)}."
    )
  k = lp_shape[-1]
  if not 1 <= k <= vocab_size:
    raise ConfigError(f"top-k size k={k} must lie in [1, vocab_size={vocab_size}].")
  _checks.check_indices(teacher_topk_indices, vocab_size, "teacher_topk_indices")
  return k


def _teacher_tail_logmass(log_pt_k: Array) -> Array:
  """log r = log(1 − Σ_j exp(a_j)), floored at log(_TAIL_FLOOR): ``(...,)``."""
  mass = jnp.sum(jnp.exp(log_pt_k), axis=-1)
  return jnp.log(jnp.maximum(1.0 - mass, _TAIL_FLOOR))


def topk_to_logits(teacher_topk_logprobs: Array, teacher_topk_indices: Array, vocab_size: int) -> Array:
  """Dense teacher log-probabilities from a top-k cache (tail spread evenly).

  z_v = a_j where v = i_j, else u = log(r / (V − k)) with
  r = 1 − Σ_j exp(a_j) the teacher's tail mass (floored at 1e-12). So
  softmax(z) is exact on the top-k tokens and on the tail's total mass at
  T = 1; softmax(z / T) assumes the tail is flat. With k = V it is the
  stored log-probabilities, scattered back to vocabulary order.

  Args:
    teacher_topk_logprobs: ``(..., k)`` teacher log-probabilities at T = 1
      (e.g. :func:`teacher_topk`), any float dtype.
    teacher_topk_indices: ``(..., k)`` distinct int ids in ``[0, V)``.
    vocab_size: V.

  Returns:
    float32 ``(..., V)`` log-probabilities.
  """
  k = _check_topk(teacher_topk_logprobs, teacher_topk_indices, vocab_size)
  lp = _checks.as_f32(teacher_topk_logprobs)
  idx = jnp.asarray(teacher_topk_indices, jnp.int32)
  if k == vocab_size:
    fill = jnp.zeros(lp.shape[:-1], jnp.float32)
  else:
    fill = _teacher_tail_logmass(lp) - math.log(vocab_size - k)
  dense = jnp.broadcast_to(fill[..., None], lp.shape[:-1] + (vocab_size,))
  return jnp.put_along_axis(dense, idx, lp, axis=-1, inplace=False)


def topk_buckets(
  student_logits: Array, teacher_topk_logprobs: Array, teacher_topk_indices: Array, temperature: Any = 1.0
) -> tuple[Array, Array]:
  """Student and teacher log-probabilities on the teacher's top-k partition.

  Buckets are the k cached tokens plus one bucket for the rest of the
  vocabulary (dropped when k = V). With p_S = softmax(s / T) over the full
  vocabulary:

    student: [log p_S(i_1), …, log p_S(i_k), log Σ_{v ∉ top-k} p_S(v)],
    teacher: log_softmax([a_1 / T, …, a_k / T, log(V − k) + u / T]),

  u = log(r / (V − k)) as in :func:`topk_to_logits`; at T = 1 the teacher
  row is exactly [a_1, …, a_k, log r]. The student's tail is a masked
  logsumexp (no 1 − Σ cancellation when it is confident).

  Args:
    student_logits: ``(..., V)``.
    teacher_topk_logprobs: ``(..., k)`` teacher log-probs at T = 1.
    teacher_topk_indices: ``(..., k)`` distinct int ids in ``[0, V)``.
    temperature: T > 0, applied to both sides.

  Returns:
    ``(student_logp, teacher_logp)``, float32 ``(..., k + 1)`` (``(..., V)``
    when k = V), each normalised over the last axis.
  """
  vocab = jnp.shape(student_logits)[-1]
  k = _check_topk(teacher_topk_logprobs, teacher_topk_indices, vocab)
  if jnp.shape(teacher_topk_logprobs)[:-1] != jnp.shape(student_logits)[:-1]:
    raise ConfigError(
      f"teacher_topk_logprobs {jnp.shape(teacher_topk_logprobs)} and student_logits "
      f"{jnp.shape(student_logits)} must agree on every axis but the last."
    )
  t = jnp.asarray(temperature, jnp.float32)
  idx = jnp.asarray(teacher_topk_indices, jnp.int32)
  # log p_S = z/T − lse(z/T), never materialised over the vocabulary: gather
  # the k logits and subtract (26 % faster value-and-grad at V = 8192 than a
  # full log_softmax followed by the gather).
  zt = _checks.as_f32(student_logits) / t
  lse = jax.nn.logsumexp(zt, axis=-1, keepdims=True)
  s_top = jnp.take_along_axis(zt, idx, axis=-1) - lse
  a = _checks.as_f32(teacher_topk_logprobs)
  if k == vocab:
    return s_top, jax.nn.log_softmax(a / t, axis=-1)
  # the student's tail: logsumexp over the tokens outside the top-k (a bool
  # scatter, then one fused select + reduction), exact however small it is
  in_top = jnp.put_along_axis(jnp.zeros(zt.shape, bool), idx, True, axis=-1, inplace=False)
  s_tail = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, zt), axis=-1, keepdims=True) - lse
  log_r = _teacher_tail_logmass(a)
  u = log_r - math.log(vocab - k)
  t_tail = (math.log(vocab - k) + u / t)[..., None]
  teacher = jax.nn.log_softmax(jnp.concatenate([a / t, t_tail], axis=-1), axis=-1)
  return jnp.concatenate([s_top, s_tail], axis=-1), teacher


def _topk_pair(student_logits, teacher_topk_logprobs, teacher_topk_indices, mask, temperature):
  _checks.check_rank(student_logits, "student_logits", 3)
  _checks.check_rank(teacher_topk_logprobs, "teacher_topk_logprobs", 3)
  _checks.check_mask(mask, jnp.shape(student_logits)[:2], "mask")
  _checks.check_positive(temperature, "temperature")
  return topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_indices, temperature)


def topk_forward_kl(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`forward_kl` from a top-k teacher: KL(teacher ‖ student) on buckets.

  ℓ_{b,l} = Σ_j P_T,j (log P_T,j − log P_S,j) over the k + 1 buckets of
  :func:`topk_buckets` (the k cached tokens and the rest). Exact
  :func:`forward_kl` when k = V; otherwise 0 ≤ ℓ ≤ the full forward KL at
  T = 1 (data-processing inequality). Unlike :func:`sparse_kl` the teacher's
  tail mass is kept, so the value is a divergence (never negative).

  Args:
    student_logits: ``(B, L, V)``.
    teacher_topk_logprobs: ``(B, L, k)`` teacher log-probs at T = 1.
    teacher_topk_indices: ``(B, L, k)`` distinct int ids in ``[0, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 on both sides (no T² factor).

  Returns:
    float32 scalar.
  """
  ls, lt = _topk_pair(student_logits, teacher_topk_logprobs, teacher_topk_indices, mask, temperature)
  return _masked_mean(_kl(lt, ls), mask)


def topk_reverse_kl(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`reverse_kl` from a top-k teacher: KL(student ‖ teacher) on buckets.

  ℓ_{b,l} = Σ_j P_S,j (log P_S,j − log P_T,j) over the buckets of
  :func:`topk_buckets`. Exact when k = V; ≤ the full reverse KL at T = 1.

  Args:
    student_logits: ``(B, L, V)``.
    teacher_topk_logprobs: ``(B, L, k)`` teacher log-probs at T = 1.
    teacher_topk_indices: ``(B, L, k)`` distinct int ids in ``[0, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 on both sides (no T² factor).

  Returns:
    float32 scalar.
  """
  ls, lt = _topk_pair(student_logits, teacher_topk_logprobs, teacher_topk_indices, mask, temperature)
  return _masked_mean(_kl(ls, lt), mask)


def topk_generalized_jsd(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  beta: float = 0.5,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`generalized_jsd` (GKD, TRL's β) from a top-k teacher, on buckets.

  β·KL(teacher ‖ M) + (1 − β)·KL(student ‖ M), M = (1 − β)·P_S + β·P_T,
  over the buckets of :func:`topk_buckets`; β = 0 is KL(teacher ‖ student),
  β = 1 is KL(student ‖ teacher). Exact when k = V.

  Args:
    student_logits: ``(B, L, V)``.
    teacher_topk_logprobs: ``(B, L, k)`` teacher log-probs at T = 1.
    teacher_topk_indices: ``(B, L, k)`` distinct int ids in ``[0, V)``.
    beta: β in [0, 1].
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 on both sides (no T² factor).

  Returns:
    float32 scalar.
  """
  _checks.check_in_unit_interval(beta, "beta")
  ls, lt = _topk_pair(student_logits, teacher_topk_logprobs, teacher_topk_indices, mask, temperature)
  # the buckets are normalised log-probs, so log_softmax(· / 1) is the identity
  return _masked_mean(_tok_generalized_jsd(ls, lt, beta, 1.0), mask)


def topk_tvd(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`tvd` from a top-k teacher: ½ Σ_j |P_T,j − P_S,j| on buckets.

  Exact when k = V; ≤ the full TVD at T = 1.

  Args:
    student_logits: ``(B, L, V)``.
    teacher_topk_logprobs: ``(B, L, k)`` teacher log-probs at T = 1.
    teacher_topk_indices: ``(B, L, k)`` distinct int ids in ``[0, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 on both sides.

  Returns:
    float32 scalar.
  """
  ls, lt = _topk_pair(student_logits, teacher_topk_logprobs, teacher_topk_indices, mask, temperature)
  return _masked_mean(0.5 * jnp.sum(jnp.abs(jnp.exp(lt) - jnp.exp(ls)), axis=-1), mask)


def topk_skew_kl(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  alpha: float = 0.1,
  mask: Array | None = None,
  temperature: float = 1.0,
  reverse: bool = False,
) -> Array:
  """:func:`skew_kl` (DistiLLM) from a top-k teacher, on the buckets of :func:`topk_buckets`.

  KL(P_T ‖ α·P_T + (1 − α)·P_S) (or the skew reverse KL) over the k + 1
  buckets; exact when k = V.

  Args:
    student_logits: ``(B, L, V)``.
    teacher_topk_logprobs: ``(B, L, k)`` teacher log-probs at T = 1.
    teacher_topk_indices: ``(B, L, k)`` distinct int ids in ``[0, V)``.
    alpha: skew α in [0, 1).
    mask: optional ``(B, L)`` bool or 0/1.
    temperature: T > 0 on both sides.
    reverse: skew reverse KL.

  Returns:
    float32 scalar.
  """
  _checks.check_in_unit_interval(alpha, "alpha")
  ls, lt = _topk_pair(student_logits, teacher_topk_logprobs, teacher_topk_indices, mask, temperature)
  return _masked_mean(_tok_skew_kl(ls, lt, alpha, 1.0, reverse), mask)


# --------------------------------------------------------------------------
# Chunked evaluation.


def chunked_token_loss(
  loss: str | Callable[..., Array],
  student_logits: Array | None,
  teacher_logits: Array,
  mask: Array | None = None,
  *,
  chunk_size: int = 128,
  student_hidden: Array | None = None,
  unembedding: Array | None = None,
  **kwargs: Any,
) -> Array:
  """A token loss evaluated chunk by chunk along the sequence axis.

  Gives the same value as the unchunked loss (e.g. ``forward_kl``) but runs
  a ``lax.scan`` over chunks of ``chunk_size`` positions whose body is
  wrapped in ``jax.checkpoint``: neither the forward nor the backward pass
  holds the full ``(B, L, V)`` probabilities (or, with hidden states, the
  student logits) at once. Chunks are sliced inside the loop, so the inputs
  are not copied; when ``chunk_size`` does not divide L the remainder is
  one shorter tail chunk.

  Args:
    loss: ``"forward_kl"``, ``"reverse_kl"``, ``"generalized_jsd"``,
      ``"tvd"``, or a callable ``fn(student_logits_chunk,
      teacher_logits_chunk, **kwargs) -> (B, chunk)`` per-token values.
    student_logits: ``(B, L, V)``, or ``None`` when ``student_hidden`` and
      ``unembedding`` are given.
    teacher_logits: ``(B, L, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    chunk_size: positions per chunk (> 0).
    student_hidden: optional ``(B, L, D)`` final hidden states; the student
      logits are then ``student_hidden @ unembedding`` per chunk.
    unembedding: ``(D, V)`` output projection used with ``student_hidden``.
    **kwargs: hyper-parameters of the loss (``temperature``, ``beta``).

  Returns:
    float32 scalar, the masked mean over tokens.
  """
  if isinstance(loss, str):
    if loss not in _PER_TOKEN:
      raise ConfigError(f"loss must be one of {sorted(_PER_TOKEN)} or a callable, got {loss!r}.")
    if "temperature" in kwargs:
      _checks.check_positive(kwargs["temperature"], "temperature")
    if loss == "generalized_jsd" and "beta" in kwargs:
      _checks.check_in_unit_interval(kwargs["beta"], "beta")
    per_token = _PER_TOKEN[loss]
  elif callable(loss):
    per_token = loss
  else:
    raise ConfigError(f"loss must be a name or a callable, got {loss!r}.")
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ConfigError(f"chunk_size must be a positive int, got {chunk_size!r}.")

  _checks.check_rank(teacher_logits, "teacher_logits", 3)
  if student_logits is None:
    if student_hidden is None or unembedding is None:
      raise ConfigError("student_logits is None: pass student_hidden (B, L, D) and unembedding (D, V) instead.")
    _checks.check_rank(student_hidden, "student_hidden", 3)
    _checks.check_rank(unembedding, "unembedding", 2)
    if student_hidden.shape[:2] != teacher_logits.shape[:2]:
      _checks.check_same_batch(student_hidden, teacher_logits, "student_hidden", "teacher_logits")
      raise ConfigError(
        f"student_hidden {student_hidden.shape} and teacher_logits {teacher_logits.shape} must agree on (B, L)."
      )
    if unembedding.shape != (student_hidden.shape[-1], teacher_logits.shape[-1]):
      raise ConfigError(
        f"unembedding must have shape (D, V) = "
        f"{(student_hidden.shape[-1], teacher_logits.shape[-1])}, got "
        f"{unembedding.shape}."
      )
    student_src = student_hidden
  else:
    _check_token_pair(student_logits, teacher_logits, None)
    student_src = student_logits
  _checks.check_mask(mask, teacher_logits.shape[:2], "mask")

  length = teacher_logits.shape[1]
  chunk_size = min(chunk_size, length)
  n_full, rem = divmod(length, chunk_size)
  m = _mask_f32(mask, teacher_logits.shape[:2])
  w = unembedding if student_logits is None else None

  def chunk_sum(w, s_c, t_c, m_c):
    if w is not None:
      s_c = jnp.einsum("bld,dv->blv", _checks.as_f32(s_c), _checks.as_f32(w))
    return jnp.sum(per_token(s_c, t_c, **kwargs) * m_c)

  # The slicing happens inside the re-materialised function, so the only
  # per-iteration residual saved for the backward pass is the chunk index
  # (slicing outside would save a stacked copy of every chunk).
  @jax.checkpoint
  def step_sum(w, s_all, t_all, m_all, i):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=1)
    return chunk_sum(w, sl(s_all), sl(t_all), sl(m_all))

  def body(total, i):
    return total + step_sum(w, student_src, teacher_logits, m, i), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(n_full))
  if rem:  # one static tail chunk
    tail = slice(n_full * chunk_size, length)
    total = total + jax.checkpoint(chunk_sum)(w, student_src[:, tail], teacher_logits[:, tail], m[:, tail])
  return total / jnp.maximum(jnp.sum(m), 1.0)
