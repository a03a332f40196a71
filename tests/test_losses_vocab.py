"""Skew KL, padded vocabularies and Universal Logit Distillation against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from kdjax import losses as kdl

B, L, V = 3, 6, 11


def _logp(z: np.ndarray, t: float = 1.0) -> np.ndarray:
  z = z.astype(np.float64) / t
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _logits(seed: int, shape=(B, L, V)) -> np.ndarray:
  return (2 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _mask(seed: int, shape=(B, L)) -> np.ndarray:
  m = np.random.default_rng(seed).random(shape) < 0.7
  m[0] = True
  return m


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha,t", [(0.1, 1.0), (0.4, 2.0), (0.0, 1.0)])
def test_skew_kl_matches_numpy(alpha, t, reverse):
  s, te, m = _logits(0), _logits(1), _mask(2)
  p, q = np.exp(_logp(te, t)), np.exp(_logp(s, t))
  if reverse:
    p, q = q, p
  mix = alpha * p + (1 - alpha) * q
  per_token = (p * (np.log(p) - np.log(mix))).sum(-1)
  want = (per_token * m).sum() / m.sum()
  got = kdl.skew_kl(s, te, alpha=alpha, mask=m, temperature=t, reverse=reverse)
  # float32 log-softmax over 11 entries: ~1e-7 relative per term
  np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-7)
  if alpha == 0.0:  # α = 0 is plain (reverse) KL
    plain = kdl.reverse_kl if reverse else kdl.forward_kl
    np.testing.assert_allclose(float(got), float(plain(s, te, mask=m, temperature=t)), rtol=2e-5)


def test_skew_kl_refuses_alpha_one():
  with pytest.raises(ValueError, match="alpha must be < 1"):
    kdl.skew_kl(_logits(0), _logits(1), alpha=1.0)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "tvd", "generalized_jsd"])
def test_padded_teacher_vocabulary_gives_the_unpadded_loss(loss):
  s, te, m = _logits(3), _logits(4), _mask(5)
  pad = np.random.default_rng(6).normal(size=(B, L, 5)).astype(np.float32) * 10  # garbage in the padded ids
  s_a, t_a = kdl.align_vocab(s, np.concatenate([te, pad], -1))
  assert s_a.shape == t_a.shape == (B, L, V)
  fn = getattr(kdl, loss)
  np.testing.assert_array_equal(np.asarray(fn(s_a, t_a, mask=m)), np.asarray(fn(s, te, mask=m)))


def _np_uld(s, t, ms, mt, temp=1.0) -> float:
  total, pairs = 0.0, 0
  for b in range(s.shape[0]):
    rs, rt = np.flatnonzero(ms[b]), np.flatnonzero(mt[b])
    for i in range(min(len(rs), len(rt))):
      ps = np.sort(np.exp(_logp(s[b, rs[i]], temp)))[::-1]
      pt = np.sort(np.exp(_logp(t[b, rt[i]], temp)))[::-1]
      size = max(len(ps), len(pt))
      ps, pt = np.pad(ps, (0, size - len(ps))), np.pad(pt, (0, size - len(pt)))
      total += np.abs(ps - pt).sum()
      pairs += 1
  return total / max(pairs, 1)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_uld_matches_numpy_across_vocabularies_and_lengths(temp):
  s = _logits(7, (B, 9, 13))  # student: 9 positions, 13 tokens
  t = _logits(8, (B, 6, 21))  # teacher: 6 positions, 21 tokens
  ms, mt = _mask(9, (B, 9)), _mask(10, (B, 6))
  ms[2] = False  # an example with no student response: no pairs from it
  got = float(kdl.uld(s, t, ms, mt, temperature=temp))
  np.testing.assert_allclose(got, _np_uld(s, t, ms, mt, temp), rtol=1e-5)


def test_uld_is_zero_for_the_same_distribution_under_a_permuted_vocabulary():
  s = _logits(11, (B, L, V))
  t = s[..., np.random.default_rng(12).permutation(V)]
  m = np.ones((B, L), bool)
  assert float(kdl.uld(s, t, m, m)) < 1e-6
  assert float(kdl.uld(s, _logits(13), m, m)) > 0.1
