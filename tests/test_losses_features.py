"""Tests for kdjax.losses feature losses against NumPy float64 formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl

B = 3


# ---------------------------------------------------------------- NumPy refs


def np_pool(x, h, w):
  b, xh, xw, c = x.shape
  fh, fw = xh // h, xw // w
  out = np.zeros((b, h, w, c))
  for i in range(h):
    for j in range(w):
      out[:, i, j] = x[:, i * fh : (i + 1) * fh, j * fw : (j + 1) * fw].mean((1, 2))
  return out


def np_match(a, b):
  if a.shape[1] > b.shape[1]:
    return np_pool(a, *b.shape[1:3]), b
  if b.shape[1] > a.shape[1]:
    return a, np_pool(b, *a.shape[1:3])
  return a, b


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_hint(s, t):
  return ((s - t) ** 2).mean()


def np_at(s, t, p=2):
  s, t = np_match(s, t)

  def at(f):
    return np_normalize((f**p).mean(-1).reshape(f.shape[0], -1))

  return ((at(s) - at(t)) ** 2).mean()


def np_sp(s, t):
  b = s.shape[0]
  fs, ft = s.reshape(b, -1), t.reshape(b, -1)
  gs, gt = np_normalize(fs @ fs.T), np_normalize(ft @ ft.T)
  return ((gt - gs) ** 2).sum() / b**2


def np_nst(s, t):
  s, t = np_match(s, t)
  total = 0.0
  for b in range(s.shape[0]):
    fs = np_normalize(s[b].reshape(-1, s.shape[-1]).T)  # (C_s, HW)
    ft = np_normalize(t[b].reshape(-1, t.shape[-1]).T)
    k = lambda x, y: ((x @ y.T) ** 2).mean()
    total += k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)
  return total / s.shape[0]


def np_fsp(sa, sb, ta, tb):
  def g(a, b):
    a, b = np_match(a, b)
    hw = a.shape[1] * a.shape[2]
    out = np.zeros((a.shape[0], a.shape[-1], b.shape[-1]))
    for n in range(a.shape[0]):
      out[n] = a[n].reshape(hw, -1).T @ b[n].reshape(hw, -1) / hw
    return out

  return ((g(sa, sb) - g(ta, tb)) ** 2).mean()


def np_ft(s, t, p):
  b = s.shape[0]
  d = np_normalize(s.reshape(b, -1)) - np_normalize(t.reshape(b, -1))
  return (np.abs(d) ** p).mean()


def np_ab(s, t, m):
  total = 0.0
  for sv, tv in zip(s.ravel(), t.ravel()):
    if sv > -m and tv <= 0:
      total += (sv + m) ** 2
    if sv <= m and tv > 0:
      total += (sv - m) ** 2
  return total / s.size


def np_vid(mu, t, log_scale, eps=1e-5):
  var = np.log1p(np.exp(log_scale)) + eps
  return (0.5 * ((mu - t) ** 2 / var + np.log(var))).mean()


# ---------------------------------------------------------------- cases


def _arr(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return dict(
    s=_arr(rng, B, 8, 8, 4),  # student map
    t=_arr(rng, B, 4, 4, 6),  # teacher map: smaller, more channels
    t_same=_arr(rng, B, 8, 8, 4),  # teacher map with the student's shape
    sb=_arr(rng, B, 4, 4, 5),  # second student layer
    tb=_arr(rng, B, 4, 4, 5),
    ta=_arr(rng, B, 8, 8, 4),
    log_scale=_arr(rng, 4),
  )


# name -> (kdjax fn of inputs dict, numpy ref of inputs dict, zero-case fn)
CASES = {
  "hint": (
    lambda d: kdl.hint(d["s"], d["t_same"]),
    lambda d: np_hint(d["s"], d["t_same"]),
    lambda d: kdl.hint(d["s"], d["s"]),
  ),
  "hint_pooled": (
    lambda d: kdl.hint(d["s"], d["ta"][:, ::2, ::2]),
    lambda d: np_hint(np_pool(d["s"], 4, 4), d["ta"][:, ::2, ::2]),
    None,
  ),
  "at": (
    lambda d: kdl.attention_transfer(d["s"], d["t"]),
    lambda d: np_at(d["s"], d["t"]),
    lambda d: kdl.attention_transfer(d["s"], d["s"]),
  ),
  "at_p4": (lambda d: kdl.attention_transfer(d["s"], d["t"], p=4), lambda d: np_at(d["s"], d["t"], 4), None),
  "sp": (
    lambda d: kdl.similarity_preserving(d["s"], d["t"]),
    lambda d: np_sp(d["s"], d["t"]),
    lambda d: kdl.similarity_preserving(d["s"], d["s"]),
  ),
  "nst": (lambda d: kdl.nst(d["s"], d["t"]), lambda d: np_nst(d["s"], d["t"]), lambda d: kdl.nst(d["s"], d["s"])),
  "fsp": (
    lambda d: kdl.fsp(d["s"], d["sb"], d["ta"], d["tb"]),
    lambda d: np_fsp(d["s"], d["sb"], d["ta"], d["tb"]),
    lambda d: kdl.fsp(d["s"], d["sb"], d["s"], d["sb"]),
  ),
  "ft_p1": (
    lambda d: kdl.factor_transfer(d["s"], d["t_same"]),
    lambda d: np_ft(d["s"], d["t_same"], 1),
    lambda d: kdl.factor_transfer(d["s"], d["s"]),
  ),
  "ft_p2": (lambda d: kdl.factor_transfer(d["s"], d["t_same"], p=2), lambda d: np_ft(d["s"], d["t_same"], 2), None),
  "ab": (lambda d: kdl.activation_boundary(d["s"], d["t_same"]), lambda d: np_ab(d["s"], d["t_same"], 1.0), None),
  "ab_m05": (
    lambda d: kdl.activation_boundary(d["s"], d["t_same"], 0.5),
    lambda d: np_ab(d["s"], d["t_same"], 0.5),
    None,
  ),
  "vid": (
    lambda d: kdl.vid(d["s"], d["t_same"], d["log_scale"]),
    lambda d: np_vid(d["s"], d["t_same"], d["log_scale"]),
    None,
  ),
}


def _f64(d):
  return {k: v.astype(np.float64) for k, v in d.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy(name):
  fn, ref, _ = CASES[name]
  d = _inputs()
  got = fn({k: jnp.asarray(v) for k, v in d.items()})
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), ref(_f64(d)), rtol=1e-5, atol=1e-7)


# Hyper-parameter variants are covered by test_matches_numpy.
@pytest.mark.parametrize("name", ["ab", "at", "fsp", "ft_p1", "hint", "nst", "sp", "vid"])
def test_properties(name):
  fn, _, zero = CASES[name]
  d = {k: jnp.asarray(v) for k, v in _inputs(1).items()}
  eager = fn(d)
  np.testing.assert_allclose(jax.jit(fn)(d), eager, rtol=1e-5)
  if zero is not None:
    np.testing.assert_allclose(zero(d), 0.0, atol=1e-6)
    assert float(eager) >= 0.0
  grads = jax.grad(fn)(d)
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  assert float(jnp.abs(grads["s"]).sum()) > 0  # the student gets a gradient
  d16 = {k: v.astype(jnp.bfloat16) for k, v in d.items()}
  got16 = fn(d16)
  assert got16.dtype == jnp.float32 and np.isfinite(got16)
  np.testing.assert_allclose(got16, eager, rtol=5e-2, atol=1e-3)


def test_ab_reference_scale_documented():
  # The documented conversion to RepDistiller's scale: × H·W·C / 1000.
  d = _inputs(2)
  s, t = d["s"], d["t_same"]
  ref_sum = np_ab(s, t, 1.0) * s.size / B / 1000  # sum / B / 1000
  got = kdl.activation_boundary(s, t) * (8 * 8 * 4) / 1000
  np.testing.assert_allclose(got, ref_sum, rtol=1e-5)


def test_pool_to_match():
  d = _inputs(3)
  a, b = kdl.pool_to_match(jnp.asarray(d["t"]), jnp.asarray(d["s"]))
  assert a.shape == (B, 4, 4, 6) and b.shape == (B, 4, 4, 4)
  np.testing.assert_allclose(b, np_pool(d["s"], 4, 4), rtol=1e-6, atol=1e-7)


def test_sp_any_rank_and_vmap():
  rng = np.random.default_rng(4)
  s, t = _arr(rng, B, 7), _arr(rng, B, 3, 5)
  np.testing.assert_allclose(
    kdl.similarity_preserving(s, t), np_sp(s.astype(np.float64), t.astype(np.float64)), rtol=1e-5
  )
  # vmap over a leading "layer" axis == per-layer loop
  ss, ts = _arr(rng, 2, B, 4, 4, 3), _arr(rng, 2, B, 2, 2, 5)
  got = jax.vmap(kdl.attention_transfer)(ss, ts)
  for i in range(2):
    np.testing.assert_allclose(got[i], np_at(ss[i].astype(np.float64), ts[i].astype(np.float64)), rtol=1e-5)


@pytest.mark.parametrize(
  "call, arg",
  [
    (lambda d: kdl.hint(d["s"], d["t_same"][:-1]), "teacher_feature"),
    (lambda d: kdl.hint(d["s"], d["t_same"][..., :3]), "teacher_feature"),
    (lambda d: kdl.attention_transfer(d["s"][0], d["t"]), "student_feature"),
    (lambda d: kdl.attention_transfer(d["s"], d["t"][:-1]), "teacher_feature"),
    (lambda d: kdl.attention_transfer(d["s"], d["t"][:, :3, :3]), "student_feature"),  # 8 is not a multiple of 3
    (lambda d: kdl.similarity_preserving(d["s"], d["t"][:-1]), "teacher_feature"),
    (lambda d: kdl.similarity_preserving(d["s"][0, 0, 0, 0], d["t"]), "student_feature"),
    (lambda d: kdl.nst(d["s"], d["t"][:-1]), "teacher_feature"),
    (lambda d: kdl.fsp(d["s"], d["sb"], d["ta"][..., :2], d["tb"]), "teacher_feature_a"),
    (lambda d: kdl.fsp(d["s"], d["sb"][:-1], d["ta"], d["tb"]), "student_feature_b"),
    (lambda d: kdl.factor_transfer(d["s"], d["t_same"][:-1]), "teacher_factor"),
    (lambda d: kdl.activation_boundary(d["s"], d["t_same"][:-1]), "teacher_preact"),
    (lambda d: kdl.vid(d["s"], d["t_same"], d["log_scale"][:3]), "log_scale"),
    (lambda d: kdl.vid(d["s"], d["t_same"][:-1], d["log_scale"]), "teacher_feature"),
  ],
)
def test_bad_input_raises(call, arg):
  d = {k: jnp.asarray(v) for k, v in _inputs().items()}
  with pytest.raises(ValueError, match=arg):
    call(d)
