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
    hint_layer: FitNet's pair: a feature name (or module path) read in both
      models (default ``stage2``); ``"s=t"``: student feature s guided by
      teacher feature t, of other depths; ``"auto"``: the student's middle
      candidate layer (``student_layers``, else its ``stageK``) with the
      teacher layer of the largest linear CKA that the regressor can map it
      onto, chosen like ``layer_map=auto`` (``kdjax.auto_layers``).
    feat_dim: embedding width of CRD/CC heads.
    crd_negatives / crd_temperature / crd_momentum: CRD's K, τ and memory
      momentum.
    init_epochs: epochs of RepDistiller's first stage for two-stage methods
      (FitNet hint pre-training, AB/FT/FSP initialisation); 0 disables.
    teacher_weights: multi-teacher weights (one per teacher; empty = equal).
    multi_teacher: ``average`` (distil from averaged logits), ``per_teacher``
      (weighted sum of per-teacher losses), ``mixture`` (from the weighted
      mixture of the teachers' distributions) or ``route`` (each row from the
      one teacher its ``batch["task"]`` names: teachers expert on different
      tasks, on-policy responses included).
    ema_decay: EMA decay for self-distillation mode.
    layer_map: which student layer the hidden-state and attention terms pair
      with which teacher layer: ``()`` or ``("uniform",)`` (student layer i of
      M with teacher layer ⌊(i+1)·N/M⌋ − 1 of N, TinyBERT's g(m) = m·N/M),
      ``("last",)``, or ``"s=t"`` entries of layer indices (``("0=1", "1=3")``)
      or, for ``hidden_mse``/``hidden_cos``, of feature names or module paths;
      ``("auto",)``: chosen before training by linear CKA between every student
      and teacher layer on ``calibration_batches`` training batches, the
      order-preserving map of the largest summed CKA (``kdjax.auto_layer_map``).
    calibration_batches: training batches ``layer_map=auto`` measures CKA on.
    student_layers / teacher_layers: layer i's hidden state, a feature name
      or module path with ``{i}`` (``"block{i}"``; ``"blocks.{i}"`` for a
      user's model, a layer of an ``nnx.scan`` stack included).
    student_attention / teacher_attention: module path of layer i's
      attention, whose probes ``probs``/``queries``/``keys``/``values`` the
      attention terms tap (``"blocks.{i}.attn"``: the zoo transformer and
      ``kdjax.models.Decoder``).
    relation_heads: relation heads of ``value_kl``/``qkv_kl`` (MiniLMv2; default
      the student's attention heads).
    token_chunk: how a language model's token terms (CE and the token
      divergences) read its output head: ``None`` (default) fuses the head
      with the loss, chunk by chunk, all token terms in one pass
      (``kdjax.losses.fused_token_losses``), when the vocabulary has at least
      2,048 tokens, with at most 2²⁴ logits and 256 rows per chunk
      (``kdjax.losses.resolve_chunk``); ``0`` never (full ``(B, L, V)``
      logits); n > 0 always, n positions per chunk.
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
  multi_teacher: Literal["average", "per_teacher", "mixture", "route"] = "average"
  ema_decay: float = 0.999
  layer_map: tuple[str, ...] = ()
  calibration_batches: int = 4
  student_layers: str = "block{i}"
  teacher_layers: str = "block{i}"
  student_attention: str = "blocks.{i}.attn"
  teacher_attention: str = "blocks.{i}.attn"
  relation_heads: int | None = None
  token_chunk: int | None = None

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
    _check(
      self.multi_teacher in ("average", "per_teacher", "mixture", "route"),
      "method.multi_teacher",
      f"must be average, per_teacher, mixture or route, got {self.multi_teacher!r}",
    )
    self._check_layers()
    if self.token_chunk is not None:
      _check(self.token_chunk >= 0, "method.token_chunk", f"must be ≥ 0 (0: full logits), got {self.token_chunk}")

  def _check_layers(self) -> None:
    named = self.layer_map not in ((), ("uniform",), ("last",), ("auto",))
    for entry in self.layer_map if named else ():
      _check(entry.count("=") == 1, "method.layer_map", f"'uniform', 'last', 'auto' or 's=t' entries, got {entry!r}")
    if self.hint_layer is not None:
      sides = self.hint_layer.split("=")
      _check(
        len(sides) <= 2 and all(sides), "method.hint_layer", f"a feature name, 's=t' or 'auto', got {self.hint_layer!r}"
      )
    _check(self.calibration_batches > 0, "method.calibration_batches", f"must be > 0, got {self.calibration_batches}")
    for field in ("student_layers", "teacher_layers", "student_attention", "teacher_attention"):
      value = getattr(self, field)
      _check("{i}" in value, f"method.{field}", f"a feature name or module path with '{{i}}', got {value!r}")
    if self.relation_heads is not None:
      _check(self.relation_heads > 0, "method.relation_heads", f"must be > 0, got {self.relation_heads}")

  def term_weights(self) -> dict[str, float]:
    return {t.split("=", 1)[0]: float(t.split("=", 1)[1]) for t in self.terms}
