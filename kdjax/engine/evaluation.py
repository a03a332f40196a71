"""Evaluation, exact match and export of a distilled student: functions over a Distiller and its state.

    metrics = kdjax.evaluate(distiller, state, eval_batches)      # accuracy, agreement, KL, ECE, CKA
    em = kdjax.exact_match(distiller, state, token_batches)         # greedy answers, KV cache
    evaluation.export(distiller, state, "exported/")          # kdjax.engine.evaluation
    evaluation.export(distiller, state, "hf/", format="hf")   # a Hugging Face checkpoint (decoder students)
    student = kdjax.student_model(distiller, state)                # an NNX module with the trained weights

``Distiller.evaluate``, ``.exact_match`` and ``.export`` call these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import batch as batch_keys
from kdjax.engine.state import TrainState, merge_model
from kdjax.engine.step import make_eval_step
from kdjax.errors import ConfigError
from kdjax.parallel import sharding, xla_cpu

CKA_EXAMPLES = 1024


def _eval_fn(distiller):
  from kdjax import report

  def make():
    spec = distiller.eval_spec()
    compiler_options = xla_cpu.compiler_options(distiller.xla_cpu_conv)
    return jax.jit(make_eval_step(spec, report.eval_batch_stats), compiler_options=compiler_options)

  return distiller.compiled("eval", make)


def _eval_batch(distiller, batch: Mapping[str, Any]) -> dict:
  """One evaluation batch as global arrays (with a mask; with the teacher's outputs under a split placement)."""
  b = {k: batch[k] for k in (batch_keys.INPUTS, batch_keys.LABEL, batch_keys.MASK) if k in batch}
  if batch_keys.MASK not in b:
    b[batch_keys.MASK] = np.ones(np.shape(b[batch_keys.LABEL]), bool)
  gb = distiller.global_batch(b)
  if distiller.run_ahead is not None and distiller.eval_spec().source.defs:
    gb[batch_keys.TEACHER_OUTPUTS] = distiller.run_ahead.outputs(b, features=True)
  return gb


def evaluate(distiller, state: TrainState, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Diagnostics over ``batches`` (this process's rows of each, with a ``mask``): student and teacher
  accuracy, agreement, KL(teacher‖student), ECE, and linear CKA of pooled features (first 1,024 examples)."""
  from kdjax import report

  sums: dict[str, Any] = {}
  s_pool, t_pool, n_pool = [], [], 0
  for batch in batches:
    gb = _eval_batch(distiller, batch)
    out, sp, tp = _eval_fn(distiller)(state, distiller.step_teacher(), gb)
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + np.asarray(sharding.to_host(v), np.float64)
    if n_pool < CKA_EXAMPLES and tp is not None:
      m = sharding.to_host(gb[batch_keys.MASK]).reshape(-1)
      s_pool.append(sharding.to_host(sp).reshape(len(m), -1)[m])
      t_pool.append(sharding.to_host(tp).reshape(len(m), -1)[m])
      n_pool += int(m.sum())
  res = {k: float(v) for k, v in report.finalize_eval_stats(sums).items()}
  if s_pool:
    x = np.concatenate(s_pool)[:CKA_EXAMPLES]
    y = np.concatenate(t_pool)[:CKA_EXAMPLES]
    res["cka"] = float(report.linear_cka(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  return res


def student_model(distiller, state: TrainState, index: int = 0) -> nnx.Module:
  """Student ``index`` as an NNX module holding its weights (and BatchNorm statistics) in ``state``:
  the trained model, to save, export or run in code of your own."""
  d = distiller.spec.students[index]
  return merge_model(d.graphdef, state.params[index], state.model_state[index], d.rngs)


def teacher_model(distiller, index: int = 0) -> nnx.Module:
  """Frozen teacher ``index`` as an NNX module holding its (placed) weights."""
  d, t = distiller.spec.teachers[index], distiller.teacher_state
  return merge_model(d.graphdef, t.params[index], t.model_state[index], d.rngs)


def _generating_models(distiller, state: TrainState, teacher: bool) -> dict[str, nnx.Module]:
  """The models whose greedy answers are scored: the (first) student, and the teacher when asked."""
  models = {"exact_match": student_model(distiller, state)}
  teachers = distiller.eval_spec().teachers  # none for a teacher of another tokenizer: its prompts differ
  if teacher and teachers:
    models["teacher_exact_match"] = teacher_model(distiller)
  return {k: m for k, m in models.items() if hasattr(m, "decode") and hasattr(m, "init_cache")}


def _generator(distiller, name: str, model: nnx.Module, max_new_tokens: int, mesh):
  """One compiled greedy :class:`~kdjax.generate.Generator` per (model role, answer length)."""
  from kdjax import generate

  sampling = generate.Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
  return distiller.compiled((name, max_new_tokens), lambda: generate.Generator(model, sampling, mesh=mesh))


def exact_match(
  distiller, state: TrainState, batches: Iterable[Mapping[str, Any]], *, teacher: bool = False
) -> dict[str, float]:
  """Exact match of greedy-generated answers over token ``batches`` (``inputs``, ``targets`` with −1 on
  prompt positions, ``mask``), the generation-time counterpart of teacher-forced token accuracy.

  Each row's prompt is its inputs up to its first scored target; the (first)
  student continues it with the KV cache (:class:`kdjax.generate.Generator`,
  temperature 0) for as many tokens as the longest answer, and the row
  counts when every answer token (the stop token included) is reproduced.
  Returns ``{"exact_match": fraction}`` (plus ``teacher_exact_match`` with
  ``teacher=True`` and a teacher that generates), or ``{}`` when the student
  cannot generate (no ``decode``).
  """
  from kdjax import generate

  models = _generating_models(distiller, state, teacher)
  if not models:
    return {}
  hits, total = dict.fromkeys(models, 0.0), 0.0
  for b in batches:
    prompts, lengths, answers = generate.prompts_and_answers(b[batch_keys.INPUTS], b[batch_keys.LABEL])
    mask = np.asarray(b.get(batch_keys.MASK, np.ones(len(prompts), bool)), bool).reshape(len(prompts), -1).all(1)
    if answers.shape[1] == 0:
      continue
    rows = {"prompts": prompts, "lengths": lengths, "answers": answers, "mask": mask}
    gb = distiller.global_batch(rows)
    total += float(sharding.to_host(jnp.sum(gb[batch_keys.MASK])))
    for name, model in models.items():
      on_teacher = name.startswith("teacher") and distiller.run_ahead is not None  # on the teacher's sub-mesh
      gen = _generator(
        distiller, name, model, answers.shape[1], distiller.teacher_mesh if on_teacher else distiller.mesh
      )
      if on_teacher:
        gb = sharding.shard_batch(rows, distiller.teacher_mesh)
      out = gen(gb["prompts"], gb["lengths"], jax.random.key(0), state=nnx.state(model))
      hit = generate.answers_match(out.tokens, gb["answers"]) & gb[batch_keys.MASK]
      hits[name] += float(sharding.to_host(jnp.sum(hit)))
  return {k: (v / total if total else float("nan")) for k, v in hits.items()}


def export(
  distiller,
  state: TrainState,
  directory,
  *,
  model_name: str | None = None,
  dtype: str = "float32",
  extra: dict | None = None,
  format: str = "kdjax",
):
  """Write the (first) student: ``format="kdjax"``: its params and BatchNorm statistics (``kdjax.export.load``
  reads them; a decoder's record also holds what ``kdjax export --format hf`` needs later); ``format="hf"``:
  a Hugging Face checkpoint of a decoder student (:func:`kdjax.models.hf_export.to_pretrained`; ``dtype``
  float32 or bfloat16), which ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

  Every process must call it (parameters split across processes are
  gathered); process 0 writes. Returns the params file's path.
  """
  from kdjax import checkpoint
  from kdjax.models import hf_export

  if format not in _FORMATS:
    raise ConfigError(f"export format={format!r}: must be one of {list(_FORMATS)}")
  if _FORMATS[format]:
    return hf_export.to_pretrained(student_model(distiller, state), directory, dtype=dtype) / "model.safetensors"
  info = distiller.spec.students[0].info
  described = hf_export.describe(student_model(distiller, state))
  return checkpoint.export_model(
    directory,
    model_name=model_name or info.name,
    num_classes=info.num_classes,
    dtype=dtype,
    params=state.params[0],
    model_state=checkpoint.batch_stats(state.model_state[0]),
    extra={**described, **(extra or {})},
  )


_FORMATS = {"kdjax": False, "hf": True}  # export format → whether it is a Hugging Face checkpoint


def export_hf(model_or_distiller, directory, state: TrainState | None = None, *, dtype: str = "float32", source=None):
  """A Hugging Face checkpoint of a decoder: ``export_hf(model, dir)`` for an NNX
  :class:`~kdjax.models.Decoder`, ``export_hf(distiller, dir, state)`` for a distilled (first) student.
  ``config.json``, ``model.safetensors`` (``dtype`` float32 or bfloat16) and the tokenizer files of
  ``source`` (default: the checkpoint the model was loaded or cut from); returns ``directory``."""
  from kdjax.models import hf_export

  model = model_or_distiller if state is None else student_model(model_or_distiller, state)
  return hf_export.to_pretrained(model, directory, dtype=dtype, source=source)


# ------------------------------------------------------------------ a language whose distribution is known
LOG_FLOOR = float(np.log(1e-9))  # log p_true of a token the language never emits (<pad>, <bos>): finite, counted
DISTINCT_N = 4
TRUTH_METRICS = (
  "true_student_kl",
  "true_teacher_kl",
  "true_entropy",
  "true_distinct_4",
  "sample_true_nll",
  "sample_reverse_kl",
  "sample_entropy",
  "sample_distinct_4",
  "greedy_true_nll",
  "greedy_distinct_4",
)


def true_kl_sum(true_logp: jax.Array, logits: jax.Array, mask: jax.Array) -> jax.Array:
  """``Σ_{masked positions} KL(true ‖ model) = Σ_v p(v) (log p(v) − log q(v))`` (``0 · log 0 = 0``).

  Args: ``true_logp`` ``(B, L, V)`` the true next-token log-probabilities (``−inf`` allowed), ``logits``
  ``(B, L, V)`` the model's, ``mask`` ``(B, L)`` the positions that count. Returns a float32 scalar (nats).
  """
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(true_logp)
  per = jnp.sum(jnp.where(p > 0, p * (true_logp - logq), 0.0), axis=-1)
  return jnp.sum(per * mask)


def continuation_true_logprobs(truth, prompts: jax.Array, lengths: jax.Array, tokens: jax.Array) -> jax.Array:
  """``(B, N)`` ``log p_true(y_i | x, y_{<i})`` of continuations ``tokens`` ``(B, N)`` of right-padded
  ``prompts`` ``(B, P)`` of ``lengths`` ``(B,)`` (the forward algorithm over prompt + continuation);
  floored at :data:`LOG_FLOOR`."""
  from kdjax.data.builders import hmm

  b, n = tokens.shape
  seq = jnp.concatenate([prompts, jnp.zeros((b, n), prompts.dtype)], axis=1)
  pos = lengths[:, None] + jnp.arange(n)[None]  # where continuation token i sits
  seq = seq.at[jnp.arange(b)[:, None], pos].set(tokens)
  lp = hmm.next_token_logprobs(truth, seq)  # (B, P + N, V): the token after each position
  lp = jnp.take_along_axis(lp, (pos - 1)[..., None], axis=1)  # (B, N, V): the distribution of token i
  return jnp.maximum(jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0], LOG_FLOOR)


def distinct_n(tokens: np.ndarray, n: int = DISTINCT_N) -> float:
  """Distinct n-grams over all rows ``(B, N)`` divided by all n-grams (Li et al. 2016, "distinct-n")."""
  t = np.asarray(tokens)
  if t.shape[1] < n:
    return float("nan")
  grams = np.stack([t[:, i : t.shape[1] - n + 1 + i] for i in range(n)], axis=-1).reshape(-1, n)
  return float(len(np.unique(grams, axis=0)) / len(grams)) if len(grams) else float("nan")


def _truth_step(distiller, truth):
  """Jitted ``(state, teacher, batch) -> sums``: KL(true ‖ student), KL(true ‖ teacher) and −log p_true of the
  held-out responses, summed over scored tokens (teacher forced)."""
  from kdjax.data.builders import hmm
  from kdjax.engine.state import apply_model
  from kdjax.engine.step import eval_mask

  spec = distiller.eval_spec()

  def step(state, teacher, batch):
    x, labels = batch[batch_keys.INPUTS], batch[batch_keys.LABEL]
    d = spec.students[0]
    s_out, _ = apply_model(d.graphdef, state.params[0], state.model_state[0], x, train=False, taps=d.taps, rngs=d.rngs)
    mask = eval_mask(batch.get(batch_keys.MASK), labels).astype(jnp.float32)
    true_lp = hmm.next_token_logprobs(truth, x)
    nll = -jnp.take_along_axis(true_lp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    out = {"count": jnp.sum(mask), "student": true_kl_sum(true_lp, s_out.logits, mask)}
    out["nll"] = jnp.sum(jnp.where(mask > 0, nll, 0.0))
    t_out = spec.source.reference(spec, state, teacher, {batch_keys.INPUTS: x})
    if t_out is not None:
      out["teacher"] = true_kl_sum(true_lp, t_out.logits, mask)
    return out

  return distiller.compiled(("truth", id(truth)), lambda: jax.jit(step))


def _sample_sums(distiller, state, truth, rows: dict, temperature: float) -> tuple[dict, np.ndarray]:
  """The student's continuations of ``rows``' prompts at ``temperature`` (0: greedy): summed log-probabilities
  under the truth and under the student, token count; and the tokens of the rows that count (host)."""
  from kdjax import generate

  n = rows["answers"].shape[1]
  gb = distiller.global_batch(rows)
  model = student_model(distiller, state)

  def make():
    gen = generate.Generator(model, generate.Sampling(max_new_tokens=n, temperature=temperature), mesh=distiller.mesh)
    score = jax.jit(lambda p, l, t, m: jnp.sum(continuation_true_logprobs(truth, p, l, t) * m[:, None]))
    return gen, score

  gen, score = distiller.compiled(("truth_samples", id(truth), n, temperature), make)
  out = gen(gb["prompts"], gb["lengths"], jax.random.key(1), state=nnx.state(model))
  m = gb[batch_keys.MASK]
  sums = {
    "true_lp": float(sharding.to_host(score(gb["prompts"], gb["lengths"], out.tokens, m.astype(jnp.float32)))),
    "model_lp": float(sharding.to_host(jnp.sum(out.logprobs * m[:, None]))),
    "tokens": float(sharding.to_host(jnp.sum(m))) * n,
  }
  keep = np.asarray(sharding.to_host(m), bool)
  return sums, np.asarray(sharding.to_host(out.tokens))[keep]


def true_distribution(
  distiller, state: TrainState, batches: Iterable[Mapping[str, Any]], truth, *, teacher: bool = False
) -> dict[str, float]:
  """Exact metrics of the (first) student against a language whose distribution is known (``truth``, a
  :class:`kdjax.data.builders.hmm.Hmm`), over held-out token ``batches`` (prompts, responses scored).

  Teacher forced, per response token: ``true_student_kl`` = KL(true ‖ student) (and ``true_teacher_kl``
  with ``teacher=True``), ``true_entropy`` = −log p_true of the held-out responses (the language's
  entropy rate: the floor of any model's NLL). On the student's own continuations of the prompts at
  temperature 1: ``sample_true_nll`` = −log p_true per token, ``sample_reverse_kl`` = the sequence-level
  KL(student ‖ true) = E_{y∼q}[log q(y|x) − log p(y|x)] estimated from the samples, per response token,
  ``sample_entropy`` = −log q per token (the student's entropy rate); greedy: ``greedy_true_nll``.
  Mode collapse shows in ``sample_distinct_4`` / ``greedy_distinct_4`` (distinct 4-grams, beside the
  held-out responses' ``true_distinct_4``). Per-token work (the forward algorithm, the models, sampling)
  runs in JAX on the mesh; sums are added on the host.
  """
  from kdjax import generate

  step, tf = _truth_step(distiller, truth), {}
  samples = {t: ({}, []) for t in (1.0, 0.0)}
  held_out = []
  for b in batches:
    gb = _eval_batch(distiller, b)
    for k, v in step(state, distiller.step_teacher(), gb).items():
      tf[k] = tf.get(k, 0.0) + float(sharding.to_host(v))
    prompts, lengths, answers = generate.prompts_and_answers(b[batch_keys.INPUTS], b[batch_keys.LABEL])
    mask = np.asarray(b.get(batch_keys.MASK, np.ones(len(prompts), bool)), bool).reshape(len(prompts), -1).all(1)
    held_out.append(answers[mask])
    rows = {"prompts": prompts, "lengths": lengths, "answers": answers, "mask": mask}
    for t, (sums, toks) in samples.items():
      s, tk = _sample_sums(distiller, state, truth, rows, t)
      for k, v in s.items():
        sums[k] = sums.get(k, 0.0) + v
      toks.append(tk)
  return _truth_results(tf, samples, held_out, teacher)


def _truth_results(tf: dict, samples: dict, held_out: list, teacher: bool) -> dict[str, float]:
  """The sums of :func:`true_distribution` as per-token figures."""
  div = lambda a, n: a / n if n else float("nan")  # noqa: E731
  (s1, toks1), (s0, toks0) = samples[1.0], samples[0.0]
  res = {
    "true_student_kl": div(tf.get("student", 0.0), tf.get("count", 0.0)),
    "true_entropy": div(tf.get("nll", 0.0), tf.get("count", 0.0)),
    "true_distinct_4": distinct_n(np.concatenate(held_out)),
    "sample_true_nll": div(-s1["true_lp"], s1["tokens"]),
    "sample_reverse_kl": div(s1["model_lp"] - s1["true_lp"], s1["tokens"]),
    "sample_entropy": div(-s1["model_lp"], s1["tokens"]),
    "sample_distinct_4": distinct_n(np.concatenate(toks1)),
    "greedy_true_nll": div(-s0["true_lp"], s0["tokens"]),
    "greedy_distinct_4": distinct_n(np.concatenate(toks0)),
  }
  if teacher and "teacher" in tf:
    res["true_teacher_kl"] = div(tf["teacher"], tf["count"])
  return res
