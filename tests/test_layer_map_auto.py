"""Automatic layer pairing: linear CKA against NumPy, the dynamic-programming alignment against brute force,
and the map recovered where the correspondence is known by construction (a student made of some of the
teacher's layers; a model and itself), then written out by a distillation run."""

import itertools

import jax
import numpy as np
import pytest

from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig, layer_match


def _np_cka(x, y):
  """Kornblith et al. 2019, eq. for linear CKA with H = I − 11ᵀ/n, via the Gram matrices (float64)."""
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
  return np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))


@pytest.mark.parametrize("d1,d2", [(5, 7), (40, 90)])  # feature form (D ≤ N) and Gram form (D > N)
def test_cka_matrix_equals_numpy(d1, d2):
  rng = np.random.default_rng(0)
  n = 30
  xs = [rng.normal(size=(n, d1)), rng.normal(size=(n, d1)) @ rng.normal(size=(d1, d1))]
  ys = [xs[0] @ rng.normal(size=(d1, d2)) + 0.3 * rng.normal(size=(n, d2)), rng.normal(size=(n, d2)) + 4.0]
  got = np.asarray(
    jax.jit(layer_match.cka_matrix)([np.float32(a) for a in xs], [np.float32(b) for b in ys], np.ones(n))
  )
  want = np.array([[_np_cka(a, b) for b in ys] for a in xs])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
  assert want.min() < 0.5 < want.max()


def test_cka_masks_rows_out_of_sequences():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 6, 5))
  y[..., :4] += 2 * x
  mask = np.ones((3, 6), bool)
  mask[0, 4:] = False
  mask[2, :2] = False
  x_pad, y_pad = x.copy(), y.copy()
  x_pad[~mask], y_pad[~mask] = 1e3, -7.0  # padding must not count
  cka = jax.jit(layer_match.linear_cka)
  got = float(cka(np.float32(x_pad), np.float32(y_pad), mask))
  np.testing.assert_allclose(got, _np_cka(x[mask], y[mask]), rtol=1e-4)
  img = rng.normal(size=(8, 3, 3, 2))
  got = float(cka(np.float32(img), np.float32(img[..., ::-1] * 3), np.arange(8) < 6))
  np.testing.assert_allclose(got, 1.0, rtol=1e-5)  # per example, H·W·C flattened: a permutation and a scale


def _brute(sim, strict):
  m, t = sim.shape
  maps = [
    c for c in itertools.product(range(t), repeat=m) if all(a < b if strict else a <= b for a, b in zip(c, c[1:]))
  ]
  return max(maps, key=lambda c: sum(sim[i, j] for i, j in enumerate(c)))


@pytest.mark.parametrize("strict", [False, True])
def test_alignment_equals_brute_force(strict):
  rng = np.random.default_rng(2)
  for m, t in [(1, 4), (2, 4), (3, 5), (4, 4), (4, 6), (3, 2)]:
    if strict and m > t:
      with pytest.raises(ConfigError, match="cannot each take"):
        layer_match.monotone_alignment(rng.random((m, t)), strict=True)
      continue
    for _ in range(5):
      sim = rng.random((m, t))
      got = layer_match.monotone_alignment(sim, strict=strict)
      assert got == _brute(sim, strict), (m, t, sim)


def test_candidates_and_bad_input_are_one_line():
  feats = {"block0": (4, 8), "block1": (4, 8), "logits": (4, 3)}
  assert layer_match.candidates(feats, "block{i}", "student") == (("block0", "block1"), True)
  cnn = {"stem": (8, 8, 4), "stage10": (2, 2, 8), "stage2": (4, 4, 8), "stage1": (8, 8, 4), "pooled": (8,)}
  assert layer_match.candidates(cnn, "block{i}", "teacher") == (("stage1", "stage2", "stage10"), False)
  with pytest.raises(ConfigError, match="no candidate layers in the teacher") as e:
    layer_match.candidates({"pooled": (8,)}, "block{i}", "teacher")
  assert "\n" not in str(e.value)
  assert MethodConfig(name="hidden_mse", layer_map=("auto",)).layer_map == ("auto",)
  with pytest.raises(ConfigError, match="calibration_batches"):
    MethodConfig(name="hidden_mse", layer_map=("auto",), calibration_batches=0)
