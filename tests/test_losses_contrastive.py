"""Tests for the CRD loss and its explicit memory bank."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl

N, D, B, K = 40, 8, 4, 6


def np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_crd(mem_s, mem_t, z_s, z_t, vs, vt, ids, neg, T, mom):
  """RepDistiller's ContrastMemory + ContrastLoss, in float64 NumPy."""
  n = mem_s.shape[0]
  vs, vt = np_unit(vs), np_unit(vt)
  idx = np.concatenate([ids[:, None], neg], axis=1)
  out_s = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], vs) / T)
  out_t = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], vt) / T)
  if z_s <= 0:
    z_s = out_s.mean() * n
  if z_t <= 0:
    z_t = out_t.mean() * n

  def nce(x):
    m = x.shape[1] - 1
    pn = 1.0 / n
    d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + 1e-7))
    d0 = np.log((m * pn) / (x[:, 1:] + m * pn + 1e-7))
    return -(d1.sum() + d0.sum()) / x.shape[0]

  loss = nce(out_s / z_s) + nce(out_t / z_t)
  new_s, new_t = mem_s.copy(), mem_t.copy()
  new_s[ids] = np_unit(mom * mem_s[ids] + (1 - mom) * vs)
  new_t[ids] = np_unit(mom * mem_t[ids] + (1 - mom) * vt)
  return loss, new_s, new_t, z_s, z_t


def _setup(seed=0, d=D):
  rng = np.random.default_rng(seed)
  bank = kdl.crd_init(jax.random.key(seed), N, d)
  vs = rng.normal(size=(B, d)).astype(np.float32)
  vt = rng.normal(size=(B, d)).astype(np.float32)
  ids = rng.permutation(N)[:B].astype(np.int32)
  neg = rng.integers(0, N, size=(B, K)).astype(np.int32)
  return bank, vs, vt, ids, neg


def _f64(x):
  return np.asarray(x, np.float64)


def test_crd_init():
  bank = kdl.crd_init(jax.random.key(0), 1000, 16)
  stdv = 1 / math.sqrt(16 / 3)
  for m in (bank.student, bank.teacher):
    assert m.shape == (1000, 16) and m.dtype == jnp.float32
    assert float(jnp.abs(m).max()) <= stdv
    assert float(jnp.abs(m).max()) > 0.9 * stdv
  assert not np.allclose(bank.student, bank.teacher)
  assert float(bank.z_student) < 0 and float(bank.z_teacher) < 0
  # rows have ~unit norm in expectation
  np.testing.assert_allclose(jnp.mean(jnp.sum(bank.student**2, 1)), 1.0, rtol=0.05)


