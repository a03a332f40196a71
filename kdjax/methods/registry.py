"""Method presets: ``build(cfg, student, teacher) -> Method``.

A preset is a list of ``(term, weight)`` with the reference weights of
RepDistiller (loss = r·CE + a·KD + b·other; KD r=0.1, a=0.9; others r=1),
mdistiller (DKD) and DIST. ``cfg.name`` may join presets with ``+``: the
union of their terms, a term in several taking the first preset's weight
(``"crd+kd"`` itself is a preset: ce 1, kd 1, crd 0.8). ``cfg.terms``
(``"name=weight"``) then overrides weights or adds terms; a weight of 0
drops the term.
"""

from __future__ import annotations

import warnings

from kdjax.errors import ConfigError
from kdjax.methods.config import MethodConfig
from kdjax.methods import contrastive, feature, hidden, logit, relation
from kdjax.methods.base import Method, ModelInfo, Term
from kdjax.methods.layer_match import HINT_AUTO

# Term name -> builder(name, weight, cfg, student, teacher) -> tuple[Term, ...]
TERMS = {
  "ce": logit.make_ce,
  "kd": logit.make_kd,
  "dkd": logit.make_dkd,
  "dist": logit.make_dist,
  "forward_kl": logit.make_forward_kl,
  "reverse_kl": logit.make_reverse_kl,
  "gkd": logit.make_gkd,
  "tvd": logit.make_tvd,
  "skew_kl": logit.make_skew_kl,
  "skew_reverse_kl": logit.make_skew_reverse_kl,
  "uld": logit.make_uld,
  "hint": feature.make_hint,
  "hint_init": feature.make_hint_init,
  "at": feature.make_at,
  "sp": feature.make_sp,
  "nst": feature.make_nst,
  "vid": feature.make_vid,
  "ab": feature.make_ab,
  "ft": feature.make_ft,
  "ft_init": feature.make_ft_init,
  "fsp": feature.make_fsp,
  "cc": relation.make_cc,
  "rkd": relation.make_rkd,
  "pkt": relation.make_pkt,
  "crd": contrastive.make_crd,
  "hidden_mse": hidden.make_hidden_mse,
  "hidden_cos": hidden.make_hidden_cos,
  "attn_kl": hidden.make_attn_kl,
  "value_kl": hidden.make_value_kl,
  "qkv_kl": hidden.make_qkv_kl,
}

# Preset -> (term, weight) list. "init" terms run only in the init stage.
PRESETS: dict[str, tuple[tuple[str, float], ...]] = {
  "ce": (("ce", 1.0),),
  "kd": (("ce", 0.1), ("kd", 0.9)),
  "dkd": (("ce", 1.0), ("dkd", 1.0)),
  "dist": (("ce", 1.0), ("dist", 2.0)),
  "fitnet": (("ce", 1.0), ("hint", 100.0)),  # + ("hint_init", 100) when init_epochs > 0
  "at": (("ce", 1.0), ("at", 1000.0)),
  "sp": (("ce", 1.0), ("sp", 3000.0)),
  "cc": (("ce", 1.0), ("cc", 0.02)),
  "vid": (("ce", 1.0), ("vid", 1.0)),
  "rkd": (("ce", 1.0), ("rkd", 1.0)),
  "pkt": (("ce", 1.0), ("pkt", 30000.0)),
  "ab": (("ce", 1.0), ("ab", 1.0)),
  "ft": (("ce", 1.0), ("ft", 200.0), ("ft_init", 1.0)),
  "fsp": (("ce", 1.0), ("fsp", 1.0)),
  "nst": (("ce", 1.0), ("nst", 50.0)),
  "crd": (("ce", 1.0), ("crd", 0.8)),
  "crd+kd": (("ce", 1.0), ("kd", 1.0), ("crd", 0.8)),
  "forward_kl": (("forward_kl", 1.0),),
  "reverse_kl": (("reverse_kl", 1.0),),
  "gkd": (("gkd", 1.0),),
  "tvd": (("tvd", 1.0),),
  "skew_kl": (("skew_kl", 1.0),),
  "skew_reverse_kl": (("skew_reverse_kl", 1.0),),
  "uld": (("ce", 1.0), ("uld", 1.0)),  # Boizard et al. 2024: CE + λ·ULD across tokenizers
  # Sequence models' hidden states and attention over a layer map (method.layer_map, default uniform).
  "tinybert": (("ce", 1.0), ("hidden_mse", 1.0)),  # Jiao et al. 2020: hidden-state MSE with projections
  "distilbert": (("forward_kl", 5.0), ("ce", 2.0), ("hidden_cos", 1.0)),  # Sanh et al. 2019: α_ce 5, α_mlm 2, α_cos 1
  "minilm": (("attn_kl", 1.0), ("value_kl", 1.0)),  # Wang et al. 2020: attention + value relation
  "minilmv2": (("qkv_kl", 1.0),),  # Wang et al. 2021: Q-Q, K-K, V-V self-attention relations
}

