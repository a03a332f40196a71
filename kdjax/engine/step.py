"""The pure train and eval steps: teacher forward + student update in one program.

``make_train_step(spec)`` returns ``train_step(state, teacher, batch) ->
(state, metrics)``: a pure function of arrays that the loop jits once with
shardings from the mesh (``Distiller.jitted_step``). Inside one compiled program:

1. the frozen teacher(s) run in eval mode (``stop_gradient``; no BN updates) —
   or their outputs come from the batch (a teacher-output cache: dense
   ``teacher_logits``, or ``teacher_topk_logp``/``teacher_topk_idx``; see
   :mod:`kdjax.batch`);
2. the student(s) run in train mode and the method's weighted loss is
   differentiated w.r.t. student params *and* adapter params;
3. optax updates both; BN statistics, method state (CRD bank) and the EMA
   teacher (self-distillation) are carried forward.

Modes (``spec.mode``): ``teacher`` (supervised), ``offline`` / ``born_again``
(one teacher), ``multi_teacher`` (averaged logits or per-teacher losses),
``dml`` (k students; each distils from the others' stop-gradiented outputs),
``self_ema`` (the teacher is an EMA of the student).

Language models can train on generated responses (``spec.responses``,
:mod:`kdjax.responses`): before anything else, the step replaces a
fraction of the rows' responses by samples from the current student
(on-policy) and the others by the teacher's (SeqKD) or keeps the data's;
teacher and student then both read the rewritten rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from flax import nnx

from kdjax import batch as B
from kdjax.engine import responses as R
from kdjax.engine.teacher_placement import on_device
from kdjax.engine.state import FunctionDef, ModelDef, TeacherState, TrainState, apply_model, rng_key
from kdjax.losses import topk_to_logits, uld_pairs
from kdjax.methods.base import Context, Method
from kdjax.methods.logit import scored_tokens
from kdjax.models.base import ModelOutput

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static description of the step (hashable parts only close over jit)."""

  students: tuple[ModelDef, ...]
  teachers: tuple[ModelDef | FunctionDef, ...]
  method: Method
  tx: optax.GradientTransformation
  mode: str
  steps_per_epoch: int
  grad_accum: int = 1
  stage: str = "main"
  teacher_weights: tuple[float, ...] = ()
  multi_teacher: str = "average"
  ema_decay: float = 0.999
  responses: R.ResponseConfig | None = None
  # Teacher placement: the sharding a tensor-parallel teacher reads its inputs with, and the teacher
  # state's shardings when its weights live in host memory (brought onto the device per forward).
  teacher_input: Any = None
  teacher_host: Any = None


def _stop(out: ModelOutput) -> ModelOutput:
  return jax.tree.map(jax.lax.stop_gradient, out)


def _weights(spec: StepSpec, n: int) -> jax.Array:
  w = jnp.asarray(spec.teacher_weights or (1.0,) * n, jnp.float32)
  return w / jnp.sum(w)


def teacher_outputs(spec: StepSpec, state: TrainState, teacher: TeacherState, batch: Batch) -> list[ModelOutput]:
  """Frozen teacher outputs for this batch (eval mode, stop-gradiented)."""
  if B.TEACHER_OUTPUTS in batch:  # computed ahead on the teacher's own devices (split placement)
    return [_stop(o) for o in batch[B.TEACHER_OUTPUTS]]
  if B.TEACHER_LOGITS in batch:  # served by the teacher-output cache
    return [ModelOutput(batch[B.TEACHER_LOGITS].astype(jnp.float32), {})]
  if B.TEACHER_TOPK_LOGP in batch:  # a top-k cache: dense view for class-level terms, exact top-k for token terms
    lp, idx = batch[B.TEACHER_TOPK_LOGP].astype(jnp.float32), batch[B.TEACHER_TOPK_IDX]
    dense = topk_to_logits(lp, idx, spec.students[0].info.num_classes)  # dropped by XLA when unused
    return [ModelOutput(dense, {}, topk_logp=lp, topk_idx=idx)]
  x = B.teacher_inputs(batch)
  if spec.mode == "self_ema":
    ema_params, ema_rest = state.ema
    sd = spec.students[0]
    out, _ = apply_model(sd.graphdef, ema_params, ema_rest, x, train=False, taps=sd.taps)
    return [_stop(out)]
  return run_teachers(spec, teacher, x)


def run_teachers(spec: StepSpec, teacher: TeacherState, x: jax.Array) -> list[ModelOutput]:
  """The teacher models' eval-mode outputs on ``x`` (stop-gradiented), as placed by ``spec``."""
  if spec.teacher_input is not None:  # tensor-parallel teacher: whole rows on each model group
    x = jax.lax.with_sharding_constraint(x, spec.teacher_input)
  if spec.teacher_host is not None:  # weights held in host memory come in for this forward
    teacher = on_device(teacher, spec.teacher_host)
  outs = []
  for td, p, r in zip(spec.teachers, teacher.params, teacher.model_state):
    if isinstance(td, FunctionDef):
      out = ModelOutput(td.fn(p, x), {})
    else:
      out, _ = apply_model(td.graphdef, p, r, x, train=False, taps=td.taps)
    outs.append(_stop(out))
  return outs


