"""kdjax.report.diagnostics against NumPy formulas written here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import report


# ---------------------------------------------------------------- NumPy references
def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_kl_ts(s, t, temp=1.0):
  ps, pt = np_softmax(np.asarray(s) / temp), np_softmax(np.asarray(t) / temp)
  return np.sum(pt * (np.log(pt) - np.log(ps)), -1)


def np_ece(logits, labels, num_bins):
  """Guo et al. 2017, written directly from the definition."""
  p = np_softmax(logits)
  conf, pred = p.max(-1), p.argmax(-1)
  correct = (pred == labels).astype(np.float64)
  n, ece = len(conf), 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    in_bin = (conf > lo) & (conf <= hi)
    if in_bin.any():
      ece += in_bin.sum() / n * abs(correct[in_bin].mean() - conf[in_bin].mean())
  return ece


def np_cka(x, y):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def rand_logits(seed, shape, scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# ---------------------------------------------------------------- per-function tests
def test_accuracy_and_agreement_vs_numpy():
  s, t = rand_logits(0, (200, 7)), rand_logits(1, (200, 7))
  labels = np.random.default_rng(2).integers(0, 7, 200)
  mask = np.random.default_rng(3).random(200) < 0.7
  np.testing.assert_allclose(report.accuracy(s, labels), np.mean(s.argmax(-1) == labels), rtol=1e-6)
  np.testing.assert_allclose(report.accuracy(s, labels, mask), np.mean((s.argmax(-1) == labels)[mask]), rtol=1e-6)
  np.testing.assert_allclose(report.agreement(s, t), np.mean(s.argmax(-1) == t.argmax(-1)), rtol=1e-6)
  np.testing.assert_allclose(report.agreement(s, t, mask), np.mean((s.argmax(-1) == t.argmax(-1))[mask]), rtol=1e-6)
  assert float(report.agreement(s, s)) == 1.0


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kl_teacher_student_vs_numpy(temp):
  s, t = rand_logits(4, (64, 10)), rand_logits(5, (64, 10))
  mask = np.arange(64) % 3 != 0
  np.testing.assert_allclose(report.kl_teacher_student(s, t, temperature=temp), np_kl_ts(s, t, temp).mean(), rtol=1e-5)
  np.testing.assert_allclose(
    report.kl_teacher_student(s, t, mask, temperature=temp), np_kl_ts(s, t, temp)[mask].mean(), rtol=1e-5
  )
  # direction: KL(teacher ‖ student) ≠ KL(student ‖ teacher) in general
  assert abs(float(report.kl_teacher_student(s, t)) - float(report.kl_teacher_student(t, s))) > 1e-3
  assert abs(float(report.kl_teacher_student(s, s))) < 1e-6


def test_ece_hand_constructed_bins():
  """10 classes, 10 bins. Four examples at confidence 0.95 (bin (0.9, 1]) with 3
  correct; two at 0.55 (bin (0.5, 0.6]) both correct; one masked example that
  would land in bin (0.3, 0.4]. ECE = 4/6·|0.75−0.95| + 2/6·|1−0.55| = 0.2833…"""

  def logits_with(conf, pred):
    p = np.full(10, (1 - conf) / 9)
    p[pred] = conf
    return np.log(p)

  rows = [(0.95, 1, 1), (0.95, 2, 2), (0.95, 3, 3), (0.95, 4, 0), (0.55, 5, 5), (0.55, 6, 6), (0.35, 7, 1)]
  logits = np.stack([logits_with(c, p) for c, p, _ in rows]).astype(np.float32)
  labels = np.array([y for _, _, y in rows])
  mask = np.array([True] * 6 + [False])
  count, conf_sum, correct_sum = (np.asarray(a) for a in report.calibration_bins(logits, labels, mask, num_bins=10))
  expected_count = np.zeros(10)
  expected_count[9], expected_count[5] = 4, 2
  np.testing.assert_array_equal(count, expected_count)
  np.testing.assert_allclose(conf_sum[[5, 9]], [1.1, 3.8], rtol=1e-5)
  np.testing.assert_array_equal(correct_sum[[5, 9]], [2, 3])
  want = 4 / 6 * abs(0.75 - 0.95) + 2 / 6 * abs(1.0 - 0.55)
  np.testing.assert_allclose(report.expected_calibration_error(logits, labels, mask, num_bins=10), want, rtol=1e-5)
  np.testing.assert_allclose(report.ece_from_bins(count, conf_sum, correct_sum), want, rtol=1e-5)
  # unmasked, the 0.35 example (wrong) adds 1/7·0.35 and reweights the rest
  want7 = 4 / 7 * 0.2 + 2 / 7 * 0.45 + 1 / 7 * 0.35
  np.testing.assert_allclose(report.expected_calibration_error(logits, labels, num_bins=10), want7, rtol=1e-5)


@pytest.mark.parametrize("num_bins", [5, 15])
def test_ece_vs_numpy_random(num_bins):
  logits = rand_logits(6, (500, 10), scale=2.0)
  labels = np.random.default_rng(7).integers(0, 10, 500)
  np.testing.assert_allclose(
    report.expected_calibration_error(logits, labels, num_bins=num_bins),
    np_ece(logits, labels, num_bins),
    rtol=1e-4,
    atol=1e-6,
  )


def test_linear_cka_properties_and_numpy():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(100, 12)).astype(np.float32)
  y = (x @ rng.normal(size=(12, 8)) + 0.5 * rng.normal(size=(100, 8))).astype(np.float32)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  np.testing.assert_allclose(report.linear_cka(x, x), 1.0, rtol=1e-5)
  ref = np_cka(x, y)
  assert 0.1 < ref < 0.99
  np.testing.assert_allclose(report.linear_cka(x, y), ref, rtol=1e-4)
  np.testing.assert_allclose(report.linear_cka(x @ q, y), ref, rtol=1e-4)  # orthogonal
  np.testing.assert_allclose(report.linear_cka(7.5 * x, 0.01 * y), ref, rtol=1e-4)  # isotropic scaling
  np.testing.assert_allclose(report.linear_cka(x + 3.0, y - 1.0), ref, rtol=1e-4)  # centring
  np.testing.assert_allclose(report.linear_cka(y, x), ref, rtol=1e-4)  # symmetric
  # N < D takes the Gram-matrix branch; same formula
  xs, ys = rng.normal(size=(20, 50)), rng.normal(size=(20, 30))
  np.testing.assert_allclose(report.linear_cka(xs, ys), np_cka(xs, ys), rtol=1e-4)
  # not invariant to a generic (non-orthogonal) linear map
  a = rng.normal(size=(12, 12)) * np.linspace(0.1, 3, 12)
  assert abs(float(report.linear_cka(x @ a, y)) - ref) > 1e-3


def test_cka_stats_accumulate_over_batches():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(90, 6)) + 5.0
  y = x[:, :4] ** 2 + rng.normal(size=(90, 4))
  parts = [report.cka_stats(x[i : i + 30], y[i : i + 30]) for i in (0, 30, 60)]
  summed = {k: sum(np.asarray(p[k], np.float64) for p in parts) for k in parts[0]}
  np.testing.assert_allclose(report.cka_from_stats(summed), np_cka(x, y), rtol=1e-4)


# ---------------------------------------------------------------- eval accumulation
def test_eval_stats_three_batches_equal_one_shot():
  s, t = rand_logits(10, (96, 10)), rand_logits(11, (96, 10))
  labels = np.random.default_rng(12).integers(0, 10, 96)
  # the last batch is padded: 16 real examples + 16 padding rows of garbage
  mask = np.ones(96, bool)
  mask[80:] = False
  stats_fn = jax.jit(report.eval_batch_stats)
  sums: dict = {}
  for i in (0, 32, 64):
    b = slice(i, i + 32)
    for k, v in stats_fn(s[b], t[b], labels[b], mask[b]).items():
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
  got = report.finalize_eval_stats(sums)
  assert set(got) == {
    "test_accuracy",
    "test_nll",
    "teacher_test_accuracy",
    "agreement",
    "teacher_student_kl",
    "ece",
    "num_examples",
  }  # no perplexity: these are per-example logits, not tokens
  m = mask
  np.testing.assert_allclose(got["num_examples"], 80)
  z = s - s.max(-1, keepdims=True)
  nll = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, labels[:, None], -1)[:, 0]
  np.testing.assert_allclose(got["test_nll"], nll[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["test_accuracy"], np.mean((s.argmax(-1) == labels)[m]), rtol=1e-6)
  np.testing.assert_allclose(got["teacher_test_accuracy"], np.mean((t.argmax(-1) == labels)[m]), rtol=1e-6)
  np.testing.assert_allclose(got["agreement"], np.mean((s.argmax(-1) == t.argmax(-1))[m]), rtol=1e-6)
  np.testing.assert_allclose(got["teacher_student_kl"], np_kl_ts(s, t)[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["ece"], np_ece(s[m], labels[m], 15), rtol=1e-4)
  # one-shot on the real examples gives the same numbers
  one = report.finalize_eval_stats(report.eval_batch_stats(s[m], t[m], labels[m], None))
  for k in got:
    np.testing.assert_allclose(got[k], one[k], rtol=1e-5, err_msg=k)


def test_eval_stats_without_teacher_omit_teacher_keys():
  s = rand_logits(13, (16, 5))
  labels = np.arange(16) % 5
  got = report.finalize_eval_stats(jax.jit(lambda a, b: report.eval_batch_stats(a, None, b))(s, labels))
  assert set(got) == {"test_accuracy", "test_nll", "ece", "num_examples"}


def test_token_shapes_bf16_and_jit():
  s = jnp.asarray(rand_logits(14, (4, 6, 11)), jnp.bfloat16)
  t = jnp.asarray(rand_logits(15, (4, 6, 11)), jnp.bfloat16)
  mask = np.arange(24).reshape(4, 6) % 4 != 0
  labels = np.arange(24).reshape(4, 6) % 11
  s32, t32 = np.asarray(s, np.float32), np.asarray(t, np.float32)
  kl = report.kl_teacher_student(s, t, mask)
  assert kl.dtype == jnp.float32
  np.testing.assert_allclose(kl, np_kl_ts(s32, t32)[mask].mean(), rtol=1e-4)
  np.testing.assert_allclose(jax.jit(report.kl_teacher_student)(s, t, mask), kl, rtol=1e-6)
  np.testing.assert_allclose(
    jax.jit(report.expected_calibration_error)(s, labels, mask), np_ece(s32[mask], labels[mask], 15), rtol=1e-4
  )
  np.testing.assert_allclose(report.agreement(s, t, mask), np.mean((s32.argmax(-1) == t32.argmax(-1))[mask]))


def test_bad_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match="mask"):
    report.accuracy(np.zeros((4, 3)), np.zeros(4, int), np.ones(5, bool))
  with pytest.raises(ValueError, match="shape"):
    report.agreement(np.zeros((4, 3)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match="same examples"):
    report.linear_cka(np.zeros((4, 3)), np.zeros((5, 3)))
