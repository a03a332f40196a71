"""The cache reader: a finished cache memory-mapped, each shard file checked against its digest on first use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np

from kdjax import batch as batch_keys
from kdjax.data.cache import packed
from kdjax.data.cache.encode import dense_logits
from kdjax.data.cache.format import (
  DIGEST_FILE,
  META_FILE,
  check_meta,
  file_digest,
  shard_name,
  view_from_fingerprint,
)
from kdjax.data.views import ViewConfig
from kdjax.errors import ConfigError


def verify_file(path: Path, digests: Mapping[str, str]) -> None:
  """``ValueError`` naming the shard when ``path``'s bytes differ from the digest written with it."""
  if digests.get(path.name) != file_digest(path):
    shard = path.parent
    raise ConfigError(
      f"data.teacher_cache: shard {shard.name} is damaged ({path.name} does not match its "
      f"{DIGEST_FILE}); delete {str(shard)!r} and re-run the same `kdjax cache` command to rebuild it"
    )


def read_shard(path: str | Path, mmap: bool = True) -> dict[str, np.ndarray]:
  """The arrays of one shard directory (memory-mapped by default)."""
  return {f.stem: np.load(f, mmap_mode="r" if mmap else None) for f in sorted(Path(path).glob("*.npy"))}


class ShardedRows:
  """One stored array across shards, indexed by global row: ``take(rows, views)``.

  Shards stay memory-mapped, so reading a batch touches only its rows.
  ``np.asarray`` materialises the whole array (tests, small caches). With
  ``files`` (each part's path and its shard's digests) a shard's file is
  checked against its digest the first time any of its rows is read.
  """

  def __init__(self, parts: list[np.ndarray], files: list[tuple[Path, Mapping[str, str]]] | None = None):
    self.parts = parts
    self._unverified = dict(enumerate(files)) if files else {}
    self.offsets = np.cumsum([0] + [len(p) for p in parts])
    self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
    self.dtype = parts[0].dtype
    self.nbytes = sum(p.nbytes for p in parts)

  def take(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
    """``a[rows[i], views[i]]`` for each i: ``(len(rows), *shape[2:])``."""
    rows, views = np.asarray(rows, np.int64), np.asarray(views, np.int64)
    shard = np.searchsorted(self.offsets, rows, side="right") - 1
    out = np.empty((len(rows), *self.shape[2:]), self.dtype)
    for s in np.unique(shard):
      unverified = self._unverified.pop(s, None)  # one atomic pop: a prefetch thread may read too
      if unverified is not None:
        verify_file(*unverified)
      m = shard == s
      out[m] = self.parts[s][rows[m] - self.offsets[s], views[m]]
    return out

  def __array__(self, dtype=None, copy=None):
    for s in list(self._unverified):
      verify_file(*self._unverified.pop(s))
    a = np.concatenate([np.asarray(p) for p in self.parts])
    return a if dtype is None else a.astype(dtype)


class PackedTopk:
  """A packed top-k cache's rows over all shards: :meth:`take` reads and decodes ``(rows, views)``.

  ``parts`` are each shard's memory-mapped ``topk_packed`` bytes (checked against the shard's digest the
  first time any of its rows is read); ``bounds`` and ``rowbytes`` (:class:`ShardedRows`) locate each
  example's bytes and each row in them. Decoding runs on the host, in the input pipeline
  (:func:`kdjax.data.cache.packed.unpack_rows`).
  """

  def __init__(
    self,
    parts: list[np.ndarray],
    files: list[tuple[Path, Mapping[str, str]]],
    bounds: ShardedRows,
    rowbytes: ShardedRows,
    k: int,
    step: float,
  ):
    self.parts, self.bounds, self.rowbytes, self.k, self.step = parts, bounds, rowbytes, k, step
    self._unverified = dict(enumerate(files))
    self.nbytes = sum(p.nbytes for p in parts) + bounds.nbytes + rowbytes.nbytes

  def _bytes(self, rows: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The packed bytes of each ``(rows[i], views[i])`` one after another, and where each begins: ``(B,)``."""
    span = self.bounds.take(rows, views)
    shard = np.searchsorted(self.bounds.offsets, np.asarray(rows, np.int64), side="right") - 1
    sizes = span[:, 1] - span[:, 0]
    starts = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), np.uint8)
    for i, s in enumerate(shard):
      unverified = self._unverified.pop(s, None)  # one atomic pop: a prefetch thread may read too
      if unverified is not None:
        verify_file(*unverified)
      out[starts[i] : starts[i] + sizes[i]] = self.parts[s][span[i, 0] : span[i, 1]]
    return out, starts

  def take(self, rows: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k log-probs float32 and ids int32 of each ``(rows[i], views[i])``: ``(B, …, k)`` each."""
    data, starts = self._bytes(rows, views)
    lengths = self.rowbytes.take(rows, views).astype(np.int64)
    flat = lengths.reshape(len(lengths), -1)
    row_starts = (starts[:, None] + np.cumsum(flat, -1) - flat).ravel()
    logp, ids = packed.unpack_rows(data, row_starts, self.k, self.step)
    return logp.reshape(*lengths.shape, self.k), ids.reshape(*lengths.shape, self.k)


def take_rows(a, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
  """``a[rows[i], views[i]]`` of a :class:`ShardedRows` or a plain array."""
  return a.take(rows, views) if isinstance(a, ShardedRows) else np.asarray(a)[rows, views]


def allow_open_files(n: int, spare: int = 256) -> None:
  """Raise this process's soft limit on open files to fit ``n`` memory-mapped shard files."""
  try:
    import resource
  except ImportError:  # pragma: no cover - not POSIX
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  want = n + spare
  if soft != resource.RLIM_INFINITY and soft < want:
    if hard != resource.RLIM_INFINITY and hard < want:
      raise ConfigError(
        f"teacher cache: {n} shard files to map but this process may open at most {hard} files; "
        f"rebuild with a larger --cache.shard-size (fewer shards) or raise `ulimit -n`"
      )
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class IdIndex:
  """Where each example id sits in an id array ``(N,)``: :meth:`rows` → int64 ``(B,)``."""

  def __init__(self, ids: np.ndarray):
    order = np.argsort(ids, kind="stable")
    self.sorted_ids = np.asarray(ids)[order]
    self.order = order

  def rows(self, ids: np.ndarray, owner: str) -> np.ndarray:
    """Rows of ``ids``; ``ConfigError`` naming the first id ``owner`` (e.g. "teacher cache") lacks."""
    ids = np.asarray(ids, np.int64)
    pos = np.clip(np.searchsorted(self.sorted_ids, ids), 0, len(self.sorted_ids) - 1)
    bad = self.sorted_ids[pos] != ids
    if bad.any():
      raise ConfigError(f"{owner} has no example id {int(ids[bad][0])}; was it built for this training set?")
    return self.order[pos]


def _read_meta(directory: Path) -> dict:
  meta_path = directory / META_FILE
  if not meta_path.is_file():
    raise ConfigError(
      f"data.teacher_cache {str(directory)!r} holds no {META_FILE}; build it with "
      f"`kdjax cache EXPERIMENT --teacher.checkpoint … --cache.dir {directory}`"
    )
  return json.loads(meta_path.read_text())


def _shard_paths(directory: Path, num_shards: int) -> list[Path]:
  """Every shard's directory; ``ConfigError`` when some are missing (an unfinished build)."""
  paths = [directory / shard_name(s, num_shards) for s in range(num_shards)]
  missing = [p.name for p in paths if not (p / "ids.npy").is_file()]
  if missing:
    raise ConfigError(
      f"data.teacher_cache {str(directory)!r} is incomplete ({len(missing)} of {num_shards} shards missing, e.g. "
      f"{missing[0]}); re-run the same `kdjax cache` command to finish it"
    )
  return paths


def _map_shard(directory: Path, path: Path) -> tuple[dict[str, np.ndarray], dict]:
  """One shard's memory-mapped arrays and digests, its ``ids`` verified (read whole right away)."""
  try:
    digests = json.loads((path / DIGEST_FILE).read_text())
    shard = read_shard(path)
  except (OSError, ValueError) as e:
    raise ConfigError(
      f"data.teacher_cache {str(directory)!r}: shard {path.name} is unreadable ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}); delete that shard directory and re-run "
      f"`kdjax cache` to rebuild it"
    ) from None
  verify_file(path / "ids.npy", digests)
  return shard, digests


def _map_shards(directory: Path, paths: list[Path], meta: Mapping) -> tuple[np.ndarray, dict[str, Any]]:
  """Example ids ``(N,)`` and each stored array over all shards (the others verified when first read);
  a packed cache's three arrays become one :class:`PackedTopk` (``topk``)."""
  allow_open_files(len(paths) * (len(list(paths[0].glob("*.npy"))) - 1))  # one mapping (a descriptor) per array
  parts: dict[str, list[np.ndarray]] = {}
  files: dict[str, list[tuple[Path, dict]]] = {}
  for p in paths:
    shard, digests = _map_shard(directory, p)
    for k, a in shard.items():
      parts.setdefault(k, []).append(a)
      files.setdefault(k, []).append((p / f"{k}.npy", digests))
  ids = np.concatenate([np.asarray(a) for a in parts.pop("ids")])
  packed_parts = parts.pop("topk_packed", None)
  arrays: dict[str, Any] = {k: ShardedRows(v, files[k]) for k, v in parts.items()}
  if packed_parts is not None:
    k = min(int(meta["top_k"]), int(meta["num_classes"]))
    bounds, rowbytes = arrays.pop("topk_bounds"), arrays.pop("topk_rowbytes")
    arrays["topk"] = PackedTopk(packed_parts, files["topk_packed"], bounds, rowbytes, k, float(meta["logp_step"]))
  return ids, arrays


class TeacherCache:
  """A finished cache (``open`` checks it is the right one).

  ``arrays`` maps each stored name to an array indexed ``[row, view, …]``:
  a :class:`ShardedRows` over memory-mapped shards when opened from disk,
  or plain arrays.
  """

  def __init__(self, meta: dict, ids: np.ndarray, arrays: Mapping[str, Any]):
    self.meta = meta
    self.num_views = int(meta["views"])
    self.view_seed = int(meta["view_seed"])
    self.num_classes = int(meta["num_classes"])
    self.view = view_from_fingerprint(meta["view"])
    self.index = IdIndex(ids)
    self.arrays = arrays
    self.directory: Path | None = None  # set by open(): Grain workers reopen the memory maps from it

  def __reduce__(self):
    if self.directory is None:
      return super().__reduce__()
    return (TeacherCache.open, (str(self.directory),))

  @classmethod
  def open(
    cls,
    directory: str | Path,
    *,
    teacher_hash: str | None = None,
    view: ViewConfig | None = None,
    num_examples: int | None = None,
  ) -> TeacherCache:
    """Load ``directory``; refuse it when it is for another teacher or view config.

    Raises:
      ValueError: missing/incomplete cache, or a stale one (the message names
        what differs and how to rebuild).
    """
    d = Path(directory)
    meta = _read_meta(d)
    check_meta(meta, d, teacher_hash=teacher_hash, view=view, num_examples=num_examples)
    ids, arrays = _map_shards(d, _shard_paths(d, meta["num_shards"]), meta)
    cache = cls(meta, ids, arrays)
    cache.directory = d
    return cache

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """Cache rows of example ``ids`` (ValueError for ids the cache lacks)."""
    return self.index.rows(ids, "teacher cache")

  def outputs(self, ids: np.ndarray, view_index: np.ndarray) -> dict[str, np.ndarray]:
    """The batch entries for view ``view_index[i]`` of ``ids[i]``.

    Full-logit caches: ``teacher_logits`` float32 ``(B, *output_shape)``.
    Top-k caches: ``teacher_topk_logp`` float32 and ``teacher_topk_idx``
    int32, ``(B, *output_shape[:-1], k)`` (the step turns them into what each
    term needs); packed ones decoded here.
    """
    r = self.rows(ids)
    k = np.asarray(view_index, np.int64)
    if "logits" in self.arrays:
      return {"teacher_logits": take_rows(self.arrays["logits"], r, k).astype(np.float32)}
    if "topk" in self.arrays:
      logp, idx = self.arrays["topk"].take(r, k)
      return {"teacher_topk_logp": logp, "teacher_topk_idx": idx}
    return {
      "teacher_topk_logp": take_rows(self.arrays["topk_logp"], r, k).astype(np.float32),
      "teacher_topk_idx": take_rows(self.arrays["topk_idx"], r, k).astype(np.int32),
    }

  def logits(self, ids: np.ndarray, view_index: np.ndarray) -> np.ndarray:
    """Dense float32 teacher logits ``(B, *output_shape)`` of view ``view_index[i]`` of ``ids[i]``.

    Top-k caches: the log-probabilities with the tail mass spread evenly over
    the other classes (NumPy twin of :func:`kdjax.losses.topk_to_logits`).
    """
    out = self.outputs(ids, view_index)
    if "teacher_logits" in out:
      return out[batch_keys.TEACHER_LOGITS]
    return dense_logits(out["teacher_topk_logp"], out["teacher_topk_idx"], self.num_classes)
