"""Autoregressive generation with a KV cache: prefill, then one compiled decode loop.

A model that generates implements two methods (the zoo's ``transformer_lm``
does)::

    cache = model.init_cache(batch_size, max_len)          # a pytree of arrays
    logits, cache = model.decode(tokens, positions, cache)   # (B, T) ints → (B, T, V)

``decode`` writes the keys/values of ``tokens`` at ``positions`` into the
cache and lets each token attend to the cached positions ``≤`` its own, so
one method serves both the prefill (``positions = arange(P)``) and each
decode step (``positions = current length``). A model whose ``decode``
computes its logits as the transpose of a ``(V, B·T)`` product (a tied
embedding head, E·xᵀ) may say so with ``vocab_major_logits = True``: greedy
decoding then reads them without transposing them back.

Prompts are right-padded ``(B, P)`` with their ``lengths``. Each sequence
continues from its own length: the first new token is sampled from the
prompt's last real position, written at position ``length``, and so on, so
the padding of one prompt never shifts another's positions. A sequence stops
at a stop token (kept in the output) or after ``max_new_tokens``; afterwards
it emits ``pad_token`` with log-probability 0. The loop is a
``lax.while_loop`` that ends when every sequence has stopped.

Sampling (:func:`sample`): ``temperature == 0`` is greedy; otherwise the
logits are divided by the temperature, restricted to the ``top_k`` most
likely tokens and to the smallest set whose probability reaches ``top_p``
(nucleus sampling, Holtzman et al. 2020), and sampled with an explicit key
(one fold per step, so every token's randomness is reproducible). The
log-probabilities returned are the model's own (temperature 1, unfiltered):
what distillation losses and on-policy methods read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How tokens are drawn.

  Attributes:
    max_new_tokens: tokens generated per sequence at most.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: keep only the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability
      reaches p (1: all).
    stop_tokens: a sequence ends after emitting one of these.
    pad_token: emitted after a sequence ended.
  """

  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  pad_token: int = 0

  def __post_init__(self):
    checks = (
      (self.max_new_tokens >= 1, "max_new_tokens", "≥ 1"),
      (0.0 <= self.temperature < math.inf, "temperature", "finite and ≥ 0 (0 = greedy)"),
      (self.top_k >= 0, "top_k", "≥ 0 (0 = off)"),
      (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
    )
    for ok, name, want in checks:
      if not ok:
        raise ConfigError(f"sampling.{name} must be {want}, got {getattr(self, name)}")


class Generated(NamedTuple):
  """Generated continuations.

  Attributes:
    tokens: ``(B, N)`` int32, N = ``max_new_tokens``; ``pad_token`` after a
      sequence ended.
    logprobs: ``(B, N)`` float32, the model's log-probability (temperature 1)
      of each generated token; 0 after the end.
    lengths: ``(B,)`` int32, tokens generated per sequence (a stop token
      included).
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """``(..., V)`` bool: the ``k`` largest logits (all tied with the k-th kept); all when ``k`` is 0 or ≥ V."""
  if k <= 0 or k >= logits.shape[-1]:
    return jnp.ones(logits.shape, bool)
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return logits >= kth


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """``(..., V)`` bool: the smallest set of most likely tokens whose probability reaches ``p``.

  A token is kept when the probability of the strictly more likely tokens is
  below ``p``, so the most likely token is always kept (and ties with a kept
  token are kept).
  """
  if p >= 1.0:
    return jnp.ones(logits.shape, bool)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass strictly above each sorted entry
  kept = before < p
  threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return probs >= threshold


def sample(key: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
  """``(B, V)`` logits → ``(B,)`` int32 tokens drawn as :class:`Sampling` says."""
  if sampling.temperature == 0.0:
    return first_max(logits)
  z = logits.astype(jnp.float32) / sampling.temperature
  keep = top_k_mask(z, sampling.top_k) & top_p_mask(z, sampling.top_p)
  # The Gumbel-max draw of ``jax.random.categorical`` (exact for any vocabulary; the same tokens for the same
  # key, so published runs reproduce), its argmax taken by :func:`first_max`: the same first maximum, without
  # the index-carrying reduction that XLA:CPU runs slowly.
  noise = jax.random.gumbel(key, z.shape, jnp.float32)
  return first_max(noise + jnp.where(keep, z, -jnp.inf))


def first_max(logits: jax.Array, axis: int = -1) -> jax.Array:
  """``(..., V)`` → ``(...)`` int32: the first index of the largest logit along ``axis``, as ``jnp.argmax``.

  Computed without argmax's index-carrying reduction, which XLA:CPU runs several times slower than a plain
  one: the logits are read once, as blocks of 128 (or the largest power of two ≤ 128 dividing V), for each
  block's maximum; the first block holding the overall maximum is found among those maxima, and the first
  matching index inside that one block. A V with no such block of ≥ 8 takes a max and a min over all V.
  """
  axis %= logits.ndim
  v = logits.shape[axis]
  blk = math.gcd(v, 128)
  if blk < 8:
    hit = logits == jnp.max(logits, axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    return jnp.minimum(jnp.min(jnp.where(hit, index, v), axis=axis), v - 1)
  blocks = logits.reshape(logits.shape[:axis] + (v // blk, blk) + logits.shape[axis + 1 :])
  # The barrier keeps XLA from merging the two maxima below into a second pass over all V logits.
  block_max = jax.lax.optimization_barrier(jnp.max(blocks, axis=axis + 1))  # (..., V / blk, ...)
  top = jnp.max(block_max, axis=axis, keepdims=True)
  first = _first_true(block_max == top, axis)  # the first block holding the maximum
  block = jnp.take_along_axis(blocks, jnp.expand_dims(first, (axis, axis + 1)), axis=axis)
  within = _first_true(jnp.squeeze(block, axis) == top, axis)
  return jnp.minimum(first * blk + within, v - 1)  # in range even for NaN logits, which match nothing


def _first_true(mask: jax.Array, axis: int) -> jax.Array:
  """The first index along ``axis`` where ``mask`` holds (the axis' length where it never does), int32."""
  index = jax.lax.broadcasted_iota(jnp.int32, mask.shape, axis)
  return jnp.min(jnp.where(mask, index, mask.shape[axis]), axis=axis)


def _vocab_major(model: nnx.Module, sampling: Sampling) -> bool:
  """Whether the decode loop keeps its next-token logits as ``(V, B)``: for greedy decoding with a model whose
  ``vocab_major_logits`` is true.

  Such a model computes a decode step's output head as E·xᵀ, ``(V, B)``; the greedy token and its
  log-probability are reductions over the vocabulary, read where the product left the logits instead of after
  a ``B × V`` transpose each step. Sampling keeps ``(B, V)`` rows for its row-wise filters and noise (read
  transposed, its fusions run slower than the one transpose), and so does a head of kernel ``(D, V)``, whose
  product XLA would otherwise reorder into a slower one.
  """
  return sampling.temperature == 0.0 and bool(getattr(model, "vocab_major_logits", False))


def _draw(key: jax.Array, logits: jax.Array, sampling: Sampling, vocab_major: bool) -> tuple[jax.Array, jax.Array]:
  """Next-token logits (``(V, B)`` if ``vocab_major``, else ``(B, V)``) → each row's token ``(B,)``
  (:func:`sample`) and its log-probability ``(B,)``."""
  axis = 0 if vocab_major else -1
  z = logits.astype(jnp.float32)
  tok = first_max(z, axis=0) if axis == 0 else sample(key, z, sampling)
  chosen = jnp.take_along_axis(z, jnp.expand_dims(tok, axis), axis=axis)
  return tok, jnp.squeeze(chosen - jax.nn.logsumexp(z, axis=axis, keepdims=True), axis)


class _Loop(NamedTuple):
  step: jax.Array  # () int32: tokens generated so far
  pos: jax.Array  # (B,) int32: where the next generated token goes in the cache
  done: jax.Array  # (B,) bool
  tokens: jax.Array  # (B, N)
  logprobs: jax.Array  # (B, N)
  next_logits: jax.Array  # the model's logits for the next token: (V, B) or (B, V) (see _vocab_major)
  cache: Any


def generate(
  model: nnx.Module,
  prompts: jax.Array,
  lengths: jax.Array,
  key: jax.Array,
  sampling: Sampling,
  limits: jax.Array | None = None,
  cache_len: int | None = None,
) -> Generated:
  """Continue each right-padded prompt ``(B, P)`` of ``lengths`` ``(B,)``; traceable (jit it, or use :class:`Generator`).

  ``limits`` ``(B,)`` optionally caps each row's new tokens below
  ``max_new_tokens`` (the loop ends once every row is done). The KV cache
  holds ``cache_len`` positions (default ``P + max_new_tokens``, which the
  model's ``max_len`` must allow); a smaller one suits rows that must fit a
  fixed length: a row's last token, whose successor is never asked for, may
  then go unwritten.
  """
  b, p = prompts.shape
  n = sampling.max_new_tokens
  size = p + n if cache_len is None else cache_len
  last_logits, cache = _prefill(model, prompts, lengths, size)
  stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)
  cap = jnp.full((b,), n, jnp.int32) if limits is None else jnp.clip(limits, 1, n).astype(jnp.int32)
  vocab_major = _vocab_major(model, sampling)
  orient = (lambda z: z.T) if vocab_major else (lambda z: z)

  def emit(s: _Loop) -> tuple[_Loop, jax.Array]:
    tok, logp = _draw(jax.random.fold_in(key, s.step), s.next_logits, sampling, vocab_major)
    tok = jnp.where(s.done, sampling.pad_token, tok)
    logp = jnp.where(s.done, 0.0, logp)
    done = s.done | jnp.isin(tok, stops) | (s.step + 1 >= cap)
    tokens, logprobs = s.tokens.at[:, s.step].set(tok), s.logprobs.at[:, s.step].set(logp)
    return s._replace(step=s.step + 1, pos=s.pos + 1, done=done, tokens=tokens, logprobs=logprobs), tok

  def body(s: _Loop) -> _Loop:
    new, tok = emit(s)
    step_logits, cache = model.decode(tok[:, None], jnp.minimum(s.pos, size - 1)[:, None], s.cache)
    return new._replace(next_logits=orient(step_logits[:, 0]), cache=cache)

  init = _Loop(
    jnp.int32(0),
    lengths.astype(jnp.int32),
    jnp.zeros(b, bool),
    jnp.full((b, n), sampling.pad_token, jnp.int32),
    jnp.zeros((b, n), jnp.float32),
    orient(last_logits),
    cache,
  )
  # The last token's successor is never asked for: the loop stops one token short and that token is drawn
  # without a decode step (rows all done earlier: it writes their padding again).
  out = jax.lax.while_loop(lambda s: (s.step < n - 1) & ~jnp.all(s.done), body, init)
  out, _ = emit(out)
  return Generated(out.tokens, out.logprobs, _lengths(out.tokens, sampling, cap))


def _prefill(model: nnx.Module, prompts: jax.Array, lengths: jax.Array, size: int) -> tuple[jax.Array, Any]:
  """A cache of ``size`` positions holding the prompts' keys/values, and each row's next-token logits ``(B, V)``.

  The prompts' own logits go unused, so XLA drops the output head over all B·P positions; the next-token
  logits come from re-running each row's last prompt token at its position (rewriting that slot with the
  same keys/values): one B × V head instead of B·P × V.
  """
  b, p = prompts.shape
  cache = model.init_cache(b, size)
  _, cache = model.decode(prompts, jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)), cache)
  last = (lengths - 1).astype(jnp.int32)[:, None]
  logits, cache = model.decode(jnp.take_along_axis(prompts, last, axis=1), last, cache)
  return logits[:, 0], cache


