"""Automatic layer pairing: linear CKA against NumPy, the dynamic-programming alignment against brute force,
and the map recovered where the correspondence is known by construction (a student made of some of the
teacher's layers; a model and itself), then written out by a distillation run."""

import itertools
import json

import jax
import numpy as np
import pytest

from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig, ModelInfo, layer_match


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


def _brute(sim, strict, allowed=None):
  m, t = sim.shape
  maps = [
    c for c in itertools.product(range(t), repeat=m) if all(a < b if strict else a <= b for a, b in zip(c, c[1:]))
  ]
  if allowed is not None:
    maps = [c for c in maps if all(allowed[i, j] for i, j in enumerate(c))]
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
      allowed = rng.random((m, t)) < 0.7  # some pairs forbidden (layers of other positions)
      try:
        want = _brute(sim, strict, allowed)
      except ValueError:  # no map through the allowed pairs
        with pytest.raises(ConfigError, match="no order-preserving map"):
          layer_match.monotone_alignment(sim, strict=strict, allowed=allowed)
        continue
      assert layer_match.monotone_alignment(sim, strict=strict, allowed=allowed) == want


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


# ---------------------------------------------------------------- on models (slow, tiny)

V, LEN = 32, 8


def _lm(layers: int, seed: int):
  from flax import nnx

  from kdjax import models

  return models.create(
    "transformer_lm", num_classes=V, num_layers=layers, dim=16, num_heads=2, max_len=LEN, rngs=nnx.Rngs(seed)
  )


def _token_batches(n: int = 2, rows: int = 8):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    mask = np.ones((rows, LEN), bool)
    mask[::2, 5:] = False  # right padding on every other row
    out.append(
      {
        "inputs": rng.integers(0, V, (rows, LEN)).astype(np.int32),
        "mask": mask,
        "label": np.zeros((rows, LEN), np.int32),
      }
    )
  return out


def _copied_student():
  """A 4-layer teacher whose layers 0 and 2 add nothing (zeroed output projections) and a 2-layer student made of
  its layers 1 and 3 with the same embeddings and head: student block 0 ≡ teacher block 1 (= block 2), student
  block 1 ≡ teacher block 3."""
  from flax import nnx

  teacher, student = _lm(4, 1), _lm(2, 2)
  for i in (0, 2):
    for lin in (teacher.blocks[i].attn.proj, teacher.blocks[i].fc2):
      lin.kernel[...] = 0 * lin.kernel[...]
      lin.bias[...] = 0 * lin.bias[...]
  for name in ("tok", "pos", "ln_f", "head"):
    nnx.update(getattr(student, name), nnx.state(getattr(teacher, name)))
  for s, t in ((0, 1), (1, 3)):
    nnx.update(student.blocks[s], nnx.state(teacher.blocks[t]))
  return student, teacher


@pytest.mark.slow
def test_auto_map_recovers_copied_layers_and_a_model_itself():
  import kdjax

  student, teacher = _copied_student()
  batches = _token_batches()
  sim = kdjax.layer_similarity(student, teacher, batches)
  assert sim.layer_map == ("0=1", "1=3") and sim.rows == 2 * (8 * LEN - 4 * 3)
  np.testing.assert_allclose(sim.cka[[0, 0, 1], [1, 2, 3]], 1.0, atol=1e-4)  # copies: equal hidden states
  assert sim.cka[0, 0] < 0.99 and sim.cka[1, :3].max() < 0.99
  itself = kdjax.layer_similarity(student, student, batches)
  assert itself.layer_map == ("0=0", "1=1")
  np.testing.assert_allclose(np.diag(itself.cka), 1.0, atol=1e-4)
  assert itself.cka[0, 1] < 0.99 and itself.cka[1, 0] < 0.99
  few = [{**batches[0], "mask": np.arange(8 * LEN).reshape(8, LEN) < 2}]
  with pytest.raises(ConfigError, match="2 real calibration rows are too few"):
    kdjax.layer_similarity(student, teacher, few)


def _png(path) -> bool:
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_auto_map_through_the_distiller_and_on_a_cnn_pair(tmp_path):
  """layer_map=auto resolved by Distiller.init on its calibration batches (the step's method reads that map), and a
  ResNet pair compared stage by stage; each writes its map, matrix and heat map."""
  import optax
  from flax import nnx

  import kdjax
  from kdjax import models

  batches = _token_batches()
  method = MethodConfig(name="ce", terms=("hidden_mse=1",), layer_map=("auto",), calibration_batches=1)
  d = kdjax.Distiller(_lm(2, 3), _lm(4, 4), method=method, optimizer=optax.adam(1e-3), calibration=batches)
  d.init(jax.random.key(0), batches[0])
  sim = d.layer_similarity
  assert sim.rows == 8 * LEN - 4 * 3 and sim.cka.shape == (2, 4)  # calibration_batches=1: the first batch only
  assert len(sim.targets) == 2 and sim.targets[0] <= sim.targets[1]
  assert sim.layer_map == tuple(f"{i}={t}" for i, t in enumerate(sim.targets))
  (term,) = [t for t in d.spec.method.terms if t.name == "hidden_mse"]
  assert term.teacher_features == tuple(dict.fromkeys(f"block{t}" for t in sim.targets))
  js, png = sim.write(tmp_path / "lm")
  assert json.loads(js.read_text())["layer_map"] == list(sim.layer_map) and _png(png)

  rng = np.random.default_rng(0)
  images = [{"inputs": rng.normal(size=(4, 8, 8, 3)).astype(np.float32), "mask": np.ones(4, bool)} for _ in range(2)]
  s = models.create("resnet8", num_classes=10, rngs=nnx.Rngs(0))
  t = models.create("resnet14", num_classes=10, rngs=nnx.Rngs(1))
  cnn = kdjax.layer_similarity(s, t, images)
  assert cnn.student_layers == cnn.teacher_layers == ("stage1", "stage2", "stage3") and cnn.rows == 8
  assert all(e.startswith("stage") and "=stage" in e for e in cnn.layer_map) and len(cnn.layer_map) == 3
  assert ((0 <= cnn.cka) & (cnn.cka <= 1 + 1e-6)).all()
  # For the hidden-state terms only stages of one H × W pair up (here stage k with stage k).
  hint = MethodConfig(name="ce", terms=("hidden_mse=1",), layer_map=("auto",))
  cfg, _ = kdjax.auto_layer_map(s, t, images, hint)
  assert cfg.layer_map == ("stage1=stage1", "stage2=stage2", "stage3=stage3")
  js, png = cnn.write(tmp_path / "cnn")
  assert json.loads(js.read_text())["cka"] == [[round(float(v), 6) for v in r] for r in cnn.cka] and _png(png)


def test_auto_map_without_a_teacher_model_is_one_line():
  import optax
  from flax import nnx

  import kdjax

  method = MethodConfig(name="ce", terms=("hidden_mse=1",), layer_map=("auto",))
  student = nnx.eval_shape(lambda: _lm(1, 0))  # refused before any model runs
  d = kdjax.Distiller(student, None, method=method, optimizer=optax.sgd(0.1))
  with pytest.raises(ConfigError, match="layer_map=auto pairs the student's layers with a teacher model's") as e:
    d.init(jax.random.key(0), _token_batches(1)[0])
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="layer_map=auto is chosen on data"):
    kdjax.methods.build(method, ModelInfo("s", V, {"block0": (LEN, 16)}), ModelInfo("t", V, {"block0": (LEN, 16)}))
