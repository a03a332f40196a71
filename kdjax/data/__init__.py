"""kdjax.data: TFDS datasets (ArrayRecord, no TensorFlow) as deterministic, resumable,
process-sharded NumPy batches on Grain.

Importing this package registers the embedded TFDS datasets ``mnist1d`` and
``digits`` (built into ``data_dir`` on first use, no network);
:mod:`kdjax.data.prepare` stores a user's own text or images as a dataset used by name.
"""

from kdjax.data import builders  # noqa: F401  (registers mnist1d, digits)
from kdjax.data import cache, prepare, retokenize, views
from kdjax.data.loader import Loader, default_workers, eval_batches, make_loader, to_global
from kdjax.data.tfds import (
  ArrayDataset,
  ConcatSource,
  DatasetSpec,
  DatasetUnavailableError,
  RecordSource,
  concat,
  default_data_dir,
  default_view,
  get_builder,
  get_info,
  load_arrays,
  open_split,
)
from kdjax.data.cache import CachedLoader, CacheSpec, TeacherCache, build_cache
from kdjax.data.views import ViewConfig

__all__ = [
  "ArrayDataset",
  "CachedLoader",
  "CacheSpec",
  "ConcatSource",
  "DatasetSpec",
  "DatasetUnavailableError",
  "Loader",
  "RecordSource",
  "TeacherCache",
  "ViewConfig",
  "build_cache",
  "cache",
  "concat",
  "default_data_dir",
  "default_view",
  "default_workers",
  "eval_batches",
  "get_builder",
  "get_info",
  "load_arrays",
  "make_loader",
  "open_split",
  "prepare",
  "retokenize",
  "to_global",
  "views",
]
