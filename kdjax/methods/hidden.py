"""Hidden-state and attention terms for sequence models, over a layer map between models of different depth.

Layer i of a model is named by templates (``MethodConfig``): its hidden
state ``(B, L, D)`` by ``student_layers`` / ``teacher_layers`` (default
``"block{i}"``, a feature of the zoo transformer and of
:class:`kdjax.models.Decoder`; a module path such as ``"blocks.{i}"`` or
``"encoder.layers.{i}"`` taps a user's model, a layer of an ``nnx.scan``
stack included), and its attention module by ``student_attention`` /
``teacher_attention`` (default ``"blocks.{i}.attn"``), under which the probes
``probs`` ``(B, H, L, L)``, ``queries``, ``keys`` and ``values`` ``(B, L, H, d)``
are tapped (:mod:`kdjax.models.probe`). The engine taps every path the
templates name (:func:`tap_templates`); the terms read them as features.

``layer_map`` pairs student layer s with teacher layer t:
``uniform`` (default; TinyBERT's g(m) = m·N/M: student layer i of M reads
teacher layer ⌊(i+1)·N/M⌋ − 1 of N, so every k-th teacher layer when N = k·M),
``last`` (the last layers only, as MiniLM), or explicit ``"s=t"`` entries of
layer indices (or, for the hidden-state terms, of feature names / module
paths: ``"blocks.1=encoder.layers.5"``). Losses are summed over the pairs;
each is a mean over the batch's real tokens (``batch["mask"]``).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

import kdjax.losses as kdl
from kdjax import batch as batch_keys
from kdjax.errors import ConfigError
from kdjax.methods import adapters as adapter_lib
from kdjax.methods._common import need_teacher, shape, stop
from kdjax.methods.base import ModelInfo, Term
from kdjax.methods.config import MethodConfig

HIDDEN_TERMS = ("hidden_mse", "hidden_cos")
PROBES = {"attn_kl": ("probs",), "value_kl": ("values",), "qkv_kl": ("queries", "keys", "values")}


def _index(entry: str) -> int | None:
  """A layer index (negative counts from the last layer), or None for a feature name or module path."""
  return int(entry) if entry.strip().lstrip("-").isdigit() else None


def uniform_pairs(m: int, n: int) -> tuple[tuple[int, int], ...]:
  """TinyBERT's g(m) = m·N/M, 0-based: student layer i of M reads teacher layer ⌊(i+1)·N/M⌋ − 1 of N (every
  k-th teacher layer when N = k·M); a student deeper than its teacher maps each teacher layer the same way."""
  if m <= n:
    return tuple((i, (i + 1) * n // m - 1) for i in range(m))
  return tuple(((j + 1) * m // n - 1, j) for j in range(n))


def layer_pairs(cfg: MethodConfig, m: int, n: int, term: str) -> tuple[tuple[int, int], ...]:
  """``(student layer, teacher layer)`` index pairs of ``cfg.layer_map`` for M student and N teacher layers."""
  spec = cfg.layer_map or ("uniform",)
  if m == 0 or n == 0:
    raise ConfigError(f"term {term!r}: the layer map needs layers in both models, found {m} (student), {n} (teacher)")
  if spec == ("auto",):
    raise ConfigError(
      f"term {term!r}: method.layer_map=auto is chosen on data before the method is built: pass the MethodConfig "
      "to kdjax.Distiller (init resolves it) or resolve it with kdjax.auto_layer_map"
    )
  if spec == ("uniform",):
    return uniform_pairs(m, n)
  if spec == ("last",):
    return ((m - 1, n - 1),)
  pairs = []
  for entry in spec:
    s, t = (_index(x) for x in entry.split("=", 1))
    if s is None or t is None:
      raise ConfigError(f"method.layer_map: term {term!r} pairs layers by index ('1=3'), got {entry!r}")
    if not (-m <= s < m and -n <= t < n):
      raise ConfigError(f"method.layer_map: {entry!r} is outside the student's {m} and the teacher's {n} layers")
    pairs.append((s % m, t % n))
  return tuple(pairs)


def count_layers(info: ModelInfo, template: str) -> int:
  """How many layers ``template`` (with ``{i}``) names among a model's features."""
  return next(i for i in itertools.count() if template.format(i=i) not in info.feature_shapes)


def _explicit(cfg: MethodConfig) -> list[tuple[str, str]] | None:
  spec = cfg.layer_map
  if spec in ((), ("uniform",), ("last",), ("auto",)) or all(
    _index(x) is not None for e in spec for x in e.split("=", 1)
  ):
    return None
  return [tuple(e.split("=", 1)) for e in spec]


