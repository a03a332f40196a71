"""A method's hyper-parameters as plain data: a preset name, term weights and the papers' knobs.

``MethodConfig`` is what :func:`kdjax.methods.build` turns into a
:class:`kdjax.methods.Method`. It is also the ``method`` field of the CLI's
``Experiment`` (so every field is a ``--method.*`` flag), but it belongs to
the methods: they never import the CLI's configuration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from kdjax.errors import ConfigError


def _check(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Distillation method: a preset name plus hyper-parameter overrides.

  ``name`` is a preset from ``kdjax.methods.available()`` (``ce``, ``kd``,
  ``dkd``, ``crd``, ``crd+kd`` …) or several joined by ``+``. ``None`` fields
  take the preset's reference value (RepDistiller / mdistiller / DIST).

  Attributes:
    terms: explicit ``name=weight`` overrides of term weights, e.g.
      ``("ce=0.1", "kd=0.9")``; a term not in the preset is added.
    temperature: softmax temperature of logit terms.
    dkd_alpha / dkd_beta / dkd_warmup_epochs: DKD's TCKD/NCKD weights and the
      linear warm-up of the DKD term.
    dist_beta / dist_gamma: DIST inter/intra weights.
    gkd_beta: generalized-JSD interpolation (TRL convention: 0 → KL(T‖S)).
    skew_alpha: DistiLLM's skew α of ``skew_kl`` / ``skew_reverse_kl`` (0.1).
    hint_layer: feature name used by FitNet (both models).
    feat_dim: embedding width of CRD/CC heads.
    crd_negatives / crd_temperature / crd_momentum: CRD's K, τ and memory
      momentum.
    init_epochs: epochs of RepDistiller's first stage for two-stage methods
      (FitNet hint pre-training, AB/FT/FSP initialisation); 0 disables.
    teacher_weights: multi-teacher weights (one per teacher; empty = equal).
    multi_teacher: ``average`` (distil from averaged logits) or ``per_teacher``
      (weighted sum of per-teacher losses).
    ema_decay: EMA decay for self-distillation mode.
  """

  name: str = "kd"
  terms: tuple[str, ...] = ()
  temperature: float | None = None
  dkd_alpha: float | None = None
  dkd_beta: float | None = None
  dkd_warmup_epochs: float | None = None
  dist_beta: float | None = None
  dist_gamma: float | None = None
  gkd_beta: float | None = None
  skew_alpha: float | None = None
  hint_layer: str | None = None
  feat_dim: int | None = None
  crd_negatives: int | None = None
  crd_temperature: float | None = None
  crd_momentum: float | None = None
  init_epochs: float = 0.0
  teacher_weights: tuple[float, ...] = ()
  multi_teacher: Literal["average", "per_teacher"] = "average"
  ema_decay: float = 0.999

  def __post_init__(self):
    if self.temperature is not None:
      _check(0 < self.temperature < math.inf, "method.temperature", f"must be > 0 and finite, got {self.temperature}")
    for t in self.terms:
      _check("=" in t, "method.terms", f"entries are name=weight, got {t!r}")
      name, w = t.split("=", 1)
      try:
        weight = float(w)
      except ValueError:
        raise ConfigError(f"method.terms: weight of {name!r} is not a number: {w!r}") from None
      _check(math.isfinite(weight), "method.terms", f"weight of {name!r} must be finite, got {w!r}")
    if self.gkd_beta is not None:
      _check(0.0 <= self.gkd_beta <= 1.0, "method.gkd_beta", f"must be in [0, 1], got {self.gkd_beta}")
    if self.skew_alpha is not None:
      _check(0.0 <= self.skew_alpha < 1.0, "method.skew_alpha", f"must be in [0, 1), got {self.skew_alpha}")
    if self.crd_momentum is not None:
      _check(0.0 <= self.crd_momentum < 1.0, "method.crd_momentum", f"must be in [0, 1), got {self.crd_momentum}")
    _check(self.init_epochs >= 0, "method.init_epochs", f"must be ≥ 0, got {self.init_epochs}")
    _check(0.0 < self.ema_decay < 1.0, "method.ema_decay", f"must be in (0, 1), got {self.ema_decay}")
    _check(all(w >= 0 for w in self.teacher_weights), "method.teacher_weights", "must be ≥ 0")

  def term_weights(self) -> dict[str, float]:
    return {t.split("=", 1)[0]: float(t.split("=", 1)[1]) for t in self.terms}