def _average_outputs(outs: list[ModelOutput], w: jax.Array) -> ModelOutput:
  """Weighted mean of the logits; features are the *first* output's (teachers
  of different architectures have no common feature space to average — use
  ``multi_teacher="per_teacher"`` for feature methods)."""
  logits = sum(w[i] * o.logits.astype(jnp.float32) for i, o in enumerate(outs))
  return ModelOutput(logits, outs[0].features)


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


def _global_norm(tree) -> jax.Array:
  """‖tree‖₂ over all leaves, float32 (no optax version dependency)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def labelled_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy over labelled examples (label ≥ 0)."""
  valid = labels >= 0
  hit = (jnp.argmax(logits, -1) == labels) & valid
  return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def _micro_loss(spec: StepSpec, trainable, state: TrainState, t_outs, batch: Batch, ctx: Context):
  """Total loss of one (micro-)batch and what it updates."""
  x = B.inputs(batch)
  outs, rests = [], []
  for i, sd in enumerate(spec.students):
    out, rest = apply_model(sd.graphdef, trainable["students"][i], state.model_state[i], x, train=True, taps=sd.taps)
    outs.append(out)
    rests.append(rest)
  total = jnp.zeros((), jnp.float32)
  new_mstate, metrics = [], {}
  k = len(spec.students)
  for i in range(k):
    adapters, mstate = trainable["adapters"][i], state.method_state[i]
    if spec.mode == "dml":
      others = [_stop(outs[j]) for j in range(k) if j != i]
      targets = [_average_outputs(others, jnp.full((k - 1,), 1.0 / (k - 1)))]
    elif spec.mode == "teacher":
      targets = [None]
    elif spec.mode == "multi_teacher" and spec.multi_teacher == "per_teacher" and len(t_outs) > 1:
      targets = list(t_outs)
    elif len(t_outs) > 1:
      targets = [_average_outputs(t_outs, _weights(spec, len(t_outs)))]
    else:
      targets = t_outs
    w = _weights(spec, len(targets)) if len(targets) > 1 else jnp.ones((1,), jnp.float32)
    li = jnp.zeros((), jnp.float32)
    m: dict[str, jax.Array] = {}
    for j, target in enumerate(targets):
      lj, mstate, mj = spec.method.loss(adapters, mstate, outs[i], target, batch, ctx, stage=spec.stage)
      li = li + w[j] * lj
      for name, v in mj.items():
        m[name] = m.get(name, 0.0) + w[j] * v
    total = total + li
    new_mstate.append(mstate)
    prefix = f"s{i}/" if k > 1 else ""
    metrics.update({prefix + n: v for n, v in m.items()})
    metrics[prefix + "train/accuracy"] = labelled_accuracy(outs[i].logits, batch[B.LABEL])
  metrics["loss/total"] = total
  return total, (tuple(rests), tuple(new_mstate), metrics)