def test_crd_matches_numpy_two_steps():
  bank, vs, vt, ids, neg = _setup()
  state = (_f64(bank.student), _f64(bank.teacher), -1.0, -1.0)
  for step in range(2):  # step 0 sets Z, step 1 must reuse it
    loss, bank = kdl.crd(bank, vs, vt, ids, neg, temperature=0.07, momentum=0.5)
    want, *state = np_crd(*state, _f64(vs), _f64(vt), ids, neg, 0.07, 0.5)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(bank.student, state[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bank.teacher, state[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bank.z_student, state[2], rtol=1e-5)
    np.testing.assert_allclose(bank.z_teacher, state[3], rtol=1e-5)
    vs, vt = vt, vs  # different embeddings on the second step


def test_bank_update_is_momentum_rule_and_touches_only_positives():
  bank, vs, vt, ids, neg = _setup(1)
  _, new = kdl.crd(bank, vs, vt, ids, neg, momentum=0.3)
  old_s = _f64(bank.student)
  want = np_unit(0.3 * old_s[ids] + 0.7 * np_unit(_f64(vs)))
  np.testing.assert_allclose(new.student[ids], want, rtol=1e-5, atol=1e-6)
  rest = np.setdiff1d(np.arange(N), ids)
  np.testing.assert_array_equal(new.student[rest], bank.student[rest])
  np.testing.assert_array_equal(new.teacher[rest], bank.teacher[rest])


def test_jit_grad_bf16():
  bank, vs, vt, ids, neg = _setup(2)
  f = lambda bank, vs, vt: kdl.crd(bank, vs, vt, ids, neg)
  loss, new = f(bank, vs, vt)
  loss_j, new_j = jax.jit(f)(bank, vs, vt)
  np.testing.assert_allclose(loss_j, loss, rtol=1e-5)
  for a, b in zip(new_j, new):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  gs, gt = jax.grad(lambda s, t: f(bank, s, t)[0], argnums=(0, 1))(vs, vt)
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  assert float(jnp.abs(gs).sum()) > 0 and float(jnp.abs(gt).sum()) > 0
  loss16, _ = f(bank, jnp.asarray(vs, jnp.bfloat16), jnp.asarray(vt, jnp.bfloat16))
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss, rtol=2e-2)


def test_loss_falls_when_student_moves_toward_teacher():
  # Width 64 so that random negatives are nearly orthogonal to the
  # positives (as with CRD's 128-d heads), and negatives drawn away from
  # the batch's positives (a collision, rare at N = 50000, would make a
  # negative *be* the teacher memory we move towards).
  bank, vs, vt, ids, _ = _setup(3, d=64)
  others = np.setdiff1d(np.arange(N), ids)
  neg = np.random.default_rng(3).choice(others, size=(B, K)).astype(np.int32)
  step = jax.jit(lambda bank: kdl.crd(bank, vt, vt, ids, neg)[1])
  for _ in range(8):  # memories of the positives converge to the teacher
    bank = step(bank)
  losses = []
  for a in np.linspace(0.0, 1.0, 5):
    v = (1 - a) * vs + a * np_unit(vt)
    losses.append(float(kdl.crd(bank, v, vt, ids, neg)[0]))
  assert all(np.diff(losses) < 0), losses
  # and a gradient step on the student embedding lowers it too
  g = jax.grad(lambda v: kdl.crd(bank, v, vt, ids, neg)[0])(vs)
  lower = kdl.crd(bank, vs - 0.05 * g, vt, ids, neg)[0]
  assert float(lower) < losses[0]


@pytest.mark.parametrize(
  "change, arg",
  [
    (dict(vt=lambda x: x[:-1]), "teacher_embedding"),
    (dict(vs=lambda x: x[:, :-1]), "student_embedding"),
    (dict(vs=lambda x: x[0]), "student_embedding"),
    (dict(ids=lambda x: x + N), "example_ids"),
    (dict(ids=lambda x: x[:-1]), "example_ids"),
    (dict(neg=lambda x: x - N), "negative_ids"),
    (dict(neg=lambda x: x[0]), "negative_ids"),
    (dict(T=lambda x: 0.0), "temperature"),
    (dict(mom=lambda x: 1.5), "momentum"),
  ],
)
def test_bad_input_raises(change, arg):
  bank, vs, vt, ids, neg = _setup()
  a = dict(vs=vs, vt=vt, ids=ids, neg=neg, T=0.07, mom=0.5)
  for k, f in change.items():
    a[k] = f(a[k])
  with pytest.raises(ValueError, match=arg):
    kdl.crd(bank, a["vs"], a["vt"], a["ids"], a["neg"], a["T"], a["mom"])


def test_bank_sharded_on_explicit_mesh():
  # A 1-device mesh with an Explicit axis exercises the same code path
  # (shardings in the types; gathers/scatters need out_sharding) as a
  # bank sharded over many devices; checked against the unsharded call.
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
  bank, vs, vt, ids, neg = _setup(4)
  want_loss, want_bank = kdl.crd(bank, vs, vt, ids, neg)

  def put(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

  rows = P("data", None)
  bank_sh = kdl.CRDBank(
    put(bank.student, rows), put(bank.teacher, rows), put(bank.z_student, P()), put(bank.z_teacher, P())
  )
  args = [put(vs, rows), put(vt, rows), put(ids, P("data")), put(neg, rows)]
  with jax.set_mesh(mesh):
    loss, new = jax.jit(kdl.crd)(bank_sh, *args)
  assert new.student.sharding.spec == rows
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)  # a float32 sum over the bank: order-dependent ulps
  for a, b in zip(new, want_bank):  # incl. the NCE normalisers Z (~3e3: float32 sums, 1-ulp-scale differences)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
