"""Standalone inference for an exported model: :func:`load` + :func:`predict`.

A finished run writes ``WORKDIR/export/model.msgpack`` (parameters and
BatchNorm statistics as plain arrays) and ``model.json`` (architecture, class
count, dtype, provenance); ``kdjax export WORKDIR --out DIR`` copies them.
Nothing else is needed to predict::

    params = kdjax.export.load("DIR")          # or a workdir, or the .msgpack
    logits = kdjax.export.predict(params, x)   # (N, C)

``x`` is preprocessed as by the engine's evaluation
(:func:`kdjax.data.views.normalize`; identity for the embedded datasets with
``data.view="none"``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import checkpoint as ckpt
from kdjax.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load(path: str | Path) -> dict[str, Any]:
  """An exported model as a plain dict.

  Args:
    path: an export directory, a run workdir or a ``model.msgpack`` file.

  Returns:
    ``{"model", "num_classes", "dtype", "params", "model_state", "hash"}``:
    the registry name, class count and compute dtype; ``params`` and
    ``model_state`` (BatchNorm statistics) as nested dicts of NumPy arrays;
    ``hash`` the file's content hash (what a distillation run records as its
    ``teacher_hash``).
  """
  meta, payload, digest = ckpt.load_export(path, what="exported model")
  missing = [k for k in ("model", "num_classes") if k not in meta]
  if missing:
    raise ConfigError(
      f"exported model {str(path)!r} has no {ckpt.EXPORT_META} entries {missing}; re-export it with "
      f"`kdjax export WORKDIR --out DIR`"
    )
  dtype = meta.get("dtype", "float32")
  if dtype not in _DTYPES:
    raise ConfigError(f"exported model {str(path)!r}: unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
  return {
    "model": meta["model"],
    "num_classes": int(meta["num_classes"]),
    "dtype": dtype,
    "params": payload["params"],
    "model_state": payload.get("model_state", {}),
    "hash": digest,
  }


@functools.lru_cache(maxsize=8)
def _template(model: str, num_classes: int, dtype: str):
  """``(params, rest, jitted forward)`` of a freshly created ``model``."""
  from kdjax import models

  m = models.create(model, num_classes=num_classes, rngs=nnx.Rngs(0), dtype=_DTYPES[dtype])
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def forward(p, r, x):
    return nnx.merge(graphdef, p, r)(x, train=False).logits

  # The engine's CPU convolution kernels (kdjax.parallel.xla_cpu), so exported
  # predictions equal the engine's evaluation, not just to float32 rounding.
  from kdjax.parallel import xla_cpu

  return params, rest, jax.jit(forward, compiler_options=xla_cpu.compiler_options("eigen"))


def _filled(params: dict[str, Any]) -> tuple[nnx.State, nnx.State]:
  p_tmpl, r_tmpl, _ = _template(params["model"], int(params["num_classes"]), params["dtype"])
  p, r = jax.tree.map(lambda x: x, p_tmpl), jax.tree.map(lambda x: x, r_tmpl)  # fresh containers
  ckpt._check_same_shapes(params["params"], ckpt.pure_dict(p), "params")
  nnx.replace_by_pure_dict(p, jax.tree.map(jnp.asarray, params["params"]))
  nnx.replace_by_pure_dict(r, ckpt._merge_known(ckpt.pure_dict(r), params.get("model_state", {})))
  return p, r


def predict(params: dict[str, Any], images: Any, *, batch_size: int = 1024) -> np.ndarray:
  """Logits of the exported model (eval mode: BatchNorm uses its statistics).

  Args:
    params: what :func:`load` returns.
    images: ``(N, *input_shape)``, preprocessed like the engine's eval.
    batch_size: examples per forward pass (the last one may be smaller).

  Returns:
    ``(N, num_classes)`` float32 logits.
  """
  if not isinstance(params, dict) or not {"model", "num_classes", "dtype", "params"} <= set(params):
    raise TypeError("predict(params, images): params must be what kdjax.export.load(path) returns")
  if batch_size <= 0:
    raise ConfigError(f"batch_size={batch_size}: must be positive")
  images = np.asarray(images)
  p, r = _filled(params)
  forward = _template(params["model"], int(params["num_classes"]), params["dtype"])[2]
  out = [
    np.asarray(forward(p, r, jnp.asarray(images[i : i + batch_size])), np.float32)
    for i in range(0, len(images), batch_size)
  ]
  return np.concatenate(out) if out else np.zeros((0, int(params["num_classes"])), np.float32)


def to_hf(path: str | Path, directory: str | Path, *, dtype: str = "float32") -> Path:
  """An exported decoder (a run workdir, its ``export/`` or the ``.msgpack``) rewritten as a Hugging Face
  checkpoint in ``directory`` (:func:`kdjax.models.hf_export.to_pretrained`: ``config.json``,
  ``model.safetensors`` as ``dtype``, the tokenizer files of the checkpoint it was cut from)."""
  from kdjax.models import hf_export
  from kdjax.models.decoder import Decoder

  meta, payload, _ = ckpt.load_export(path, what="exported model")
  if "decoder" not in meta:
    raise ConfigError(
      f"exported model {str(path)!r} ({meta.get('model', '?')}) is not a decoder language model; "
      f"--format hf writes Llama/Qwen/Gemma/GPT-2-family students (student.name hf)"
    )
  cfg = hf_export.decoder_config(meta["decoder"])
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  shapes = jax.tree.map(lambda v: np.broadcast_to(np.zeros((), np.uint8), v.shape), ckpt.pure_dict(params))
  ckpt._check_same_shapes(payload["params"], shapes, "params")
  nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, payload["params"]))
  source = meta.get("hf_source")
  source = source if source and (Path(source) / "config.json").is_file() else None
  return hf_export.to_pretrained(nnx.merge(graphdef, params), directory, dtype=dtype, source=source)
