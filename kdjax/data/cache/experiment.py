"""An experiment's training set, view and cached-teacher loader.

``cfg`` is a :class:`kdjax.config.Experiment`, read by attribute only
(``kdjax.data`` imports no config, engine or CLI). Building a cache runs a
model, so that lives in :mod:`kdjax.engine.teacher_cache`.
"""

from __future__ import annotations

from kdjax.data import views
from kdjax.data.cache.read import TeacherCache
from kdjax.data.cache.serve import CachedLoader
from kdjax.data.loader import Loader
from kdjax.data.tfds import concat, open_split, raw_scale
from kdjax.errors import ConfigError


def training_set(cfg):
  """The distillation training set of an ``Experiment`` (train + transfer split); ``fit`` and
  ``kdjax cache`` both read it through here, so example ids agree.  Small datasets are held
  in memory, ImageNet-sized ones read record by record (:func:`kdjax.data.open_split`)."""
  dl = dict(data_dir=cfg.data.data_dir, download=cfg.data.download)
  ds = open_split(cfg.data.name, cfg.data.train_split, **dl)
  if cfg.data.transfer_split:
    ds = concat([ds, open_split(cfg.data.name, cfg.data.transfer_split, **dl)])
  return ds


def experiment_view(cfg) -> views.ViewConfig:
  """The training and eval view of ``cfg.data`` (its kind, mixing and the dataset's raw scale)."""
  return views.ViewConfig(
    kind=cfg.data.view,
    mixup_alpha=cfg.data.mixup_alpha,
    cutmix_alpha=cfg.data.cutmix_alpha,
    scale=raw_scale(cfg.data.name),
    image_size=cfg.data.image_size,
  )


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


def loader_for_experiment(
  cfg, loader: Loader, *, teacher_hash: str | None, needs_teacher_features: bool, method_name: str
) -> CachedLoader:
  """``loader`` serving ``cfg.data.teacher_cache`` (checked to be this teacher's and view's), then its own transform."""
  check_method(needs_teacher_features, cfg.mode, method_name)
  if teacher_hash is None:
    raise ConfigError(
      "data.teacher_cache needs --teacher.checkpoint too: its hash proves the cache is this teacher's outputs "
      "(a cache filled by a served teacher, `kdjax cache --cache.endpoint`, needs none)"
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
    transform=loader.transform,
  )
