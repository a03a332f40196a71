"""Tests for kdjax.losses relational losses (rkd, pkt, correlation_congruence)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl

B = 5


# ---------------------------------------------------------------- NumPy refs


def np_huber(x, y):
  d = np.abs(x - y)
  return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def np_rkd(s, t, wd=25.0, wa=50.0):
  def dist(e):
    n = e.shape[0]
    d = np.zeros((n, n))
    for i, j in itertools.product(range(n), range(n)):
      d[i, j] = np.linalg.norm(e[i] - e[j])
    off = d[~np.eye(n, dtype=bool)]
    return d / off.mean()

  def angle(e):
    n = e.shape[0]
    a = np.zeros((n, n, n))
    for j, i, k in itertools.product(range(n), range(n), range(n)):
      u, v = e[i] - e[j], e[k] - e[j]
      nu, nv = np.linalg.norm(u), np.linalg.norm(v)
      if nu > 0 and nv > 0:
        a[j, i, k] = u @ v / (nu * nv)
    return a

  return wd * np_huber(dist(s), dist(t)) + wa * np_huber(angle(s), angle(t))


def np_pkt(s, t, eps=1e-7):
  def probs(e):
    e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
    k = (e @ e.T + 1) / 2
    return k / k.sum(1, keepdims=True)

  ps, pt = probs(s), probs(t)
  return (pt * np.log((pt + eps) / (ps + eps))).mean()


def np_cc(s, t):
  d = np.abs(s - t)
  return np.mean([d[i] @ d[i + 1] for i in range(len(d) - 1)])


# ---------------------------------------------------------------- cases


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(B, 6)).astype(np.float32),
    rng.normal(size=(B, 9)).astype(np.float32),
    rng.normal(size=(B, 6)).astype(np.float32),
  )


# name -> (kdjax fn(s, t_wide, t_same), numpy ref, zero when s == t)
CASES = {
  "rkd": (lambda s, t, u: kdl.rkd(s, t), lambda s, t, u: np_rkd(s, t)),
  "rkd_weights": (lambda s, t, u: kdl.rkd(s, t, 1.0, 2.0), lambda s, t, u: np_rkd(s, t, 1.0, 2.0)),
  "pkt": (lambda s, t, u: kdl.pkt(s, t), lambda s, t, u: np_pkt(s, t)),
  "cc": (lambda s, t, u: kdl.correlation_congruence(s, u), lambda s, t, u: np_cc(s, u)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy(name):
  fn, ref = CASES[name]
  args = _inputs()
  got = fn(*map(jnp.asarray, args))
  assert got.dtype == jnp.float32 and got.shape == ()
  want = ref(*(a.astype(np.float64) for a in args))
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)


# Hyper-parameter variants are covered by test_matches_numpy.
@pytest.mark.parametrize("name", ["cc", "pkt", "rkd"])
def test_properties(name):
  fn, _ = CASES[name]
  s, t, u = map(jnp.asarray, _inputs(1))
  eager = fn(s, t, u)
  np.testing.assert_allclose(jax.jit(fn)(s, t, u), eager, rtol=1e-5)
  assert float(eager) >= 0.0
  # zero when student == teacher
  np.testing.assert_allclose(fn(s, s, s), 0.0, atol=1e-6)
  g = jax.grad(fn)(s, t, u)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0
  got16 = fn(*(x.astype(jnp.bfloat16) for x in (s, t, u)))
  assert got16.dtype == jnp.float32 and np.isfinite(got16)
  np.testing.assert_allclose(got16, eager, rtol=5e-2, atol=1e-3)


def test_rkd_gradient_safe_with_duplicate_rows():
  s, t, _ = map(jnp.asarray, _inputs(2))
  s = s.at[1].set(s[0])  # a zero off-diagonal distance as well
  # it still counts in the mean distance (as in the reference, whose clamped
  # d[d > 0] keeps it at 1e-6)
  np.testing.assert_allclose(kdl.rkd(s, t), np_rkd(np.asarray(s, np.float64), np.asarray(t, np.float64)), rtol=1e-5)
  gs, gt = jax.grad(kdl.rkd, argnums=(0, 1))(s, t)
  assert np.all(np.isfinite(gs))
  np.testing.assert_array_equal(gt, 0.0)  # teacher under stop_gradient


def test_pkt_vmap():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(2, B, 4)).astype(np.float32)
  t = rng.normal(size=(2, B, 7)).astype(np.float32)
  got = jax.vmap(kdl.pkt)(s, t)
  for i in range(2):
    np.testing.assert_allclose(got[i], np_pkt(s[i].astype(np.float64), t[i].astype(np.float64)), rtol=1e-5)


@pytest.mark.parametrize(
  "call, arg",
  [
    (lambda s, t, u: kdl.rkd(s, t[:-1]), "teacher_embedding"),
    (lambda s, t, u: kdl.rkd(s[0], t), "student_embedding"),
    (lambda s, t, u: kdl.pkt(s, t[:-1]), "teacher_embedding"),
    (lambda s, t, u: kdl.correlation_congruence(s, t), "teacher_embedding"),
    (lambda s, t, u: kdl.correlation_congruence(s, u[:-1]), "teacher_embedding"),
    (lambda s, t, u: kdl.correlation_congruence(s[:, :, None], u), "student_embedding"),
  ],
)
def test_bad_input_raises(call, arg):
  s, t, u = map(jnp.asarray, _inputs())
  with pytest.raises(ValueError, match=arg):
    call(s, t, u)
