"""Tests for kdjax.losses logit losses (kd, dkd, dist) against NumPy float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl

B, C = 6, 10


# ---------------------------------------------------------------- NumPy refs


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_kd(s, t, T):
  ps, pt = np_softmax(s / T), np_softmax(t / T)
  kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
  return kl.mean() * T**2


def np_dkd(s, t, y, alpha, beta, T):
  ps, pt = np_softmax(s / T), np_softmax(t / T)
  out = []
  for b in range(s.shape[0]):
    g = y[b]
    bt = np.array([pt[b, g], 1 - pt[b, g]])
    bs = np.array([ps[b, g], 1 - ps[b, g]])
    tckd = (bt * np.log(bt / bs)).sum()
    keep = np.arange(s.shape[1]) != g
    qt = pt[b, keep] / pt[b, keep].sum()
    qs = ps[b, keep] / ps[b, keep].sum()
    nckd = (qt * np.log(qt / qs)).sum()
    beta_b = beta[b] if np.ndim(beta) else beta
    out.append(alpha * tckd + beta_b * nckd)
  return np.mean(out) * T**2


def np_pearson_mean(a, b, eps=1e-8):
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  r = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)
  return r.mean()


def np_dist(s, t, beta, gamma, T):
  ys, yt = np_softmax(s / T), np_softmax(t / T)
  inter = 1 - np_pearson_mean(ys, yt)
  intra = 1 - np_pearson_mean(ys.T, yt.T)
  return T**2 * (beta * inter + gamma * intra)


# ---------------------------------------------------------------- fixtures


def _data(seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, C)).astype(np.float32) * scale
  t = rng.normal(size=(B, C)).astype(np.float32) * scale
  y = rng.integers(0, C, size=(B,)).astype(np.int32)
  return s, t, y


# Each case: (name, kdjax call, numpy reference) with the same arguments.
CASES = {
  "kd_T4": (lambda s, t, y: kdl.kd(s, t, temperature=4.0), lambda s, t, y: np_kd(s, t, 4.0)),
  "kd_T1": (lambda s, t, y: kdl.kd(s, t, temperature=1.0), lambda s, t, y: np_kd(s, t, 1.0)),
  "dkd": (lambda s, t, y: kdl.dkd(s, t, y), lambda s, t, y: np_dkd(s, t, y, 1.0, 8.0, 4.0)),
  "dkd_a2_b05_T1": (
    lambda s, t, y: kdl.dkd(s, t, y, alpha=2.0, beta=0.5, temperature=1.0),
    lambda s, t, y: np_dkd(s, t, y, 2.0, 0.5, 1.0),
  ),
  "dist": (lambda s, t, y: kdl.dist(s, t), lambda s, t, y: np_dist(s, t, 1.0, 1.0, 1.0)),
  "dist_T4_b2_g05": (
    lambda s, t, y: kdl.dist(s, t, beta=2.0, gamma=0.5, temperature=4.0),
    lambda s, t, y: np_dist(s, t, 2.0, 0.5, 4.0),
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy(name):
  fn, ref = CASES[name]
  s, t, y = _data()
  got = fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y))
  assert got.dtype == jnp.float32 and got.shape == ()
  want = ref(s.astype(np.float64), t.astype(np.float64), y)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)


# Hyper-parameter variants are covered by test_matches_numpy.
@pytest.mark.parametrize("name", ["dkd", "dist_T4_b2_g05", "kd_T1", "kd_T4"])
def test_properties(name):
  fn, _ = CASES[name]
  s, t, y = map(jnp.asarray, _data(1))
  eager = fn(s, t, y)
  # jit == eager
  np.testing.assert_allclose(jax.jit(fn)(s, t, y), eager, rtol=1e-6)
  # non-negative; zero when student == teacher
  assert float(eager) >= 0.0
  # (DIST is only ~0: the eps = 1e-8 in the Pearson denominator leaves
  # T²·eps/var, which is ~1e-4 for T = 4 softmax columns.)
  np.testing.assert_allclose(fn(t, t, y), 0.0, atol=1e-3 if name.startswith("dist") else 1e-5)
  # finite gradient
  g = jax.grad(fn)(s, t, y)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0
  # bf16 inputs: finite float32 result close to the float32 one
  got16 = fn(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), y)
  assert got16.dtype == jnp.float32 and np.isfinite(got16)
  np.testing.assert_allclose(got16, eager, rtol=5e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["kd_T4", "dkd", "dist_T4_b2_g05"])
def test_extreme_logits_finite(name):
  fn, _ = CASES[name]
  rng = np.random.default_rng(2)
  s = jnp.asarray(rng.choice([-1e4, 0.0, 1e4], size=(B, C)), jnp.float32)
  t = jnp.asarray(rng.choice([-1e4, 0.0, 1e4], size=(B, C)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, size=(B,)), jnp.int32)
  val, g = jax.value_and_grad(fn)(s, t, y)
  assert np.isfinite(val)
  assert np.all(np.isfinite(g))


def np_log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_logsumexp(z):
  m = z.max()
  return m + np.log(np.exp(z - m).sum())


def np_dkd_logspace(s, t, y, alpha, beta, T):
  """DKD in float64 log space (no probabilities that underflow), per sample."""
  out = []
  for b in range(s.shape[0]):
    g = y[b]
    keep = np.arange(s.shape[1]) != g
    ls, lt = np_log_softmax(s[b] / T), np_log_softmax(t[b] / T)
    bs = np.array([ls[g], np_logsumexp(ls[keep])])
    bt = np.array([lt[g], np_logsumexp(lt[keep])])
    tckd = (np.exp(bt) * (bt - bs)).sum()
    qs, qt = np_log_softmax(s[b, keep] / T), np_log_softmax(t[b, keep] / T)
    nckd = (np.exp(qt) * (qt - qs)).sum()
    out.append(alpha * tckd + beta * nckd)
  return np.mean(out) * T**2


def np_kd_logspace(s, t, T):
  ls, lt = np_log_softmax(s / T), np_log_softmax(t / T)
  return (np.exp(lt) * (lt - ls)).sum(-1).mean() * T**2


# Logits at ±1e4 where the teacher is (numerically) one-hot on the label:
# p_t,gt = 1 in float32, log(1 − p_t,gt) ≈ −2e4, and the gt logit is far
# above the non-target ones. Row 1 is the case that used to give NaN
# gradients (exp of the unmasked gt entry of the non-target log-softmax).
EXTREME_S = np.array([[0.0, 0.0, 0.0, 0.0], [1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 1e4, 0.0]], np.float32)
EXTREME_T = np.array([[1e4, 0.0, 0.0, -1e4], [1e4, -1e4, -1e4, -1e4], [0.0, 1e4, -1e4, 0.0]], np.float32)
EXTREME_Y = np.array([0, 0, 2], np.int32)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_extreme_confident_teacher_matches_logspace_numpy(T):
  s, t, y = EXTREME_S, EXTREME_T, EXTREME_Y
  f64 = lambda x: x.astype(np.float64)
  for fn, want in [
    (lambda s: kdl.dkd(s, t, y, temperature=T), np_dkd_logspace(f64(s), f64(t), y, 1.0, 8.0, T)),
    (lambda s: kdl.kd(s, t, temperature=T), np_kd_logspace(f64(s), f64(t), T)),
  ]:
    val, g = jax.value_and_grad(fn)(jnp.asarray(s))
    np.testing.assert_allclose(float(val), want, rtol=1e-5)
    assert np.all(np.isfinite(g)), g
  # the teacher side gets finite gradients too (e.g. a trained teacher head)
  gt = jax.grad(lambda t: kdl.dkd(s, t, y, temperature=T))(jnp.asarray(t))
  assert np.all(np.isfinite(gt)), gt


def test_dkd_reproduces_kd_identity():
  # KD = TCKD + (1 - p_t,gt) * NCKD  (Zhao et al. 2022, Eq. 3)
  s, t, y = map(jnp.asarray, _data(3))
  for T in (1.0, 4.0):
    p_t = jax.nn.softmax(t / T)[jnp.arange(B), y]
    got = kdl.dkd(s, t, y, alpha=1.0, beta=1.0 - p_t, temperature=T)
    np.testing.assert_allclose(got, kdl.kd(s, t, temperature=T), rtol=1e-5)


def test_kd_gradient_independent_of_temperature():
  # For student = teacher + ε·δ and near-uniform teacher, the T² factor
  # makes ∇_s kd ≈ ε·(δ − mean δ)/(C·B) (Hinton et al. 2015, Sec. 2.1),
  # whatever T. Without T² the gradients at T=2 and T=8 would differ 16×.
  rng = np.random.default_rng(4)
  t = jnp.asarray(rng.normal(size=(B, C)) * 0.2, jnp.float32)
  delta = rng.normal(size=(B, C))
  eps = 1e-2
  s = t + jnp.asarray(eps * delta, jnp.float32)
  limit = eps * (delta - delta.mean(1, keepdims=True)) / (C * B)
  norms = {}
  for T in (2.0, 8.0):
    g = np.asarray(jax.grad(kdl.kd)(s, t, T), np.float64)
    norms[T] = np.linalg.norm(g)
    cos = (g * limit).sum() / (np.linalg.norm(g) * np.linalg.norm(limit))
    assert cos > 0.98, (T, cos)
    assert abs(norms[T] / np.linalg.norm(limit) - 1) < 0.1, (T, norms[T])
  assert abs(norms[2.0] / norms[8.0] - 1) < 0.1


def test_kd_sequence_shape_and_vmap():
  rng = np.random.default_rng(5)
  s = jnp.asarray(rng.normal(size=(3, B, C)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, B, C)), jnp.float32)
  # (L, B, C): mean over all leading dims == mean of per-slice kd
  per = jax.vmap(kdl.kd, in_axes=(0, 0, None))(s, t, 4.0)
  assert per.shape == (3,)
  for i in range(3):
    np.testing.assert_allclose(per[i], kdl.kd(s[i], t[i]), rtol=1e-6)
  np.testing.assert_allclose(kdl.kd(s, t), per.mean(), rtol=1e-6)


def test_dkd_vmap_over_beta():
  s, t, y = map(jnp.asarray, _data(6))
  betas = jnp.array([0.5, 2.0, 8.0])
  got = jax.vmap(lambda b: kdl.dkd(s, t, y, beta=b))(betas)
  for i, b in enumerate([0.5, 2.0, 8.0]):
    np.testing.assert_allclose(got[i], np_dkd(*_data(6)[:2], _data(6)[2], 1.0, b, 4.0), rtol=1e-5)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "call, arg",
  [
    (lambda s, t, y: kdl.kd(s, t[:-1]), "teacher_logits"),
    (lambda s, t, y: kdl.kd(s[0], t[0]), "student_logits"),
    (lambda s, t, y: kdl.kd(s, t, temperature=0.0), "temperature"),
    (lambda s, t, y: kdl.kd(s, t, temperature=-1.0), "temperature"),
    (lambda s, t, y: kdl.dkd(s, t[:-1], y), "teacher_logits"),
    (lambda s, t, y: kdl.dkd(s, t, y + C), "labels"),
    (lambda s, t, y: kdl.dkd(s, t, y - 20), "labels"),
    (lambda s, t, y: kdl.dkd(s, t, y[:-1]), "labels"),
    (lambda s, t, y: kdl.dkd(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: kdl.dkd(s, t, y, beta=jnp.ones(B + 1)), "beta"),
    (lambda s, t, y: kdl.dist(s[None], t[None]), "student_logits"),
    (lambda s, t, y: kdl.dist(s, t[:-1]), "teacher_logits"),
    (lambda s, t, y: kdl.dist(s, t, temperature=0), "temperature"),
  ],
)
def test_bad_input_raises(call, arg):
  s, t, y = map(jnp.asarray, _data())
  with pytest.raises(ValueError, match=arg):
    call(s, t, y)


def test_label_range_not_checked_under_jit():
  s, t, y = map(jnp.asarray, _data())
  # Traced labels are not range-checked (documented); shapes still are.
  out = jax.jit(kdl.dkd)(s, t, y)
  assert np.isfinite(out)
  with pytest.raises(ValueError, match="labels"):
    jax.jit(kdl.dkd)(s, t, y[:-1])


def test_per_example_outputs_are_the_terms_of_the_mean():
  """``per_example=True`` gives each example's value (NumPy KD here), whose mean is the default scalar."""
  s, t, y = _data(6)
  per = np.asarray(kdl.kd(jnp.asarray(s), jnp.asarray(t), temperature=2.0, per_example=True))
  lp = np.log(np_softmax(np.asarray(t, np.float64) / 2.0))
  lq = np.log(np_softmax(np.asarray(s, np.float64) / 2.0))
  np.testing.assert_allclose(per, 4.0 * np.sum(np.exp(lp) * (lp - lq), -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(per.mean(), kdl.kd(jnp.asarray(s), jnp.asarray(t), temperature=2.0), rtol=1e-6)
  per_dkd = np.asarray(kdl.dkd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), beta=2.0, per_example=True))
  assert per_dkd.shape == (len(y),)
  for i in range(len(y)):
    one = kdl.dkd(jnp.asarray(s[i : i + 1]), jnp.asarray(t[i : i + 1]), jnp.asarray(y[i : i + 1]), beta=2.0)
    np.testing.assert_allclose(per_dkd[i], one, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    per_dkd.mean(), kdl.dkd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), beta=2.0), rtol=1e-6
  )
