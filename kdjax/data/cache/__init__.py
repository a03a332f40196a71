"""Augmentation-aware teacher-output cache: K cached views per example.

Online KD spends most of its compute in the frozen teacher (resnet32x4 is
~6× the FLOPs of a resnet8x4 student). The cache computes the teacher's
logits once, for every training example under ``K`` reproducible views, and
the training loop then feeds them as ``batch["teacher_logits"]`` — the
step skips the teacher forward (``kdjax.engine.step.teacher_outputs``).

Views (:mod:`.draw`). View ``k`` of example ``id`` is exactly the view the
:class:`Loader` would make at *epoch* ``k`` with seed ``view_seed``:
``augment(view, x, view_key(view_seed, id, k, STREAM_STUDENT))``. In epoch
``e`` of distillation each example draws one index
``k = randint(view_key(seed, id, e, STREAM_CACHE), K)`` (a pure function of
the run's seed, the epoch and the id); the :class:`CachedOutputs` transform
regenerates that view for the student and looks up its cached logits, so the
student's input is the very input the teacher saw ("consistent" views, Beyer
et al. 2022). With ``view_mode="independent"`` the student gets a fresh view
of its own. ``K = 1`` with ``view="none"`` is plain logit caching. FKD (Shen &
Xing 2022) caches soft labels of several crops per image the same way; Beyer
et al. 2022 found a fixed teacher output per image overfits, which is why K > 1.

Outputs. A classifier teacher gives ``(C,)`` logits per example; a language
model gives ``(L, V)`` — one distribution per position (``view="tokens"``,
usually K = 1). The cache stores whatever the teacher outputs per example
(``output_shape`` in ``cache.json``).

Storage (``directory/``, :mod:`.format`; written by :mod:`.build`, read by :mod:`.read`):
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
                   in float16), or — ``encoding="packed"``, format 4,
                   :mod:`.packed` — the same top-k rows with delta-coded
                   exact ids and log-probs on a 1/32-nat grid (error
                   ≤ ``LOGP_BOUND`` ≈ 0.032 nat), ``topk_packed`` (bytes),
                   ``topk_rowbytes`` (n, K, …) and ``topk_bounds`` (n, K, 2),
                   decoded on the host as batches are read (~200 B per
                   token at k = 128, V = 151,936, measured into
                   ``cache.json``), and ``digest.json``, the
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

Caches written by earlier kdjax (format 3: plain arrays) are read as
before; older formats are refused with one line naming the rebuild command.

Modules: :mod:`.format` (layout, ``cache.json``, staleness checks),
:mod:`.draw` (which view), :mod:`.encode` (outputs ↔ stored arrays),
:mod:`.packed` (quantised, delta-coded top-k rows),
:mod:`.build` (the writer), :mod:`.read` (the memory-mapped reader),
:mod:`.serve` (the Loader transform), :mod:`.experiment` (an Experiment's
training set, view and loader).
"""

from kdjax.data.cache.build import build_cache
from kdjax.data.cache.draw import STREAM_CACHE, choose_views, view_images
from kdjax.data.cache.encode import dense_logits, encode, encode_prediction
from kdjax.data.cache.experiment import check_method, experiment_view, loader_for_experiment, training_set
from kdjax.data.cache.format import (
  DIGEST_FILE,
  FORMAT_VERSION,
  META_FILE,
  READ_FORMATS,
  CacheSpec,
  cache_meta,
  check_view,
  index_dtype_for,
  view_fingerprint,
)
from kdjax.data.cache.packed import LOGP_BOUND, LOGP_STEP, pack_rows, unpack_rows
from kdjax.data.cache.read import IdIndex, PackedTopk, ShardedRows, TeacherCache, read_shard, verify_file
from kdjax.data.cache.serve import CachedLoader, CachedOutputs, Chain, chain

__all__ = [
  "DIGEST_FILE",
  "FORMAT_VERSION",
  "LOGP_BOUND",
  "LOGP_STEP",
  "META_FILE",
  "READ_FORMATS",
  "STREAM_CACHE",
  "CacheSpec",
  "CachedLoader",
  "CachedOutputs",
  "Chain",
  "IdIndex",
  "PackedTopk",
  "ShardedRows",
  "TeacherCache",
  "build_cache",
  "cache_meta",
  "chain",
  "check_method",
  "check_view",
  "choose_views",
  "dense_logits",
  "encode",
  "encode_prediction",
  "experiment_view",
  "index_dtype_for",
  "loader_for_experiment",
  "pack_rows",
  "read_shard",
  "training_set",
  "unpack_rows",
  "verify_file",
  "view_fingerprint",
  "view_images",
]