def hidden_pairs(name: str, cfg: MethodConfig, student: ModelInfo, teacher: ModelInfo) -> list[tuple[str, str]]:
  """``(student feature, teacher feature)`` of each mapped layer pair's hidden state."""
  named = _explicit(cfg)
  if named is not None:
    return named
  st, tt = cfg.student_layers, cfg.teacher_layers
  pairs = layer_pairs(cfg, count_layers(student, st), count_layers(teacher, tt), name)
  return [(st.format(i=s), tt.format(i=t)) for s, t in pairs]


def _probe_pairs(name, cfg, student, teacher, probe) -> list[tuple[str, str]]:
  sa, ta = f"{cfg.student_attention}.{probe}", f"{cfg.teacher_attention}.{probe}"
  if _explicit(cfg) is not None:
    raise ConfigError(f"term {name!r} pairs attention layers by index: method.layer_map entries like '1=3'")
  pairs = layer_pairs(cfg, count_layers(student, sa), count_layers(teacher, ta), name)
  return [(sa.format(i=s), ta.format(i=t)) for s, t in pairs]


def tap_templates(cfg: MethodConfig, terms) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Paths (with ``{i}``, or literal) the engine taps in the student and the teacher for these term names."""
  s, t = [], []
  if any(x in HIDDEN_TERMS for x in terms):
    named = _explicit(cfg)
    s += [a for a, _ in named] if named else [cfg.student_layers]
    t += [b for _, b in named] if named else [cfg.teacher_layers]
  for probe in dict.fromkeys(p for x in terms for p in PROBES.get(x, ())):
    s.append(f"{cfg.student_attention}.{probe}")
    t.append(f"{cfg.teacher_attention}.{probe}")
  return tuple(s), tuple(t)


def lead_mask(batch, lead: tuple[int, ...]):
  """The batch's mask over ``lead``, ``(B, L)`` tokens or ``(B,)`` examples (an example mask spread over the
  tokens; a token mask says nothing of one vector per example: None), or None."""
  m = batch.get(batch_keys.MASK)
  if m is None:
    return None
  m = jnp.asarray(m)
  if m.ndim == 1:
    return jnp.broadcast_to(m.reshape((-1,) + (1,) * (len(lead) - 1)), lead)
  return m if m.shape == tuple(lead) else None


def feature_mask(batch, x):
  """:func:`lead_mask` for features ``x``: sequences ``(B, L, D)`` by token, vectors ``(B, D)`` by example."""
  return lead_mask(batch, x.shape[:2] if x.ndim >= 3 else x.shape[:1])


def batch_share(ctx, batch):
  """This micro-batch's weight in the whole batch's mean (:meth:`Context.share`), counted on ``batch["mask"]``."""
  m = batch.get(batch_keys.MASK)
  return 1.0 if m is None else ctx.share(jnp.sum(jnp.asarray(m) > 0), ctx.mask_total)


def _make_hidden(name, weight, cfg, student, teacher, loss_fn):
  teacher = need_teacher(name, teacher)
  pairs = hidden_pairs(name, cfg, student, teacher)
  dims = {(s, t): (shape(student, s, name)[-1], shape(teacher, t, name)[-1]) for s, t in pairs}
  for s, t in pairs:
    if shape(student, s, name)[:-1] != shape(teacher, t, name)[:-1]:
      raise ConfigError(
        f"term {name!r}: student {s!r} {shape(student, s, name)} and teacher {t!r} {shape(teacher, t, name)} "
        "may differ in their width D only"
      )

  def init(key, s_out, t_out, info):
    return {
      f"{s}->{t}": adapter_lib.linear_init(jax.random.fold_in(key, i), *dims[s, t])
      for i, (s, t) in enumerate(pairs)
      if dims[s, t][0] != dims[s, t][1]
    }, {}

  def apply(params, state, s_out, t_out, batch, ctx):
    total = jnp.zeros((), jnp.float32)
    for s, t in pairs:
      fs, ft = s_out.features[s], stop(t_out.features[t])
      proj = params.get(f"{s}->{t}")
      fs = adapter_lib.dense_apply(proj, fs) if proj is not None else fs
      total = total + loss_fn(fs, ft, feature_mask(batch, fs))
    return total * batch_share(ctx, batch), state, {}

  feats_s, feats_t = tuple(dict.fromkeys(s for s, _ in pairs)), tuple(dict.fromkeys(t for _, t in pairs))
  return (Term(name, weight, apply, init, feats_s, feats_t, needs_logits_only=False),)


def make_hidden_mse(name, weight, cfg, student, teacher):
  """``hidden_mse`` (TinyBERT): Σ over mapped layer pairs of MSE(W·h_s, h_t) over real tokens.

  ``W`` is a learned linear map ``D_s → D_t`` per pair (none when the widths
  are equal), initialised as ``nn.Linear``. Jiao et al. 2020.
  """
  return _make_hidden(name, weight, cfg, student, teacher, kdl.hidden_mse)


def make_hidden_cos(name, weight, cfg, student, teacher):
  """``hidden_cos`` (DistilBERT): Σ over mapped layer pairs of 1 − cos(W·h_s, h_t) over real tokens
  (``W`` as in ``hidden_mse``). Sanh et al. 2019."""
  return _make_hidden(name, weight, cfg, student, teacher, kdl.hidden_cosine)


def _flat(x):
  """``(B, L, H, d)`` → ``(B, L, H·d)``; ``(B, L, D)`` unchanged."""
  return x.reshape(x.shape[:2] + (-1,))


def _probe_term(name, weight, per_probe: dict, loss_fn) -> Term:
  """A term summing ``loss_fn(student feature, teacher feature, token mask)`` over each probe's layer pairs."""

  def apply(params, state, s_out, t_out, batch, ctx):
    mask = lead_mask(batch, jnp.shape(batch[batch_keys.INPUTS])[:2])
    total = jnp.zeros((), jnp.float32)
    for pairs in per_probe.values():
      for s, t in pairs:
        total = total + loss_fn(s_out.features[s], stop(t_out.features[t]), mask)
    return total * batch_share(ctx, batch), state, {}

  feats_s = tuple(s for pairs in per_probe.values() for s, _ in pairs)
  feats_t = tuple(t for pairs in per_probe.values() for _, t in pairs)
  return Term(name, weight, apply, student_features=feats_s, teacher_features=feats_t, needs_logits_only=False)


