"""kdjax.data: TFDS datasets as deterministic, resumable, process-sharded NumPy batches.

Importing this package registers the embedded TFDS datasets ``mnist1d`` and
``digits`` (built into ``data_dir`` on first use, no network).
"""

from kdjax.data import builders  # noqa: F401  (registers mnist1d, digits)
from kdjax.data import cache, views
from kdjax.data.loader import Loader, eval_batches, to_global
from kdjax.data.stream import StreamLoader, make_loader
from kdjax.data.tfds import (
    ArrayDataset,
    DatasetSpec,
    DatasetUnavailableError,
    concat,
    default_data_dir,
    default_view,
    get_builder,
    get_info,
    load_arrays,
)
from kdjax.data.cache import CachedLoader, CacheSpec, TeacherCache, build_cache
from kdjax.data.views import ViewConfig

__all__ = [
    "ArrayDataset", "CachedLoader", "CacheSpec", "DatasetSpec", "DatasetUnavailableError", "Loader", "StreamLoader",
    "TeacherCache", "ViewConfig", "build_cache", "cache",
    "concat", "default_data_dir", "default_view", "eval_batches", "get_builder", "get_info",
    "load_arrays", "make_loader", "to_global", "views",
]
