"""What a distillation method is: weighted loss terms with adapters and state.

A *term* is data plus two pure functions:

* ``init(key, student_out, teacher_out, info) -> (adapter_params, state)``
  builds the trainable adapter parameters (FitNet regressors, CRD embed heads,
  VID variances …) and the non-trainable method state (CRD memory bank …)
  from example model outputs (concrete or ``jax.ShapeDtypeStruct`` leaves).
* ``apply(adapter_params, state, student_out, teacher_out, batch, ctx)
  -> (loss, new_state, aux)`` returns an *unweighted* float32 scalar loss, the
  new method state and a dict of extra scalar metrics. A term that reads
  labels leaves unlabelled examples (label −1) out of its loss itself.

A *method* is a tuple of terms with weights; its loss is the weighted sum.
Methods never touch the model or optimizer: the engine owns those.

A token term may also describe itself as one part of a fused token group
(``token_part``): at a large vocabulary the method then computes all such
terms, and the training accuracy, in one chunked pass over the student's
output head (:func:`kdjax.losses.fused_token_losses`), projecting each chunk
onto the vocabulary once instead of once per term.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdjax import batch as batch_keys
from kdjax.errors import ConfigError
import kdjax.losses as kdl
from kdjax.models.base import ModelOutput

PyTree = Any


class Context(NamedTuple):
  """Per-step information a term may use (all jit-traced scalars).

  Attributes:
    step: global optimizer step (int32 scalar).
    epoch: fractional epoch ``step / steps_per_epoch`` (float32 scalar); DKD's
      warm-up and other schedules read it.
    key: a PRNG key for this step and term (e.g. CRD negative sampling).
    accum: micro-batches per optimizer step (gradient accumulation).
    mask_total / labelled_total: over the *whole* global batch, the entries
      that ``batch["mask"]`` selects and those that are also labelled
      (label ≥ 0); None without accumulation. With them a term that averages
      over entries scales its micro-batch mean by :meth:`share`, so the
      accumulated loss is the mean over the whole batch's entries, whatever
      the micro-batches hold.
    pair_total: the same for cross-tokenizer terms: the whole batch's
      student/teacher response-token pairs (:func:`kdjax.losses.uld_pairs`).
  """

  step: jax.Array
  epoch: jax.Array
  key: jax.Array
  accum: int = 1
  mask_total: jax.Array | None = None
  labelled_total: jax.Array | None = None
  pair_total: jax.Array | None = None

  def share(self, count: jax.Array, total: jax.Array | None) -> jax.Array | float:
    """``count · accum / total``: this micro-batch's weight when averaging over the whole batch (1 without accumulation)."""
    if self.accum == 1 or total is None:
      return 1.0
    return jnp.asarray(count, jnp.float32) * self.accum / jnp.maximum(total, 1.0)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """Static description of a model the method is built for.

  Attributes:
    name: registry name, e.g. ``"resnet32x4"``.
    num_classes: classifier width.
    feature_shapes: per-feature shapes *without* the batch dim.
  """

  name: str
  num_classes: int
  feature_shapes: dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class InitInfo:
  """What ``init`` may need besides the example outputs."""

  student: ModelInfo
  teacher: ModelInfo | None
  num_examples: int  # size of the training set (CRD memory bank rows)


InitFn = Callable[[jax.Array, ModelOutput, ModelOutput | None, InitInfo], tuple[PyTree, PyTree]]
ApplyFn = Callable[
  [PyTree, PyTree, ModelOutput, ModelOutput | None, dict[str, jax.Array], Context],
  tuple[jax.Array, PyTree, dict[str, jax.Array]],
]


ACCURACY = "train/accuracy"  # the metric of the student's top-1 accuracy on labelled entries


class FusedPart(NamedTuple):
  """A term's loss as one part of a fused token group, on the student's output head.

  Attributes:
    part: the loss (its ``weight``: the term's micro-batch share, :meth:`Context.share`).
    chunk: positions per chunk.
    teacher: what a divergence compares with (the teacher's head, logits or top-k), None for cross-entropy.
  """

  part: kdl.TokenPart
  chunk: int
  teacher: Any = None


