"""Token losses computed together with the output projection, chunk by chunk (fused heads).

A language model's token loss needs, at every position, the logits
z = h·W (+ b) over a vocabulary of V tokens. Held for a whole batch they cost
B·L·V floats per tensor (5 GB at 8 × 1,024 tokens and V = 151,936), and the
loss's log-softmaxes and gradients hold several more. Here a model hands
over its final hidden states and its unembedding as a :class:`TokenHead`
instead, and the projection and the divergence are computed together over
chunks of C positions, as Liger-Kernel's fused linear cross-entropy (Hsu et
al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024) and
Cut Cross-Entropy (Wijmans et al., "Cut Your Losses in Large-Vocabulary
Language Models", ICLR 2025) do:

* forward: per chunk, both models' logits ``(B, C, V)``, the per-position
  divergence (:mod:`kdjax.losses.divergences`, the one definition of each)
  and, under differentiation, its gradient w.r.t. the chunk's hidden states
  and the projections (one ``jax.vjp`` per chunk, accumulated);
* backward (a ``jax.custom_vjp``): the stored gradients times the incoming
  cotangent, no second pass over the vocabulary.

At most one chunk's ``(B, C, V)`` arrays exist at a time: the temporary
memory is O(B·C·V + D·V) instead of O(B·L·V). Values and gradients equal
the unchunked ones to float32 rounding. An input nobody differentiates (a
frozen, stop-gradiented teacher) gets no gradient computed.

Chunks are of positions only: with C chosen so that B·C·V is at most about
2²⁴ (:func:`resolve_chunk`), one chunk over the whole vocabulary already fits
in bounded memory at any V, so an online log-sum-exp over vocabulary chunks
would add passes without saving memory. At small vocabularies a chunk is
capped at 256 rows (B·C), so that its arrays stay in cache while its products
stay efficient: fused is then also the faster step. Tensor parallelism splits the
vocabulary instead: with W split over a mesh's ``model`` axis, each chunk's
logits stay split and their log-sum-exps reduce across devices; the
vocabulary is never gathered.

The teacher side is a :class:`TokenHead` (a teacher run in the same
program), dense logits ``(B, L, V)``, or a top-k cache's
``(log-probs, ids)`` ``(B, L, k)`` (the top-k forms of
:mod:`kdjax.losses.sequence`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks
from kdjax.losses import sequence

Array = jax.Array

# From this vocabulary on the methods fuse by default: a chunk's logits stay in cache, where the plain
# losses write and re-read (B, L, V) arrays (results/bench.md, section 14, measures both).
FUSED_MIN_VOCAB = 2_048
# An automatic chunk holds about this many logits per model (64 MiB in float32) ...
AUTO_CHUNK_LOGITS = 1 << 24
# ... and at most this many rows (B·C), enough for efficient matrix products.
AUTO_CHUNK_ROWS = 256


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["hidden", "kernel", "bias"],
  meta_fields=["softcap", "vocab", "transposed"],
)
@dataclasses.dataclass(frozen=True)
class TokenHead:
  """A language model's output head, unapplied: z = cap·tanh((h·W + b) / cap), first ``vocab`` columns.

  Attributes:
    hidden: ``(B, L, D)`` final hidden states (the head's input).
    kernel: the unembedding, ``(D, V')``, or ``(V', D)`` with ``transposed``
      (a head tied to the token embedding).
    bias: ``(V',)`` or None.
    softcap: tanh soft-capping of the logits (Gemma 2); 0: none.
    vocab: logits over the first ``vocab`` of the V' columns; 0: all.
    transposed: ``kernel`` is ``(V', D)``.
  """

  hidden: Array
  kernel: Array
  bias: Array | None = None
  softcap: float = 0.0
  vocab: int = 0
  transposed: bool = False

  @property
  def vocab_size(self) -> int:
    """V, the number of logits per position."""
    return self.vocab or int(self.kernel.shape[0 if self.transposed else 1])

  def logits(self) -> Array:
    """The full float32 logits ``(B, L, V)`` (what the model's plain output holds)."""
    return project(self, self.kernel, self.bias, self.hidden)


def project(head: TokenHead, kernel: Array, bias: Array | None, hidden: Array) -> Array:
  """``head``'s logits on ``hidden`` ``(B, C, D)`` with ``kernel``/``bias``: float32 ``(B, C, V)``.

  The product runs in the hidden states' dtype and accumulates in float32.
  """
  k = kernel.astype(hidden.dtype)
  spec = "nd,vd->nv" if head.transposed else "nd,dv->nv"
  # One row axis, so that the kernel's gradient contracts a single dimension (a library matrix product on CPU).
  rows = hidden.reshape(-1, hidden.shape[-1])
  z = jnp.einsum(spec, rows, k, preferred_element_type=jnp.float32).reshape(*hidden.shape[:-1], -1)
  if bias is not None:
    z = z + _checks.as_f32(bias)
  if head.softcap:
    z = head.softcap * jnp.tanh(z / head.softcap)
  return z[..., : head.vocab] if head.vocab else z


def resolve_chunk(head: TokenHead | None, chunk_size: int | None) -> int | None:
  """Positions per chunk for a fused loss on ``head``, or None for the plain ``(B, L, V)`` loss.

  ``chunk_size``: None picks automatically (fused when V ≥ :data:`FUSED_MIN_VOCAB`, with
  C = min(:data:`AUTO_CHUNK_LOGITS` / (B·V), :data:`AUTO_CHUNK_ROWS` / B) positions, at least 1);
  0: never fused; n > 0: fused, n positions.
  """
  if head is None or chunk_size == 0:
    return None
  if chunk_size is not None:
    return chunk_size
  vocab, batch = head.vocab_size, int(head.hidden.shape[0])
  if vocab < FUSED_MIN_VOCAB:
    return None
  return max(1, min(AUTO_CHUNK_LOGITS // (batch * vocab), AUTO_CHUNK_ROWS // batch))


# --------------------------------------------------------------------------
# Chunks of positions.


def _over_chunks(fn: Callable, rows: Any, chunk: int) -> tuple[Any, Any]:
  """``fn(rows_chunk) -> (acc, ys)`` over chunks of ``rows`` (arrays ``(B, L, ...)``) along L.

  Returns the sum of ``acc`` over chunks and ``ys`` (arrays ``(B, C, ...)``)
  joined back to ``(B, L, ...)``. Full chunks run in a ``lax.scan``; when
  ``chunk`` does not divide L the rest is one static, shorter chunk.
  """
  length = jax.tree.leaves(rows)[0].shape[1]
  chunk = min(chunk, length)
  n_full, rem = divmod(length, chunk)
  cut = lambda start, size: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1), rows)  # noqa: E731

  def body(acc, i):
    a, ys = fn(cut(i * chunk, chunk))
    return jax.tree.map(jnp.add, acc, a), ys

  acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, cut(0, chunk))[0])
  acc, ys = jax.lax.scan(body, acc0, jnp.arange(n_full))
  ys = jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], n_full * chunk, *y.shape[3:]), ys)
  if rem:
    a, ys_tail = fn(jax.tree.map(lambda x: x[:, n_full * chunk :], rows))
    acc = jax.tree.map(jnp.add, acc, a)
    ys = jax.tree.map(lambda y, t: jnp.concatenate([y, t], axis=1), ys, ys_tail)
  return acc, ys