def make_attn_kl(name, weight, cfg, student, teacher):
  """``attn_kl`` (MiniLM's attention transfer): Σ over mapped layer pairs of KL(A_t ‖ A_s) per head and
  real query (``kdl.attention_kl``). Both models need the same number of heads. Wang et al. 2020."""
  teacher = need_teacher(name, teacher)
  pairs = _probe_pairs(name, cfg, student, teacher, "probs")
  for s, t in pairs:
    if shape(student, s, name) != shape(teacher, t, name):
      raise ConfigError(
        f"term {name!r}: student {s!r} {shape(student, s, name)} and teacher {t!r} {shape(teacher, t, name)} "
        "must have the same heads and length; the relation terms 'value_kl' and 'qkv_kl' take any head counts"
      )
  return (_probe_term(name, weight, {"probs": pairs}, kdl.attention_kl),)


def _flat(x):
  """``(B, L, H, d)`` → ``(B, L, H·d)``; ``(B, L, D)`` unchanged."""
  return x.reshape(x.shape[:2] + (-1,))


def _make_relation(name, weight, cfg, student, teacher, probes):
  teacher = need_teacher(name, teacher)
  per_probe = {p: _probe_pairs(name, cfg, student, teacher, p) for p in probes}
  first = shape(student, per_probe[probes[0]][0][0], name)
  heads = cfg.relation_heads or (first[-2] if len(first) == 3 else 1)
  for pairs in per_probe.values():
    for info, f in [(student, s) for s, _ in pairs] + [(teacher, t) for _, t in pairs]:
      width = math.prod(shape(info, f, name)[1:])
      if width % heads:
        raise ConfigError(
          f"term {name!r}: {heads} relation heads do not divide {f!r} of width {width} in {info.name!r}; "
          "set method.relation_heads"
        )

  def loss_fn(fs, ft, mask):
    return kdl.relation_kl(_flat(fs), _flat(ft), heads, mask)

  return (_probe_term(name, weight, per_probe, loss_fn),)


def make_value_kl(name, weight, cfg, student, teacher):
  """``value_kl`` (MiniLM's value relation): Σ over mapped layer pairs of KL(VR_t ‖ VR_s),
  VR = softmax(V Vᵀ/√d) per head (``kdl.relation_kl``; heads: ``method.relation_heads``, default the
  student's value heads). Wang et al. 2020."""
  return _make_relation(name, weight, cfg, student, teacher, ("values",))


def make_qkv_kl(name, weight, cfg, student, teacher):
  """``qkv_kl`` (MiniLMv2): Σ over mapped layer pairs and over queries, keys and values of the relation KL
  with the heads concatenated and re-split into ``method.relation_heads`` relation heads (default: the
  student's query heads), so teacher and student head counts may differ. Wang et al. 2021."""
  return _make_relation(name, weight, cfg, student, teacher, ("queries", "keys", "values"))
