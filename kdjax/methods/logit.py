"""Terms on logits: supervised CE, KD, DKD, DIST, token-level divergences and ULD.

All of them read only logits (``needs_logits_only=True``), so a teacher
output cache can serve them. The teacher side is always stop-gradiented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import batch as batch_keys
from kdjax.errors import ConfigError
import kdjax.losses as kdl
from kdjax.methods.config import MethodConfig
from kdjax.methods._common import opt, stop
from kdjax.methods.base import FusedPart, ModelInfo, Term, run_fused


def _token_mask(batch, shape):
  """The ``(B, L)`` positions a token term scores: the batch's mask (per example or per token) and, when
  the labels are per token, only labelled positions (a prompt's targets are −1); None = all."""
  m, labels = batch.get(batch_keys.MASK), batch.get("label")
  if m is not None and jnp.ndim(m) not in (1, len(shape)):
    m = None
  if labels is not None and jnp.shape(labels) == tuple(shape):
    scored = jnp.asarray(labels) >= 0
    if m is None:
      return scored
    m = jnp.asarray(m) > 0
    return scored & m.reshape(m.shape + (1,) * (len(shape) - m.ndim))
  return m if m is not None and jnp.ndim(m) == len(shape) else None


def scored_tokens(batch, shape) -> jax.Array:
  """``(B, L)`` bool: the positions a token term scores (all when the batch says nothing)."""
  m = _token_mask(batch, shape)
  return jnp.ones(shape, bool) if m is None else m.astype(bool)


def cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  label_b: jax.Array | None = None,
  mix_lambda: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Softmax cross-entropy over *labelled* examples (or tokens), float32.

  ``logits`` is ``(B, C)`` with ``labels`` ``(B,)``, or ``(B, L, V)`` with
  ``labels`` ``(B, L)`` (language models: ``labels[b, l]`` is the target of
  position ``l``, i.e. already the next token). Entries with label −1 are
  unlabelled/ignored; ``mask`` (same shape as ``labels``, bool or 0/1)
  removes more (padding). The result is the mean over the remaining
  entries, 0 when there are none.

  Mixup/CutMix: with ``label_b`` and ``mix_lambda`` (``(B,)``, λ per
  example) each example's loss is ``λ·CE(label) + (1 − λ)·CE(label_b)``;
  an example counts as labelled when both labels are ≥ 0.
  """
  z = jnp.asarray(logits, jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)

  def nll(lab):
    lab = jnp.asarray(lab)
    picked = jnp.take_along_axis(z, jnp.maximum(lab, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked, lab >= 0

  per, valid = nll(labels)
  if label_b is not None and mix_lambda is not None:
    per_b, valid_b = nll(label_b)
    lam = jnp.asarray(mix_lambda, jnp.float32).reshape(jnp.shape(mix_lambda) + (1,) * (per.ndim - jnp.ndim(mix_lambda)))
    per = lam * per + (1.0 - lam) * per_b
    valid = valid & valid_b
  if mask is not None:
    valid = valid & (jnp.asarray(mask) > 0)
  w = valid.astype(jnp.float32)
  return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def _labels_shape_ok(logits, labels):
  return jnp.shape(labels) == jnp.shape(logits)[:-1]


def _ce_share(labels, mask, batch, ctx):
  """The CE's micro-batch share (:meth:`Context.share`) of the whole batch's labelled entries."""
  labelled = jnp.asarray(labels) >= 0
  if mask is not None:
    labelled &= jnp.asarray(mask) > 0
  if batch.get(batch_keys.LABEL_B) is not None:
    labelled &= jnp.asarray(batch[batch_keys.LABEL_B]) >= 0
  return ctx.share(jnp.sum(labelled), ctx.labelled_total)


def make_ce(name: str, weight: float, cfg: MethodConfig, student: ModelInfo, teacher: ModelInfo | None):
  """``ce``: supervised cross-entropy (:func:`cross_entropy`) on batch["label"]; a language model's
  from its output head, chunk by chunk, as ``cfg.token_chunk`` says (token labels, no mixup)."""

  def labels_of(s_out, batch):
    labels = batch[batch_keys.LABEL]
    if not _labels_shape_ok(s_out.logits, labels):
      raise ConfigError(
        f"term {name!r}: labels of shape {jnp.shape(labels)} do not match logits of shape "
        f"{jnp.shape(s_out.logits)} (expected logits.shape[:-1])"
      )
    return labels

  def token_part(s_out, t_out, batch, ctx):
    labels = labels_of(s_out, batch)
    chunk = kdl.resolve_chunk(s_out.head, cfg.token_chunk)
    if chunk is None or batch.get(batch_keys.LABEL_B) is not None or jnp.ndim(labels) != 2:
      return None
    mask = _token_mask(batch, jnp.shape(labels))
    return FusedPart(kdl.TokenPart(kdl.CROSS_ENTROPY, _ce_share(labels, mask, batch, ctx), mask), chunk)

  def apply(params, state, s_out, t_out, batch, ctx):
    fp = token_part(s_out, t_out, batch, ctx)
    if fp is not None:
      return run_fused(s_out, [fp], batch).total, state, {}
    labels = labels_of(s_out, batch)
    mask = _token_mask(batch, jnp.shape(labels))
    loss = cross_entropy(s_out.logits, labels, batch.get(batch_keys.LABEL_B), batch.get(batch_keys.MIX_LAMBDA), mask)
    return loss * _ce_share(labels, mask, batch, ctx), state, {}

  return (Term(name, weight, apply, needs_teacher=False, token_part=token_part),)


def make_kd(name, weight, cfg, student, teacher):
  """``kd``: Hinton KD, T² · KL(teacher ‖ student) at temperature T (default 4)."""
  temp = opt(cfg.temperature, 4.0)

  def apply(params, state, s_out, t_out, batch, ctx):
    return kdl.kd(s_out.logits, stop(t_out.logits), temperature=temp), state, {}

  return (Term(name, weight, apply),)


def make_dkd(name, weight, cfg, student, teacher):
  """``dkd``: α·TCKD + β·NCKD (T² scaled) × min(epoch / warm-up, 1).

  Unlabelled examples (label −1) have no target class and are left out:
  the loss is the mean of the per-example DKD over labelled examples (0 if
  none). The warm-up factor is reported as ``dkd/warmup``.
  """
  alpha, beta = opt(cfg.dkd_alpha, 1.0), opt(cfg.dkd_beta, 8.0)
  temp, warm = opt(cfg.temperature, 4.0), opt(cfg.dkd_warmup_epochs, 20.0)

  def apply(params, state, s_out, t_out, batch, ctx):
    labels = jnp.asarray(batch[batch_keys.LABEL])
    s, t = s_out.logits, stop(t_out.logits)
    per = kdl.dkd(s, t, jnp.maximum(labels, 0), alpha=alpha, beta=beta, temperature=temp, per_example=True)
    valid = (labels >= 0).astype(jnp.float32)
    loss = jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    factor = jnp.minimum(jnp.asarray(ctx.epoch, jnp.float32) / warm, 1.0) if warm > 0 else jnp.float32(1.0)
    return factor * loss, state, {"warmup": factor}

  return (Term(name, weight, apply),)


def make_dist(name, weight, cfg, student, teacher):
  """``dist``: DIST inter + intra Pearson relation (β=γ=1, T=4 on CIFAR)."""
  b, g, temp = opt(cfg.dist_beta, 1.0), opt(cfg.dist_gamma, 1.0), opt(cfg.temperature, 4.0)

  def apply(params, state, s_out, t_out, batch, ctx):
    return kdl.dist(s_out.logits, stop(t_out.logits), beta=b, gamma=g, temperature=temp), state, {}

  return (Term(name, weight, apply),)


def _fused_target(t_out):
  """What a fused token loss compares the student's head with: the teacher's top-k (a cache), its head
  (a teacher run in the step) or its logits, outside the gradient."""
  if t_out.topk_logp is not None:
    return stop(t_out.topk_logp), t_out.topk_idx
  return stop(t_out.head if t_out.head is not None else t_out.logits)


def _token_term(fn, topk_fn, **fixed):
  def make(name, weight, cfg, student, teacher):
    temp = opt(cfg.temperature, 1.0)
    kw = dict(fixed)
    if "beta" in kw:
      kw["beta"] = opt(cfg.gkd_beta, kw["beta"])
    if "alpha" in kw:
      kw["alpha"] = opt(cfg.skew_alpha, kw["alpha"])

    def share(s_out, batch, ctx, mask):
      tokens = jnp.sum(mask > 0) if mask is not None else s_out.logits.shape[0] * s_out.logits.shape[1]
      # The mean over the whole batch's scored tokens (those the CE counts), also under gradient accumulation.
      return ctx.share(tokens, ctx.labelled_total if "label" in batch else ctx.mask_total)

    def token_part(s_out, t_out, batch, ctx):
      chunk = kdl.resolve_chunk(s_out.head, cfg.token_chunk)
      if chunk is None:
        return None
      mask = _token_mask(batch, jnp.shape(s_out.logits)[:2])
      part = kdl.TokenPart(fn.__name__, share(s_out, batch, ctx, mask), mask, temp, kw)
      return FusedPart(part, chunk, _fused_target(t_out))

    def apply(params, state, s_out, t_out, batch, ctx):
      fp = token_part(s_out, t_out, batch, ctx)
      if fp is not None:  # from the heads, chunk by chunk: no (B, L, V) logits
        return run_fused(s_out, [fp], batch).total, state, {}
      s = s_out.logits
      mask = _token_mask(batch, jnp.shape(s)[:2])
      if t_out.topk_logp is not None:  # a teacher-output cache with top-k storage: the exact top-k form
        loss = topk_fn(s, stop(t_out.topk_logp), t_out.topk_idx, mask=mask, temperature=temp, **kw)
      else:
        loss = fn(s, stop(t_out.logits), mask=mask, temperature=temp, **kw)
      return loss * share(s_out, batch, ctx, mask), state, {}

    return (Term(name, weight, apply, token_part=token_part),)

  make.__doc__ = (
    f"Token-level ``{fn.__name__}`` over (B, L, V) logits; batch['mask'] (B, L) "
    "selects tokens; temperature default 1 (no T² factor). From a top-k teacher "
    f"cache: ``{topk_fn.__name__}`` on the top-k + tail partition. At large vocabularies, from the "
    "models' output heads chunk by chunk, in one pass with the method's other token terms "
    "(``kdjax.losses.fused_token_losses``, ``cfg.token_chunk``)."
  )
  return make


make_forward_kl = _token_term(kdl.forward_kl, kdl.topk_forward_kl)
make_reverse_kl = _token_term(kdl.reverse_kl, kdl.topk_reverse_kl)
make_gkd = _token_term(kdl.generalized_jsd, kdl.topk_generalized_jsd, beta=0.5)
make_tvd = _token_term(kdl.tvd, kdl.topk_tvd)
make_skew_kl = _token_term(kdl.skew_kl, kdl.topk_skew_kl, alpha=0.1)
make_skew_reverse_kl = _token_term(kdl.skew_kl, kdl.topk_skew_kl, alpha=0.1, reverse=True)


def make_uld(name, weight, cfg, student, teacher):
  """Universal Logit Distillation across tokenizers (:func:`kdjax.losses.uld`): the student's scored
  response tokens paired in order with the teacher's, which ``batch["teacher_inputs"]`` holds in the
  teacher's tokenization and ``batch["teacher_mask"]`` marks. Temperature default 1."""
  temp = opt(cfg.temperature, 1.0)

  def apply(params, state, s_out, t_out, batch, ctx):
    if "teacher_mask" not in batch:
      raise ConfigError(
        f"term {name!r} pairs response tokens across tokenizers: the batch needs 'teacher_inputs' "
        "and 'teacher_mask' (B, L_t) in the teacher's tokenization (kdjax.data.retokenize)"
      )
    s = s_out.logits
    s_mask = scored_tokens(batch, jnp.shape(s)[:2])
    t_mask = batch[batch_keys.TEACHER_MASK]
    loss = kdl.uld(s, stop(t_out.logits), s_mask, t_mask, temperature=temp)
    return loss * ctx.share(kdl.uld_pairs(s_mask, t_mask), ctx.pair_total), state, {}

  return (Term(name, weight, apply, any_vocab=True),)