def _is_primal(x: Any) -> bool:
  return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _keep(tree: Any, flags: Any) -> Any:
  """``tree`` with every leaf whose flag is False replaced by None."""
  return jax.tree.map(lambda x, f: x if f else None, tree, flags)


def _fill(tree: Any, kept: Any, flags: Any) -> Any:
  """``tree`` with the leaves of ``kept`` (from :func:`_keep`) put back where the flag is True."""
  return jax.tree.map(lambda x, f, k: k if f else x, tree, flags, kept, is_leaf=lambda x: x is None)


def _fused_sum(per_token: Callable[[Any, Any], tuple[Array, dict]], chunk: int) -> Callable[[Any, Any], tuple]:
  """``f(params, rows) -> (Σ_{b,l} ℓ_{b,l}, aux)`` chunked along L, with a custom VJP for the sum.

  ``per_token(params, rows_chunk) -> ((B, C) weighted losses, aux)``, ``aux``
  a dict of scalars (summed over chunks, not differentiated); ``rows`` is a
  dict of arrays ``(B, L, ...)``; ``params`` is not chunked (the
  projections). The forward pass stores each chunk's gradient w.r.t. the
  differentiated inputs; the backward pass scales them.
  """

  def chunk_sum(params, r):
    loss, aux = per_token(params, r)
    return jnp.sum(loss), jax.tree.map(jax.lax.stop_gradient, aux)

  def value(params, rows):
    return _over_chunks(lambda r: (chunk_sum(params, r), ()), rows, chunk)[0]

  def fwd(params, rows):
    unwrap = lambda t: jax.tree.map(lambda x: x.value, t, is_leaf=_is_primal)  # noqa: E731
    flags = lambda t: jax.tree.map(lambda x: x.perturbed, t, is_leaf=_is_primal)  # noqa: E731
    p, r, pf, rf = unwrap(params), unwrap(rows), flags(params), flags(rows)

    def chunk_grads(rc):
      f = lambda pd, rd: chunk_sum(_fill(p, pd, pf), _fill(rc, rd, rf))  # noqa: E731
      total, vjp, aux = jax.vjp(f, _keep(p, pf), _keep(rc, rf), has_aux=True)
      g_params, g_rows = vjp(jnp.ones((), total.dtype))
      return ((total, aux), g_params), g_rows

    (out, g_params), g_rows = _over_chunks(chunk_grads, r, chunk)
    return out, (g_params, g_rows)

  def bwd(res, g):
    g_params, g_rows = res
    g_total = g[0]
    scale = lambda t: jax.tree.map(lambda x: (g_total * x).astype(x.dtype), t)  # noqa: E731
    return scale(g_params), scale(g_rows)

  fused = jax.custom_vjp(value)
  fused.defvjp(fwd, bwd, symbolic_zeros=True)
  return fused


