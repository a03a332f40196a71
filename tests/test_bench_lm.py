"""The benchmark's PyTorch-in-its-own-process and released-shape cases (``kdjax bench --quick --cases
torch_eager_kd_process,generate_hf,released_kd``): the PyTorch workers run without JAX, the A-B-A ratio is
taken from its lines, greedy generation equals transformers' token for token, and the fused KD step's first
loss equals the plain one's with less temporary memory."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def rows():
  from kdjax import bench

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert bench.main(["--quick", "--cases", "torch_eager_kd_process,generate_hf,released_kd"]) == 0
  return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def _one(rows, case, **match):
  got = [r for r in rows if r["case"] == case and all(r.get(k) == v for k, v in match.items())]
  assert len(got) == 1, (case, match, got)
  return got[0]


@pytest.mark.slow
@pytest.mark.procs
def test_torch_process_runs_around_the_kd_step_without_jax(rows):
  before = _one(rows, "torch_eager_kd_process", order="before")
  after = _one(rows, "torch_eager_kd_process", order="after")
  kd = _one(rows, "kd", aba=True)
  summary = _one(rows, "kd_vs_torch_process")
  peak = _one(rows, "matmul_peak")
  for r in (before, after):
    assert r["torch_in_process"] is False and r["jax_imported"] is False
    assert r["images_per_sec"] > 0 and r["peak_rss_bytes"] > 0 and r["pair"] == "cnn1d-mlp"
  mean = (before["images_per_sec"] + after["images_per_sec"]) / 2
  np.testing.assert_allclose(summary["ratio"], kd["images_per_sec"] / mean, rtol=2e-3)
  np.testing.assert_allclose(summary["achieved_gflops"], kd["gflop_per_image"] * kd["images_per_sec"], rtol=2e-3)
  np.testing.assert_allclose(summary["peak_fraction"], summary["achieved_gflops"] / peak["gflops"], atol=1e-3)


@pytest.mark.slow
@pytest.mark.procs
def test_generate_hf_greedy_equals_transformers_token_for_token(rows):
  greedy = _one(rows, "generate_hf", mode="greedy")
  sampled = _one(rows, "generate_hf", mode="sampled")
  assert greedy["greedy_tokens"] == greedy["batch"] * greedy["new"] > 0
  assert greedy["greedy_equal_tokens"] == greedy["greedy_tokens"]
  for r in (greedy, sampled):
    assert r["kdjax_tokens_per_sec"] > 0 and r["torch_tokens_per_sec"] > 0 and r["torch_jax_imported"] is False
    np.testing.assert_allclose(r["ratio"], r["kdjax_tokens_per_sec"] / r["torch_tokens_per_sec"], rtol=2e-3)
    assert len(r["round_ratios"]) == r["rounds"] and min(r["round_ratios"]) > 0


@pytest.mark.slow
@pytest.mark.procs
def test_released_kd_fused_step_equals_plain_in_less_memory(rows):
  r = _one(rows, "released_kd")
  np.testing.assert_allclose(r["loss_fused"], r["loss_plain"], rtol=1e-5)
  assert 0 < r["temp_bytes_fused"] < r["temp_bytes_plain"] and r["argument_bytes"] > 0
  for k in ("fused", "plain", "torch"):
    assert r[f"tokens_per_sec_{k}"] > 0
  assert r["torch_peak_rss_bytes"] > 0 and r["peak_rss_bytes"] > 0 and r["torch_jax_imported"] is False
