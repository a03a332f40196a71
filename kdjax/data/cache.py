"""Augmentation-aware teacher-output cache: K cached views per example.

Online KD spends most of its compute in the frozen teacher (resnet32x4 is
~6× the FLOPs of a resnet8x4 student). The cache computes the teacher's
logits once, for every training example under ``K`` reproducible views, and
the training loop then feeds them as ``batch["teacher_logits"]`` — the
step skips the teacher forward (``kdjax.engine.step.teacher_outputs``).

Views. View ``k`` of example ``id`` is exactly the view the :class:`Loader`
would make at *epoch* ``k`` with seed ``view_seed``:
``augment(view, x, view_key(view_seed, id, k, STREAM_STUDENT))``. In epoch
``e`` of distillation each example draws one index
``k = randint(view_key(seed, id, e, STREAM_CACHE), K)`` (a pure function of
the run's seed, the epoch and the id), the loader regenerates that view for
the student and looks up its cached logits, so the student's input is the
very input the teacher saw ("consistent" views, Beyer et al. 2022). With
``view_mode="independent"`` the student gets a fresh view of its own.
``K = 1`` with ``view="none"`` is plain logit caching. FKD (Shen & Xing
2022) caches soft labels of several crops per image the same way; Beyer et
al. 2022 found a fixed teacher output per image overfits, which is why K > 1.

Outputs. A classifier teacher gives ``(C,)`` logits per example; a language
model gives ``(L, V)`` — one distribution per position (``view="tokens"``,
usually K = 1). The cache stores whatever the teacher outputs per example
(``output_shape`` in ``cache.json``).

Storage (``directory/``):
  ``cache.json``   what the cache is for (teacher hash, view config, K,
                   view seed, dataset, example count, output shape, storage
                   format); written first. A cache whose teacher hash or view
                   config differs from the run's is refused.
  ``shard-SSSSS-of-NNNNN/``  examples ``[s·S, (s+1)·S)`` of the training
                   set (dataset order), one ``.npy`` file per array (read
                   memory-mapped: a cache larger than host memory works, and
                   a batch reads only its own rows): ``ids`` (n,) and either ``logits``
                   (n, K, *output_shape) float16/float32, or the top-k
                   log-probabilities ``topk_logp`` (n, K, …, k) float16/float32
                   with their class / token ids ``topk_idx`` (n, K, …, k)
                   uint16 (int32 above 65,536 classes), for large class counts
                   and vocabularies (k·L numbers per example instead of V·L;
                   ``cache.json`` records ``bytes_per_token``: 256 at k = 64
                   in float16), and ``digest.json``, the
                   SHA-256 of each file: a file that does not match (a
                   damaged disk, an overwritten shard) is refused, naming the
                   shard, the first time any of its rows is read. Each shard is written to a
                   hidden temporary directory and renamed (atomic); an
                   interrupted build resumes by skipping finished shards. Process ``p`` of
                   ``P`` builds shards ``s ≡ p (mod P)``.

Top-k caches reach the step as ``teacher_topk_logp`` / ``teacher_topk_idx``
(k numbers per distribution on the host-to-device link, not V). There,
token-level terms (``forward_kl``, ``reverse_kl``, ``gkd``, ``tvd``) use the
exact top-k forms of their divergence (:func:`kdjax.losses.topk_buckets`:
the k cached tokens plus the teacher's tail mass), and class-level terms (kd,
dkd, dist) read :func:`kdjax.losses.topk_to_logits` — the top-k
log-probabilities with the tail mass spread evenly over the other classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

import numpy as np

from kdjax import batch as B
from kdjax.data import views as V
from kdjax.data.loader import Loader
from kdjax.data.tfds import ArrayDataset
from kdjax.errors import ConfigError

FORMAT_VERSION = 3  # 2: output_shape, top-k storage, .npy shard directories; 3: per-shard digest.json
DIGEST_FILE = "digest.json"
META_FILE = "cache.json"
STREAM_CACHE = 3  # view-key stream of the per-epoch choice among the K views
_STORAGE = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """How to build a cache.

  Attributes:
    views: K, the number of cached views per example (≥ 1).
    view_seed: seed of the cached views (independent of the run's seed).
    dtype: storage of logits or top-k log-probabilities, ``float16`` (half
      the bytes) or ``float32`` (bit-exact).
    top_k: 0 stores full logits; k > 0 stores the top-k log-probabilities and
      their class / token ids (for large class counts or vocabularies).
    shard_size: examples per shard file (the unit of atomic writes / resume).
    batch_size: teacher batch size while building.
  """

  views: int = 1
  view_seed: int = 0
  dtype: str = "float16"
  top_k: int = 0
  shard_size: int = 4096
  batch_size: int = 256

  def __post_init__(self):
    if self.views < 1:
      raise ConfigError(f"cache.views={self.views}: must be ≥ 1 (1 with views off = plain logit caching)")
    if self.dtype not in _STORAGE:
      raise ConfigError(f"cache.dtype={self.dtype!r}: expected one of {_STORAGE}")
    if self.top_k < 0:
      raise ConfigError(f"cache.top_k={self.top_k}: must be ≥ 0 (0 stores full logits)")
    if self.shard_size < 1 or self.batch_size < 1:
      raise ConfigError(f"cache.shard_size={self.shard_size}, cache.batch_size={self.batch_size}: must be ≥ 1")
    if self.view_seed < 0:
      raise ConfigError(f"cache.view_seed={self.view_seed}: must be ≥ 0")


def view_fingerprint(view: V.ViewConfig) -> dict:
  """The view config as JSON data (part of the cache key)."""
  return json.loads(json.dumps(dataclasses.asdict(view)))


def check_view(view: V.ViewConfig) -> None:
  if view.mixes:
    raise ConfigError(
      f"teacher cache with mixup_alpha={view.mixup_alpha}, cutmix_alpha={view.cutmix_alpha}: a mixed input pairs "
      f"two examples per batch, so its teacher output cannot be cached per example; set both to 0 or drop "
      f"--data.teacher_cache (online teacher)"
    )


def view_images(
  view: V.ViewConfig, images: np.ndarray, ids: np.ndarray, view_seed: int, view_index: np.ndarray | int
) -> np.ndarray:
  """View ``view_index`` of each example: ``(B, ...)`` raw → ``(B, ...)`` float32.

  Equal to the :class:`Loader`'s student view at epoch ``view_index`` with
  seed ``view_seed``.
  """
  return V.augment(view, images, V.view_key(view_seed, ids, view_index, V.STREAM_STUDENT))


def choose_views(seed: int, ids: np.ndarray, epoch: int, num_views: int) -> np.ndarray:
  """Which cached view each example uses in ``epoch``: int64 ``(B,)`` in [0, K)."""
  if num_views == 1:
    return np.zeros(len(ids), np.int64)
  return V.randint(V.view_key(seed, ids, epoch, STREAM_CACHE), 0, num_views)


# --------------------------------------------------------------------------- building


def _shard_name(s: int, n: int) -> str:
  return f"shard-{s:05d}-of-{n:05d}"


def _atomic_write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _atomic_save_shard(path: Path, **arrays: np.ndarray) -> None:
  """``path/NAME.npy`` for each array, all or nothing (a renamed temporary directory)."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  for name, a in arrays.items():
    np.save(tmp / f"{name}.npy", a)
  digests = {f"{name}.npy": _file_digest(tmp / f"{name}.npy") for name in arrays}
  (tmp / DIGEST_FILE).write_text(json.dumps(digests, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _file_digest(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def verify_file(path: Path, digests: Mapping[str, str]) -> None:
  """``ValueError`` naming the shard when ``path``'s bytes differ from the digest written with it."""
  if digests.get(path.name) != _file_digest(path):
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


def _allow_open_files(n: int, spare: int = 256) -> None:
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


def _take(a, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
  return a.take(rows, views) if isinstance(a, ShardedRows) else np.asarray(a)[rows, views]


def cache_meta(
  ds: ArrayDataset,
  spec: CacheSpec,
  view: V.ViewConfig,
  teacher_hash: str,
  num_classes: int,
  output_shape: tuple[int, ...] | None = None,
) -> dict:
  """The ``cache.json`` content: everything a reader must agree with."""
  n_shards = -(-len(ds) // spec.shard_size)
  shape = tuple(int(d) for d in (output_shape or (num_classes,)))
  if shape[-1] != num_classes:
    raise ConfigError(f"teacher output shape {shape} does not end in num_classes={num_classes}")
  index_dtype = index_dtype_for(num_classes)
  k = min(spec.top_k, num_classes)
  per_dist = (
    k * (np.dtype(spec.dtype).itemsize + np.dtype(index_dtype).itemsize)
    if spec.top_k
    else num_classes * np.dtype(spec.dtype).itemsize
  )
  meta = {
    "format": FORMAT_VERSION,
    "teacher_hash": teacher_hash,
    "view": view_fingerprint(view),
    "views": spec.views,
    "view_seed": spec.view_seed,
    "dtype": spec.dtype,
    "top_k": spec.top_k,
    "num_classes": int(num_classes),
    "output_shape": list(shape),
    "num_examples": len(ds),
    "dataset": f"{ds.name}/{ds.split}",
    "shard_size": spec.shard_size,
    "num_shards": n_shards,
    "index_dtype": index_dtype if spec.top_k else None,
    "bytes_per_example": int(per_dist * math.prod(shape[:-1])),
  }
  if len(shape) > 1:  # (L, V): one distribution per token
    meta["bytes_per_token"] = int(per_dist)
  return meta


def index_dtype_for(num_classes: int) -> str:
  """Storage of top-k ids: ``uint16`` while every id fits (V ≤ 65,536), else ``int32``."""
  return "uint16" if num_classes <= 65536 else "int32"


def _same_key(a: Mapping, b: Mapping) -> list[str]:
  keys = (
    "format",
    "teacher_hash",
    "view",
    "views",
    "view_seed",
    "dtype",
    "top_k",
    "num_classes",
    "output_shape",
    "num_examples",
    "dataset",
    "shard_size",
  )
  return [k for k in keys if a.get(k) != b.get(k)]


def _encode(logits: np.ndarray, spec: CacheSpec, index_dtype: str = "int32") -> dict[str, np.ndarray]:
  """(n, K, …, C) float32 logits → stored arrays (top-k: log-probs at T = 1, by decreasing probability)."""
  if spec.top_k == 0:
    return {"logits": logits.astype(spec.dtype)}
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  k = min(spec.top_k, logits.shape[-1])
  idx = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
  return {"topk_logp": np.take_along_axis(logp, idx, -1).astype(spec.dtype), "topk_idx": idx.astype(index_dtype)}


def _encode_prediction(
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
    return {"topk_logp": lp[:, None].astype(spec.dtype), "topk_idx": idx[:, None].astype(index_dtype)}
  z = np.asarray(pred, np.float32)
  if z.shape[1:] != out_shape:
    raise ConfigError(
      f"teacher outputs {z.shape[1:]} per example, the cache expects {out_shape} (num_classes / output_shape)"
    )
  return _encode(z[:, None], spec, index_dtype)


def build_cache(
  directory: str | Path,
  ds: ArrayDataset,
  predict: Callable[[np.ndarray], Any],
  *,
  teacher_hash: str,
  num_classes: int,
  view: V.ViewConfig,
  spec: CacheSpec = CacheSpec(),
  output_shape: tuple[int, ...] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  max_shards: int | None = None,
  progress: Callable[[int, int], None] | None = None,
) -> dict:
  """Compute and store the teacher's outputs for every example under K views.

  Args:
    directory: cache directory (created).
    ds: the training set, in the order the loader reads it.
    predict: teacher forward on ``(spec.batch_size, *input_shape)`` views
      (always full batches, so a jitted function compiles once) →
      ``(spec.batch_size, *output_shape)`` logits, or, with ``spec.top_k``,
      optionally the pair ``(top-k log-probs, ids)`` computed on the device
      (so ``(B, L, V)`` logits never reach the host).
    teacher_hash: content hash of the teacher checkpoint (the cache key).
    num_classes: C (the vocabulary size V for a language model).
    view: the training view config (must not mix examples).
    spec: K, storage and sharding.
    output_shape: the teacher's output per example, ``(C,)`` (default) or
      ``(L, V)`` for token-level caches.
    process_index / process_count: this process builds shards ≡ index mod count.
    max_shards: stop after writing this many new shards (chunked builds; an
      interruption leaves the same state).
    progress: called with (shards done, shards total).

  Returns:
    ``{"written": new shards, "skipped": shards already present, "complete": bool, "num_shards": n}``.
  """
  check_view(view)
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  meta = cache_meta(ds, spec, view, teacher_hash, num_classes, output_shape)
  out_shape = tuple(meta["output_shape"])
  meta_path = d / META_FILE
  if meta_path.exists():
    old = json.loads(meta_path.read_text())
    for k in (
      "index_dtype",
      "bytes_per_example",
      "bytes_per_token",
    ):  # a cache begun by an older kdjax keeps its storage
      if k not in old:
        meta.pop(k, None)
    meta["index_dtype"] = old.get("index_dtype", "int32" if spec.top_k else None)
    diff = _same_key(old, meta)
    if diff:
      raise ConfigError(
        f"teacher cache {str(d)!r} holds a different cache ({', '.join(f'{k}: {old.get(k)!r} ≠ {meta[k]!r}' for k in diff[:3])}); "
        f"delete it or choose another cache directory"
      )
  elif process_index == 0:
    _atomic_write_json(meta_path, meta)
  n_shards = meta["num_shards"]
  b = spec.batch_size
  written = skipped = 0
  for s in range(process_index, n_shards, process_count):
    path = d / _shard_name(s, n_shards)
    for stale in d.glob(f".{path.name}.tmp*"):  # left by an interrupted write of this process's shard
      if stale.is_dir():
        shutil.rmtree(stale, ignore_errors=True)
      else:
        stale.unlink(missing_ok=True)
    if path.is_dir():
      skipped += 1
      continue
    if max_shards is not None and written >= max_shards:
      break
    rows = np.arange(s * spec.shard_size, min((s + 1) * spec.shard_size, len(ds)))
    images, _, ids = ds.take(rows)
    stored: dict[str, np.ndarray] = {}  # encoded batch by batch: (n, K, …) — dense (B, L, V) never piles up
    for k in range(spec.views):
      x = view_images(view, images, ids, spec.view_seed, k)
      for lo in range(0, len(rows), b):
        chunk = x[lo : lo + b]
        n = len(chunk)
        if n < b:  # pad to a full batch: one compiled shape
          chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - n, axis=0)])
        enc = _encode_prediction(predict(chunk), spec, out_shape, meta["index_dtype"] or "int32")
        for name, a in enc.items():
          if name not in stored:
            stored[name] = np.empty((len(rows), spec.views, *a.shape[2:]), a.dtype)
          stored[name][lo : lo + n, k] = a[:n, 0]
    _atomic_save_shard(path, ids=ids.astype(np.int64), **stored)
    written += 1
    if progress:
      progress(written + skipped, n_shards)
  done = sum((d / _shard_name(s, n_shards)).is_dir() for s in range(n_shards))
  return {"written": written, "skipped": skipped, "complete": done == n_shards, "num_shards": n_shards}


# --------------------------------------------------------------------------- reading


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
    self.view = V.ViewConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["view"].items()})
    order = np.argsort(ids, kind="stable")
    self._sorted_ids = ids[order]
    self._rows = order
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
    view: V.ViewConfig | None = None,
    num_examples: int | None = None,
  ) -> TeacherCache:
    """Load ``directory``; refuse it when it is for another teacher or view config.

    Raises:
      ValueError: missing/incomplete cache, or a stale one (the message names
        what differs and how to rebuild).
    """
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.is_file():
      raise ConfigError(
        f"data.teacher_cache {str(d)!r} holds no {META_FILE}; build it with "
        f"`kdjax cache EXPERIMENT --teacher.checkpoint … --cache.dir {d}`"
      )
    meta = json.loads(meta_path.read_text())
    rebuild = "rebuild it with `kdjax cache … --cache.dir <new dir>` or drop --data.teacher_cache"
    if meta.get("format") != FORMAT_VERSION:
      raise ConfigError(
        f"data.teacher_cache {str(d)!r} has format {meta.get('format')}, this kdjax reads {FORMAT_VERSION}; {rebuild}"
      )
    if teacher_hash is not None and meta["teacher_hash"] != teacher_hash:
      raise ConfigError(
        f"data.teacher_cache {str(d)!r} is stale: built for teacher {meta['teacher_hash']} but the "
        f"configured teacher is {teacher_hash}; {rebuild}"
      )
    if view is not None and meta["view"] != view_fingerprint(view):
      diff = {k: v for k, v in view_fingerprint(view).items() if meta["view"].get(k) != v}
      raise ConfigError(
        f"data.teacher_cache {str(d)!r} is stale: built for another view config (differs in "
        f"{sorted(diff)}: cache {[meta['view'].get(k) for k in sorted(diff)]}, run "
        f"{[diff[k] for k in sorted(diff)]}); {rebuild}"
      )
    if num_examples is not None and meta["num_examples"] != num_examples:
      raise ConfigError(
        f"data.teacher_cache {str(d)!r} holds {meta['num_examples']} examples but the training set "
        f"has {num_examples} (another split or transfer set?); {rebuild}"
      )
    n = meta["num_shards"]
    paths = [d / _shard_name(s, n) for s in range(n)]
    missing = [p.name for p in paths if not (p / "ids.npy").is_file()]
    if missing:
      raise ConfigError(
        f"data.teacher_cache {str(d)!r} is incomplete ({len(missing)} of {n} shards missing, e.g. "
        f"{missing[0]}); re-run the same `kdjax cache` command to finish it"
      )
    _allow_open_files(n * (len(list(paths[0].glob("*.npy"))) - 1))  # one mapping (a file descriptor) per array
    parts: dict[str, list[np.ndarray]] = {}
    files: dict[str, list[tuple[Path, dict]]] = {}
    for p in paths:
      try:
        digests = json.loads((p / DIGEST_FILE).read_text())
        shard = read_shard(p)
      except (OSError, ValueError) as e:
        raise ConfigError(
          f"data.teacher_cache {str(d)!r}: shard {p.name} is unreadable ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}); delete that shard directory and re-run "
          f"`kdjax cache` to rebuild it"
        ) from None
      verify_file(p / "ids.npy", digests)  # read whole right below; the others when first used
      for k, a in shard.items():
        parts.setdefault(k, []).append(a)
        files.setdefault(k, []).append((p / f"{k}.npy", digests))
    ids = np.concatenate([np.asarray(a) for a in parts.pop("ids")])
    cache = cls(meta, ids, {k: ShardedRows(v, files[k]) for k, v in parts.items()})
    cache.directory = d
    return cache

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """Cache rows of example ``ids`` (ValueError for ids the cache lacks)."""
    ids = np.asarray(ids, np.int64)
    pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, len(self._sorted_ids) - 1)
    bad = self._sorted_ids[pos] != ids
    if bad.any():
      raise ConfigError(f"teacher cache has no example id {int(ids[bad][0])}; was it built for this training set?")
    return self._rows[pos]

  def outputs(self, ids: np.ndarray, view_index: np.ndarray) -> dict[str, np.ndarray]:
    """The batch entries for view ``view_index[i]`` of ``ids[i]``.

    Full-logit caches: ``teacher_logits`` float32 ``(B, *output_shape)``.
    Top-k caches: ``teacher_topk_logp`` float32 and ``teacher_topk_idx``
    int32, ``(B, *output_shape[:-1], k)`` (the step turns them into what each
    term needs).
    """
    r = self.rows(ids)
    k = np.asarray(view_index, np.int64)
    if "logits" in self.arrays:
      return {"teacher_logits": _take(self.arrays["logits"], r, k).astype(np.float32)}
    return {
      "teacher_topk_logp": _take(self.arrays["topk_logp"], r, k).astype(np.float32),
      "teacher_topk_idx": _take(self.arrays["topk_idx"], r, k).astype(np.int32),
    }

  def logits(self, ids: np.ndarray, view_index: np.ndarray) -> np.ndarray:
    """Dense float32 teacher logits ``(B, *output_shape)`` of view ``view_index[i]`` of ``ids[i]``.

    Top-k caches: the log-probabilities with the tail mass spread evenly over
    the other classes (NumPy twin of :func:`kdjax.losses.topk_to_logits`).
    """
    out = self.outputs(ids, view_index)
    if "teacher_logits" in out:
      return out["teacher_logits"]
    logp = out["teacher_topk_logp"].astype(np.float64)
    idx = out["teacher_topk_idx"]
    c, kk = self.num_classes, logp.shape[-1]
    if kk >= c:
      dense = np.empty((*logp.shape[:-1], c))
    else:
      tail = np.clip(1.0 - np.exp(logp).sum(-1), 1e-12, None) / (c - kk)
      dense = np.repeat(np.log(tail)[..., None], c, axis=-1)
    np.put_along_axis(dense, idx, logp, axis=-1)
    return dense.astype(np.float32)


