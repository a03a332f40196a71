"""Generated responses inside the step: the traced half of :mod:`kdjax.responses`.

:func:`replace_responses` rewrites a batch's token rows as a
:class:`kdjax.ResponseConfig` says (on-policy samples from the student, the
teacher's answers, or the data's); see :mod:`kdjax.responses` for the rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import batch as batch_keys
from kdjax import generate as generation
from kdjax.errors import ConfigError
from kdjax.responses import ResponseConfig


def sampling(cfg: ResponseConfig, length: int, teacher: bool) -> generation.Sampling:
  """How the student (or, for SeqKD, the teacher) draws a response for rows of ``length`` tokens."""
  return generation.Sampling(
    max_new_tokens=cfg.max_new_tokens or length,
    temperature=cfg.teacher_temperature if teacher else cfg.temperature,
    stop_tokens=cfg.stop_tokens,
    pad_token=cfg.pad_token,
  )


def prompt_lengths(labels: jax.Array) -> jax.Array:
  """``(B, L)`` targets (−1 on prompt positions) → ``(B,)`` prompt lengths: first scored position + 1.

  A row with no scored target gets ``L + 1`` (it has no response to replace).
  """
  scored = labels >= 0
  first = jnp.argmax(scored, axis=1)
  return jnp.where(scored.any(axis=1), first + 1, labels.shape[1] + 1).astype(jnp.int32)


def with_response(
  inputs: jax.Array, plen: jax.Array, gen: generation.Generated, pad_token: int
) -> tuple[jax.Array, jax.Array]:
  """Rows ``(B, L)`` made of each prompt (its first ``plen`` inputs) followed by its generated response.

  Returns ``(inputs, labels)``: the new sequence without its last token and
  its next tokens, −1 on prompt positions and after the response.
  """
  b, length = inputs.shape
  j = jnp.arange(length + 1)[None, :]  # positions of the full sequence (inputs + one more token)
  g = j - plen[:, None]  # index into the generated tokens
  in_gen = (g >= 0) & (g < gen.lengths[:, None])
  gen_tok = jnp.take_along_axis(gen.tokens, jnp.clip(g, 0, gen.tokens.shape[1] - 1), axis=1)
  prompt = jnp.concatenate([inputs, jnp.full((b, 1), pad_token, inputs.dtype)], axis=1)
  full = jnp.where(j < plen[:, None], prompt, jnp.where(in_gen, gen_tok, pad_token)).astype(inputs.dtype)
  labels = jnp.where(in_gen[:, 1:], full[:, 1:], -1).astype(jnp.int32)
  return full[:, :-1], labels


def on_policy_rows(key: jax.Array, batch_size: int, fraction: float) -> jax.Array:
  """``(B,)`` bool: exactly ``round(fraction · B)`` rows, uniformly at random from ``key``."""
  n = round(fraction * batch_size)
  if n == 0:
    return jnp.zeros((batch_size,), bool)
  if n == batch_size:
    return jnp.ones((batch_size,), bool)
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch_size,))))
  return ranks < n


def _generate(model: nnx.Module, inputs, plen, key, sampling: generation.Sampling) -> generation.Generated:
  """Continue each row's prompt; a row stops once its response fills the row (``L + 1 − plen`` tokens)."""
  length = inputs.shape[1]
  lengths = jnp.minimum(plen, length)  # rows without a response still need a valid prompt length
  room = jnp.maximum(length + 1 - plen, 1)
  out = generation.generate(model, inputs, lengths, key, sampling, limits=room, cache_len=length)
  return jax.tree.map(jax.lax.stop_gradient, out)


def replace_responses(
  cfg: ResponseConfig, batch: dict, key: jax.Array, student: nnx.Module, teacher: nnx.Module | None = None
) -> dict:
  """``batch`` with its token rows' responses drawn as ``cfg`` says (traceable; call inside the step).

  Args:
    cfg: the :class:`ResponseConfig`.
    batch: ``inputs`` and ``label`` ``(B, L)``; ``mask`` ``(B,)`` or
      ``(B, L)`` and ``teacher_inputs`` are carried along.
    key: this step's sampling key.
    student: the current student (eval mode; gradients do not flow).
    teacher: the teacher, for ``others="teacher"``.

  Returns:
    The batch with ``inputs``, ``label`` (and a ``(B, L)`` ``mask``)
    rewritten on the replaced rows; ``teacher_inputs`` follows ``inputs``.
  """
  x, y = batch[batch_keys.INPUTS], batch[batch_keys.LABEL]
  if batch_keys.TEACHER_MASK in batch:
    raise ConfigError(
      "responses: generated responses cannot be retokenized for a teacher of another tokenizer "
      "inside the step; cross-tokenizer distillation (method 'uld') trains on the data's responses"
    )
  if x.ndim != 2 or y.shape != x.shape:
    raise ConfigError(f"responses: token rows need inputs and labels of one (B, L) shape, got {x.shape} and {y.shape}")
  length = x.shape[1]
  plen = prompt_lengths(y)
  has_response = plen <= length
  k_rows, k_student, k_teacher = jax.random.split(key, 3)
  new_x, new_y = x, y
  if cfg.needs_teacher:
    if teacher is None or not hasattr(teacher, "decode"):
      raise ConfigError("responses.others='teacher' (SeqKD) needs a teacher that generates (init_cache/decode)")
    tx, ty = with_response(x, plen, _generate(teacher, x, plen, k_teacher, sampling(cfg, length, True)), cfg.pad_token)
    new_x, new_y = tx, ty
  if cfg.student_fraction > 0:
    sx, sy = with_response(x, plen, _generate(student, x, plen, k_student, sampling(cfg, length, False)), cfg.pad_token)
    pick = on_policy_rows(k_rows, x.shape[0], cfg.student_fraction)[:, None]
    new_x, new_y = jnp.where(pick, sx, new_x), jnp.where(pick, sy, new_y)
  new_x = jnp.where(has_response[:, None], new_x, x)
  new_y = jnp.where(has_response[:, None], new_y, y)
  out = dict(batch, **{batch_keys.INPUTS: new_x, batch_keys.LABEL: new_y})
  if batch_keys.TEACHER_INPUTS in batch:
    out[batch_keys.TEACHER_INPUTS] = new_x
  mask = batch.get(batch_keys.MASK)
  if mask is not None and mask.ndim == 2:  # a token mask: the new responses' tokens, on rows that counted
    out[batch_keys.MASK] = jnp.where(has_response[:, None], (new_y >= 0) & mask.any(axis=1, keepdims=True), mask)
  return out