def _lengths(tokens: jax.Array, sampling: Sampling, cap: jax.Array) -> jax.Array:
  """Tokens generated per sequence: up to and including the first stop token, else its cap."""
  if not sampling.stop_tokens:
    return cap
  is_stop = jnp.isin(tokens, jnp.asarray(sampling.stop_tokens, jnp.int32))
  first = jnp.argmax(is_stop, axis=1)
  return jnp.minimum(jnp.where(is_stop.any(axis=1), first + 1, cap), cap).astype(jnp.int32)


class Generator:
  """:func:`generate` compiled once for a model and a :class:`Sampling`, batch split over a mesh.

  Usage::

    gen = Generator(model, Sampling(max_new_tokens=16, temperature=0.0))
    out = gen(prompts, lengths, jax.random.key(0))              # the model's current weights
    out = gen(prompts, lengths, key, state=nnx.state(student))   # or any state of the same graph

  With a ``mesh`` the prompts (and the cache) are split over its batch axes
  (``data``, ``fsdp``) and the weights replicated; the global batch must
  divide by their size.
  """

  def __init__(self, model: nnx.Module, sampling: Sampling, mesh: jax.sharding.Mesh | None = None):
    self.graphdef, self.state = nnx.split(model)
    self.sampling, self.mesh = sampling, mesh

    def fn(state, prompts, lengths, key):
      return generate(nnx.merge(self.graphdef, state), prompts, lengths, key, sampling)

    if mesh is None:
      self._fn = jax.jit(fn)
    else:
      rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
      self._fn = jax.jit(fn, in_shardings=(rep, rows, rows, rep), out_shardings=Generated(rows, rows, rows))

  def __call__(self, prompts, lengths, key: jax.Array, state: Any = None) -> Generated:
    return self._fn(
      self.state if state is None else state, jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32), key
    )


