"""Token-level (LLM) distillation losses on ``(B, L, V)`` logits.

Each divergence is written once, in :mod:`kdjax.losses.divergences`, as a
function of two log-probability arrays ``(student_logp, teacher_logp)``
``(..., N)`` → ``(...,)``. This module feeds it three ways:

* full vocabulary: log_softmax(logits / T) of both sides (:func:`forward_kl`,
  :func:`reverse_kl`, :func:`generalized_jsd`, :func:`tvd`, :func:`skew_kl`);
* a top-k teacher cache: the k + 1 buckets of :func:`topk_buckets`
  (:func:`topk_forward_kl` …);
* chunk by chunk along the sequence (:func:`chunked_token_loss`), a
  ``lax.scan`` re-materialised in the backward pass, so the ``(B, L, V)``
  probabilities never exist at once; it can also build the student logits
  chunk by chunk from hidden states and an unembedding matrix;
* fused with both models' output heads, chunk by chunk with a custom VJP
  (:mod:`kdjax.losses.fused`, what the methods use at large vocabularies).

Every loss is then the one masked mean over tokens (:func:`_masked_mean`):

  loss = Σ_{b,l} ℓ_{b,l} · mask_{b,l} / max(Σ mask, 1),

with ``mask`` ``(B, L)`` (bool or 0/1; ``None`` means all tokens). The
temperature divides both logit tensors; unlike :func:`kdjax.losses.kd`
there is no T² factor (TRL / GKD convention).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks
from kdjax.losses import divergences

Array = jax.Array

# The divergences a token loss can name, each over (student_logp, teacher_logp).
_DIVERGENCES: dict[str, Callable[..., Array]] = {
  "forward_kl": divergences.forward_kl,
  "reverse_kl": divergences.reverse_kl,
  "generalized_jsd": divergences.generalized_jsd,
  "tvd": divergences.tvd,
  "skew_kl": divergences.skew_kl,
}
# The mixture divergences, whose top-k forms renormalise the bucket rows once more (see _topk_per_token).
TOPK_RENORMALISED = frozenset({"generalized_jsd", "skew_kl"})


# --------------------------------------------------------------------------
# Validation and the masked mean.


def _check_token_pair(student_logits: Array, teacher_logits: Array, mask: Array | None) -> None:
  _checks.check_rank(student_logits, "student_logits", 3)
  _checks.check_rank(teacher_logits, "teacher_logits", 3)
  _checks.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
  _checks.check_mask(mask, student_logits.shape[:2], "mask")


def _check_hyper(hyper: dict[str, Any]) -> None:
  """Checks the hyper-parameters a divergence takes: ``beta`` in [0, 1], ``alpha`` in [0, 1)."""
  if "beta" in hyper:
    _checks.check_in_unit_interval(hyper["beta"], "beta")
  if "alpha" in hyper:
    alpha = hyper["alpha"]
    _checks.check_in_unit_interval(alpha, "alpha")
    if _checks.concrete_value(alpha) is not None and float(alpha) >= 1.0:
      raise ConfigError(f"alpha must be < 1 (α = 1 compares a distribution with itself), got {alpha}")


def _mask_f32(mask: Array | None, shape: tuple[int, ...]) -> Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.asarray(mask).astype(jnp.float32)


def _weighted_sum(per_token: Array, weights: Array) -> Array:
  """Σ ℓ · w over every position (a whole batch, or one chunk of it)."""
  return jnp.sum(per_token * weights)


def _normalise(total: Array, weights: Array) -> Array:
  """``total`` / max(Σ w, 1): the mean over the weighted tokens, 0 when there is none."""
  return total / jnp.maximum(jnp.sum(weights), 1.0)


def _masked_mean(per_token: Array, mask: Array | None) -> Array:
  """Σ ℓ · mask / max(Σ mask, 1) for per-token values ``(B, L)`` and a mask ``(B, L)`` (None = all)."""
  weights = _mask_f32(mask, per_token.shape)
  return _normalise(_weighted_sum(per_token, weights), weights)


# --------------------------------------------------------------------------
# Full-vocabulary losses.


def _per_token(
  divergence: Callable[..., Array], student_logits: Array, teacher_logits: Array, temperature: Any = 1.0, **hyper: Any
) -> Array:
  """``divergence`` between log_softmax(student_logits / T) and log_softmax(teacher_logits / T): ``(...,)``."""
  return divergence(
    divergences.log_probs(student_logits, temperature), divergences.log_probs(teacher_logits, temperature), **hyper
  )


def _dense_loss(
  divergence: Callable[..., Array],
  student_logits: Array,
  teacher_logits: Array,
  mask: Array | None,
  temperature: Any,
  **hyper: Any,
) -> Array:
  """The masked mean over tokens of ``divergence`` on full-vocabulary logits ``(B, L, V)``: float32 scalar."""
  _check_token_pair(student_logits, teacher_logits, mask)
  _checks.check_positive(temperature, "temperature")
  _check_hyper(hyper)
  return _masked_mean(_per_token(divergence, student_logits, teacher_logits, temperature, **hyper), mask)


def forward_kl(
  student_logits: Array, teacher_logits: Array, mask: Array | None = None, temperature: float = 1.0
) -> Array:
  """Token-level forward KL, KL(teacher ‖ student), masked mean over tokens.

  ℓ_{b,l} = Σ_v p_T,v (log p_T,v − log p_S,v), p = softmax(logits / T)
  (:func:`kdjax.losses.divergences.forward_kl`). Mass-covering.

  Shapes: logits ``(B, L, V)``; mask ``(B, L)`` bool or 0/1 (tokens with 0
  are ignored). T > 0, no T² factor. Returns a float32 scalar.
  """
  return _dense_loss(divergences.forward_kl, student_logits, teacher_logits, mask, temperature)


def reverse_kl(
  student_logits: Array, teacher_logits: Array, mask: Array | None = None, temperature: float = 1.0
) -> Array:
  """Token-level reverse KL, KL(student ‖ teacher), masked mean over tokens.

  ℓ_{b,l} = Σ_v p_S,v (log p_S,v − log p_T,v), p = softmax(logits / T)
  (:func:`kdjax.losses.divergences.reverse_kl`). Mode-seeking, as in
  MiniLLM (Gu et al., ICLR 2024).

  Shapes: logits ``(B, L, V)``; mask ``(B, L)`` bool or 0/1. T > 0, no T²
  factor. Returns a float32 scalar.
  """
  return _dense_loss(divergences.reverse_kl, student_logits, teacher_logits, mask, temperature)


def generalized_jsd(
  student_logits: Array, teacher_logits: Array, beta: float = 0.5, mask: Array | None = None, temperature: float = 1.0
) -> Array:
  """Generalized Jensen–Shannon divergence of GKD (TRL's β), masked mean over tokens.

  ℓ = β·KL(teacher ‖ M) + (1 − β)·KL(student ‖ M), M = (1 − β)·p_S + β·p_T
  (:func:`kdjax.losses.divergences.generalized_jsd`): β = 0 is the forward
  KL(teacher ‖ student), β = 1 the reverse KL(student ‖ teacher), β = 0.5
  the symmetric JSD. EasyDeL's β is TRL's 1 − β.

  Paper: Agarwal et al., "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes", ICLR 2024.

  Shapes: logits ``(B, L, V)``; mask ``(B, L)`` bool or 0/1. β in [0, 1] (a
  Python number or a traced scalar); T > 0, no T² factor. Returns a float32
  scalar.
  """
  return _dense_loss(divergences.generalized_jsd, student_logits, teacher_logits, mask, temperature, beta=beta)


def tvd(student_logits: Array, teacher_logits: Array, mask: Array | None = None, temperature: float = 1.0) -> Array:
  """Token-level total variation distance, masked mean over tokens.

  ℓ_{b,l} = ½ Σ_v |p_T,v − p_S,v| ∈ [0, 1], symmetric in teacher and
  student (:func:`kdjax.losses.divergences.tvd`).

  Shapes: logits ``(B, L, V)``; mask ``(B, L)`` bool or 0/1. T > 0. Returns
  a float32 scalar.
  """
  return _dense_loss(divergences.tvd, student_logits, teacher_logits, mask, temperature)


def skew_kl(
  student_logits: Array,
  teacher_logits: Array,
  alpha: float = 0.1,
  mask: Array | None = None,
  temperature: float = 1.0,
  reverse: bool = False,
) -> Array:
  """Skew KL divergence of DistiLLM, masked mean over tokens.

  Skew forward KL(teacher ‖ α·p_T + (1 − α)·p_S), or with ``reverse=True``
  the skew reverse KL(student ‖ α·p_S + (1 − α)·p_T)
  (:func:`kdjax.losses.divergences.skew_kl`); bounded by −log α, and α = 0
  recovers the forward (reverse) KL.

  Paper: Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation
  for Large Language Models", ICML 2024 (α = 0.1 there).

  Shapes: logits ``(B, L, V)``; mask ``(B, L)`` bool or 0/1. α in [0, 1);
  T > 0, no T² factor. Returns a float32 scalar.
  """
  return _dense_loss(
    divergences.skew_kl, student_logits, teacher_logits, mask, temperature, alpha=alpha, reverse=reverse
  )


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
  logp = divergences.log_probs(teacher_logits, temperature)
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
  log_ps = divergences.log_probs(student_logits, temperature)
  log_ps_k = jnp.take_along_axis(log_ps, teacher_topk_indices, axis=-1)
  log_pt_k = _checks.as_f32(teacher_topk_logprobs)
  return _masked_mean(divergences.kl(log_pt_k, log_ps_k), mask)


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


def _topk_loss(
  divergence: Callable[..., Array],
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None,
  temperature: Any,
  renormalise: bool = False,
  **hyper: Any,
) -> Array:
  """The masked mean over tokens of :func:`_topk_per_token`: float32 scalar."""
  _checks.check_rank(student_logits, "student_logits", 3)
  _checks.check_rank(teacher_topk_logprobs, "teacher_topk_logprobs", 3)
  _checks.check_mask(mask, jnp.shape(student_logits)[:2], "mask")
  _checks.check_positive(temperature, "temperature")
  _check_hyper(hyper)
  lp, idx = teacher_topk_logprobs, teacher_topk_indices
  return _masked_mean(_topk_per_token(divergence, student_logits, lp, idx, temperature, renormalise, **hyper), mask)


def _topk_per_token(
  divergence: Callable[..., Array],
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  temperature: Any,
  renormalise: bool,
  **hyper: Any,
) -> Array:
  """``divergence`` on the buckets of :func:`topk_buckets` at each position: ``(...,)``.

  ``renormalise`` passes both bucket rows through one more log_softmax (at
  T = 1, the identity up to float rounding) before the divergence; the
  mixture divergences (:data:`TOPK_RENORMALISED`) take it.
  """
  student_logp, teacher_logp = topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_indices, temperature)
  if renormalise:
    student_logp, teacher_logp = divergences.log_probs(student_logp, 1.0), divergences.log_probs(teacher_logp, 1.0)
  return divergence(student_logp, teacher_logp, **hyper)


# The top-k forms below take student_logits (B, L, V), the cache's teacher_topk_logprobs (B, L, k) at T = 1 and
# teacher_topk_indices (B, L, k) (distinct ids in [0, V)), a mask (B, L) and T > 0 on both sides (no T² factor),
# and return a float32 scalar. Each is exact when k = V; otherwise it is a divergence on the k + 1 buckets, ≤ the
# full-vocabulary one at T = 1 (data-processing inequality).


def topk_forward_kl(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`forward_kl` from a top-k teacher: KL(teacher ‖ student) on the buckets of :func:`topk_buckets`.

  ℓ_{b,l} = Σ_j P_T,j (log P_T,j − log P_S,j) over the k cached tokens and
  the rest. Unlike :func:`sparse_kl` the teacher's tail mass is kept, so the
  value is a divergence (never negative). Shapes: logits ``(B, L, V)``,
  top-k log-probs and ids ``(B, L, k)``, mask ``(B, L)``; float32 scalar.
  """
  lp, idx = teacher_topk_logprobs, teacher_topk_indices
  return _topk_loss(divergences.forward_kl, student_logits, lp, idx, mask, temperature)


def topk_reverse_kl(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`reverse_kl` from a top-k teacher: KL(student ‖ teacher) on the buckets of :func:`topk_buckets`.

  ℓ_{b,l} = Σ_j P_S,j (log P_S,j − log P_T,j) over the k cached tokens and
  the rest. Shapes: logits ``(B, L, V)``, top-k log-probs and ids
  ``(B, L, k)``, mask ``(B, L)``; returns a float32 scalar.
  """
  lp, idx = teacher_topk_logprobs, teacher_topk_indices
  return _topk_loss(divergences.reverse_kl, student_logits, lp, idx, mask, temperature)


def topk_generalized_jsd(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  beta: float = 0.5,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`generalized_jsd` (GKD, TRL's β) from a top-k teacher, on the buckets of :func:`topk_buckets`.

  β·KL(teacher ‖ M) + (1 − β)·KL(student ‖ M), M = (1 − β)·P_S + β·P_T; β = 0
  is KL(teacher ‖ student), β = 1 is KL(student ‖ teacher) (Agarwal et al.,
  ICLR 2024). Shapes: logits ``(B, L, V)``, top-k log-probs and ids
  ``(B, L, k)``, mask ``(B, L)``; β in [0, 1]; returns a float32 scalar.
  """
  lp, idx = teacher_topk_logprobs, teacher_topk_indices
  return _topk_loss(divergences.generalized_jsd, student_logits, lp, idx, mask, temperature, True, beta=beta)


def topk_tvd(
  student_logits: Array,
  teacher_topk_logprobs: Array,
  teacher_topk_indices: Array,
  mask: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """:func:`tvd` from a top-k teacher: ½ Σ_j |P_T,j − P_S,j| on the buckets of :func:`topk_buckets`.

  Symmetric in teacher and student. Shapes: logits ``(B, L, V)``, top-k
  log-probs and ids ``(B, L, k)``, mask ``(B, L)``; float32 scalar.
  """
  lp, idx = teacher_topk_logprobs, teacher_topk_indices
  return _topk_loss(divergences.tvd, student_logits, lp, idx, mask, temperature)


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

  KL(teacher ‖ α·P_T + (1 − α)·P_S), or with ``reverse=True``
  KL(student ‖ α·P_S + (1 − α)·P_T) (Ko et al., ICML 2024). Shapes: logits
  ``(B, L, V)``, top-k log-probs and ids ``(B, L, k)``, mask ``(B, L)``;
  α in [0, 1); returns a float32 scalar.
  """
  lp, idx = teacher_topk_logprobs, teacher_topk_indices
  hyper = {"alpha": alpha, "reverse": reverse}
  return _topk_loss(divergences.skew_kl, student_logits, lp, idx, mask, temperature, True, **hyper)


# --------------------------------------------------------------------------
# Chunked evaluation.


def _chunk_divergence(loss: str | Callable[..., Array], kwargs: dict[str, Any]) -> Callable[..., Array]:
  """The per-token function ``fn(student_logits_chunk, teacher_logits_chunk, **kwargs) -> (B, chunk)`` of ``loss``."""
  if isinstance(loss, str):
    if loss not in _DIVERGENCES:
      raise ConfigError(f"loss must be one of {sorted(_DIVERGENCES)} or a callable, got {loss!r}.")
    if "temperature" in kwargs:
      _checks.check_positive(kwargs["temperature"], "temperature")
    _check_hyper(kwargs)
    return functools.partial(_per_token, _DIVERGENCES[loss])
  if callable(loss):
    return loss
  raise ConfigError(f"loss must be a name or a callable, got {loss!r}.")


def _chunk_student_source(
  student_logits: Array | None, teacher_logits: Array, student_hidden: Array | None, unembedding: Array | None
) -> Array:
  """Checks the inputs of :func:`chunked_token_loss`; returns what the student's chunks are cut from."""
  _checks.check_rank(teacher_logits, "teacher_logits", 3)
  if student_logits is not None:
    _check_token_pair(student_logits, teacher_logits, None)
    return student_logits
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
  return student_hidden


def _scan_chunks(chunk_sum: Callable[..., Array], w, student_src, teacher_logits, weights, chunk_size: int) -> Array:
  """Σ over chunks of ``chunk_sum(w, student_chunk, teacher_chunk, weights_chunk)``, each chunk re-materialised.

  Full chunks run in a ``lax.scan``; when ``chunk_size`` does not divide L the
  remainder is one static, shorter tail chunk.
  """
  length = teacher_logits.shape[1]
  n_full, rem = divmod(length, chunk_size)

  # The slicing happens inside the re-materialised function, so the only
  # per-iteration residual saved for the backward pass is the chunk index
  # (slicing outside would save a stacked copy of every chunk).
  @jax.checkpoint
  def step_sum(w, s_all, t_all, m_all, i):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=1)
    return chunk_sum(w, sl(s_all), sl(t_all), sl(m_all))

  def body(total, i):
    return total + step_sum(w, student_src, teacher_logits, weights, i), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(n_full))
  if rem:  # one static tail chunk
    tail = slice(n_full * chunk_size, length)
    total = total + jax.checkpoint(chunk_sum)(w, student_src[:, tail], teacher_logits[:, tail], weights[:, tail])
  return total


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
  are not copied.

  Args:
    loss: ``"forward_kl"``, ``"reverse_kl"``, ``"generalized_jsd"``,
      ``"tvd"``, ``"skew_kl"`` (the divergences of
      :mod:`kdjax.losses.divergences`, directions as there), or a callable
      ``fn(student_logits_chunk, teacher_logits_chunk, **kwargs) -> (B, chunk)``.
    student_logits: ``(B, L, V)``, or ``None`` when ``student_hidden`` and
      ``unembedding`` are given.
    teacher_logits: ``(B, L, V)``.
    mask: optional ``(B, L)`` bool or 0/1.
    chunk_size: positions per chunk (> 0).
    student_hidden: optional ``(B, L, D)`` final hidden states; the student
      logits are then ``student_hidden @ unembedding`` per chunk.
    unembedding: ``(D, V)`` output projection used with ``student_hidden``.
    **kwargs: hyper-parameters of the loss (``temperature``, ``beta``, ``alpha``, ``reverse``).

  Returns:
    float32 scalar, the masked mean over tokens.
  """
  per_token = _chunk_divergence(loss, kwargs)
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ConfigError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  student_src = _chunk_student_source(student_logits, teacher_logits, student_hidden, unembedding)
  _checks.check_mask(mask, teacher_logits.shape[:2], "mask")
  weights = _mask_f32(mask, teacher_logits.shape[:2])

  def chunk_sum(w, s_c, t_c, m_c):
    if w is not None:
      s_c = jnp.einsum("bld,dv->blv", _checks.as_f32(s_c), _checks.as_f32(w))
    return _weighted_sum(per_token(s_c, t_c, **kwargs), m_c)

  w = unembedding if student_logits is None else None
  total = _scan_chunks(chunk_sum, w, student_src, teacher_logits, weights, min(chunk_size, teacher_logits.shape[1]))
  return _normalise(total, weights)
