"""CRD: contrastive representation distillation with a memory bank as method state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import batch as batch_keys
from kdjax.errors import ConfigError
import kdjax.losses as kdl
from kdjax.methods import adapters as adapter_lib
from kdjax.methods._common import need_teacher, opt, shape, stop
from kdjax.methods.base import Term

_P = "pooled"


def crd_num_negatives(requested: int, num_examples: int) -> int:
  """K actually used: ``min(requested, num_examples − 1)`` (tiny datasets)."""
  return max(1, min(int(requested), int(num_examples) - 1))


def make_crd(name, weight, cfg, student, teacher):
  """``crd``: two-way NCE between embed heads and a momentum memory bank.

  Heads: ``Linear(pooled → feat_dim=128)`` + L2 normalisation for the
  student and for the teacher (both trainable, RepDistiller's ``Embed``).
  State: ``kdl.crd_init(key, num_examples, feat_dim)`` (``InitInfo``).
  Each step draws K = ``crd_negatives`` (16384) negative rows uniformly from
  all N rows with the step's ``ctx.key``, as RepDistiller's uniform
  AliasMethod does — a negative may coincide with the positive; K is
  clamped to N − 1 for tiny datasets. Positives are ``batch["id"]`` (the
  examples' dataset indices, ``0 … N−1``). NCE temperature 0.07, memory
  momentum 0.5.
  """
  teacher = need_teacher(name, teacher)
  ds, dt = shape(student, _P, name)[-1], shape(teacher, _P, name)[-1]
  dim = opt(cfg.feat_dim, 128)
  k_req = opt(cfg.crd_negatives, 16384)
  temp, mom = opt(cfg.crd_temperature, 0.07), opt(cfg.crd_momentum, 0.5)

  def init(key, s_out, t_out, info):
    if info.num_examples < 2:
      raise ConfigError(
        f"term {name!r} needs a training set of ≥ 2 examples for negatives, got num_examples={info.num_examples}"
      )
    kp, ks, kb = jax.random.split(key, 3)
    params = {"student": adapter_lib.linear_init(kp, ds, dim), "teacher": adapter_lib.linear_init(ks, dt, dim)}
    return params, kdl.crd_init(kb, info.num_examples, dim)

  def apply(params, bank, s_out, t_out, batch, ctx):
    es = adapter_lib.l2_normalize(adapter_lib.linear_apply(params["student"], s_out.features[_P]))
    et = adapter_lib.l2_normalize(adapter_lib.linear_apply(params["teacher"], stop(t_out.features[_P])))
    n = bank.student.shape[0]
    k = crd_num_negatives(k_req, n)
    neg = kdl.crd_negatives(ctx.key, es.shape[0], n, k)
    ids = jnp.asarray(batch[batch_keys.ID]).astype(jnp.int32)
    loss, new_bank = kdl.crd(bank, es, et, ids, neg, temperature=temp, momentum=mom)
    return loss, new_bank, {}

  return (Term(name, weight, apply, init, (_P,), (_P,), needs_logits_only=False),)