# --------------------------------------------------------------------------
# Inputs.


def _check_head(head: Any, name: str) -> None:
  if not isinstance(head, TokenHead):
    raise ConfigError(f"{name} must be a kdjax.losses.TokenHead, got {type(head).__name__}.")
  _checks.check_rank(head.hidden, f"{name}.hidden", 3)
  _checks.check_rank(head.kernel, f"{name}.kernel", 2)
  d = head.kernel.shape[1 if head.transposed else 0]
  if head.hidden.shape[-1] != d:
    raise ConfigError(f"{name}.hidden {head.hidden.shape} and {name}.kernel {head.kernel.shape} disagree on D.")


def _check_chunk(chunk_size: Any) -> None:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ConfigError(f"chunk_size must be a positive int (positions per chunk), got {chunk_size!r}.")


def _weights(mask: Array | None, shape: tuple[int, int]) -> Array:
  _checks.check_mask(mask, shape, "mask")
  return sequence._mask_f32(mask, shape)


def _teacher_parts(teacher: Any, shape: tuple[int, int], vocab: int) -> tuple[Any, dict[str, Array]]:
  """The teacher's unchunked params and chunked rows, after checking them against the student."""
  if isinstance(teacher, TokenHead):
    _check_head(teacher, "teacher")
    if teacher.hidden.shape[:2] != shape or teacher.vocab_size != vocab:
      raise ConfigError(
        f"teacher head (B, L) = {teacher.hidden.shape[:2]}, V = {teacher.vocab_size} must match the student's "
        f"{shape}, V = {vocab}."
      )
    return (teacher.kernel, teacher.bias), {"t": teacher.hidden}
  if isinstance(teacher, tuple):
    logp, idx = teacher
    _checks.check_rank(logp, "teacher_topk_logprobs", 3)
    if logp.shape[:2] != shape or jnp.shape(idx) != logp.shape:
      raise ConfigError(
        f"teacher top-k (log-probs {logp.shape}, ids {jnp.shape(idx)}) must be (B, L, k), (B, L) = {shape}."
      )
    sequence._check_topk(logp, idx, vocab)
    return None, {"t": logp, "idx": jnp.asarray(idx, jnp.int32)}
  _checks.check_rank(teacher, "teacher_logits", 3)
  if jnp.shape(teacher) != shape + (vocab,):
    raise ConfigError(f"teacher_logits {jnp.shape(teacher)} must be (B, L, V) = {shape + (vocab,)}.")
  return None, {"t": teacher}


