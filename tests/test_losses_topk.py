"""Top-k teacher losses (teacher-output caches for large vocabularies).

Each ``kdl.topk_*`` divergence is checked against the (k + 1)-bucket
formula written out in NumPy here (float64), against the full-vocabulary
loss when k = V, and against the data-processing inequality: coarse-graining
the vocabulary to {top-k tokens, rest} can only lower an f-divergence, with
equality when the student spreads its tail like the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl
from test_losses_sequence import B, L, V, _inputs, np_logp  # (2, 7, 13) logits, mask; NumPy log-softmax

K = 4


def np_topk(t, k):
  lp = np_logp(np.asarray(t, np.float64))
  idx = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(lp, idx, -1), idx


def np_buckets(s, a, idx, T=1.0):
  """(k+1)-bucket probabilities, written per token with plain loops."""
  vocab, k = s.shape[-1], a.shape[-1]
  ps_full = np.exp(np_logp(np.asarray(s, np.float64), T))
  ps = np.zeros(a.shape[:-1] + (k + (k < vocab),))
  pt = np.zeros_like(ps)
  for pos in np.ndindex(*a.shape[:-1]):
    top = list(idx[pos])
    ps[pos][:k] = ps_full[pos][top]
    if k < vocab:
      ps[pos][k] = ps_full[pos][[v for v in range(vocab) if v not in top]].sum()
      r = max(1.0 - np.exp(a[pos]).sum(), 1e-12)
      w = np.append(np.exp(a[pos] / T), (vocab - k) * (r / (vocab - k)) ** (1.0 / T))  # even tail, tempered
    else:
      w = np.exp(a[pos] / T)
    pt[pos] = w / w.sum()
  return ps, pt


def np_div(name, ps, pt, beta=0.5):
  kl = lambda p, q: np.sum(np.where(p > 0, p * np.log(p / q), 0.0), -1)  # noqa: E731
  if name == "forward_kl":
    return kl(pt, ps)
  if name == "reverse_kl":
    return kl(ps, pt)
  if name == "tvd":
    return 0.5 * np.abs(pt - ps).sum(-1)
  m = (1 - beta) * ps + beta * pt
  return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def masked_mean(x, mask):
  m = np.ones(x.shape) if mask is None else np.asarray(mask, np.float64)
  return (x * m).sum() / max(m.sum(), 1.0)


TOPK = {
  "forward_kl": lambda s, a, i, m, T: kdl.topk_forward_kl(s, a, i, m, temperature=T),
  "reverse_kl": lambda s, a, i, m, T: kdl.topk_reverse_kl(s, a, i, m, temperature=T),
  "gjsd": lambda s, a, i, m, T: kdl.topk_generalized_jsd(s, a, i, beta=0.3, mask=m, temperature=T),
  "tvd": lambda s, a, i, m, T: kdl.topk_tvd(s, a, i, m, temperature=T),
}
FULL = {
  "forward_kl": lambda s, t, m: kdl.forward_kl(s, t, m),
  "reverse_kl": lambda s, t, m: kdl.reverse_kl(s, t, m),
  "gjsd": lambda s, t, m: kdl.generalized_jsd(s, t, 0.3, m),
  "tvd": lambda s, t, m: kdl.tvd(s, t, m),
}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(TOPK))
def test_topk_losses_match_numpy_buckets(name, temperature):
  s, t, mask = _inputs()
  a, idx = np_topk(t, K)
  got = TOPK[name](
    jnp.asarray(s), jnp.asarray(a, jnp.float32), jnp.asarray(idx, jnp.int32), jnp.asarray(mask), temperature
  )
  assert got.dtype == jnp.float32 and got.shape == ()
  ps, pt = np_buckets(s, a.astype(np.float32).astype(np.float64), idx, temperature)
  want = masked_mean(np_div("gjsd" if name == "gjsd" else name, ps, pt, beta=0.3), mask)
  assert want > 1e-3
  np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(TOPK))
def test_topk_with_k_equal_vocab_is_the_full_loss(name):
  s, t, mask = _inputs(1)
  a, idx = kdl.teacher_topk(jnp.asarray(t), V)
  got = TOPK[name](jnp.asarray(s), a, idx, jnp.asarray(mask), 1.0)
  np.testing.assert_allclose(
    float(got), float(FULL[name](jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))), rtol=2e-6, atol=1e-7
  )


@pytest.mark.parametrize("name", sorted(TOPK))
def test_data_processing_inequality_and_its_equality_case(name):
  """Per token at T = 1: 0 ≤ top-k divergence ≤ full divergence; equal when
  the student's tail is the teacher's tail up to a constant factor."""
  rng = np.random.default_rng(2)
  s = (rng.normal(size=(B, L, V)) * 2).astype(np.float32)
  t = (rng.normal(size=(B, L, V)) * 2).astype(np.float32)
  a, idx = kdl.teacher_topk(jnp.asarray(t), K)
  per = lambda fn, *x: np.asarray(
    [
      [float(fn(*(y[b : b + 1, l : l + 1] for y in x))) for l in range(L)]  # noqa: E731
      for b in range(B)
    ]
  )
  coarse = per(lambda s_, a_, i_: TOPK[name](s_, a_, i_, None, 1.0), jnp.asarray(s), a, idx)
  full = per(lambda s_, t_: FULL[name](s_, t_, None), jnp.asarray(s), jnp.asarray(t))
  assert np.all(coarse >= -1e-7) and np.all(coarse <= full + 1e-6)
  assert np.mean(coarse < full - 1e-3) > 0.5  # strictly lower in general
  # equality: student = teacher shifted on the tail (same conditional tail), other values on the top-k
  in_top = np.zeros((B, L, V), bool)
  np.put_along_axis(in_top, np.asarray(idx), True, axis=-1)
  s_eq = np.where(in_top, s, t + 0.7).astype(np.float32)
  coarse_eq = per(lambda s_, a_, i_: TOPK[name](s_, a_, i_, None, 1.0), jnp.asarray(s_eq), a, idx)
  full_eq = per(lambda s_, t_: FULL[name](s_, t_, None), jnp.asarray(s_eq), jnp.asarray(t))
  np.testing.assert_allclose(coarse_eq, full_eq, rtol=2e-5, atol=2e-6)
  assert np.all(full_eq > 1e-3)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_topk_to_logits_is_the_teacher_the_buckets_see(temperature):
  """Dense reconstruction (used by kd/dkd/dist) and the top-k buckets describe
  one teacher at every temperature; at T = 1 its top-k entries and tail mass
  are the stored ones."""
  _, t, _ = _inputs(3)
  a, idx = kdl.teacher_topk(jnp.asarray(t), K)
  dense = np.asarray(kdl.topk_to_logits(a, idx, V), np.float64)
  np.testing.assert_allclose(np.exp(dense).sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.take_along_axis(dense, np.asarray(idx), -1), a, rtol=1e-6)
  # the tail is flat and holds the teacher's exact tail mass
  in_top = np.zeros(dense.shape, bool)
  np.put_along_axis(in_top, np.asarray(idx), True, axis=-1)
  tail = np.where(in_top, -np.inf, dense)
  np.testing.assert_allclose(np.exp(tail).sum(-1), 1 - np.exp(np.asarray(a, np.float64)).sum(-1), rtol=1e-5)
  assert np.ptp(np.where(in_top, np.nan, dense)[~in_top].reshape(B, L, V - K), axis=-1).max() < 1e-6
  # softmax(dense / T) coarse-grained == the buckets' teacher row
  s = jnp.zeros((B, L, V))
  _, lt = kdl.topk_buckets(s, a, idx, temperature)
  pd = np.exp(np_logp(dense, temperature))
  coarse = np.concatenate(
    [np.take_along_axis(pd, np.asarray(idx), -1), np.where(in_top, 0, pd).sum(-1, keepdims=True)], -1
  )
  np.testing.assert_allclose(np.exp(np.asarray(lt)), coarse, rtol=1e-5, atol=1e-7)
  # … and equals NumPy's reconstruction in the cache reader
  from kdjax.data import cache as C
  from kdjax.data import views

  meta = {"views": 1, "view_seed": 0, "num_classes": V, "top_k": K, "view": C.view_fingerprint(views.ViewConfig())}
  arr = {"topk_logp": np.asarray(a).reshape(B * L, 1, K), "topk_idx": np.asarray(idx).reshape(B * L, 1, K)}
  host = C.TeacherCache(meta, np.arange(B * L), arr).logits(np.arange(B * L), np.zeros(B * L, int))
  np.testing.assert_allclose(host.reshape(B, L, V), dense, rtol=1e-6, atol=1e-6)


def test_gradients_finite_for_confident_students_and_float16_teachers():
  """A student with (almost) all mass on the top-k, and float16 teacher
  log-probs whose top-k mass rounds past 1 (tail floored, not NaN)."""
  s, t, mask = _inputs(4, scale=40.0)
  a, idx = kdl.teacher_topk(jnp.asarray(t * 3), K)
  a16 = jnp.asarray(a, jnp.float16)
  s_conf = np.asarray(s).copy()
  np.put_along_axis(s_conf, np.asarray(idx), 1e4, axis=-1)
  for name, fn in TOPK.items():
    for student in (s, s_conf):
      for dtype in (jnp.float32, jnp.bfloat16):
        v, g = jax.value_and_grad(lambda x: fn(x, a16, idx, jnp.asarray(mask), 2.0))(jnp.asarray(student, dtype))
        assert np.isfinite(float(v)) and float(v) >= -1e-6, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
  # masked-out tokens get no gradient; jit == eager
  g = jax.grad(lambda x: kdl.topk_forward_kl(x, a, idx, jnp.asarray(mask)))(jnp.asarray(s))
  assert np.all(np.asarray(g)[~mask] == 0) and np.abs(np.asarray(g)[mask]).max() > 0
  np.testing.assert_allclose(
    jax.jit(kdl.topk_tvd)(jnp.asarray(s), a, idx), kdl.topk_tvd(jnp.asarray(s), a, idx), rtol=1e-6
  )


def test_topk_bad_inputs_name_the_argument():
  s, t, _ = _inputs()
  a, idx = kdl.teacher_topk(jnp.asarray(t), K)
  with pytest.raises(ValueError, match="teacher_topk_indices must have the shape"):
    kdl.topk_forward_kl(jnp.asarray(s), a, idx[..., :2])
  with pytest.raises(ValueError, match="agree on every axis but the last"):
    kdl.topk_reverse_kl(jnp.asarray(s)[:, :2], a, idx)
  with pytest.raises(ValueError, match="teacher_topk_indices"):
    kdl.topk_tvd(jnp.asarray(s), a, idx + V)
  with pytest.raises(ValueError, match="k=18 must lie in"):
    kdl.topk_to_logits(jnp.zeros((2, 18)), jnp.zeros((2, 18), jnp.int32), V)
  with pytest.raises(ValueError, match="beta"):
    kdl.topk_generalized_jsd(jnp.asarray(s), a, idx, beta=1.5)
