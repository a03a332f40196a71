"""Optimizers and learning-rate schedules from ``OptimConfig`` (optax)."""

from __future__ import annotations

import optax

from kdjax.config import OptimConfig
from kdjax.errors import ConfigError


def make_schedule(cfg: OptimConfig, steps_per_epoch: int, total_steps: int, init_steps: int = 0) -> optax.Schedule:
  """Learning rate per optimizer step.

  ``init_steps`` (RepDistiller's first stage for two-stage methods) run at the
  constant peak lr; the main schedule starts after them.
  """
  main_steps = max(total_steps - init_steps, 1)
  warm = int(round(cfg.warmup_epochs * steps_per_epoch))
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "step":
    bounds = {int(round(e * steps_per_epoch)) - warm: cfg.decay_factor for e in cfg.decay_epochs}
    main = optax.piecewise_constant_schedule(cfg.lr, {b: f for b, f in bounds.items() if b > 0})
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, max(main_steps - warm, 1))
  else:
    raise ConfigError(f"optim.schedule: unknown schedule {cfg.schedule!r} (constant, step, cosine)")
  if warm > 0:
    main = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), main], [warm])
  if init_steps > 0:
    return optax.join_schedules([optax.constant_schedule(cfg.lr), main], [init_steps])
  return main


def make_optimizer(
  cfg: OptimConfig, steps_per_epoch: int, total_steps: int, init_steps: int = 0
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation for the student (and adapters).

  SGD follows PyTorch semantics (as RepDistiller): weight decay is added to
  the gradient before momentum and applies to every parameter, BN included.
  """
  lr = make_schedule(cfg, steps_per_epoch, total_steps, init_steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.name == "sgd":
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.sgd(lr, momentum=cfg.momentum or None))
  elif cfg.name == "adam":
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.adam(lr))
  elif cfg.name == "adamw":
    parts.append(optax.adamw(lr, weight_decay=cfg.weight_decay))
  else:
    raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r} (sgd, adam, adamw)")
  return optax.chain(*parts), lr