# --------------------------------------------------------------------------
# Losses.


CROSS_ENTROPY = "cross_entropy"


@dataclasses.dataclass(frozen=True)
class TokenPart:
  """One token loss of a :func:`fused_token_losses` group.

  Attributes:
    loss: :data:`CROSS_ENTROPY` (against the group's ``labels``) or a divergence
      from the teacher: ``"forward_kl"``, ``"reverse_kl"``, ``"generalized_jsd"``,
      ``"tvd"``, ``"skew_kl"``.
    weight: its multiplier in the group's total (a number or a traced scalar).
    mask: optional ``(B, L)`` bool or 0/1: the tokens it averages over (cross-entropy
      also leaves out label −1).
    temperature: T > 0 on both sides of a divergence (no T² factor).
    hyper: the divergence's ``beta``, ``alpha``, ``reverse``.
  """

  loss: str
  weight: Any = 1.0
  mask: Array | None = None
  temperature: Any = 1.0
  hyper: dict = dataclasses.field(default_factory=dict)


class FusedLosses(NamedTuple):
  """What :func:`fused_token_losses` returns.

  Attributes:
    total: Σ_i weight_i · values_i, float32 (the differentiable output).
    values: each part's loss (its masked mean over tokens), outside the gradient.
    accuracy: the fraction of labelled tokens whose label's logit is the largest (ties count), or None
      without labels.
  """

  total: Array
  values: tuple[Array, ...]
  accuracy: Array | None


def _check_part(part: Any) -> None:
  if not isinstance(part, TokenPart):
    raise ConfigError(f"parts must be kdjax.losses.TokenPart, got {type(part).__name__}.")
  if part.loss != CROSS_ENTROPY and part.loss not in sequence._DIVERGENCES:
    raise ConfigError(
      f"TokenPart.loss must be one of {sorted([CROSS_ENTROPY, *sequence._DIVERGENCES])}, got {part.loss!r}."
    )
  _checks.check_positive(part.temperature, "temperature")
  sequence._check_hyper(part.hyper)


def _group_rows(student: TokenHead, teacher: Any, parts, labels: Array | None) -> tuple[Any, dict, tuple]:
  """Checked inputs of a group: the teacher's params, the chunked rows (each part's weights ``w{i}`` pre-scaled by
  its weight over its token count, its mask ``m{i}``) and each part's token count."""
  shape, vocab = student.hidden.shape[:2], student.vocab_size
  t_params, rows = (None, {}) if teacher is None else _teacher_parts(teacher, shape, vocab)
  rows["s"] = student.hidden
  if labels is not None:
    if jnp.shape(labels) != shape:
      raise ConfigError(f"labels {jnp.shape(labels)} must be (B, L) = {shape}.")
    labels = jnp.asarray(labels, jnp.int32)
    rows["y"], rows["labelled"] = jnp.maximum(labels, 0), (labels >= 0).astype(jnp.float32)
  counts = []
  for i, part in enumerate(parts):
    _check_part(part)
    if part.loss == CROSS_ENTROPY and labels is None:
      raise ConfigError("a cross-entropy TokenPart needs the group's labels.")
    if part.loss != CROSS_ENTROPY and teacher is None:
      raise ConfigError(f"TokenPart {part.loss!r} needs a teacher.")
    m = _weights(part.mask, shape) * (rows["labelled"] if part.loss == CROSS_ENTROPY else 1.0)
    counts.append(jnp.maximum(jnp.sum(m), 1.0))
    rows[f"m{i}"], rows[f"w{i}"] = m, m * (jnp.asarray(part.weight, jnp.float32) / counts[-1])
  return t_params, rows, tuple(counts)


