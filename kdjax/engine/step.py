"""The pure train and eval steps: teacher outputs, student update and evaluation in one program each.

``make_train_step(spec)`` returns ``train_step(state, teacher, batch) ->
(state, metrics)``: a pure function of arrays that the Distiller jits once
with shardings from the mesh (``Distiller.jitted_step``). Inside one compiled
program:

1. the responses a language model trains on are generated, when
   ``spec.responses`` asks (on-policy samples from the current student, the
   teacher's answers for SeqKD; :mod:`kdjax.responses`), before the teacher
   and the student read the rows;
2. the teacher source (:mod:`kdjax.engine.teachers`) gives the teacher
   outputs: frozen models in eval mode, a cache's or a split teacher's
   outputs carried by the batch, an EMA of the student, or none;
3. the student(s) run in train mode and the method's weighted loss against
   the source's targets is differentiated w.r.t. student params *and*
   adapter params — over micro-batches when ``grad_accum > 1``
   (:func:`kdjax.engine.accumulate.microbatched`);
4. optax updates both; BatchNorm statistics, method state (CRD bank) and the
   source's own state (the EMA teacher) are carried forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from kdjax import batch as batch_keys
from kdjax.engine import responses as response_lib
from kdjax.engine.accumulate import microbatched
from kdjax.engine.state import ModelDef, TeacherState, TrainState, apply_model, merge_model, rng_key
from kdjax.engine.teachers import TeacherSource
from kdjax.losses import TokenHead, resolve_chunk, token_argmax, uld_pairs
from kdjax.methods.base import ACCURACY, Context, Method, logit_accuracy
from kdjax.methods.logit import scored_tokens

Batch = dict[str, jax.Array]
RESPONSE_KEY = 0x5EED  # folded into the step key for sampling responses (independent of the methods' keys)
MODEL_RNG_KEY = 0xD50  # + student index, folded into the context key for the students' own RNG streams


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static description of the step (closed over by jit; arrays travel as arguments)."""

  students: tuple[ModelDef, ...]
  source: TeacherSource
  method: Method
  tx: optax.GradientTransformation
  steps_per_epoch: int
  grad_accum: int = 1
  stage: str = "main"
  responses: response_lib.ResponseConfig | None = None

  @property
  def teachers(self) -> tuple:
    """The frozen teachers' static halves (none for other sources)."""
    return self.source.defs


def _skip_unreached(updates, grads):
  """Zero the update of every leaf whose gradient is exactly zero everywhere.

  Those are parameters the current loss does not reach: the classifier head
  and CE-only adapters during a two-stage method's init stage, FT's
  paraphraser (stop-gradiented) and AB's connectors in the main stage. As
  in PyTorch, where such parameters have ``grad is None`` and the optimizer
  skips them, neither leftover momentum from the other stage nor weight
  decay moves them.
  """
  return jax.tree.map(lambda u, g: jnp.where(jnp.any(g != 0), u, jnp.zeros_like(u)), updates, grads)


def labelled_accuracy(logits: jax.Array, labels: jax.Array, head: TokenHead | None = None) -> jax.Array:
  """Top-1 accuracy over labelled examples (label ≥ 0) (:func:`kdjax.methods.base.logit_accuracy`); at a large
  vocabulary, the argmax of the student's ``head`` chunk by chunk (:func:`kdjax.losses.token_argmax`), never
  holding its logits (a method with token terms reports its own, from the pass its terms make)."""
  chunk = resolve_chunk(head, None) if jnp.ndim(labels) == 2 else None
  if chunk is None:
    return logit_accuracy(logits, labels)
  valid = labels >= 0
  hit = (token_argmax(head, chunk) == labels) & valid
  return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def teacher_outputs(spec: StepSpec, state: TrainState, teacher: TeacherState, batch: Batch) -> list:
  """The teacher source's outputs for ``batch``: frozen teachers, cached or ahead-computed outputs, the EMA."""
  return spec.source.outputs(spec, state, teacher, batch)


def _student_loss(spec: StepSpec, i: int, outs, t_outs, trainable, state: TrainState, batch: Batch, ctx: Context):
  """Student ``i``'s weighted loss over the source's targets, its new method state and its metrics."""
  adapters, mstate = trainable["adapters"][i], state.method_state[i]
  targets, w = spec.source.targets(i, outs, t_outs, batch)
  loss = jnp.zeros((), jnp.float32)
  metrics: dict[str, jax.Array] = {}
  for j, target in enumerate(targets):
    lj, mstate, mj = spec.method.loss(adapters, mstate, outs[i], target, batch, ctx, stage=spec.stage)
    loss = loss + w[j] * lj
    for name, v in mj.items():
      if name == ACCURACY:  # the student's own, whichever teacher it is compared with
        metrics[name] = v
      else:
        metrics[name] = metrics.get(name, 0.0) + w[j] * v
  for t, (target, rows) in enumerate(spec.source.groups(t_outs, batch)):
    metrics.update(_group_metrics(spec, t, outs[i], target, rows, adapters, state.method_state[i], batch, ctx))
  return loss, mstate, metrics


