"""Every config field does what its name says, or is refused with one line.

``student.checkpoint`` initialises the student; ``method.init_epochs`` on a
method without an init stage is refused (it used to add epochs silently);
``from_dict`` refuses unknown keys; digits trains on x/16 in [0, 1].
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import checkpoint as ckpt
from kdjax import engine, models
from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig, from_dict, to_dict
from kdjax.engine.state import split_model


def _export(d, name: str, seed: int) -> dict:
  m = models.create(name, num_classes=10, rngs=nnx.Rngs(seed))
  _, params, rest = split_model(m)
  ckpt.export_model(
    d / ckpt.EXPORT_DIR, model_name=name, num_classes=10, dtype="float32", params=params, model_state=rest, extra={}
  )
  return jax.tree.map(np.asarray, ckpt.pure_dict(params))


def _cfg(tfds_dir, tmp_path, **kw) -> Experiment:
  base = Experiment(
    name="fields",
    mode="teacher",
    data=DataConfig(name="mnist1d", data_dir=tfds_dir, batch_size=50, eval_batch_size=500),
    student=ModelConfig(name="mlp"),
    method=MethodConfig(name="ce"),
    optim=OptimConfig(steps=3),
    run=RunConfig(workdir=str(tmp_path / "run"), quiet=True),
  )
  return base.replace(**kw)


@pytest.mark.slow
def test_student_starts_from_its_checkpoint(tfds_dir, tmp_path):
  want = _export(tmp_path / "pre", "mlp", seed=11)
  fresh = engine.build(_cfg(tfds_dir, tmp_path))
  run = engine.build(_cfg(tfds_dir, tmp_path, student=ModelConfig(name="mlp", checkpoint=str(tmp_path / "pre"))))
  got = jax.tree.map(np.asarray, ckpt.pure_dict(run.state.params[0]))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  other = jax.tree.map(np.asarray, ckpt.pure_dict(fresh.state.params[0]))
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want)))


@pytest.mark.slow
def test_student_checkpoint_of_another_architecture_is_one_line(tfds_dir, tmp_path):
  _export(tmp_path / "pre", "cnn1d", seed=0)
  with pytest.raises(
    ValueError,
    match=r"student.checkpoint .* holds a 'cnn1d' but the config asks for "
    r"student.name='mlp'",
  ):
    engine.build(_cfg(tfds_dir, tmp_path, student=ModelConfig(name="mlp", checkpoint=str(tmp_path / "pre"))))


def test_student_checkpoint_with_dml_is_refused():
  with pytest.raises(ValueError, match="student.checkpoint: mode=dml needs differently initialised students"):
    Experiment(mode="dml", student=ModelConfig(name="mlp", checkpoint="somewhere"))


@pytest.mark.slow
def test_init_epochs_on_a_single_stage_method_is_refused(tfds_dir, tmp_path):
  cfg = _cfg(tfds_dir, tmp_path, method=MethodConfig(name="ce", init_epochs=1.0))
  with pytest.raises(ValueError, match=r"method.init_epochs=1.0: method 'ce' has no init stage"):
    engine.build(cfg)


def test_from_dict_round_trips_and_refuses_unknown_keys():
  cfg = Experiment(
    extra_teachers=(ModelConfig(name="cnn1d"),),
    mode="multi_teacher",
    method=MethodConfig(name="dkd", terms=("kd=0.5",), teacher_weights=(1.0, 2.0)),
  )
  d = to_dict(cfg)
  assert from_dict(d) == cfg
  bad = dict(d, optim=dict(d["optim"], learning_rate=0.1))
  with pytest.raises(ValueError, match=r"unknown field\(s\) optim.learning_rate"):
    from_dict(bad)
  bad = dict(d, extra_teachers=[dict(d["extra_teachers"][0], chekpoint="x")])
  with pytest.raises(ValueError, match=r"unknown field\(s\) extra_teachers\[0\].chekpoint"):
    from_dict(bad)
  with pytest.raises(ValueError, match=r"unknown field\(s\) sead"):
    from_dict(dict(d, sead=3))


@pytest.mark.slow
def test_digits_inputs_are_x_over_16(tfds_dir, tmp_path):
  """digits stores 0..16 in uint8: training and eval inputs are x/16, spanning [0, 1]."""
  cfg = _cfg(
    tfds_dir,
    tmp_path,
    data=DataConfig(name="digits", data_dir=tfds_dir, batch_size=64, eval_batch_size=359),
    student=ModelConfig(name="cnn_digits"),
  )
  run = engine.build(cfg)
  raw = run.loader.ds.images
  assert raw.dtype == np.uint8 and raw.max() == 16
  np.testing.assert_array_equal(run.loader.ds.ids, np.arange(len(raw)))  # ids index the rows
  x = run.loader.batch(0, 0)["inputs"]
  ids = run.loader.batch(0, 0)["id"]
  np.testing.assert_allclose(x, run.loader.ds.images[ids].astype(np.float32) / 16.0, rtol=0, atol=0)
  from kdjax import data as kd_data

  ev = next(kd_data.eval_batches(run.eval_ds, 359, view=run.view))
  assert ev["inputs"].min() == 0.0 and ev["inputs"].max() == 1.0
  assert dataclasses.asdict(run.view)["scale"] == 16.0
