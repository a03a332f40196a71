"""Terms on the pooled embedding: CC, RKD, PKT (RepDistiller's ``feat[-1]``)."""

from __future__ import annotations

import jax

import kdjax.losses as kdl
from kdjax.methods import adapters as adapter_lib
from kdjax.methods._common import need_teacher, opt, shape, stop
from kdjax.methods.base import Term

_P = "pooled"


def make_cc(name, weight, cfg, student, teacher):
  """``cc``: correlation congruence on LinearEmbed(pooled) of both models.

  Two trainable heads ``Linear(D → feat_dim)`` (default 128), one per model,
  as RepDistiller's ``LinearEmbed`` (no normalisation).
  """
  teacher = need_teacher(name, teacher)
  ds, dt = shape(student, _P, name)[-1], shape(teacher, _P, name)[-1]
  dim = opt(cfg.feat_dim, 128)

  def init(key, s_out, t_out, info):
    ks, kt = jax.random.split(key)
    return {"student": adapter_lib.linear_init(ks, ds, dim), "teacher": adapter_lib.linear_init(kt, dt, dim)}, {}

  def apply(params, state, s_out, t_out, batch, ctx):
    es = adapter_lib.linear_apply(params["student"], s_out.features[_P])
    et = adapter_lib.linear_apply(params["teacher"], stop(t_out.features[_P]))
    return kdl.correlation_congruence(es, et), state, {}

  return (Term(name, weight, apply, init, (_P,), (_P,), needs_logits_only=False),)


def make_rkd(name, weight, cfg, student, teacher):
  """``rkd``: relational KD on pooled embeddings (distance 25, angle 50)."""
  need_teacher(name, teacher)

  def apply(params, state, s_out, t_out, batch, ctx):
    return kdl.rkd(s_out.features[_P], stop(t_out.features[_P]), 25.0, 50.0), state, {}

  return (Term(name, weight, apply, student_features=(_P,), teacher_features=(_P,), needs_logits_only=False),)


def make_pkt(name, weight, cfg, student, teacher):
  """``pkt``: probabilistic knowledge transfer on pooled embeddings."""
  need_teacher(name, teacher)

  def apply(params, state, s_out, t_out, batch, ctx):
    return kdl.pkt(s_out.features[_P], stop(t_out.features[_P])), state, {}

  return (Term(name, weight, apply, student_features=(_P,), teacher_features=(_P,), needs_logits_only=False),)
