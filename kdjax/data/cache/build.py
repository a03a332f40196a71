"""The cache writer: the teacher over every example under K views, one shard at a time.

Each shard is written to a hidden temporary directory and renamed (atomic):
an interrupted build leaves whole shards only, and re-running it skips them.
Process ``p`` of ``P`` builds shards ``s ≡ p (mod P)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from kdjax.data import views
from kdjax.data.cache import packed
from kdjax.data.cache.draw import view_images
from kdjax.data.cache.encode import encode_prediction
from kdjax.data.cache.format import (
  DIGEST_FILE,
  META_FILE,
  CacheSpec,
  cache_meta,
  check_view,
  differing_fields,
  file_digest,
  packed_sizes,
  shard_name,
)
from kdjax.data.cache.read import read_shard
from kdjax.errors import ConfigError

DEFAULT_SPEC = CacheSpec()  # one view, float16 logits (a frozen dataclass: a safe shared default)


def _atomic_write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _atomic_save_shard(path: Path, **arrays: np.ndarray) -> None:
  """``path/NAME.npy`` for each array and their ``digest.json``, all or nothing (a renamed temporary directory)."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  for name, a in arrays.items():
    np.save(tmp / f"{name}.npy", a)
  digests = {f"{name}.npy": file_digest(tmp / f"{name}.npy") for name in arrays}
  (tmp / DIGEST_FILE).write_text(json.dumps(digests, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _remove_leftovers(path: Path) -> None:
  """Delete what an interrupted write of shard ``path`` left (its hidden temporaries)."""
  for stale in path.parent.glob(f".{path.name}.tmp*"):
    if stale.is_dir():
      shutil.rmtree(stale, ignore_errors=True)
    else:
      stale.unlink(missing_ok=True)


def _begin(directory: Path, meta: dict, spec: CacheSpec, process_index: int, provenance: dict | None = None) -> dict:
  """Write ``cache.json`` (process 0), or check the one there is the same cache: its ``meta``, resumed.

  A cache begun by an older kdjax keeps the storage fields it recorded; ``provenance`` adds entries outside
  the cache's identity.
  """
  meta = {**meta, **(provenance or {})}
  meta_path = directory / META_FILE
  if not meta_path.exists():
    if process_index == 0:
      _atomic_write_json(meta_path, meta)
    return meta
  old = json.loads(meta_path.read_text())
  for k in ("index_dtype", "bytes_per_example", "bytes_per_token"):
    if k not in old:
      meta.pop(k, None)
  meta["index_dtype"] = old.get("index_dtype", "int32" if spec.top_k else None)
  diff = differing_fields(old, meta)
  if diff:
    said = ", ".join(f"{k}: {old.get(k)!r} ≠ {meta[k]!r}" for k in diff[:3])
    raise ConfigError(
      f"teacher cache {str(directory)!r} holds a different cache ({said}); delete it or choose another cache directory"
    )
  return meta


def _full_batch(x: np.ndarray, size: int) -> np.ndarray:
  """``x`` padded to ``size`` rows by repeating its first (one compiled teacher shape)."""
  return x if len(x) == size else np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


class _ArraySink:
  """Encoded batches gathered into one array per name, ``(n, K, …)``."""

  def __init__(self, n: int, views: int):
    self.n, self.views, self.stored = n, views, {}

  def add(self, view: int, lo: int, encoded: dict[str, np.ndarray]) -> None:
    for name, a in encoded.items():
      if name not in self.stored:
        self.stored[name] = np.empty((self.n, self.views, *a.shape[1:]), a.dtype)
      self.stored[name][lo : lo + len(a), view] = a

  def arrays(self) -> dict[str, np.ndarray]:
    return self.stored


class _PackedSink:
  """Top-k batches packed as they come (:func:`kdjax.data.cache.packed.pack_rows`): ``topk_packed`` uint8
  (all rows), ``topk_rowbytes`` uint16 ``(n, K, …)`` (each row's length) and ``topk_bounds`` int64
  ``(n, K, 2)`` (each example's byte range in ``topk_packed``)."""

  def __init__(self, n: int, views: int, out_shape: tuple[int, ...]):
    self.rowbytes = np.zeros((n, views, *out_shape[:-1]), np.uint16)
    self.bounds = np.zeros((n, views, 2), np.int64)
    self.chunks: list[np.ndarray] = []
    self.cursor = 0

  def add(self, view: int, lo: int, encoded: dict[str, np.ndarray]) -> None:
    lp, idx = encoded["topk_logp"], encoded["topk_idx"]
    n, k = len(lp), lp.shape[-1]
    data, nbytes = packed.pack_rows(lp.reshape(-1, k), idx.reshape(-1, k))
    self.rowbytes[lo : lo + n, view] = nbytes.reshape(n, *self.rowbytes.shape[2:])
    per_example = nbytes.reshape(n, -1).sum(-1, dtype=np.int64)
    ends = self.cursor + np.cumsum(per_example)
    self.bounds[lo : lo + n, view] = np.stack([ends - per_example, ends], -1)
    self.chunks.append(data)
    self.cursor = int(ends[-1])

  def arrays(self) -> dict[str, np.ndarray]:
    data = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.uint8)
    return {"topk_packed": data, "topk_rowbytes": self.rowbytes, "topk_bounds": self.bounds}


def _shard_arrays(
  ds, rows: np.ndarray, predict: Callable, view: views.ViewConfig, spec: CacheSpec, meta: dict
) -> dict[str, np.ndarray]:
  """The stored arrays of examples ``rows``: ``ids`` int64 ``(n,)`` and the encoded outputs ``(n, K, …)``
  (or their packed rows).

  Encoded batch by batch, so dense ``(B, L, V)`` teacher outputs never pile up.
  """
  images, _, ids = ds.take(rows)
  out_shape, index_dtype, size = tuple(meta["output_shape"]), meta["index_dtype"] or "int32", spec.batch_size
  sink = _PackedSink(len(rows), spec.views, out_shape) if spec.packed else _ArraySink(len(rows), spec.views)
  for k in range(spec.views):
    x = view_images(view, images, ids, spec.view_seed, k)
    for lo in range(0, len(rows), size):
      n = min(size, len(rows) - lo)
      pred = predict(_full_batch(x[lo : lo + size], size))
      pred = tuple(np.asarray(a)[:n] for a in pred) if isinstance(pred, (tuple, list)) else np.asarray(pred)[:n]
      sink.add(k, lo, {name: a[:, 0] for name, a in encode_prediction(pred, spec, out_shape, index_dtype).items()})
  return {"ids": ids.astype(np.int64), **sink.arrays()}


def _record_sizes(directory: Path, meta: dict) -> dict:
  """A finished packed cache's ``cache.json`` with the bytes its shards store (measured, rewritten)."""
  n = meta["num_shards"]
  shards = [read_shard(directory / shard_name(s, n)) for s in range(n)]
  meta = {**meta, **packed_sizes(shards, meta)}
  _atomic_write_json(directory / META_FILE, meta)
  return meta


def build_cache(
  directory: str | Path,
  ds,
  predict: Callable[[np.ndarray], Any],
  *,
  teacher_hash: str,
  num_classes: int,
  view: views.ViewConfig,
  spec: CacheSpec = DEFAULT_SPEC,
  output_shape: tuple[int, ...] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  max_shards: int | None = None,
  progress: Callable[[int, int], None] | None = None,
  provenance: dict | None = None,
) -> dict:
  """Compute and store the teacher's outputs for every example of ``ds`` under K views.

  Args:
    directory: cache directory (created).
    ds: the training set, in the order the loader reads it.
    predict: teacher forward on ``(spec.batch_size, *input_shape)`` views (always full batches: a jitted
      function compiles once) → ``(spec.batch_size, *output_shape)`` logits, or, with ``spec.top_k``, optionally
      the pair ``(top-k log-probs, ids)`` computed on the device (``(B, L, V)`` logits never reach the host).
    teacher_hash: content hash of the teacher checkpoint (the cache key).
    num_classes: C (the vocabulary size V for a language model).
    view: the training view config (must not mix examples).
    spec: K, storage and sharding.
    output_shape: the teacher's output per example, ``(C,)`` (default) or ``(L, V)`` for token-level caches.
    process_index / process_count: this process builds shards ≡ index mod count.
    max_shards: stop after writing this many new shards (chunked builds; an interruption leaves the same state).
    progress: called with (shards done, shards total).
    provenance: ``cache.json`` entries outside the cache's identity (where a remote teacher was served).

  Returns:
    ``{"written": new shards, "skipped": shards already present, "complete": bool, "num_shards": n}``.
  """
  check_view(view)
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  meta = _begin(d, cache_meta(ds, spec, view, teacher_hash, num_classes, output_shape), spec, process_index, provenance)
  n_shards = meta["num_shards"]
  written = skipped = 0
  for s in range(process_index, n_shards, process_count):
    path = d / shard_name(s, n_shards)
    _remove_leftovers(path)
    if path.is_dir():
      skipped += 1
      continue
    if max_shards is not None and written >= max_shards:
      break
    rows = np.arange(s * spec.shard_size, min((s + 1) * spec.shard_size, len(ds)))
    _atomic_save_shard(path, **_shard_arrays(ds, rows, predict, view, spec, meta))
    written += 1
    if progress:
      progress(written + skipped, n_shards)
  done = sum((d / shard_name(s, n_shards)).is_dir() for s in range(n_shards))
  if done == n_shards and spec.packed:
    _record_sizes(d, meta)
  return {"written": written, "skipped": skipped, "complete": done == n_shards, "num_shards": n_shards}