def prompts_and_answers(inputs, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Split next-token rows into what generation starts from and what it must produce.

  Args:
    inputs: ``(B, L)`` token ids (a sequence without its last token).
    targets: ``(B, L)`` next tokens, −1 where a target is a prompt token (the
      batch contract of token datasets); rows with no scored target are
      returned with an empty answer.

  Returns:
    ``prompts`` ``(B, P)`` right-padded with 0, ``lengths`` ``(B,)`` and
    ``answers`` ``(B, N)``: row ``i``'s scored targets from its first one on,
    padded with −1; ``P`` and ``N`` are the largest over the batch.
  """
  x, y = np.asarray(inputs), np.asarray(targets)
  scored = y >= 0
  first = np.where(scored.any(1), scored.argmax(1), y.shape[1])  # position whose target is the first answer token
  lengths = (first + 1).clip(max=y.shape[1]).astype(np.int32)
  p, n = int(lengths.max()), int(y.shape[1] - first.min())
  cols = np.arange(p)
  prompts = np.where(cols[None] < lengths[:, None], x[:, :p], 0).astype(np.int32)
  take = first[:, None] + np.arange(n)[None]
  answers = np.where(take < y.shape[1], np.take_along_axis(y, take.clip(max=y.shape[1] - 1), 1), -1)
  return prompts, lengths, answers.astype(np.int32)


def answers_match(tokens, answers) -> jax.Array:
  """``(B,)`` bool: each generated row reproduces its answer token for token (−1 entries are not compared)."""
  tokens, answers = jnp.asarray(tokens), jnp.asarray(answers)
  n = min(tokens.shape[1], answers.shape[1])
  extra = answers[:, n:]
  return jnp.all((tokens[:, :n] == answers[:, :n]) | (answers[:, :n] < 0), axis=1) & jnp.all(extra < 0, axis=1)