def _group_metrics(spec: StepSpec, t: int, out, target, rows, adapters, mstate, batch: Batch, ctx: Context) -> dict:
  """Teacher ``t``'s share of a routed batch, reported apart (metrics only: no gradient, no state kept).

  ``loss/<term>/teacher{t}``: the method's terms on the ``(B,)`` ``rows`` it
  scores against its own output (the batch's mask narrowed to them; the
  micro-batch's own mean), and ``train/agreement/teacher{t}``: the fraction
  of those rows' labelled entries where the student's top-1 is the teacher's.
  """
  mask = batch.get(batch_keys.MASK)
  if mask is not None:
    rows = rows.reshape(rows.shape + (1,) * (mask.ndim - 1)) & (mask > 0)
  narrowed = dict(batch, **{batch_keys.MASK: rows})
  own = Context(step=ctx.step, epoch=ctx.epoch, key=ctx.key)
  _, _, m = spec.method.loss(adapters, mstate, out, target, narrowed, own, stage=spec.stage)
  metrics = {f"{name}/teacher{t}": jax.lax.stop_gradient(v) for name, v in m.items() if name != ACCURACY}
  labels = batch[batch_keys.LABEL]
  hit = jnp.argmax(out.logits, -1) == jnp.argmax(target.logits, -1)
  counted = eval_mask(rows, labels)
  metrics[f"train/agreement/teacher{t}"] = jnp.sum(hit & counted) / jnp.maximum(jnp.sum(counted), 1)
  return metrics


def _micro_loss(spec: StepSpec, trainable, state: TrainState, t_outs, batch: Batch, ctx: Context):
  """Total loss of one (micro-)batch and what it updates: ``(loss, (rests, method states, metrics))``."""
  x, extra = batch_keys.inputs(batch), batch_keys.model_kwargs(batch)
  outs, rests = [], []
  for i, d in enumerate(spec.students):
    key = jax.random.fold_in(ctx.key, MODEL_RNG_KEY + i)  # the student's dropout (and other stream) draws
    params, rest = trainable["students"][i], state.model_state[i]
    out, rest = apply_model(d.graphdef, params, rest, x, train=True, taps=d.taps, rngs=d.rngs, key=key, extra=extra)
    outs.append(out)
    rests.append(rest)
  total = jnp.zeros((), jnp.float32)
  new_mstate, metrics = [], {}
  k = len(spec.students)
  for i in range(k):
    loss, mstate, m = _student_loss(spec, i, outs, t_outs, trainable, state, batch, ctx)
    total = total + loss
    new_mstate.append(mstate)
    prefix = f"s{i}/" if k > 1 else ""
    metrics.update({prefix + n: v for n, v in m.items()})
    if ACCURACY not in m:  # a fused token group computes it in its pass over the head
      metrics[prefix + ACCURACY] = labelled_accuracy(outs[i].logits, batch[batch_keys.LABEL], outs[i].head)
  metrics["loss/total"] = total
  return total, (tuple(rests), tuple(new_mstate), metrics)


