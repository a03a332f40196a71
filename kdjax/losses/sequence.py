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

from kdjax.losses import _checks

Array = jax.Array


# --------------------------------------------------------------------------
# Validation and reduction helpers.


def _check_token_pair(student_logits: Array, teacher_logits: Array,
                      mask: Array | None) -> None:
  _checks.check_rank(student_logits, "student_logits", 3)
  _checks.check_rank(teacher_logits, "teacher_logits", 3)
  _checks.check_same_shape(student_logits, teacher_logits, "student_logits",
                           "teacher_logits")
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


def _tok_generalized_jsd(s: Array, t: Array, beta: Any = 0.5,
                         temperature: Any = 1.0) -> Array:
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
  jsd = jnp.where(beta_f == 0.0, _kl(log_pt, log_ps),
                  jnp.where(beta_f == 1.0, _kl(log_ps, log_pt), jsd))
  return jsd


def _tok_tvd(s: Array, t: Array, temperature: Any = 1.0) -> Array:
  ps = jnp.exp(_log_probs(s, temperature))
  pt = jnp.exp(_log_probs(t, temperature))
  return 0.5 * jnp.sum(jnp.abs(pt - ps), axis=-1)


_PER_TOKEN: dict[str, Callable[..., Array]] = {
    "forward_kl": _tok_forward_kl,
    "reverse_kl": _tok_reverse_kl,
    "generalized_jsd": _tok_generalized_jsd,
    "tvd": _tok_tvd,
}


# --------------------------------------------------------------------------
# Public losses.


def forward_kl(student_logits: Array, teacher_logits: Array,
               mask: Array | None = None, temperature: float = 1.0) -> Array:
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
  return _masked_mean(
      _tok_forward_kl(student_logits, teacher_logits, temperature), mask)


def reverse_kl(student_logits: Array, teacher_logits: Array,
               mask: Array | None = None, temperature: float = 1.0) -> Array:
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
  return _masked_mean(
      _tok_reverse_kl(student_logits, teacher_logits, temperature), mask)


def generalized_jsd(student_logits: Array, teacher_logits: Array,
                    beta: float = 0.5, mask: Array | None = None,
                    temperature: float = 1.0) -> Array:
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
  return _masked_mean(
      _tok_generalized_jsd(student_logits, teacher_logits, beta,
                           temperature), mask)


def tvd(student_logits: Array, teacher_logits: Array,
        mask: Array | None = None, temperature: float = 1.0) -> Array:
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
  return _masked_mean(_tok_tvd(student_logits, teacher_logits, temperature),
                      mask)


def teacher_topk(teacher_logits: Array, k: int,
                 temperature: float = 1.0) -> tuple[Array, Array]:
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
    raise ValueError(f"k must lie in [1, {vocab}], got {k!r}.")
  _checks.check_positive(temperature, "temperature")
  logp = _log_probs(teacher_logits, temperature)
  vals, idx = jax.lax.top_k(logp, k)
  return vals, idx.astype(jnp.int32)


def sparse_kl(student_logits: Array, teacher_topk_logprobs: Array,
              teacher_topk_indices: Array, mask: Array | None = None,
              temperature: float = 1.0) -> Array:
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
  _checks.check_same_batch(student_logits, teacher_topk_logprobs,
                           "student_logits", "teacher_topk_logprobs")
  if teacher_topk_logprobs.shape[:2] != student_logits.shape[:2]:
    raise ValueError(
        "teacher_topk_logprobs must have shape (B, L, K) matching "
        f"student_logits {student_logits.shape}, got "
        f"{teacher_topk_logprobs.shape}.")
  if jnp.shape(teacher_topk_indices) != teacher_topk_logprobs.shape:
    raise ValueError(
        "teacher_topk_indices must have the shape of teacher_topk_logprobs "
        f"{teacher_topk_logprobs.shape}, got "
        f"{jnp.shape(teacher_topk_indices)}.")
  _checks.check_indices(teacher_topk_indices, student_logits.shape[-1],
                        "teacher_topk_indices")
  _checks.check_mask(mask, student_logits.shape[:2], "mask")
  _checks.check_positive(temperature, "temperature")
  log_ps = _log_probs(student_logits, temperature)
  log_ps_k = jnp.take_along_axis(log_ps, teacher_topk_indices, axis=-1)
  log_pt_k = _checks.as_f32(teacher_topk_logprobs)
  per_tok = jnp.sum(jnp.exp(log_pt_k) * (log_pt_k - log_ps_k), axis=-1)
  return _masked_mean(per_tok, mask)


# --------------------------------------------------------------------------
# Chunked evaluation.


def chunked_token_loss(loss: str | Callable[..., Array],
                       student_logits: Array | None,
                       teacher_logits: Array,
                       mask: Array | None = None,
                       *,
                       chunk_size: int = 128,
                       student_hidden: Array | None = None,
                       unembedding: Array | None = None,
                       **kwargs: Any) -> Array:
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
      raise ValueError(
          f"loss must be one of {sorted(_PER_TOKEN)} or a callable, got "
          f"{loss!r}.")
    if "temperature" in kwargs:
      _checks.check_positive(kwargs["temperature"], "temperature")
    if loss == "generalized_jsd" and "beta" in kwargs:
      _checks.check_in_unit_interval(kwargs["beta"], "beta")
    per_token = _PER_TOKEN[loss]
  elif callable(loss):
    per_token = loss
  else:
    raise ValueError(f"loss must be a name or a callable, got {loss!r}.")
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")

  _checks.check_rank(teacher_logits, "teacher_logits", 3)
  if student_logits is None:
    if student_hidden is None or unembedding is None:
      raise ValueError(
          "student_logits is None: pass student_hidden (B, L, D) and "
          "unembedding (D, V) instead.")
    _checks.check_rank(student_hidden, "student_hidden", 3)
    _checks.check_rank(unembedding, "unembedding", 2)
    if student_hidden.shape[:2] != teacher_logits.shape[:2]:
      _checks.check_same_batch(student_hidden, teacher_logits,
                               "student_hidden", "teacher_logits")
      raise ValueError(
          f"student_hidden {student_hidden.shape} and teacher_logits "
          f"{teacher_logits.shape} must agree on (B, L).")
    if unembedding.shape != (student_hidden.shape[-1],
                             teacher_logits.shape[-1]):
      raise ValueError(
          f"unembedding must have shape (D, V) = "
          f"{(student_hidden.shape[-1], teacher_logits.shape[-1])}, got "
          f"{unembedding.shape}.")
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
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size,
                                                chunk_size, axis=1)
    return chunk_sum(w, sl(s_all), sl(t_all), sl(m_all))

  def body(total, i):
    return total + step_sum(w, student_src, teacher_logits, m, i), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          jnp.arange(n_full))
  if rem:  # one static tail chunk
    tail = slice(n_full * chunk_size, length)
    total = total + jax.checkpoint(chunk_sum)(
        w, student_src[:, tail], teacher_logits[:, tail], m[:, tail])
  return total / jnp.maximum(jnp.sum(m), 1.0)