def _entry_totals(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Over the whole batch: the entries ``batch["mask"]`` selects (a ``(B,)`` mask over all of an example's
  tokens), and those also labelled (label ≥ 0). Examples for ``(B,)`` labels, tokens for ``(B, L)``."""
  label = batch[B.LABEL]
  mask = batch.get(B.MASK)
  if mask is None or mask.shape != label.shape[: mask.ndim]:
    selected = jnp.ones(label.shape, bool)
  else:
    selected = jnp.broadcast_to((mask > 0).reshape(mask.shape + (1,) * (label.ndim - mask.ndim)), label.shape)
  labelled = selected & (label >= 0)
  if batch.get("label_b") is not None:  # mixup: an example counts when both of its labels do
    labelled = labelled & (batch["label_b"] >= 0)
  return jnp.sum(selected).astype(jnp.float32), jnp.sum(labelled).astype(jnp.float32)


def _pair_total(batch: Batch) -> jax.Array | None:
  """Over the whole batch: the student/teacher response-token pairs a cross-tokenizer term averages over."""
  if B.TEACHER_MASK not in batch:
    return None
  label = batch[B.LABEL]
  return uld_pairs(scored_tokens(batch, label.shape), batch[B.TEACHER_MASK])


def step_key(state: TrainState) -> jax.Array:
  """The step's key: the run's key folded with the step number (a resumed run draws the same)."""
  return jax.random.fold_in(rng_key(state.key), state.step)


def with_responses(spec: StepSpec, state: TrainState, teacher: TeacherState, batch: Batch) -> Batch:
  """The batch the step trains on: responses generated as ``spec.responses`` says
  (:func:`kdjax.responses.replace_responses`), or ``batch`` itself."""
  if spec.responses is None or not spec.responses.active:
    return batch
  key = jax.random.fold_in(step_key(state), RESPONSE_KEY)
  sd = spec.students[0]
  student = nnx.merge(sd.graphdef, state.params[0], state.model_state[0])
  t = None
  if spec.responses.needs_teacher:
    td = spec.teachers[0]
    t = nnx.merge(td.graphdef, teacher.params[0], teacher.model_state[0])
  return R.replace_responses(spec.responses, batch, key, student, t)


RESPONSE_KEY = 0x5EED  # folded into the step key for sampling responses (independent of the methods' keys)


def make_train_step(spec: StepSpec) -> Callable[[TrainState, TeacherState, Batch], tuple[TrainState, dict]]:
  """Build the pure step for ``spec`` (:meth:`kdjax.Distiller.jitted_step` jits it)."""

  def train_step(state: TrainState, teacher: TeacherState, batch: Batch):
    key = step_key(state)
    epoch = state.step.astype(jnp.float32) / spec.steps_per_epoch
    grad_fn = jax.value_and_grad(lambda tr, st, tb, b, c: _micro_loss(spec, tr, st, tb, b, c), has_aux=True)
    trainable = state.trainable()
    batch = with_responses(spec, state, teacher, batch)

    if spec.grad_accum == 1:
      t_outs = teacher_outputs(spec, state, teacher, batch)
      ctx = Context(step=state.step, epoch=epoch, key=key)
      (_, (rests, mstates, metrics)), grads = grad_fn(trainable, state, t_outs, batch, ctx)
    else:
      a = spec.grad_accum
      mask_total, labelled_total = _entry_totals(batch)
      pair_total = _pair_total(batch)
      # Micro-batch m holds examples m, m+A, m+2A, … so every device
      # contributes equally to every micro-batch (no resharding).
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1), batch)

      def body(carry, mb_and_i):
        st, gsum, msum = carry
        mb, i = mb_and_i
        t_outs = teacher_outputs(spec, st, teacher, mb)
        ctx = Context(
          step=st.step,
          epoch=epoch,
          key=jax.random.fold_in(key, i),
          accum=a,
          mask_total=mask_total,
          labelled_total=labelled_total,
          pair_total=pair_total,
        )
        (_, (rests, mstates, metrics)), g = grad_fn(trainable, st, t_outs, mb, ctx)
        st = st.replace(model_state=rests, method_state=mstates)
        gsum = jax.tree.map(jnp.add, gsum, g)
        msum = jax.tree.map(jnp.add, msum, metrics)
        return (st, gsum, msum), None

      zeros_g = jax.tree.map(jnp.zeros_like, trainable)
      first = jax.tree.map(lambda x: x[0], micro)
      metric_shape = jax.eval_shape(
        lambda: grad_fn(
          trainable, state, teacher_outputs(spec, state, teacher, first), first, Context(state.step, epoch, key)
        )[0][1][2]
      )
      zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape)
      (st, gsum, msum), _ = jax.lax.scan(body, (state, zeros_g, zeros_m), (micro, jnp.arange(a)))
      rests, mstates = st.model_state, st.method_state
      grads = jax.tree.map(lambda g: g / a, gsum)
      metrics = jax.tree.map(lambda m: m / a, msum)

    updates, opt_state = spec.tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, _skip_unreached(updates, grads))
    metrics["train/grad_norm"] = _global_norm(grads)
    ema = state.ema
    if spec.mode == "self_ema":
      d = spec.ema_decay
      ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema[0], trainable["students"][0])
      ema = (ema_params, rests[0])
    new_state = state.replace(
      step=state.step + 1,
      params=trainable["students"],
      adapter_params=trainable["adapters"],
      opt_state=opt_state,
      model_state=rests,
      method_state=mstates,
      ema=ema,
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
  is the teacher (offline modes), the EMA teacher (``self_ema``) or the
  second student (``dml``).
  """

  def eval_step(state: TrainState, teacher: TeacherState, batch: Batch):
    x = B.inputs(batch)
    sd = spec.students[0]
    s_out, _ = apply_model(sd.graphdef, state.params[0], state.model_state[0], x, train=False, taps=sd.taps)
    t_out = None
    if spec.mode == "dml":
      s1 = spec.students[1]
      t_out, _ = apply_model(s1.graphdef, state.params[1], state.model_state[1], x, train=False, taps=s1.taps)
    elif spec.mode != "teacher":
      ahead = {B.TEACHER_OUTPUTS: batch[B.TEACHER_OUTPUTS]} if B.TEACHER_OUTPUTS in batch else {}
      outs = teacher_outputs(spec, state, teacher, {B.INPUTS: x, **ahead})
      if outs:  # none for a student trained alone (method ce without a teacher checkpoint)
        t_out = _average_outputs(outs, _weights(spec, len(outs))) if len(outs) > 1 else outs[0]
    labels = batch[B.LABEL]
    sums = stats_fn(s_out.logits, None if t_out is None else t_out.logits, labels, eval_mask(batch.get(B.MASK), labels))
    if "pooled" not in s_out.features and s_out.logits.ndim > 2:  # tokens: no one vector per example for CKA
      return sums, None, None
    s_pool = s_out.features.get("pooled", s_out.logits)
    t_pool = None if t_out is None else t_out.features.get("pooled", t_out.logits)
    return sums, s_pool, t_pool

  return eval_step