_NEEDS_INIT = ("ab", "fsp", "ft")


def available() -> list[str]:
  """Preset names accepted by :func:`build` (join with ``+`` to combine)."""
  return sorted(PRESETS)


def available_terms() -> list[str]:
  """Term names accepted in ``MethodConfig.terms``."""
  return sorted(TERMS)


def _preset_terms(name: str, cfg: MethodConfig) -> list[tuple[str, float]]:
  if name in PRESETS:
    parts = [name]
  else:
    parts = [p.strip() for p in name.split("+")]
    bad = [p for p in parts if p not in PRESETS]
    if bad or not parts:
      raise ConfigError(
        f"method.name: unknown method {name!r} (unknown part(s) {bad}); available: "
        f"{available()} (join several with '+')"
      )
  weights: dict[str, float] = {}
  for p in parts:
    for t, w in PRESETS[p]:
      weights.setdefault(t, w)
    if p == "fitnet" and cfg.init_epochs > 0:
      weights.setdefault("hint_init", weights["hint"])
    if p in _NEEDS_INIT and cfg.init_epochs <= 0:
      warnings.warn(
        f"method {p!r} trains its distillation term only in RepDistiller's init stage; with "
        f"method.init_epochs=0 it runs as plain CE (the reference uses 30 init epochs)",
        stacklevel=3,
      )
  return list(weights.items())


def check_names(cfg: MethodConfig) -> None:
  """``ValueError`` for an unknown preset or term name: what can be checked without the models."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _preset_terms(cfg.name, cfg)
  bad = [t for t in cfg.term_weights() if t not in TERMS]
  if bad:
    raise ConfigError(f"method.terms: unknown term {bad[0]!r}; available: {available_terms()}")


def tap_templates(cfg: MethodConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The layer paths (``{i}`` templates or literal) the method reads from the student and the teacher: what
  the engine taps before describing the models (hidden states and attention probes of the layer map, FitNet's
  hint pair)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    weights = dict(_preset_terms(cfg.name, cfg))
  weights.update(cfg.term_weights())
  kept = [t for t, w in weights.items() if w != 0.0]
  s, t = hidden.tap_templates(cfg, kept)
  if {"hint", "hint_init"} & set(kept) and cfg.hint_layer not in (None, HINT_AUTO):  # FitNet's pair, by path
    guided, hinted = feature.hint_pair("hint", cfg)
    s, t = (*s, guided), (*t, hinted)
  return s, t


def build(cfg: MethodConfig, student: ModelInfo, teacher: ModelInfo | None) -> Method:
  """The :class:`Method` for ``cfg`` against these models.

  Raises ``ValueError`` for an unknown preset or term, for features the
  models lack (naming the term and what exists), and for term/model
  combinations that cannot work (e.g. a feature term without a teacher).
  """
  weights = dict(_preset_terms(cfg.name, cfg))
  for t, w in cfg.term_weights().items():
    if t not in TERMS:
      raise ConfigError(f"method.terms: unknown term {t!r}; available: {available_terms()}")
    weights[t] = w
  # Drop zero-weight terms unless another kept term reads their params.
  keep = {t for t, w in weights.items() if w != 0.0}
  for child, parent in (("hint_init", "hint"), ("ft_init", "ft")):
    if child in keep:  # the init term trains the parent's adapters
      weights.setdefault(parent, 0.0)
      keep.add(parent)
  terms: list[Term] = []
  for t, w in weights.items():
    if t in keep:
      try:
        terms.extend(TERMS[t](t, float(w), cfg, student, teacher))
      except ValueError as e:  # name the method the user asked for, not only the term
        raise ConfigError(f"method {cfg.name!r}: {e}") from None
  if not terms:
    raise ConfigError(f"method {cfg.name!r} with terms {cfg.terms} has no term with a non-zero weight")
  return Method(cfg.name, tuple(terms))
