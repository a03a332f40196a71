"""Tests for kdjax.losses token-level losses and their chunked evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl

B, L, V = 2, 7, 13


# ---------------------------------------------------------------- NumPy refs


def np_logp(z, T=1.0):
  z = z / T
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(logp, logq):
  return (np.exp(logp) * (logp - logq)).sum(-1)


def np_masked_mean(x, mask):
  m = np.ones(x.shape) if mask is None else np.asarray(mask, np.float64)
  return (x * m).sum() / max(m.sum(), 1.0)


def np_fkl(s, t, mask=None, T=1.0):
  return np_masked_mean(np_kl(np_logp(t, T), np_logp(s, T)), mask)


def np_rkl(s, t, mask=None, T=1.0):
  return np_masked_mean(np_kl(np_logp(s, T), np_logp(t, T)), mask)


def np_gjsd(s, t, beta, mask=None, T=1.0):
  ps, pt = np.exp(np_logp(s, T)), np.exp(np_logp(t, T))
  if beta == 0:
    per = (pt * np.log(pt / ps)).sum(-1)
  elif beta == 1:
    per = (ps * np.log(ps / pt)).sum(-1)
  else:
    m = (1 - beta) * ps + beta * pt
    per = beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)
  return np_masked_mean(per, mask)


def np_tvd(s, t, mask=None, T=1.0):
  ps, pt = np.exp(np_logp(s, T)), np.exp(np_logp(t, T))
  return np_masked_mean(0.5 * np.abs(pt - ps).sum(-1), mask)


def np_sparse_kl(s, t_lp, t_idx, mask=None):
  ls = np_logp(s)
  per = np.zeros(s.shape[:2])
  for b in range(s.shape[0]):
    for l in range(s.shape[1]):
      for lp, i in zip(t_lp[b, l], t_idx[b, l]):
        per[b, l] += np.exp(lp) * (lp - ls[b, l, i])
  return np_masked_mean(per, mask)


# ---------------------------------------------------------------- inputs


def _inputs(seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(B, L, V)) * scale).astype(np.float32)
  t = (rng.normal(size=(B, L, V)) * scale).astype(np.float32)
  mask = rng.random((B, L)) < 0.7
  mask[0, 0] = True
  return s, t, mask


MASKS = {
  "none": lambda m: None,
  "bool": lambda m: m,
  "float": lambda m: m.astype(np.float32),
}

# name -> (kdjax fn(s, t, mask), numpy ref(s, t, mask))
CASES = {
  "forward_kl": (lambda s, t, m: kdl.forward_kl(s, t, m), lambda s, t, m: np_fkl(s, t, m)),
  "forward_kl_T2": (lambda s, t, m: kdl.forward_kl(s, t, m, 2.0), lambda s, t, m: np_fkl(s, t, m, 2.0)),
  "reverse_kl": (lambda s, t, m: kdl.reverse_kl(s, t, m), lambda s, t, m: np_rkl(s, t, m)),
  "gjsd_0.5": (lambda s, t, m: kdl.generalized_jsd(s, t, 0.5, m), lambda s, t, m: np_gjsd(s, t, 0.5, m)),
  "gjsd_0.1_T2": (
    lambda s, t, m: kdl.generalized_jsd(s, t, 0.1, m, temperature=2.0),
    lambda s, t, m: np_gjsd(s, t, 0.1, m, 2.0),
  ),
  "gjsd_0": (lambda s, t, m: kdl.generalized_jsd(s, t, 0.0, m), lambda s, t, m: np_gjsd(s, t, 0.0, m)),
  "gjsd_1": (lambda s, t, m: kdl.generalized_jsd(s, t, 1.0, m), lambda s, t, m: np_gjsd(s, t, 1.0, m)),
  "tvd": (lambda s, t, m: kdl.tvd(s, t, m), lambda s, t, m: np_tvd(s, t, m)),
}


@pytest.mark.parametrize("mask_kind", sorted(MASKS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy(name, mask_kind):
  fn, ref = CASES[name]
  s, t, mask = _inputs()
  m = MASKS[mask_kind](mask)
  got = fn(jnp.asarray(s), jnp.asarray(t), None if m is None else jnp.asarray(m))
  assert got.dtype == jnp.float32 and got.shape == ()
  want = ref(s.astype(np.float64), t.astype(np.float64), m)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)


# Hyper-parameter variants are covered by test_matches_numpy.
@pytest.mark.parametrize("name", ["forward_kl", "gjsd_0.1_T2", "gjsd_0.5", "reverse_kl", "tvd"])
def test_properties(name):
  fn, _ = CASES[name]
  s, t, mask = map(jnp.asarray, _inputs(1))
  eager = fn(s, t, mask)
  np.testing.assert_allclose(jax.jit(fn)(s, t, mask), eager, rtol=1e-5)
  assert float(eager) >= 0.0
  np.testing.assert_allclose(fn(t, t, mask), 0.0, atol=1e-6)
  g = jax.grad(fn)(s, t, mask)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0
  # masked-out tokens get no gradient
  assert float(jnp.abs(g[~mask]).sum()) == 0.0
  got16 = fn(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), mask)
  assert got16.dtype == jnp.float32 and np.isfinite(got16)
  np.testing.assert_allclose(got16, eager, rtol=5e-2, atol=1e-2)


def test_gjsd_endpoints_and_traced_beta():
  s, t, mask = map(jnp.asarray, _inputs(2))
  fkl, rkl = kdl.forward_kl(s, t, mask), kdl.reverse_kl(s, t, mask)
  np.testing.assert_allclose(kdl.generalized_jsd(s, t, 0.0, mask), fkl, rtol=1e-6)
  np.testing.assert_allclose(kdl.generalized_jsd(s, t, 1.0, mask), rkl, rtol=1e-6)
  # traced beta (e.g. a schedule): same endpoints, same interior values
  f = jax.jit(lambda b: kdl.generalized_jsd(s, t, b, mask))
  np.testing.assert_allclose(f(0.0), fkl, rtol=1e-5)
  np.testing.assert_allclose(f(1.0), rkl, rtol=1e-5)
  np.testing.assert_allclose(f(0.3), kdl.generalized_jsd(s, t, 0.3, mask), rtol=1e-5)
  # the symmetric JSD (beta = 0.5) is bounded by log 2
  assert 0.0 < float(kdl.generalized_jsd(s, t, 0.5, mask)) <= np.log(2.0)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "gjsd_0.5", "gjsd_0.1_T2", "tvd"])
def test_extreme_logits_finite(name):
  fn, _ = CASES[name]
  rng = np.random.default_rng(3)
  s = rng.choice([-1e4, 0.0, 1e4], size=(B, L, V)).astype(np.float32)
  t = rng.choice([-1e4, 0.0, 1e4], size=(B, L, V)).astype(np.float32)
  # plus (numerically) one-hot teachers / students: probabilities of exactly 0
  t[0, 0], s[0, 0] = -1e4, 0.0
  t[0, 0, 3] = 1e4
  s[0, 1], t[0, 1] = -1e4, -1e4
  s[0, 1, 2], t[0, 1, 2], t[0, 1, 5] = 1e4, 1e4, 0.0
  val, g = jax.value_and_grad(fn)(jnp.asarray(s), jnp.asarray(t), None)
  assert np.isfinite(val) and np.all(np.isfinite(g))
  g_t = jax.grad(fn, argnums=1)(jnp.asarray(s), jnp.asarray(t), None)
  assert np.all(np.isfinite(g_t))


def test_sparse_kl_and_teacher_topk():
  s, t, mask = _inputs(4)
  lp, idx = kdl.teacher_topk(jnp.asarray(t), 4)
  assert lp.shape == idx.shape == (B, L, 4) and idx.dtype == jnp.int32
  full = np_logp(t.astype(np.float64))
  want_idx = np.argsort(-full, axis=-1)[..., :4]
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(lp, np.take_along_axis(full, want_idx, -1), rtol=1e-5)
  got = kdl.sparse_kl(jnp.asarray(s), lp, idx, jnp.asarray(mask))
  want = np_sparse_kl(s.astype(np.float64), np.asarray(lp, np.float64), np.asarray(idx), mask)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # with k = V it is the full forward KL
  lp_all, idx_all = kdl.teacher_topk(jnp.asarray(t), V)
  np.testing.assert_allclose(
    kdl.sparse_kl(jnp.asarray(s), lp_all, idx_all, jnp.asarray(mask)),
    kdl.forward_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)),
    rtol=1e-5,
  )
  g = jax.grad(kdl.sparse_kl)(jnp.asarray(s, jnp.bfloat16), lp, idx)
  assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize(
  "name, kw",
  [
    ("forward_kl", {}),
    ("reverse_kl", {"temperature": 2.0}),
    ("generalized_jsd", {"beta": 0.3}),
    ("tvd", {}),
  ],
)
def test_chunked_equals_unchunked(name, kw):
  s, t, mask = map(jnp.asarray, _inputs(5))
  plain = getattr(kdl, name)
  want = plain(s, t, mask=mask, **kw)
  for chunk in (1, 3, L, 64):  # 3 does not divide L = 7: padded chunk
    got = kdl.chunked_token_loss(name, s, t, mask, chunk_size=chunk, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  g_want = jax.grad(lambda s: plain(s, t, mask=mask, **kw))(s)
  g_got = jax.jit(jax.grad(lambda s: kdl.chunked_token_loss(name, s, t, mask, chunk_size=3, **kw)))(s)
  np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-7)


def test_chunked_from_hidden_states_and_callable():
  rng = np.random.default_rng(6)
  hidden = jnp.asarray(rng.normal(size=(B, L, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, V)), jnp.float32)
  _, t, mask = map(jnp.asarray, _inputs(6))
  want = kdl.forward_kl(hidden @ w, t, mask)
  got = kdl.chunked_token_loss("forward_kl", None, t, mask, chunk_size=2, student_hidden=hidden, unembedding=w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  gw = jax.grad(
    lambda w: kdl.chunked_token_loss("forward_kl", None, t, mask, chunk_size=2, student_hidden=hidden, unembedding=w)
  )(w)
  gw_want = jax.grad(lambda w: kdl.forward_kl(hidden @ w, t, mask))(w)
  np.testing.assert_allclose(gw, gw_want, rtol=1e-4, atol=1e-6)
  # a user per-token function: (B, c, V), (B, c, V) -> (B, c)
  sq = lambda s, t: jnp.mean((s - t) ** 2, axis=-1)
  s = hidden @ w
  got = kdl.chunked_token_loss(sq, s, t, mask, chunk_size=4)
  m = np.asarray(mask, np.float64)
  want = (np.mean((np.asarray(s) - np.asarray(t)) ** 2, -1) * m).sum() / m.sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # padded positions of the last chunk (L = 7, chunk 3) never count
  ones = lambda s, t: jnp.ones(s.shape[:2])
  np.testing.assert_allclose(kdl.chunked_token_loss(ones, s, t, None, chunk_size=3), 1.0, rtol=1e-6)


def test_chunked_memory_does_not_grow_with_length():
  # Compiled scratch memory of value+grad (w.r.t. hidden states and the
  # unembedding): constant in L for the chunked loss, while the unchunked
  # loss needs several (B, L, V) buffers.
  d, v = 16, 2048

  def temp_bytes(length, chunked):
    h = jax.ShapeDtypeStruct((1, length, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((1, length, v), jnp.float32)
    if chunked:
      f = lambda h, w, t: kdl.chunked_token_loss("forward_kl", None, t, chunk_size=16, student_hidden=h, unembedding=w)
    else:
      f = lambda h, w, t: kdl.forward_kl(h @ w, t)
    g = jax.jit(jax.grad(f, argnums=(0, 1)))
    stats = g.lower(h, w, t).compile().memory_analysis()
    if stats is None:
      pytest.skip("backend has no memory analysis")
    return stats.temp_size_in_bytes

  one_blv = 1024 * v * 4
  small, large = temp_bytes(256, True), temp_bytes(1024, True)
  assert large <= 1.1 * small, (small, large)
  assert large < 0.5 * one_blv
  assert temp_bytes(1024, False) > one_blv


def test_all_masked_is_zero_not_nan():
  s, t, _ = map(jnp.asarray, _inputs(7))
  zero = jnp.zeros((B, L), bool)
  assert float(kdl.forward_kl(s, t, zero)) == 0.0
  assert float(kdl.chunked_token_loss("tvd", s, t, zero, chunk_size=3)) == 0.0


@pytest.mark.parametrize(
  "call, arg",
  [
    (lambda s, t, m: kdl.forward_kl(s[0], t[0]), "student_logits"),
    (lambda s, t, m: kdl.reverse_kl(s, t[:1]), "teacher_logits"),
    (lambda s, t, m: kdl.tvd(s, t, m[:, :-1]), "mask"),
    (lambda s, t, m: kdl.forward_kl(s, t, m[None]), "mask"),
    (lambda s, t, m: kdl.forward_kl(s, t, temperature=0.0), "temperature"),
    (lambda s, t, m: kdl.generalized_jsd(s, t, 1.5), "beta"),
    (lambda s, t, m: kdl.generalized_jsd(s, t, temperature=-2.0), "temperature"),
    (lambda s, t, m: kdl.chunked_token_loss("forward_kl", s, t, m[:, :3]), "mask"),
    (lambda s, t, m: kdl.chunked_token_loss("forward_kl", s, t, temperature=0.0), "temperature"),
    (lambda s, t, m: kdl.chunked_token_loss("nope", s, t), "loss"),
    (lambda s, t, m: kdl.chunked_token_loss("tvd", s, t, chunk_size=0), "chunk_size"),
    (lambda s, t, m: kdl.sparse_kl(s, *kdl.teacher_topk(t[:1], 3)), "teacher_topk_logprobs"),
    (lambda s, t, m: kdl.sparse_kl(s, t[..., :3], jnp.full((B, L, 3), V, jnp.int32)), "teacher_topk_indices"),
    (lambda s, t, m: kdl.teacher_topk(t, V + 1), "k"),
  ],
)
def test_bad_input_raises(call, arg):
  s, t, mask = map(jnp.asarray, _inputs())
  with pytest.raises(ValueError, match=arg):
    call(s, t, mask)
