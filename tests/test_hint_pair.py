"""FitNet's hint pair between different layers of the two models (``hint_layer="s=t"``), and that pair chosen by
linear CKA (``hint_layer="auto"``): the term reads the named features (loss against NumPy), the automatic choice
recovers a layer copied from the teacher and is recorded as ``layer_map=auto``'s choice is, bad input is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig, ModelInfo, build, layer_match, tap_templates

from test_layer_map_auto import LEN, _lm, _png, _token_batches


def _one_line(match: str, make) -> None:
  with pytest.raises(ConfigError, match=match) as e:
    make()
  assert "\n" not in str(e.value)


def test_hint_layer_is_checked_once_and_bad_input_is_one_line():
  for bad in ("a=b=c", "=b", "a=", ""):
    _one_line("method.hint_layer", lambda: MethodConfig(name="fitnet", hint_layer=bad))
  assert MethodConfig(name="fitnet", hint_layer="block0=block2").hint_layer == "block0=block2"
  _one_line(r"needs feature 'stage9', but model 's' exposes \['stage1', 'stage2'\]", lambda: _fitnet("stage9=stage1"))
  _one_line(r"needs feature 'nope', but model 't' exposes \['stage1', 'stage3'\]", lambda: _fitnet("stage2=nope"))
  _one_line("hint_layer=auto is chosen on data", lambda: _fitnet("auto"))
  assert _fitnet("stage2=stage3").terms[1].teacher_features == ("stage3",)  # 4×4 → 2×2: a stride-2 ConvReg
  # A module path of a model of one's own is tapped in each model (the student's and the teacher's side).
  assert tap_templates(MethodConfig(name="fitnet", hint_layer="enc.1=enc.3")) == (("enc.1",), ("enc.3",))
  assert tap_templates(MethodConfig(name="fitnet", hint_layer="auto")) == ((), ())


def _fitnet(hint):
  s_info = ModelInfo("s", 10, {"stage1": (8, 8, 4), "stage2": (4, 4, 8)})
  t_info = ModelInfo("t", 10, {"stage1": (8, 8, 8), "stage3": (2, 2, 16)})
  return build(MethodConfig(name="fitnet", hint_layer=hint), s_info, t_info)


def test_hint_choice_takes_the_middle_student_layer_and_the_most_similar_mappable_teacher_layer():
  assert [layer_match.guided_layer(m) for m in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 2]
  assert layer_match.hint_mappable((4, 4, 8), (8, 8, 3)) and layer_match.hint_mappable((4, 4, 8), (2, 2, 3))
  assert layer_match.hint_mappable((4, 4, 8), (4, 4, 3)) and not layer_match.hint_mappable((4, 4, 8), (1, 1, 3))
  assert layer_match.hint_mappable((6, 8), (6, 32)) and not layer_match.hint_mappable((6, 8), (5, 8))
  assert layer_match.hint_mappable((8,), (3,)) and not layer_match.hint_mappable((8,), (6, 8))
  sim = np.array([[0.9, 0.1, 0.2, 0.3], [0.2, 0.4, 0.8, 0.95], [0.9, 0.9, 0.9, 0.9]])
  student = [(16, 16, 4), (8, 8, 8), (4, 4, 8)]
  teacher = [(16, 16, 8), (8, 8, 8), (4, 4, 16), (1, 1, 32)]  # the last: 8× smaller, no ConvReg for it
  assert layer_match.hint_choice(sim, student, teacher) == (1, 2)
  _one_line("no teacher layer", lambda: layer_match.hint_choice(sim, student, [(1, 1, 32)]))
  # Before any model runs, the method is validated on a stand-in pair of the same candidates.
  cfg = layer_match.provisional(
    MethodConfig(name="fitnet", hint_layer="auto"),
    dict(zip(["stage1", "stage2", "stage3"], student)),
    {f"stage{k + 1}": s for k, s in enumerate(teacher)},
  )
  assert cfg.hint_layer == "stage2=stage1" and cfg.layer_map == ()


# ---------------------------------------------------------------- on features and models (slow, tiny)


def _loss_and_params(cfg, s_info, t_info, s_feats, t_feats, mask=None):
  """The ``hint`` term's loss on these features, with the regressor ``init`` made (BN affine perturbed)."""
  from kdjax.methods.base import Context, InitInfo
  from kdjax.models.base import ModelOutput

  m = build(cfg, s_info, t_info)
  b = next(iter(s_feats.values())).shape[0]
  s, t = ModelOutput(jnp.zeros((b, 10)), s_feats), ModelOutput(jnp.zeros((b, 10)), t_feats)
  params, state = m.init(jax.random.key(0), s, t, InitInfo(s_info, t_info, 0))
  if "bn" in params["hint"]:
    c = params["hint"]["bn"]["scale"].shape[0]
    params["hint"]["bn"] = {"scale": jnp.linspace(0.5, 2.0, c), "bias": jnp.linspace(-0.3, 0.3, c)}
  ctx = Context(step=jnp.int32(0), epoch=jnp.float32(0), key=jax.random.key(0))
  batch = {} if mask is None else {"mask": jnp.asarray(mask)}
  loss = jax.jit(lambda p: m.loss(p, state, s, t, batch, ctx)[2]["loss/hint"])(params)
  return float(loss), jax.tree.map(np.asarray, params["hint"])


