"""The benchmark (:mod:`kdjax.bench`, also ``kdjax bench`` and ``scripts/bench.py``): ``--quick`` prints
valid JSON lines with every field, XLA's FLOP count matches the models' arithmetic, and the audited step
neither recompiles nor keeps its donated input state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from kdjax import cli

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
  "case",
  "pair",
  "images_per_sec",
  "compile_seconds",
  "gflop_per_image",
  "achieved_gflops",
  "devices",
  "backend",
)


@pytest.fixture(scope="module")
def bench():
  """The benchmark module itself (the package's, not the script that wraps it)."""
  from kdjax import bench as module

  return module


@pytest.fixture(scope="module")
def quick_rows(bench):
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert bench.main(["--quick"]) == 0
  return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def _flops_cnn1d_forward() -> float:
  """MNIST-1D CNN forward FLOPs (multiply-add = 2), written out from its shapes."""
  lengths, flops, c_in = [40], 0, 1
  for k in (5, 3, 3):
    n = (lengths[-1] + 2 - k) // 2 + 1
    flops += 2 * n * 25 * k * c_in
    lengths.append(n)
    c_in = 25
  return flops + 2 * 125 * 10


def _flops_mlp_forward() -> float:
  return 2 * (40 * 100 + 100 * 100 + 100 * 10)


@pytest.mark.slow
def test_quick_prints_valid_json_lines_with_all_fields(quick_rows, bench):
  peak = [r for r in quick_rows if r["case"] == "matmul_peak"]
  assert len(peak) == 1 and peak[0]["gflops"] > 0
  rows = {r["case"]: r for r in quick_rows if r["case"] != "matmul_peak" and "skipped" not in r}
  skipped = {r["case"]: r["skipped"] for r in quick_rows if "skipped" in r}
  has_torch = bench._torch_available()
  expected = {"student_only", "kd", "kd_cached"} | ({"torch_eager_kd"} if has_torch else set())
  assert set(rows) == expected
  # Without the bench extra the torch case says so in one line instead of vanishing; generation
  # is for language models only.
  assert skipped.pop("generate") == "generation: language-model pairs only"
  assert skipped.pop("on_policy") == "on-policy distillation: language-model pairs only"
  assert skipped == ({} if has_torch else {"torch_eager_kd": skipped.get("torch_eager_kd")})
  if not has_torch:
    assert "pip install" in skipped["torch_eager_kd"]
  else:  # PyTorch beside JAX in one process, labelled so (torch_eager_kd_process runs it alone)
    assert rows["torch_eager_kd"]["torch_in_process"] is True
  for r in rows.values():
    for f in FIELDS:
      assert f in r, (r["case"], f)
    assert r["pair"] == "cnn1d-mlp" and r["images_per_sec"] > 0 and r["devices"] >= 1
    np.testing.assert_allclose(r["achieved_gflops"], r["gflop_per_image"] * r["images_per_sec"], rtol=2e-3)
  for c in ("student_only", "kd", "kd_cached"):
    assert rows[c]["backend"] == jax.default_backend() and rows[c]["compile_seconds"] > 0


@pytest.mark.slow
def test_xla_flop_counts_match_the_models(quick_rows):
  rows = {r["case"]: r for r in quick_rows}
  teacher_fwd = (rows["kd"]["gflop_per_image"] - rows["kd_cached"]["gflop_per_image"]) * 1e9
  # the online step costs exactly one extra teacher forward …
  np.testing.assert_allclose(teacher_fwd, _flops_cnn1d_forward(), rtol=0.15)
  # … and training the student is ≈ 3 forwards (forward + two backward matmuls per layer)
  np.testing.assert_allclose(rows["student_only"]["gflop_per_image"] * 1e9, 3 * _flops_mlp_forward(), rtol=0.25)
  np.testing.assert_allclose(rows["kd_cached"]["gflop_per_image"], rows["student_only"]["gflop_per_image"], rtol=0.1)


@pytest.mark.slow
def test_engine_step_compiles_once_and_donates_its_state(bench):
  case = bench.JaxCase("kd", "cnn1d-mlp", 8, "float32")
  teacher_before = [np.asarray(x) for x in jax.tree.leaves(case.teacher)]
  state = case.state
  for _ in range(3):
    old = state
    state, metrics = case.jitted(state, case.teacher, case.batch_arrays)
    assert all(x.is_deleted() for x in jax.tree.leaves(old))  # donated: no second copy of the state
  assert case.jitted._cache_size() == 1  # no recompilation across steps
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss/total"]))
  for a, b in zip(teacher_before, jax.tree.leaves(case.teacher)):  # frozen teacher, untouched
    np.testing.assert_array_equal(a, np.asarray(b))


def test_every_entry_point_runs_the_packaged_benchmark(tmp_path, capfd):
  """``kdjax bench``, ``python -m kdjax.bench`` and ``python scripts/bench.py`` all reach its argument parser."""
  commands = [[sys.executable, "-m", "kdjax.bench"], [sys.executable, str(ROOT / "scripts" / "bench.py")]]
  for cmd in commands:
    r = subprocess.run([*cmd, "--pairs", "nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "kdjax bench: error: unknown pair 'nope'" in r.stderr, (cmd, r.stderr)
  capfd.readouterr()
  assert cli.main(["bench", "--pairs", "nope"]) == 2
  assert "kdjax bench: error: unknown pair 'nope'" in capfd.readouterr().err


def test_bad_arguments_exit_with_a_message(bench, capsys):
  with pytest.raises(SystemExit):
    bench.parse_args(["--pairs", "resnet9-nope"])
  assert "unknown pair 'resnet9-nope'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench.parse_args(["--dtype", "float8"])
  assert "unknown --dtype 'float8'" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_case_times_the_kv_cache_and_full_recompute_side_by_side(bench, monkeypatch, capsys):
  tiny = {"num_layers": 1, "dim": 16, "num_heads": 2, "max_len": 16}
  monkeypatch.setitem(bench.PAIRS, "tiny-lm", ("transformer_lm", "transformer_lm", (16,), 32))
  monkeypatch.setitem(bench.PAIR_KWARGS, "tiny-lm", (tiny, tiny))
  capsys.readouterr()
  assert (
    bench.main(
      [
        "--pairs",
        "tiny-lm",
        "--cases",
        "generate,on_policy",
        "--batch",
        "4",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
      ]
    )
    == 0
  )
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  gen = {r["case"]: r for r in rows if r["case"].startswith("generate")}
  assert set(gen) == {"generate_kv", "generate_recompute"}
  for r in gen.values():
    assert r["tokens_per_sec"] > 0 and r["prompt_len"] == 4 and r["new_tokens"] == 12 and r["batch"] == 4
  # on-policy: half of each 16-token row sampled (9 tokens: the row's second half and its last target)
  (op,) = [r for r in rows if r["case"] == "on_policy"]
  np.testing.assert_allclose(op["generated_tokens_per_sec"], 9 * op["images_per_sec"], rtol=1e-3)
  assert op["tokens_per_sec"] > 0


@pytest.mark.slow
def test_input_case_reports_both_worker_counts_and_the_cold_start(bench):
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert (
      bench.main(
        ["--cases", "input", "--pairs", "cnn1d-mlp", "--batch", "32", "--steps", "2", "--rounds", "1", "--warmup", "1"]
      )
      == 0
    )
  rows = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
  got = {(r["dataset"], r["workers"]) for r in rows if r.get("case") == "input"}
  assert got == {("mnist1d", 0), ("mnist1d", 2), ("cifar100_mock", 0), ("cifar100_mock", 2)}
  assert all(r["examples_per_sec"] > 0 for r in rows if r.get("case") == "input")
  cold = [r for r in rows if r.get("case") == "input_cold_start"]
  assert len(cold) == 1 and cold[0]["seconds"] > 0
  assert not [r for r in rows if r.get("case") in ("kd", "student_only")]  # only what was asked for
