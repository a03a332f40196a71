"""Teacher outputs ↔ stored arrays: dense logits, or the top-k log-probabilities and their ids."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdjax.data.cache.format import CacheSpec
from kdjax.errors import ConfigError


def encode(logits: np.ndarray, spec: CacheSpec, index_dtype: str = "int32") -> dict[str, np.ndarray]:
  """``(n, K, …, C)`` float32 logits → stored arrays (top-k: log-probs at T = 1, by decreasing probability)."""
  if spec.top_k == 0:
    return {"logits": logits.astype(spec.value_dtype)}
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  k = min(spec.top_k, logits.shape[-1])
  idx = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
  return {
    "topk_logp": np.take_along_axis(logp, idx, -1).astype(spec.value_dtype),
    "topk_idx": idx.astype(index_dtype),
  }


def encode_prediction(
  pred: Any, spec: CacheSpec, out_shape: tuple[int, ...], index_dtype: str = "int32"
) -> dict[str, np.ndarray]:
  """One predicted batch → stored arrays with a view axis of 1: ``(n, 1, …)``.

  ``pred`` is dense logits ``(n, *out_shape)``, or — for top-k storage, when
  the top-k is taken on the device (:func:`kdjax.losses.teacher_topk`) — a
  pair ``(log-probs, ids)`` of shape ``(n, *out_shape[:-1], k)``.
  """
  if isinstance(pred, (tuple, list)):
    if spec.top_k == 0:
      raise ConfigError("predict returned a top-k pair but cache.top_k=0 stores full logits")
    lp, idx = (np.asarray(a) for a in pred)
    k = min(spec.top_k, out_shape[-1])
    if lp.shape[1:] != (*out_shape[:-1], k) or idx.shape != lp.shape:
      raise ConfigError(f"teacher top-k outputs {lp.shape}/{idx.shape} per batch; expected (n, {(*out_shape[:-1], k)})")
    return {"topk_logp": lp[:, None].astype(spec.value_dtype), "topk_idx": idx[:, None].astype(index_dtype)}
  z = np.asarray(pred, np.float32)
  if z.shape[1:] != out_shape:
    raise ConfigError(
      f"teacher outputs {z.shape[1:]} per example, the cache expects {out_shape} (num_classes / output_shape)"
    )
  return encode(z[:, None], spec, index_dtype)


def dense_logits(topk_logp: np.ndarray, topk_idx: np.ndarray, num_classes: int) -> np.ndarray:
  """Top-k log-probabilities ``(…, k)`` and their ids → float32 logits ``(…, C)``.

  The tail mass is spread evenly over the other classes (NumPy twin of
  :func:`kdjax.losses.topk_to_logits`).
  """
  logp = topk_logp.astype(np.float64)
  k = logp.shape[-1]
  if k >= num_classes:
    dense = np.empty((*logp.shape[:-1], num_classes))
  else:
    tail = np.clip(1.0 - np.exp(logp).sum(-1), 1e-12, None) / (num_classes - k)
    dense = np.repeat(np.log(tail)[..., None], num_classes, axis=-1)
  np.put_along_axis(dense, topk_idx, logp, axis=-1)
  return dense.astype(np.float32)
