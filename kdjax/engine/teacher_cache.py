"""``kdjax cache``: run a config's teacher over its training set into a teacher-output cache.

Lives in the engine, not in ``kdjax.data.cache``, because it loads and runs
a model (data never imports the engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from kdjax.config import Experiment
from kdjax.parallel import xla_cpu
from kdjax.engine.experiment import load_teacher
from kdjax.engine.state import apply_model, split_model


def build_teacher_cache(
  cfg: Experiment, directory: str | Path, spec: Any = None, *, max_shards: int | None = None, progress: Any = None
) -> dict:
  """``kdjax cache``: the teacher of ``cfg`` over its training set, K views each.

  ``spec`` is a :class:`kdjax.data.cache.CacheSpec` (default: one view, float16).

  Loads ``cfg.teacher`` from ``cfg.teacher.checkpoint`` (its content hash keys
  the cache) and runs it jitted in eval mode, one fixed batch shape.
  """
  from kdjax.data import cache
  from kdjax.data.tfds import get_info

  spec = cache.CacheSpec() if spec is None else spec
  view = cache.experiment_view(cfg)
  cache.check_view(view)
  num_classes = int(get_info(cfg.data.name, data_dir=cfg.data.data_dir).num_classes)
  model, teacher_hash = load_teacher(cfg.teacher, num_classes)
  graphdef, params, rest = split_model(model)
  ds = cache.training_set(cfg)
  first, _, first_id = ds.take(np.arange(1))
  example = cache.view_images(view, first, first_id, 0, 0)
  return cache.build_cache(
    directory,
    ds,
    teacher_predict_fn(graphdef, params, rest, spec.top_k, cfg.run.xla_cpu_conv),
    teacher_hash=teacher_hash,
    num_classes=num_classes,
    view=view,
    spec=spec,
    output_shape=_output_shape(graphdef, params, rest, example),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    max_shards=max_shards,
    progress=progress,
  )


def teacher_predict_fn(graphdef, params, rest, top_k: int = 0, xla_cpu_conv: str = "eigen"):
  """The jitted eval-mode teacher forward a cache build calls on each batch.

  ``top_k = 0``: ``x → logits``. ``top_k > 0``: ``x → (log-probs, ids)`` of
  the k most likely classes / tokens at T = 1, selected on the device
  (:func:`kdjax.losses.teacher_topk`), so a language model's ``(B, L, V)``
  logits never travel to the host. Compiled with the online step's CPU
  convolution kernels, so a float32 cache holds the online teacher's logits
  up to XLA:CPU's shape- and batch-position-dependent rounding (a few ulp on
  CPUs without AVX-512, none on the AVX-512 machine measured).
  """
  from kdjax.losses import teacher_topk

  def fwd(p, r, x):
    z = apply_model(graphdef, p, r, x, train=False)[0].logits
    if top_k:
      return teacher_topk(z, min(top_k, z.shape[-1]))
    return z

  jitted = jax.jit(fwd, compiler_options=xla_cpu.compiler_options(xla_cpu_conv))
  return lambda x: jax.device_get(jitted(params, rest, x))


def _output_shape(graphdef, params, rest, x: np.ndarray) -> tuple[int, ...]:
  """The teacher's output per example for inputs like ``x`` (``(C,)``, or ``(L, V)`` for a language model)."""
  x_abs = jax.ShapeDtypeStruct(x.shape, x.dtype)
  out = jax.eval_shape(lambda p, r, x: apply_model(graphdef, p, r, x, train=False)[0].logits, params, rest, x_abs)
  return tuple(out.shape[1:])