@pytest.mark.slow
def test_a_hint_pair_reads_student_s_and_teacher_t_on_maps_and_sequences():
  rng = np.random.default_rng(0)
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  # NHWC maps: student stage1 (4×4) guided by teacher stage3 (4×4), a 1×1 ConvReg; both models also expose the
  # other name at another size, so reading the wrong one would not even match the regressor's geometry.
  s_info = ModelInfo("s", 10, {"stage1": (4, 4, 3), "stage3": (2, 2, 3)})
  t_info = ModelInfo("t", 10, {"stage1": (8, 8, 5), "stage3": (4, 4, 5)})
  fs, ft = {"stage1": f(6, 4, 4, 3), "stage3": f(6, 2, 2, 3)}, {"stage1": f(6, 8, 8, 5), "stage3": f(6, 4, 4, 5)}
  loss, p = _loss_and_params(
    MethodConfig(name="fitnet", hint_layer="stage1=stage3", terms=("ce=0",)), s_info, t_info, fs, ft
  )
  y = fs["stage1"] @ p["conv"]["w"][0, 0] + p["conv"]["b"]  # 1×1 conv, then train-mode BN and ReLU
  y = (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  np.testing.assert_allclose(loss, ((np.maximum(y, 0) - ft["stage3"]) ** 2).mean(), rtol=1e-5)
  # Sequences: student block0 (width 8) guided by teacher block2 (width 12), a linear map per real token.
  s_info = ModelInfo("s", 10, {"block0": (LEN, 8), "block1": (LEN, 8)})
  t_info = ModelInfo("t", 10, {f"block{i}": (LEN, 12) for i in range(3)})
  fs = {n: f(3, LEN, 8) for n in s_info.feature_shapes}
  ft = {n: f(3, LEN, 12) for n in t_info.feature_shapes}
  mask = np.ones((3, LEN), np.float32)
  mask[0, 5:] = 0
  cfg = MethodConfig(name="fitnet", hint_layer="block0=block2", terms=("ce=0",))
  loss, p = _loss_and_params(cfg, s_info, t_info, fs, ft, mask)
  per = ((fs["block0"] @ p["w"] + p["b"] - ft["block2"]) ** 2).mean(-1)
  np.testing.assert_allclose(loss, (per * mask).sum() / mask.sum(), rtol=1e-5)


def _copied_deeper():
  """A 4-layer teacher whose layers 0 and 1 add nothing (zeroed output projections) and a 2-layer student made of
  its layers 2 and 3 with the same embeddings and head: student block 0 ≡ teacher block 2 (and no other)."""
  from flax import nnx

  teacher, student = _lm(4, 1), _lm(2, 2)
  for i in (0, 1):
    for lin in (teacher.blocks[i].attn.proj, teacher.blocks[i].fc2):
      lin.kernel[...] = 0 * lin.kernel[...]
      lin.bias[...] = 0 * lin.bias[...]
  for name in ("tok", "pos", "ln_f", "head"):
    nnx.update(getattr(student, name), nnx.state(getattr(teacher, name)))
  for s, t in ((0, 2), (1, 3)):
    nnx.update(student.blocks[s], nnx.state(teacher.blocks[t]))
  return student, teacher


@pytest.mark.slow
def test_auto_hint_recovers_the_copied_layer_through_the_distiller(tmp_path):
  """hint_layer=auto resolved by Distiller.init: the student's middle layer (block 0 of 2) with the teacher layer
  it copies (CKA 1); both FitNet stages read that pair; the choice is written as layer_map=auto's is."""
  import optax

  import kdjax

  student, teacher = _copied_deeper()
  batches = _token_batches()
  method = MethodConfig(name="fitnet", hint_layer="auto", init_epochs=1, calibration_batches=2)
  d = kdjax.Distiller(student, teacher, method=method, optimizer=optax.adam(1e-3), calibration=batches)
  state = d.init(jax.random.key(0), batches[0])
  sim = d.layer_similarity
  assert d.method_arg.hint_layer == sim.hint_layer == "block0=block2" and sim.hint == (0, 2)
  np.testing.assert_allclose(sim.cka[0, 2], 1.0, atol=1e-4)
  assert np.delete(sim.cka[0], 2).max() < 0.99 and sim.targets == () and sim.layer_map == ()
  hint_terms = [t for t in d.spec.method.terms if t.name in ("hint", "hint_init")]
  assert [(t.name, t.student_features, t.teacher_features) for t in hint_terms] == [
    ("hint", ("block0",), ("block2",)),
    ("hint_init", ("block0",), ("block2",)),
  ]
  assert state.adapter_params[0]["hint"]["w"].shape == (16, 16)
  js, png = sim.write(tmp_path)
  written = json.loads(js.read_text())
  assert written["hint_layer"] == "block0=block2" and "layer_map" not in written and _png(png)
  assert written["hint_cka"] == round(float(sim.cka[0, 2]), 6) and written["rows"] == sim.rows
  # Both choices from one measurement: the map of the hidden-state terms and FitNet's pair.
  both = MethodConfig(name="fitnet", terms=("hidden_mse=1",), hint_layer="auto", layer_map=("auto",))
  cfg, sim2 = kdjax.auto_layers(student, teacher, batches, both)
  assert cfg.hint_layer == "block0=block2" and cfg.layer_map == sim2.layer_map == ("0=2", "1=3")
  assert set(json.loads(sim2.write(tmp_path / "both")[0].read_text())) >= {"hint_layer", "layer_map", "pairs"}
  # A CNN compared with itself: its middle stage, guided by the same stage (stages 1 and 3, 2× and ½× its H × W,
  # could be regressed onto too).
  from flax import nnx

  from kdjax import models

  rng = np.random.default_rng(0)
  images = [{"inputs": rng.normal(size=(4, 8, 8, 3)).astype(np.float32)} for _ in range(2)]
  cnn = models.create("resnet8", num_classes=10, rngs=nnx.Rngs(0))
  cfg, sim3 = kdjax.auto_layers(cnn, cnn, images, MethodConfig(name="fitnet", hint_layer="auto"))
  assert cfg.hint_layer == "stage2=stage2" and sim3.rows == 8 and sim3.cka[1, [0, 2]].max() < 0.99


def test_auto_hint_without_a_teacher_model_is_one_line():
  """A teacher known by its cached outputs only, or the student's own average: no teacher layers to compare."""
  import optax
  from flax import nnx

  import kdjax

  method = MethodConfig(name="fitnet", hint_layer="auto")
  student = nnx.eval_shape(lambda: _lm(1, 0))  # refused before any model runs
  for mode in ("offline", "self_ema"):
    d = kdjax.Distiller(student, None, mode=mode, method=method, optimizer=optax.sgd(0.1))
    _one_line(
      rf"method.hint_layer=auto pairs the student's layers with a teacher model's; this run has none \(mode='{mode}'\)",
      lambda: d.init(jax.random.key(0), _token_batches(1)[0]),
    )


@pytest.mark.slow
def test_kdjax_distill_records_the_chosen_hint_pair(tfds_dir, tmp_path):
  """A run with hint_layer=auto writes layer_map.json, layer_map.png and results.json's layer_map, as with
  layer_map=auto, and trains on the chosen pair."""
  from kdjax import checkpoint as ckpt
  from kdjax import models
  from kdjax.config import DataConfig, Experiment, ModelConfig, OptimConfig, RunConfig
  from kdjax.engine import loop
  from kdjax.engine.state import split_model

  _, params, _ = split_model(models.create("mlp", num_classes=10))
  teacher_dir = tmp_path / "teacher" / ckpt.EXPORT_DIR
  ckpt.export_model(teacher_dir, model_name="mlp", num_classes=10, dtype="float32", params=params, model_state={})
  cfg = Experiment(
    name="hint_auto",
    mode="offline",
    data=DataConfig(name="mnist1d", data_dir=tfds_dir, batch_size=50, eval_batch_size=1000),
    teacher=ModelConfig(name="mlp", checkpoint=str(tmp_path / "teacher")),
    student=ModelConfig(name="mlp"),
    method=MethodConfig(name="fitnet", hint_layer="auto", calibration_batches=2),
    optim=OptimConfig(steps=1),
    run=RunConfig(workdir=str(tmp_path / "run"), quiet=True, log_every=100),
  )
  res = loop.fit(cfg)
  chosen = res["layer_map"]
  assert chosen["hint_layer"].startswith("stage1=stage") and chosen["rows"] == 100  # 2 batches of 50 examples
  on_disk = json.loads((tmp_path / "run" / "layer_map.json").read_text())
  assert on_disk == chosen == json.loads((tmp_path / "run" / "results.json").read_text())["layer_map"]
  assert _png(tmp_path / "run" / "layer_map.png") and res["steps"] == 1
