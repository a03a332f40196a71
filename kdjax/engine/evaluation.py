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
