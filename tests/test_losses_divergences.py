"""Tests for kdjax.losses.divergences: each token divergence over a pair of log-probability arrays.

The full-vocabulary losses, their top-k forms and the chunked evaluation all
call these functions; here they are checked against NumPy (float64), on
positions of any leading shape (no reduction over positions), and through
each public loss that feeds them (the skew KL forms included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl
from kdjax.errors import ConfigError
from kdjax.losses import divergences
from test_losses_sequence import _inputs, np_kl, np_logp, np_masked_mean

NAMES = ["forward_kl", "reverse_kl", "generalized_jsd", "tvd", "skew_kl"]


def np_divergence(name, ls, lt, beta=0.5, alpha=0.1, reverse=False):
  """Per-position reference from log-probabilities ``(..., N)``: ``(...,)``."""
  ps, pt = np.exp(ls), np.exp(lt)
  if name == "forward_kl":
    return np_kl(lt, ls)
  if name == "reverse_kl":
    return np_kl(ls, lt)
  if name == "tvd":
    return 0.5 * np.abs(pt - ps).sum(-1)
  if name == "generalized_jsd":
    m = (1 - beta) * ps + beta * pt
    return beta * np_kl(lt, np.log(m)) + (1 - beta) * np_kl(ls, np.log(m))
  first, second = (ls, lt) if reverse else (lt, ls)
  return np_kl(first, np.log(alpha * np.exp(first) + (1 - alpha) * np.exp(second)))


def _logp_pair(shape, seed=0):
  rng = np.random.default_rng(seed)
  s, t = (rng.normal(size=shape) * 2.0 for _ in range(2))
  return np_logp(s), np_logp(t)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(9,), (4, 9), (2, 3, 9)])
def test_per_position_matches_numpy(name, shape):
  ls, lt = _logp_pair(shape)
  got = getattr(divergences, name)(jnp.asarray(ls, jnp.float32), jnp.asarray(lt, jnp.float32))
  assert got.shape == shape[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np_divergence(name, ls, lt), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_chunk_of_positions_gives_that_chunk_of_values(name):
  ls, lt = (jnp.asarray(x, jnp.float32) for x in _logp_pair((2, 8, 11), seed=1))
  fn = getattr(divergences, name)
  whole = fn(ls, lt)
  np.testing.assert_array_equal(np.asarray(fn(ls[:, 3:6], lt[:, 3:6])), np.asarray(whole[:, 3:6]))


def test_endpoints_and_identities():
  ls, lt = (jnp.asarray(x, jnp.float32) for x in _logp_pair((3, 10), seed=2))
  fkl, rkl = divergences.forward_kl(ls, lt), divergences.reverse_kl(ls, lt)
  np.testing.assert_array_equal(np.asarray(divergences.generalized_jsd(ls, lt, 0.0)), np.asarray(fkl))
  np.testing.assert_array_equal(np.asarray(divergences.generalized_jsd(ls, lt, 1.0)), np.asarray(rkl))
  # a traced β picks the same endpoints
  traced = jax.jit(divergences.generalized_jsd)
  np.testing.assert_allclose(np.asarray(traced(ls, lt, jnp.float32(0.0))), np.asarray(fkl), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(traced(ls, lt, jnp.float32(1.0))), np.asarray(rkl), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(divergences.skew_kl(ls, lt, 0.0)), np.asarray(fkl), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(divergences.skew_kl(ls, lt, 0.0, reverse=True)), np.asarray(rkl), rtol=1e-5)
  for name in NAMES:
    assert np.all(np.abs(np.asarray(getattr(divergences, name)(ls, ls))) < 1e-6)
  np.testing.assert_array_equal(np.asarray(divergences.tvd(ls, lt)), np.asarray(divergences.tvd(lt, ls)))


def test_skew_kl_is_bounded_by_minus_log_alpha():
  ls = jnp.log(jnp.asarray([[1.0 - 1e-20, 1e-20]], jnp.float32))
  lt = jnp.log(jnp.asarray([[1e-20, 1.0 - 1e-20]], jnp.float32))
  for reverse in (False, True):
    assert float(divergences.skew_kl(ls, lt, 0.1, reverse)[0]) <= -np.log(0.1) + 1e-5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_skew_kl_loss_matches_numpy(reverse, temperature):
  s, t, mask = _inputs(seed=3)
  got = kdl.skew_kl(jnp.asarray(s), jnp.asarray(t), 0.2, jnp.asarray(mask), temperature, reverse)
  ls, lt = np_logp(s.astype(np.float64), temperature), np_logp(t.astype(np.float64), temperature)
  want = np_masked_mean(np_divergence("skew_kl", ls, lt, alpha=0.2, reverse=reverse), mask)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "name, kw",
  [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("tvd", {}),
    ("generalized_jsd", {"beta": 0.3}),
    ("skew_kl", {"alpha": 0.2}),
  ],
)
def test_every_loss_is_the_masked_mean_of_its_divergence(name, kw):
  s, t, mask = (jnp.asarray(x) for x in _inputs(seed=4))
  ls, lt = divergences.log_probs(s, 1.5), divergences.log_probs(t, 1.5)
  per = np.asarray(getattr(divergences, name)(ls, lt, **kw), np.float64)
  want = np_masked_mean(per, np.asarray(mask))
  np.testing.assert_allclose(float(getattr(kdl, name)(s, t, mask=mask, temperature=1.5, **kw)), want, rtol=1e-6)
  chunked = kdl.chunked_token_loss(name, s, t, mask, chunk_size=3, temperature=1.5, **kw)
  np.testing.assert_allclose(float(chunked), want, rtol=1e-6)
  # the top-k form is the same divergence on the buckets of topk_buckets
  lp, idx = kdl.teacher_topk(t, 4)
  bs, bt = kdl.topk_buckets(s, lp, idx, 1.5)
  want_topk = np_masked_mean(np.asarray(getattr(divergences, name)(bs, bt, **kw), np.float64), np.asarray(mask))
  got_topk = getattr(kdl, "topk_" + name)(s, lp, idx, mask=mask, temperature=1.5, **kw)
  np.testing.assert_allclose(float(got_topk), want_topk, rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_skew_kl_with_every_token_cached_is_skew_kl(reverse):
  s, t, mask = (jnp.asarray(x) for x in _inputs(seed=5))
  lp, idx = kdl.teacher_topk(t, t.shape[-1])
  got = kdl.topk_skew_kl(s, lp, idx, 0.1, mask, 2.0, reverse)
  np.testing.assert_allclose(float(got), float(kdl.skew_kl(s, t, 0.1, mask, 2.0, reverse)), rtol=1e-5)
  grad = jax.grad(lambda s: kdl.topk_skew_kl(s, lp, idx, 0.1, mask, 2.0, reverse))(s)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize(
  "call",
  [
    lambda s, t, lp, idx: kdl.skew_kl(s, t, alpha=1.0),
    lambda s, t, lp, idx: kdl.topk_skew_kl(s, lp, idx, alpha=1.0),
    lambda s, t, lp, idx: kdl.chunked_token_loss("skew_kl", s, t, alpha=1.0),
    lambda s, t, lp, idx: kdl.topk_generalized_jsd(s, lp, idx, beta=1.5),
    lambda s, t, lp, idx: kdl.topk_tvd(s, lp, idx, temperature=0.0),
  ],
)
def test_bad_hyper_parameters_raise(call):
  s, t, _ = (jnp.asarray(x) for x in _inputs())
  lp, idx = kdl.teacher_topk(t, 3)
  with pytest.raises(ConfigError):
    call(s, t, lp, idx)


def test_losses_import_only_errors_from_the_rest_of_kdjax():
  import ast
  import pathlib

  root = pathlib.Path(kdl.__file__).parent
  for path in root.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
      if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module]
      for name in names:
        if name == "kdjax" or name.startswith("kdjax."):
          assert name == "kdjax.errors" or name.startswith("kdjax.losses"), f"{path.name} imports {name}"