class CachedLoader(Loader):
  """A :class:`Loader` whose batches carry cached teacher logits.

  Each batch adds the cached teacher outputs (``teacher_logits`` float32
  ``(B, *output_shape)``, or ``teacher_topk_logp`` / ``teacher_topk_idx``
  for a top-k cache; see :meth:`TeacherCache.outputs`) and ``view_index``
  int32 ``(B,)``; in ``view_mode="consistent"`` ``inputs`` is view
  ``view_index`` of each example (the input the teacher saw). Order,
  sharding over processes, the Grain pipeline and ``state()``/``restore()``
  are the Loader's: the cache joins the pipeline by example id.
  """

  def __init__(
    self,
    ds,
    cache: TeacherCache,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    view_mode: str = "consistent",
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int | None = None,
  ):
    check_view(cache.view)
    super().__init__(
      ds,
      batch_size,
      seed=seed,
      shuffle=shuffle,
      drop_remainder=drop_remainder,
      view=cache.view,
      view_mode=view_mode,
      process_index=process_index,
      process_count=process_count,
      worker_count=worker_count,
    )
    self.cache = cache
    cache.rows(ds.ids)  # every example must be cached

  def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    gidx, gvalid = self.global_indices(epoch, step)
    lo = self.process_index * self.local_batch_size
    rows = np.arange(lo, lo + self.local_batch_size)
    idx = gidx[rows]
    ds, c = self.ds, self.cache
    images, labels, ids = ds.take(idx)
    k = choose_views(self.seed, ids, epoch, c.num_views)
    if self.view_mode == "consistent":
      image = view_images(c.view, images, ids, c.view_seed, k)
    else:  # the student's own fresh view; the teacher's is cached view k
      image = V.augment(c.view, images, V.view_key(self.seed, ids, epoch, V.STREAM_STUDENT))
    out = {
      B.INPUTS: image,
      **c.outputs(ids, k),
      B.VIEW_INDEX: k.astype(np.int32),
      "label": labels,
      "id": ids.astype(np.int32),
      "epoch": np.full(len(idx), epoch, np.int32),
    }
    if not self.drop_remainder:
      out["mask"] = gvalid[rows]
    return out