def _entry_totals(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Over the whole batch: the entries ``batch["mask"]`` selects (a ``(B,)`` mask over all of an example's
  tokens), and those also labelled (label ≥ 0). Examples for ``(B,)`` labels, tokens for ``(B, L)``."""
  label = batch[batch_keys.LABEL]
  mask = batch.get(batch_keys.MASK)
  if mask is None or mask.shape != label.shape[: mask.ndim]:
    selected = jnp.ones(label.shape, bool)
  else:
    selected = jnp.broadcast_to((mask > 0).reshape(mask.shape + (1,) * (label.ndim - mask.ndim)), label.shape)
  labelled = selected & (label >= 0)
  if batch.get(batch_keys.LABEL_B) is not None:  # mixup: an example counts when both of its labels do
    labelled = labelled & (batch[batch_keys.LABEL_B] >= 0)
  return jnp.sum(selected).astype(jnp.float32), jnp.sum(labelled).astype(jnp.float32)


def _pair_total(batch: Batch) -> jax.Array | None:
  """Over the whole batch: the student/teacher response-token pairs a cross-tokenizer term averages over."""
  if batch_keys.TEACHER_MASK not in batch:
    return None
  label = batch[batch_keys.LABEL]
  return uld_pairs(scored_tokens(batch, label.shape), batch[batch_keys.TEACHER_MASK])


def step_key(state: TrainState) -> jax.Array:
  """The step's key: the run's key folded with the step number (a resumed run draws the same)."""
  return jax.random.fold_in(rng_key(state.key), state.step)


def with_responses(spec: StepSpec, state: TrainState, teacher: TeacherState, batch: Batch) -> Batch:
  """The batch the step trains on: responses generated as ``spec.responses`` says
  (:func:`kdjax.engine.responses.replace_responses`), or ``batch`` itself."""
  if spec.responses is None or not spec.responses.active:
    return batch
  key = jax.random.fold_in(step_key(state), RESPONSE_KEY)
  d = spec.students[0]
  student = merge_model(d.graphdef, state.params[0], state.model_state[0], d.rngs)
  t = None
  if spec.responses.needs_teacher:
    td = spec.teachers[0]
    t = merge_model(td.graphdef, teacher.params[0], teacher.model_state[0], td.rngs)
  return response_lib.replace_responses(spec.responses, batch, key, student, t)


def _contexts(spec: StepSpec, state: TrainState, batch: Batch) -> Callable[[jax.Array], Context]:
  """Micro-batch index → the methods' :class:`Context`: the step, epoch and key, and under accumulation the
  whole batch's entry counts (so a mean over entries never depends on how the batch is split)."""
  key = step_key(state)
  epoch = state.step.astype(jnp.float32) / spec.steps_per_epoch
  if spec.grad_accum == 1:
    return lambda index: Context(step=state.step, epoch=epoch, key=key)
  mask_total, labelled_total = _entry_totals(batch)
  pair_total = _pair_total(batch)
  return lambda index: Context(
    step=state.step,
    epoch=epoch,
    key=jax.random.fold_in(key, index),
    accum=spec.grad_accum,
    mask_total=mask_total,
    labelled_total=labelled_total,
    pair_total=pair_total,
  )


def make_train_step(spec: StepSpec) -> Callable[[TrainState, TeacherState, Batch], tuple[TrainState, dict]]:
  """Build the pure step for ``spec`` (:meth:`kdjax.Distiller.jitted_step` jits it)."""
  value_and_grad = jax.value_and_grad(lambda *args: _micro_loss(spec, *args), has_aux=True)

  def train_step(state: TrainState, teacher: TeacherState, batch: Batch):
    trainable = state.trainable()
    batch = with_responses(spec, state, teacher, batch)
    context = _contexts(spec, state, batch)

    def grads_of(carry: TrainState, rows: Batch, index: jax.Array):
      t_outs = teacher_outputs(spec, carry, teacher, rows)
      (_, (rests, mstates, metrics)), grads = value_and_grad(trainable, carry, t_outs, rows, context(index))
      return carry.replace(model_state=rests, method_state=mstates), grads, metrics

    carried, grads, metrics = microbatched(grads_of, spec.grad_accum)(state, batch)
    updates, opt_state = spec.tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, _skip_unreached(updates, grads))
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(
      step=state.step + 1,
      params=trainable["students"],
      adapter_params=trainable["adapters"],
      opt_state=opt_state,
      model_state=carried.model_state,
      method_state=carried.method_state,
      ema=spec.source.update_extra(state.ema, trainable["students"], carried.model_state),
    )
    return new_state, metrics

  return train_step


def eval_mask(mask, labels) -> jnp.ndarray:
  """Which labels count: the batch's ``mask`` (``(B,)`` per example or ``labels.shape``), broadcast over
  token positions, and only labelled entries (``labels >= 0``: a token dataset's prompt positions are −1)."""
  labels = jnp.asarray(labels)
  if mask is None:
    return labels >= 0
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
  return jnp.broadcast_to(mask, labels.shape) & (labels >= 0)


def make_eval_step(spec: StepSpec, stats_fn: Callable) -> Callable:
  """``eval_step(state, teacher, batch) -> (sums, student_pooled, teacher_pooled)``.

  ``stats_fn(student_logits, teacher_logits, labels, mask)`` returns additive
  sums (``kdjax.report.eval_batch_stats``). The reference for the diagnostics
  is the teacher source's (:meth:`~kdjax.engine.teachers.TeacherSource.reference`): the teacher, the EMA
  teacher or the second student.
  """

  def eval_step(state: TrainState, teacher: TeacherState, batch: Batch):
    x = batch_keys.inputs(batch)
    d = spec.students[0]
    s_out, _ = apply_model(d.graphdef, state.params[0], state.model_state[0], x, train=False, taps=d.taps, rngs=d.rngs)
    ahead = {k: batch[k] for k in (batch_keys.TEACHER_OUTPUTS, batch_keys.TASK) if k in batch}
    t_out = spec.source.reference(spec, state, teacher, {batch_keys.INPUTS: x, **ahead})
    labels = batch[batch_keys.LABEL]
    sums = stats_fn(
      s_out.logits, None if t_out is None else t_out.logits, labels, eval_mask(batch.get(batch_keys.MASK), labels)
    )
    if "pooled" not in s_out.features and s_out.logits.ndim > 2:  # tokens: no one vector per example for CKA
      return sums, None, None
    s_pool = s_out.features.get("pooled", s_out.logits)
    t_pool = None if t_out is None else t_out.features.get("pooled", t_out.logits)
    return sums, s_pool, t_pool

  return eval_step