def _part_per_token(part: TokenPart, s: Array, t: Any, r: dict) -> Array:
  """``(B, C)``: one part's loss at each position of a chunk, from the student's logits ``s`` and the teacher's
  ``t`` (logits, or top-k ``(log-probs, ids)``)."""
  if part.loss == CROSS_ENTROPY:
    return jax.nn.logsumexp(s, axis=-1) - jnp.take_along_axis(s, r["y"][..., None], axis=-1)[..., 0]
  divergence = sequence._DIVERGENCES[part.loss]
  if isinstance(t, tuple):
    renormalise = part.loss in sequence.TOPK_RENORMALISED
    return sequence._topk_per_token(divergence, s, *t, part.temperature, renormalise, **part.hyper)
  return sequence._per_token(divergence, s, t, part.temperature, **part.hyper)


def fused_token_losses(
  student: TokenHead,
  parts: tuple[TokenPart, ...] | list[TokenPart],
  teacher: TokenHead | Array | tuple[Array, Array] | None = None,
  labels: Array | None = None,
  *,
  chunk_size: int,
) -> FusedLosses:
  """Several token losses on one student head in one pass: each chunk's logits are projected once.

    total = Σ_i weight_i · Σ_{b,l} ℓ^i_{b,l} · mask^i_{b,l} / max(Σ mask^i, 1),

  ℓ^i the cross-entropy −log softmax(z_S)_y or a divergence between
  log_softmax(z_S / T_i) and log_softmax(z_T / T_i) (:mod:`kdjax.losses.divergences`,
  the one definition of each), z = :func:`project` of each head. A KD objective
  (CE + a divergence) and the training accuracy then cost one projection of each
  model onto the vocabulary per chunk, forward and backward, instead of one per
  loss. Values and gradients equal the sum of the separate losses to float32
  rounding.

  Args:
    student: the student's :class:`TokenHead`, hidden ``(B, L, D)``.
    parts: the losses (:class:`TokenPart`).
    teacher: for divergence parts: a :class:`TokenHead` (the same V), logits
      ``(B, L, V)``, or a top-k cache's ``(log-probs, ids)`` ``(B, L, k)``.
    labels: ``(B, L)`` int targets in ``[0, V)`` or −1 (not scored): for
      cross-entropy parts and the accuracy.
    chunk_size: positions per chunk (> 0; need not divide L).

  Returns:
    :class:`FusedLosses`.
  """
  _check_head(student, "student")
  _check_chunk(chunk_size)
  parts = tuple(parts)
  t_params, rows, counts = _group_rows(student, teacher, parts, labels)
  topk = isinstance(teacher, tuple)

  def per_token(params, r):
    (s_kernel, s_bias), t_kp = params
    s = project(student, s_kernel, s_bias, r["s"])
    t = (r["t"], r["idx"]) if topk else None if teacher is None else r["t"]
    if t_kp is not None:
      t = project(teacher, *t_kp, r["t"])
    loss, aux = jnp.zeros(s.shape[:2], jnp.float32), {}
    for i, part in enumerate(parts):
      ell = _part_per_token(part, s, t, r)
      loss = loss + ell * r[f"w{i}"]
      aux[f"sum{i}"] = jnp.sum(ell * r[f"m{i}"])
    if labels is not None:  # the label's logit reaches the row maximum
      picked = jnp.take_along_axis(s, r["y"][..., None], axis=-1)[..., 0]
      aux["hits"] = jnp.sum((picked >= jnp.max(s, axis=-1)) * r["labelled"])
    return loss, aux

  total, aux = _fused_sum(per_token, chunk_size)(((student.kernel, student.bias), t_params), rows)
  values = tuple(aux[f"sum{i}"] / counts[i] for i in range(len(parts)))
  accuracy = None if labels is None else aux["hits"] / jnp.maximum(jnp.sum(rows["labelled"]), 1.0)
  return FusedLosses(total, values, accuracy)


