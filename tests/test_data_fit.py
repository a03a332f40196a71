"""The engine on the Grain pipeline: a streamed (mock) ImageNet through `fit`."""

from __future__ import annotations

import json
import warnings

import pytest
import tensorflow_datasets as tfds

from kdjax import engine
from kdjax.config import DataConfig, Experiment, ModelConfig, OptimConfig, RunConfig


def _imagenet_cfg(tmp_path, **data) -> Experiment:
  return Experiment(
    name="mock_imagenet",
    mode="teacher",
    student=ModelConfig(name="resnet8"),
    data=DataConfig(
      name="imagenet2012",
      data_dir=str(tmp_path / "tfds"),
      view="imagenet",
      image_size=32,
      batch_size=4,
      eval_batch_size=4,
      download=True,
      eval_split="validation",
      **data,
    ),
    optim=OptimConfig(steps=2, lr=0.01),
    run=RunConfig(workdir=str(tmp_path / "run"), quiet=True, eval_every=2),
  )


@pytest.mark.slow
def test_mock_imagenet_streams_through_fit(tmp_path):
  cfg = _imagenet_cfg(tmp_path, workers=0)
  with tfds.testing.mock_data(num_examples=8), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    run = engine.build(cfg)
    from kdjax.data import RecordSource

    assert isinstance(run.loader.ds, RecordSource) and isinstance(run.eval_ds, RecordSource)
    b = run.loader.batch(0, 0)
    assert b["inputs"].shape == (4, 32, 32, 3) and run.num_classes == 1000
    res = engine.fit(cfg)
  assert res["steps"] == 2 and 0.0 <= res["test_accuracy"] <= 1.0
  lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert any(r.get("split") == "eval" for r in lines)