TokenPartFn = Callable[[ModelOutput, ModelOutput | None, dict[str, jax.Array], "Context"], FusedPart | None]


def token_labels(batch, shape) -> jax.Array | None:
  """``batch["label"]`` when it is per token ``(B, L)``, else None."""
  labels = batch.get(batch_keys.LABEL)
  return labels if labels is not None and jnp.shape(labels) == tuple(shape) else None


def logit_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy over labelled entries (label ≥ 0) of ``logits`` ``(..., V)``: the label's logit is the largest
  (a tie counts as a hit), one gather and the row maximum that a log-softmax computes anyway."""
  valid = labels >= 0
  picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
  hit = (picked >= jnp.max(logits, axis=-1)) & valid
  return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def run_fused(student_out: ModelOutput, parts: list[FusedPart], batch) -> kdl.FusedLosses:
  """``parts`` (one chunk size, one teacher) in one pass over ``student_out.head``."""
  teacher = next((p.teacher for p in parts if p.teacher is not None), None)
  labels = token_labels(batch, student_out.head.hidden.shape[:2])
  return kdl.fused_token_losses(student_out.head, [p.part for p in parts], teacher, labels, chunk_size=parts[0].chunk)


def _no_init(key, student_out, teacher_out, info):
  del key, student_out, teacher_out, info
  return {}, {}


@dataclasses.dataclass(frozen=True)
class Term:
  """One loss term of a method.

  Attributes:
    name: metric namespace, e.g. ``"kd"``; metrics are logged as
      ``"loss/<name>"``.
    weight: multiplier in the total loss.
    apply: see module docstring.
    init: see module docstring.
    student_features / teacher_features: feature names the term reads; the
      engine checks them against the models before compiling anything.
    needs_teacher: whether the term reads the teacher's output at all.
    needs_logits_only: True when only teacher *logits* are read (a teacher
      output cache can serve it).
    stage: ``"main"`` or ``"init"`` (RepDistiller's two-stage methods run the
      ``"init"`` terms alone for ``method.init_epochs`` first).
    params_from: name of another term whose adapter params (not state) this
      term reads instead of owning its own, so an ``"init"`` term can train
      the adapters its ``"main"`` term uses (FitNet's regressor, FT's
      paraphraser). Its own ``init`` is not called for params.
    any_vocab: the term compares teacher and student across vocabularies
      (ULD), so their class counts need not match.
    token_part: ``(student_out, teacher_out, batch, ctx) -> FusedPart | None``:
      the term as a part of a fused token group when it computes from the
      output heads (None: it does not, as ``apply`` says).
  """

  name: str
  weight: float
  apply: ApplyFn
  init: InitFn = _no_init
  student_features: tuple[str, ...] = ()
  teacher_features: tuple[str, ...] = ()
  needs_teacher: bool = True
  needs_logits_only: bool = True
  stage: str = "main"
  params_from: str | None = None
  any_vocab: bool = False
  token_part: TokenPartFn | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A weighted sum of terms: ``loss = Σ_i w_i · term_i``.

  ``adapter_params`` and ``state`` are dicts keyed by term name.
  """

  name: str
  terms: tuple[Term, ...]

  @property
  def needs_teacher(self) -> bool:
    return any(t.needs_teacher for t in self.terms)

  @property
  def any_vocab(self) -> bool:
    """Whether the method distils across tokenizers: its teacher reads ``teacher_inputs`` of its own."""
    return any(t.any_vocab and t.needs_teacher for t in self.terms)

  @property
  def needs_teacher_features(self) -> bool:
    return any(t.needs_teacher and not t.needs_logits_only for t in self.terms)

  def stage_terms(self, stage: str) -> tuple[Term, ...]:
    return tuple(t for t in self.terms if t.stage == stage)

  def validate(self, student: ModelInfo, teacher: ModelInfo | None) -> None:
    """Raise ``ValueError`` naming the method, feature and what exists."""
    for t in self.terms:
      for f in t.student_features:
        if f not in student.feature_shapes:
          raise ConfigError(
            f"method {self.name!r} (term {t.name!r}) needs student feature {f!r}, "
            f"but model {student.name!r} exposes {sorted(student.feature_shapes)}"
          )
      if t.needs_teacher and teacher is None:
        raise ConfigError(f"method {self.name!r} (term {t.name!r}) needs a teacher, but none is configured")
      if teacher is not None:
        for f in t.teacher_features:
          if f not in teacher.feature_shapes:
            raise ConfigError(
              f"method {self.name!r} (term {t.name!r}) needs teacher feature {f!r}, "
              f"but model {teacher.name!r} exposes {sorted(teacher.feature_shapes)}"
            )
    same_vocab = any(t.needs_teacher and not t.any_vocab for t in self.terms)
    if teacher is not None and same_vocab and student.num_classes != teacher.num_classes:
      raise ConfigError(
        f"teacher {teacher.name!r} has {teacher.num_classes} classes but student "
        f"{student.name!r} has {student.num_classes}; they must match for method {self.name!r} (a language "
        f"model teacher of the student's tokenizer with a padded vocabulary: load it with "
        f"from_pretrained(..., vocab_size={student.num_classes}); another tokenizer: method 'uld')"
      )

  def init(self, key, student_out, teacher_out, info: InitInfo) -> tuple[dict, dict]:
    params, state = {}, {}
    for i, t in enumerate(self.terms):
      p, s = t.init(jax.random.fold_in(key, i), student_out, teacher_out, info)
      params[t.name], state[t.name] = ({} if t.params_from else p), s
    return params, state

  def loss(self, adapter_params, state, student_out, teacher_out, batch, ctx: Context, stage: str = "main"):
    """Weighted total over the terms of ``stage``.

    Returns ``(total, new_state, metrics)`` with ``metrics["loss/<term>"]``
    holding each unweighted term and ``metrics["loss/total"]`` the total; a
    fused token group also reports ``metrics["train/accuracy"]``.
    """
    keyed = [(t, ctx._replace(key=jax.random.fold_in(ctx.key, i))) for i, t in enumerate(self.terms)]
    terms = [(t, c) for t, c in keyed if t.stage == stage]
    total, metrics = self._fused(terms, student_out, teacher_out, batch)
    new_state = dict(state)
    for t, tctx in terms:
      if f"loss/{t.name}" in metrics:
        continue
      p = adapter_params[t.params_from or t.name]
      value, s, aux = t.apply(p, state[t.name], student_out, teacher_out, batch, tctx)
      value = jnp.asarray(value, jnp.float32)
      new_state[t.name] = s
      total = total + t.weight * value
      metrics[f"loss/{t.name}"] = value
      for k, v in aux.items():
        metrics[f"{t.name}/{k}"] = v
    metrics["loss/total"] = total
    return total, new_state, metrics

  @staticmethod
  def _fused(terms, student_out, teacher_out, batch) -> tuple[jax.Array, dict]:
    """The terms that describe themselves as fused token parts, in one pass: their weighted total and metrics
    (``loss/<term>``: each term's value, as its ``apply`` returns it; ``train/accuracy`` of a language model,
    from that pass, or from the logits when its token terms read them)."""
    named, parts, plain = [], [], False
    for t, tctx in terms:
      fp = t.token_part(student_out, teacher_out, batch, tctx) if t.token_part is not None else None
      plain |= t.token_part is not None and fp is None
      if fp is not None and (not parts or fp.chunk == parts[0].chunk):
        share = fp.part.weight
        named.append((t.name, share))
        parts.append(fp._replace(part=dataclasses.replace(fp.part, weight=t.weight * share)))
    labels = token_labels(batch, student_out.logits.shape[:2]) if jnp.ndim(student_out.logits) == 3 else None
    if not parts:  # a token term reads the full logits: the accuracy from them, not from another pass over the head
      accuracy = {} if labels is None or not plain else {ACCURACY: logit_accuracy(student_out.logits, labels)}
      return jnp.zeros((), jnp.float32), accuracy
    out = run_fused(student_out, parts, batch)
    metrics = {f"loss/{name}": v * share for (name, share), v in zip(named, out.values)}
    if out.accuracy is not None:
      metrics[ACCURACY] = out.accuracy
    return out.total, metrics