def fused_token_loss(
  loss: str,
  student: TokenHead,
  teacher: TokenHead | Array | tuple[Array, Array],
  mask: Array | None = None,
  *,
  chunk_size: int,
  temperature: float = 1.0,
  **hyper: Any,
) -> Array:
  """A token divergence from the student's head, chunk by chunk: the masked mean over tokens.

  Equals :func:`kdjax.losses.forward_kl` (…) on the full logits, or with a
  top-k teacher :func:`kdjax.losses.topk_forward_kl` (…), to float32
  rounding, values and gradients, without holding ``(B, L, V)``:

    loss = Σ_{b,l} ℓ_{b,l} · mask_{b,l} / max(Σ mask, 1),
    ℓ_{b,l} = divergence(log_softmax(z_S / T), log_softmax(z_T / T)),

  with z = :func:`project` of each head, directions as in
  :mod:`kdjax.losses.divergences` (forward KL is KL(teacher ‖ student)).
  One part of :func:`fused_token_losses`.

  Args:
    loss: ``"forward_kl"``, ``"reverse_kl"``, ``"generalized_jsd"``,
      ``"tvd"`` or ``"skew_kl"``.
    student: the student's :class:`TokenHead`, hidden ``(B, L, D)``.
    teacher: a :class:`TokenHead` (hidden ``(B, L, D_T)``, the same V),
      logits ``(B, L, V)``, or a top-k cache's ``(log-probs, ids)``, each
      ``(B, L, k)`` (log-probs at T = 1).
    mask: optional ``(B, L)`` bool or 0/1.
    chunk_size: positions per chunk (> 0; need not divide L).
    temperature: T > 0 on both sides (no T² factor), a number or a traced scalar.
    **hyper: the divergence's ``beta``, ``alpha`` (numbers or traced scalars), ``reverse``.

  Returns:
    float32 scalar.
  """
  if loss not in sequence._DIVERGENCES:
    raise ConfigError(f"loss must be one of {sorted(sequence._DIVERGENCES)}, got {loss!r}.")
  part = TokenPart(loss, 1.0, mask, temperature, hyper)
  return fused_token_losses(student, (part,), teacher, chunk_size=chunk_size).total


def fused_cross_entropy(student: TokenHead, labels: Array, mask: Array | None = None, *, chunk_size: int) -> Array:
  """Next-token cross-entropy from the student's head, chunk by chunk: mean over scored tokens.

    loss = Σ_{b,l} w_{b,l} · (logsumexp(z_{b,l}) − z_{b,l,y}) / max(Σ w, 1),

  w = mask · [y ≥ 0] (label −1: not scored). Equals the softmax
  cross-entropy on the full logits to float32 rounding, values and
  gradients (the fused linear cross-entropy of Liger-Kernel and Cut
  Cross-Entropy). One part of :func:`fused_token_losses`.

  Args:
    student: the student's :class:`TokenHead`, hidden ``(B, L, D)``.
    labels: ``(B, L)`` int targets in ``[0, V)`` or −1.
    mask: optional ``(B, L)`` bool or 0/1.
    chunk_size: positions per chunk (> 0).

  Returns:
    float32 scalar.
  """
  part = TokenPart(CROSS_ENTROPY, 1.0, mask)
  return fused_token_losses(student, (part,), labels=labels, chunk_size=chunk_size).total


def token_argmax(head: TokenHead, chunk_size: int) -> Array:
  """argmax over the vocabulary of ``head``'s logits, chunk by chunk: int32 ``(B, L)``."""
  _check_head(head, "head")
  _check_chunk(chunk_size)

  def fn(r):
    return (), jnp.argmax(project(head, head.kernel, head.bias, r["s"]), axis=-1).astype(jnp.int32)

  return jax.lax.stop_gradient(_over_chunks(fn, {"s": head.hidden}, chunk_size)[1])


__all__ = [
  "TokenHead",
  "TokenPart",
  "FusedLosses",
  "CROSS_ENTROPY",
  "fused_token_losses",
  "project",
  "resolve_chunk",
  "fused_token_loss",
  "fused_cross_entropy",
  "token_argmax",
  "FUSED_MIN_VOCAB",
]
