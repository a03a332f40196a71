"""The cache on disk: its directory layout, ``cache.json`` and the checks that a cache is the run's.

A cache directory holds ``cache.json`` (:func:`cache_meta`) and one
directory per shard (:func:`shard_name`) of ``.npy`` files with their
SHA-256 digests in ``digest.json`` (:func:`file_digest`). The fields in
:data:`KEY_FIELDS` are the cache's identity: a reader or a resumed build
whose fields differ is refused with one line naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from collections.abc import Mapping

import numpy as np

from kdjax.data import views
from kdjax.data.cache import packed
from kdjax.errors import ConfigError

# 2: output_shape, top-k storage, .npy shard directories; 3: per-shard digest.json; 4: packed top-k rows.
# Plain caches keep format 3's layout and number (older kdjax reads them); kdjax reads formats 3 and 4.
FORMAT_VERSION = 4
PLAIN_FORMAT = 3
READ_FORMATS = (PLAIN_FORMAT, FORMAT_VERSION)
DIGEST_FILE = "digest.json"
META_FILE = "cache.json"
STORAGE_DTYPES = ("float16", "float32")
ENCODINGS = ("plain", "packed")
MAX_PACKED_VOCAB = 1 << 24  # packed ids are read as ≤ 25-bit fields
KEY_FIELDS = (
  "format",
  "encoding",
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
REBUILD = "rebuild it with `kdjax cache … --cache.dir <new dir>` or drop --data.teacher_cache"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """How to build a cache.

  Attributes:
    views: K, the number of cached views per example (≥ 1).
    view_seed: seed of the cached views (independent of the run's seed).
    dtype: storage of logits or top-k log-probabilities, ``float16`` (half
      the bytes) or ``float32`` (bit-exact); packed rows use their own grid.
    top_k: 0 stores full logits; k > 0 stores the top-k log-probabilities and
      their class / token ids (for large class counts or vocabularies).
    encoding: ``plain`` (arrays of ``dtype`` log-probs and uint16/int32 ids,
      4 or 6 bytes an entry) or, with ``top_k``, ``packed``
      (:mod:`kdjax.data.cache.packed`: ids exact, log-probs within
      ``LOGP_BOUND`` ≈ 0.032 nat, ~1.5–2.4 bytes an entry).
    shard_size: examples per shard file (the unit of atomic writes / resume).
    batch_size: teacher batch size while building.
  """

  views: int = 1
  view_seed: int = 0
  dtype: str = "float16"
  top_k: int = 0
  encoding: str = "plain"
  shard_size: int = 4096
  batch_size: int = 256

  def __post_init__(self):
    if self.views < 1:
      raise ConfigError(f"cache.views={self.views}: must be ≥ 1 (1 with views off = plain logit caching)")
    if self.dtype not in STORAGE_DTYPES:
      raise ConfigError(f"cache.dtype={self.dtype!r}: expected one of {STORAGE_DTYPES}")
    if self.top_k < 0:
      raise ConfigError(f"cache.top_k={self.top_k}: must be ≥ 0 (0 stores full logits)")
    if self.encoding not in ENCODINGS:
      raise ConfigError(f"cache.encoding={self.encoding!r}: expected one of {ENCODINGS}")
    if self.packed and not self.top_k:
      raise ConfigError("cache.encoding='packed' stores top-k rows: set cache.top_k > 0 (e.g. 128)")
    if self.shard_size < 1 or self.batch_size < 1:
      raise ConfigError(f"cache.shard_size={self.shard_size}, cache.batch_size={self.batch_size}: must be ≥ 1")
    if self.view_seed < 0:
      raise ConfigError(f"cache.view_seed={self.view_seed}: must be ≥ 0")

  @property
  def packed(self) -> bool:
    return self.encoding == "packed"

  @property
  def value_dtype(self) -> str:
    """What the encoder keeps log-probs or logits in: ``dtype``, or float32 ahead of packing."""
    return "float32" if self.packed else self.dtype


def view_fingerprint(view: views.ViewConfig) -> dict:
  """The view config as JSON data (part of the cache key)."""
  return json.loads(json.dumps(dataclasses.asdict(view)))


def view_from_fingerprint(fingerprint: Mapping) -> views.ViewConfig:
  """The :class:`ViewConfig` a ``cache.json`` records (JSON lists back to tuples)."""
  return views.ViewConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fingerprint.items()})


def check_view(view: views.ViewConfig) -> None:
  """Refuse a view that mixes examples: its teacher output belongs to a pair, not to one example."""
  if view.mixes:
    raise ConfigError(
      f"teacher cache with mixup_alpha={view.mixup_alpha}, cutmix_alpha={view.cutmix_alpha}: a mixed input pairs "
      f"two examples per batch, so its teacher output cannot be cached per example; set both to 0 or drop "
      f"--data.teacher_cache (online teacher)"
    )


def shard_name(s: int, n: int) -> str:
  """Directory of shard ``s`` of ``n``: ``shard-SSSSS-of-NNNNN``."""
  return f"shard-{s:05d}-of-{n:05d}"


def index_dtype_for(num_classes: int) -> str:
  """Storage of top-k ids: ``uint16`` while every id fits (V ≤ 65,536), else ``int32``."""
  return "uint16" if num_classes <= 65536 else "int32"


def bytes_per_distribution(spec: CacheSpec, num_classes: int) -> int | None:
  """Bytes stored per teacher distribution: C logits, or k log-probabilities with their ids (packed: not
  known before the rows are written; :func:`packed_sizes` measures them)."""
  if spec.packed:
    return None
  if not spec.top_k:
    return num_classes * np.dtype(spec.dtype).itemsize
  k = min(spec.top_k, num_classes)
  return k * (np.dtype(spec.dtype).itemsize + np.dtype(index_dtype_for(num_classes)).itemsize)


def cache_meta(
  ds,
  spec: CacheSpec,
  view: views.ViewConfig,
  teacher_hash: str,
  num_classes: int,
  output_shape: tuple[int, ...] | None = None,
) -> dict:
  """The ``cache.json`` content of ``ds`` (any dataset with ``len``, ``name``, ``split``): what a reader must agree with."""
  shape = tuple(int(d) for d in (output_shape or (num_classes,)))
  if shape[-1] != num_classes:
    raise ConfigError(f"teacher output shape {shape} does not end in num_classes={num_classes}")
  if spec.packed and num_classes > MAX_PACKED_VOCAB:
    raise ConfigError(f"cache.encoding='packed' holds ids below {MAX_PACKED_VOCAB}, got num_classes={num_classes}")
  per_dist = bytes_per_distribution(spec, num_classes)
  meta = {
    "format": FORMAT_VERSION if spec.packed else PLAIN_FORMAT,
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
    "num_shards": -(-len(ds) // spec.shard_size),
    "index_dtype": index_dtype_for(num_classes) if spec.top_k else None,
    "bytes_per_example": None if per_dist is None else int(per_dist * math.prod(shape[:-1])),
  }
  if len(shape) > 1:  # (L, V): one distribution per token
    meta["bytes_per_token"] = None if per_dist is None else int(per_dist)
  if spec.packed:  # sizes are measured when the build completes (packed_sizes)
    meta.update(encoding=spec.encoding, logp_step=packed.LOGP_STEP, logp_bound=packed.LOGP_BOUND)
  return meta


def packed_sizes(shards: list[Mapping[str, np.ndarray]], meta: Mapping) -> dict:
  """``bytes_per_example`` and (token caches) ``bytes_per_token`` a packed cache's shards store.

  Counts the packed rows, their lengths and each example's byte range (not the example ids), averaged over
  every stored distribution (examples × views × positions).
  """
  names = ("topk_packed", "topk_rowbytes", "topk_bounds")
  total = sum(int(s[n].nbytes) for s in shards for n in names)
  per_example = math.prod(meta["output_shape"][:-1])
  dists = meta["num_examples"] * meta["views"] * per_example
  out = {"bytes_per_example": round(total / (meta["num_examples"] * meta["views"]), 2)}
  if len(meta["output_shape"]) > 1:
    out["bytes_per_token"] = round(total / dists, 2)
  return out


def differing_fields(a: Mapping, b: Mapping) -> list[str]:
  """The :data:`KEY_FIELDS` on which two ``cache.json`` contents disagree."""
  return [k for k in KEY_FIELDS if a.get(k) != b.get(k)]


def check_meta(
  meta: Mapping,
  directory: Path,
  *,
  teacher_hash: str | None = None,
  view: views.ViewConfig | None = None,
  num_examples: int | None = None,
) -> None:
  """Refuse a cache of another format, teacher, view config or training set (``None``: not checked)."""
  where = f"data.teacher_cache {str(directory)!r}"
  if meta.get("format") not in READ_FORMATS:
    raise ConfigError(
      f"{where} has format {meta.get('format')}, this kdjax reads formats {list(READ_FORMATS)}; {REBUILD}"
    )
  if teacher_hash is not None and meta["teacher_hash"] != teacher_hash:
    raise ConfigError(
      f"{where} is stale: built for teacher {meta['teacher_hash']} but the configured teacher is {teacher_hash}; "
      f"{REBUILD}"
    )
  if view is not None and meta["view"] != view_fingerprint(view):
    diff = {k: v for k, v in view_fingerprint(view).items() if meta["view"].get(k) != v}
    raise ConfigError(
      f"{where} is stale: built for another view config (differs in {sorted(diff)}: cache "
      f"{[meta['view'].get(k) for k in sorted(diff)]}, run {[diff[k] for k in sorted(diff)]}); {REBUILD}"
    )
  if num_examples is not None and meta["num_examples"] != num_examples:
    raise ConfigError(
      f"{where} holds {meta['num_examples']} examples but the training set has {num_examples} "
      f"(another split or transfer set?); {REBUILD}"
    )


def file_digest(path: Path) -> str:
  """SHA-256 of a file's bytes (hex), read in 4 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()