def check_method(needs_teacher_features: bool, mode: str, method_name: str) -> None:
  """Refuse a cache for methods/modes that need more than teacher logits."""
  if needs_teacher_features:
    raise ConfigError(
      f"data.teacher_cache: method {method_name!r} reads teacher *features*, which the cache does not "
      f"store (it holds logits only); drop --data.teacher_cache to run the online teacher"
    )
  if mode != "offline":
    raise ConfigError(
      f"data.teacher_cache works with mode='offline' (one frozen teacher), got mode={mode!r}; drop --data.teacher_cache"
    )


# --------------------------------------------------------------------------- experiments


def training_set(cfg):
  """The distillation training set of an ``Experiment`` (train + transfer split); ``fit`` and
  ``kdjax cache`` both read it through here, so example ids agree.  Small datasets are held
  in memory, ImageNet-sized ones read record by record (:func:`kdjax.data.open_split`)."""
  from kdjax.data.tfds import concat, open_split

  dl = dict(data_dir=cfg.data.data_dir, download=cfg.data.download)
  ds = open_split(cfg.data.name, cfg.data.train_split, **dl)
  if cfg.data.transfer_split:
    ds = concat([ds, open_split(cfg.data.name, cfg.data.transfer_split, **dl)])
  return ds


def experiment_view(cfg) -> V.ViewConfig:
  """The training and eval view of ``cfg.data`` (its kind, mixing and the dataset's raw scale)."""
  from kdjax.data.tfds import raw_scale

  return V.ViewConfig(
    kind=cfg.data.view,
    mixup_alpha=cfg.data.mixup_alpha,
    cutmix_alpha=cfg.data.cutmix_alpha,
    scale=raw_scale(cfg.data.name),
    image_size=cfg.data.image_size,
  )


def loader_for_experiment(
  cfg, loader: Loader, *, teacher_hash: str | None, needs_teacher_features: bool, method_name: str
) -> CachedLoader:
  """The ``fit`` loader with ``cfg.data.teacher_cache`` checked and attached."""
  check_method(needs_teacher_features, cfg.mode, method_name)
  if teacher_hash is None:
    raise ConfigError(
      "data.teacher_cache needs --teacher.checkpoint too: its hash proves the cache is this teacher's outputs"
    )
  cache = TeacherCache.open(
    cfg.data.teacher_cache, teacher_hash=teacher_hash, view=experiment_view(cfg), num_examples=len(loader.ds)
  )
  return CachedLoader(
    loader.ds,
    cache,
    batch_size=loader.batch_size,
    seed=loader.seed,
    shuffle=loader.shuffle,
    drop_remainder=loader.drop_remainder,
    view_mode=loader.view_mode,
    process_index=loader.process_index,
    process_count=loader.process_count,
    worker_count=loader.worker_count,
  )
