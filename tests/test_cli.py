"""The ``kdjax`` CLI end to end on the embedded MNIST-1D: sweep → report, the
slurm array script and one of its cells run locally, every config field as a
flag, and what ``results.json`` holds.

Everything runs in this process through ``kdjax.cli.main`` (what the console
script calls) with tiny step counts; one subprocess checks the real exit
status and stderr of a misspelt flag.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from kdjax import checkpoint as ckpt
from kdjax import cli
from kdjax.config import Experiment, config_hash, from_dict

STEPS = 20
RESULT_KEYS = (
  "test_accuracy",
  "best_test_accuracy",
  "teacher_test_accuracy",
  "agreement",
  "teacher_student_kl",
  "ece",
  "steps",
  "seconds",
  "config_hash",
  "teacher_hash",
)


def _train_teacher(workdir: Path, data_dir: str, seed: int) -> str:
  rc = cli.main(
    [
      "train-teacher",
      "mnist1d_kd",
      "--workdir",
      str(workdir),
      "--optim.steps",
      "30",
      "--run.seed",
      str(seed),
      "--run.quiet",
      "--data.data_dir",
      data_dir,
    ]
  )
  assert rc == 0
  return str(workdir)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tfds_dir) -> str:
  return _train_teacher(tmp_path_factory.mktemp("teacher"), tfds_dir, seed=0)


def _sweep_args(teacher: str, data_dir: str) -> list[str]:
  return [
    "mnist1d_kd",
    "kd_labelled",
    "--grid",
    "method=kd,dkd",
    "--seeds",
    "2",
    "--teacher.checkpoint",
    teacher,
    "--optim.steps",
    str(STEPS),
    "--run.eval_every",
    "10",
    "--data.data_dir",
    data_dir,
  ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, teacher, tfds_dir) -> Path:
  root = tmp_path_factory.mktemp("sweep")
  assert cli.main(["sweep", *_sweep_args(teacher, tfds_dir), "--workdir", str(root)]) == 0
  return root


def _results(root: Path) -> dict[str, list[dict]]:
  by_method: dict[str, list[dict]] = {}
  for p in sorted(root.rglob("results.json")):
    r = json.loads(p.read_text())
    by_method.setdefault(r["method"], []).append(r)
  return by_method


def _fmt(values, decimals):
  v = np.asarray(values, np.float64)
  return f"{v.mean():.{decimals}f} ± {v.std(ddof=1):.{decimals}f}"


# ---------------------------------------------------------------- (a) sweep → report


@pytest.mark.slow
def test_sweep_writes_one_workdir_per_cell(sweep):
  want = {f"name={m}/seed{s}" for m in ("kd", "dkd") for s in (0, 1)}
  got = {str(p.parent.relative_to(sweep)) for p in sweep.rglob("results.json")}
  assert got == want
  for d in want:
    r = json.loads((sweep / d / "results.json").read_text())
    assert r["method"] == d.split("/")[0].split("=")[1] and r["seed"] == int(d[-1]) and r["steps"] == STEPS


@pytest.mark.slow
def test_report_table_is_mean_std_of_the_runs(sweep, tmp_path, capsys):
  out = tmp_path / "rep" / "results.md"
  assert cli.main(["report", str(sweep), "--out", str(out)]) == 0
  md = out.read_text()
  from kdjax.report.compare import BEGIN, END

  assert md.count(BEGIN) == md.count(END) == 1  # a reading written around the table survives a re-run
  assert md.split(BEGIN)[1].split(END)[0].strip() in capsys.readouterr().out  # also printed
  header = next(line for line in md.splitlines() if line.startswith("| cell"))
  cols = [c.strip() for c in header.strip("|").split("|")]
  assert cols[:4] == ["cell", "seeds", "last-epoch acc. (%)", "best-epoch acc. (%)"]
  rows = {}
  for line in md.splitlines():
    if line.startswith("| cnn1d→mlp"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      rows[cells[0]] = dict(zip(cols, cells))
  runs = _results(sweep)
  assert set(rows) == {"cnn1d→mlp kd", "cnn1d→mlp dkd"}
  for method, rs in runs.items():
    row = rows[f"cnn1d→mlp {method}"]
    assert row["seeds"] == "2"
    assert row["last-epoch acc. (%)"] == _fmt([100 * r["test_accuracy"] for r in rs], 2)
    assert row["best-epoch acc. (%)"] == _fmt([100 * r["best_test_accuracy"] for r in rs], 2)
    assert row["agreement"] == _fmt([r["agreement"] for r in rs], 3)
    assert row["KL(T‖S)"] == _fmt([r["teacher_student_kl"] for r in rs], 3)
    assert row["ECE"] == _fmt([r["ece"] for r in rs], 3)
  assert "last = final evaluation; best = max over evaluations" in md
  # CSV: full precision, same statistics.
  with open(out.with_suffix(".csv"), newline="", encoding="utf-8") as f:
    table = {r["group"]: r for r in csv.DictReader(f)}
  for method, rs in runs.items():
    r = table[f"cnn1d→mlp {method}"]
    acc = np.array([100 * x["test_accuracy"] for x in rs])
    assert int(r["seeds"]) == 2 and r["seed_list"] == "0;1"
    np.testing.assert_allclose(float(r["last_acc_pct_mean"]), acc.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(r["last_acc_pct_std"]), acc.std(ddof=1), rtol=1e-12)
  # PNGs, linked from the Markdown.
  for name in ("results_curves.png", "results_bars.png"):
    data = (out.parent / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert f"({name})" in md


@pytest.mark.slow
def test_best_epoch_is_the_max_over_logged_evals(sweep):
  """best_test_accuracy (the 'best-epoch' column) = max of the eval rows in metrics.jsonl; last = the final one."""
  for p in sweep.rglob("results.json"):
    r = json.loads(p.read_text())
    evals = [json.loads(line) for line in (p.parent / "metrics.jsonl").read_text().splitlines()]
    evals = sorted((e for e in evals if e.get("split") == "eval"), key=lambda e: e["step"])
    assert [e["step"] for e in evals] == [10, 20]
    assert r["best_test_accuracy"] == max(e["test_accuracy"] for e in evals)
    assert r["test_accuracy"] == evals[-1]["test_accuracy"]


@pytest.mark.slow
def test_rerunning_a_sweep_skips_finished_cells(sweep, teacher, tfds_dir, capsys):
  before = {p: p.stat().st_mtime_ns for p in sweep.rglob("results.json")}
  assert cli.main(["sweep", *_sweep_args(teacher, tfds_dir), "--workdir", str(sweep)]) == 0
  assert "4 of 4 cells already finished" in capsys.readouterr().out
  assert {p: p.stat().st_mtime_ns for p in sweep.rglob("results.json")} == before


# ---------------------------------------------------------------- (b) slurm script and one cell locally


@pytest.mark.slow
def test_slurm_script_and_one_cell_through_the_same_entry_point(sweep, teacher, tfds_dir, tmp_path, monkeypatch):
  root = tmp_path / "slurm"
  assert (
    cli.main(
      [
        "sweep",
        *_sweep_args(teacher, tfds_dir),
        "--workdir",
        str(root),
        "--launcher",
        "slurm",
        "--nodes",
        "2",
        "--sbatch",
        "gpus-per-node=8",
      ]
    )
    == 0
  )
  script = (root / "sweep.sbatch").read_text()
  assert script.startswith("#!/bin/bash\n")
  assert "#SBATCH --array=0-3\n" in script  # 2 methods × 2 seeds
  assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
  assert "#SBATCH --gpus-per-node=8\n" in script and f"#SBATCH --chdir={os.getcwd()}\n" in script
  srun = [line for line in script.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1
  assert '--cell "$SLURM_ARRAY_TASK_ID"' in srun[0] and srun[0].endswith("--distributed")
  cells = json.loads((root / "cells.json").read_text())
  assert [c["cell"] for c in cells] == [0, 1, 2, 3]
  assert [(c["method.name"], c["run.seed"]) for c in cells] == [("kd", "0"), ("kd", "1"), ("dkd", "0"), ("dkd", "1")]

  # Array task 3, run locally: the script's own srun command line, $SLURM_ARRAY_TASK_ID = 3.
  argv = shlex.split(srun[0].replace('"$SLURM_ARRAY_TASK_ID"', "3"))
  assert argv[1:4] == [sys.executable, "-m", "kdjax.cli"]
  calls = []
  monkeypatch.setattr("kdjax.engine.distributed.initialize", lambda: calls.append("init"))
  assert cli.main(argv[4:]) == 0
  assert calls == ["init"]  # --distributed → jax.distributed.initialize() (reads SLURM's environment)
  mine = json.loads((Path(cells[3]["workdir"]) / "results.json").read_text())
  ref = json.loads((sweep / "name=dkd" / "seed1" / "results.json").read_text())
  assert (mine["method"], mine["seed"]) == ("dkd", 1)
  assert mine["config_hash"] == ref["config_hash"]  # the same cell as in the local sweep …
  assert mine["test_accuracy"] == ref["test_accuracy"]  # … with the same result (deterministic)


@pytest.mark.slow
def test_cell_out_of_range_is_one_line(teacher, tfds_dir, tmp_path, capsys):
  rc = cli.main(["sweep", *_sweep_args(teacher, tfds_dir), "--workdir", str(tmp_path), "--cell", "4"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1 and "--cell 4 is out of range: the sweep has 4 cells" in err[0]


def test_grid_over_named_configs_with_a_glob():
  names = list(cli.load_experiment("cifar100_crd_table").CONFIGS)
  cells = cli.sweep_cells(["config=vgg13-vgg8/*", "optim.lr=0.05,0.01"], 2, names, "cifar100_crd_table")
  assert len(cells) == 16 * 2 * 2
  assert cells[0] == {"config": "vgg13-vgg8/kd", "optim.lr": "0.05", "run.seed": "0"}
  assert cli.cell_dir("R", cells[0]) == str(Path("R") / "vgg13-vgg8.kd_lr=0.05" / "seed0")
  with pytest.raises(cli.CliError, match="no matching config"):
    cli.sweep_cells(["config=vgg13-vgg9/*"], 1, names, "cifar100_crd_table")


# ---------------------------------------------------------------- (c) every field is a flag


def _leaf_value(path: str, typ, default):
  """A valid non-default value for one leaf and its CLI spelling."""
  origin, args = typing.get_origin(typ), typing.get_args(typ)
  if path in ("teacher.dtype", "student.dtype"):
    return "bfloat16", ["bfloat16"]
  if path == "mode":
    return "self_ema", ["self_ema"]
  if origin is typing.Literal:
    v = next(a for a in args if a != default)
    return v, [v]
  if typ is bool:
    return (not default), []
  if path == "extra_teachers":
    return None, ["resnet8=/tmp/t1", "cnn1d"]
  if origin is tuple:
    if args[0] is str:
      return ("ce=0.5", "kd=2.0"), ["ce=0.5", "kd=2.0"]
    if args[0] is int:
      return (2, 5), ["2", "5"]
    return (0.25, 0.75), ["0.25", "0.75"]
  base = next((a for a in args if a is not type(None)), typ) if args else typ
  if base is int:
    v = (default or 0) + 3
    return v, [str(v)]
  if base is float:
    v = (
      0.375 if path not in ("optim.decay_factor", "method.ema_decay", "method.crd_momentum", "method.gkd_beta") else 0.5
    )
    return v, [repr(v)]
  v = f"x_{path.replace('.', '_')}"
  if path.endswith(("_layers", "_attention")):  # a path template of layer i
    v += ".{i}"
  return v, [v]


def _get(cfg, path):
  for p in path.split("."):
    cfg = getattr(cfg, p)
  return cfg


@pytest.mark.slow  # ~200 fields, each parsed and validated: seconds, not the quick tier's milliseconds
def test_every_config_field_is_settable_from_the_cli():
  base = Experiment(optim=dataclasses.replace(Experiment().optim, steps=7))
  paths = cli.field_paths(Experiment)
  assert len(paths) > 50
  for path, typ in paths.items():
    want, values = _leaf_value(path, typ, _get(base, path))
    if typ is bool:
      flag = path if want else ".".join(path.split(".")[:-1] + ["no-" + path.split(".")[-1].replace("_", "-")])
      cfg = cli.apply_overrides(base, [f"--{flag}"])
    else:
      cfg = cli.apply_overrides(base, [f"--{path}", *values])
    got = _get(cfg, path)
    if path == "extra_teachers":
      assert [(m.name, m.checkpoint) for m in got] == [("resnet8", "/tmp/t1"), ("cnn1d", None)]
    else:
      assert got == want and got != _get(base, path), path
    others = {p: _get(cfg, p) for p in paths if p != path}
    assert others == {p: _get(base, p) for p in paths if p != path}, f"setting {path} changed other fields"


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--optim.lrr", "0.1"], "unknown flag --optim.lrr; did you mean --optim.lr?"),
    (["--optim.lr", "-1"], "optim.lr: must be > 0 and finite, got -1.0"),
    (["--optim.lr", "fast"], "fast"),
    (["--optim.name", "lion"], "lion"),
    (["--run.no-seed"], "unknown flag --run.no_seed"),
  ],
)
def test_bad_flag_or_value_is_one_line(args, needle, capsys, tmp_path):
  rc = cli.main(["distill", "mnist1d_kd", "--workdir", str(tmp_path), *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1, err
  assert err[0].startswith("kdjax: error: ") and needle in err[0]


@pytest.mark.slow
def test_misspelt_flag_exit_status_in_a_real_process(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "kdjax.cli",
      "distill",
      "mnist1d_kd",
      "--workdir",
      str(tmp_path),
      "--method.temprature",
      "4",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert p.returncode == 1
  assert p.stderr.strip().splitlines() == [
    "kdjax: error: unknown flag --method.temprature; did you mean --method.temperature?"
  ]
  assert "Traceback" not in p.stderr + p.stdout


# ---------------------------------------------------------------- (d) results.json


@pytest.mark.slow
def test_results_json_fields(sweep, teacher):
  export = ckpt.resolve_export(teacher)
  want_teacher_hash = hashlib.sha256(Path(export).read_bytes()).hexdigest()[:16]
  for p in sweep.rglob("results.json"):
    r = json.loads(p.read_text())
    assert set(RESULT_KEYS) <= set(r)
    for k in ("test_accuracy", "best_test_accuracy", "teacher_test_accuracy", "agreement", "ece"):
      assert 0.0 <= r[k] <= 1.0, k
    assert r["best_test_accuracy"] >= r["test_accuracy"]
    assert r["teacher_student_kl"] >= 0.0 and r["seconds"] > 0.0 and r["steps"] == STEPS
    saved = json.loads((p.parent / "config.json").read_text())
    assert r["config_hash"] == config_hash(from_dict(saved["config"]))
    assert r["teacher_hash"] == want_teacher_hash
    assert re.fullmatch(r"[0-9a-f]{16}", r["config_hash"])
  # Same experiment, two seeds → two config hashes; same teacher → one teacher hash.
  rs = _results(sweep)["kd"]
  assert rs[0]["config_hash"] != rs[1]["config_hash"] and rs[0]["teacher_hash"] == rs[1]["teacher_hash"]


@pytest.mark.slow
def test_teacher_hash_changes_with_the_teacher_checkpoint(sweep, tfds_dir, tmp_path):
  other = _train_teacher(tmp_path / "teacher2", tfds_dir, seed=1)
  work = tmp_path / "kd"
  rc = cli.main(
    [
      "distill",
      "mnist1d_kd",
      "kd_labelled",
      "--workdir",
      str(work),
      "--teacher.checkpoint",
      other,
      "--optim.steps",
      str(STEPS),
      "--run.eval_every",
      "10",
      "--run.quiet",
      "--data.data_dir",
      tfds_dir,
    ]
  )
  assert rc == 0
  mine = json.loads((work / "results.json").read_text())
  ref = json.loads((sweep / "name=kd" / "seed0" / "results.json").read_text())
  assert mine["teacher_hash"] != ref["teacher_hash"]
  assert mine["teacher_hash"] == hashlib.sha256(Path(ckpt.resolve_export(other)).read_bytes()).hexdigest()[:16]
  assert mine["teacher_test_accuracy"] != ref["teacher_test_accuracy"]  # a different teacher, measured as such


@pytest.mark.slow
def test_student_alone_has_no_teacher_fields(tfds_dir, tmp_path):
  """The table's "student" row: CE without a teacher checkpoint → no teacher hash or diagnostics."""
  work = tmp_path / "scratch"
  rc = cli.main(
    [
      "distill",
      "mnist1d_kd",
      "scratch",
      "--workdir",
      str(work),
      "--teacher.checkpoint",
      "None",
      "--optim.steps",
      "5",
      "--run.quiet",
      "--data.data_dir",
      tfds_dir,
    ]
  )
  assert rc == 0
  r = json.loads((work / "results.json").read_text())
  assert r["teacher_hash"] is None and r["agreement"] is None and r["teacher_test_accuracy"] is None
  assert 0.0 <= r["test_accuracy"] <= 1.0 and r["steps"] == 5 and r["group"] == "mlp scratch"


@pytest.mark.procs
def test_parallel_sweep_adds_a_seed_in_subprocesses(sweep, teacher, tfds_dir, tmp_path, capsys):
  """--parallel 2 on a copy of the sweep with --seeds 3: the 4 finished cells are skipped, the 2 new ones run
  as 2 concurrent `python -m kdjax.cli distill` processes."""
  import shutil

  root = tmp_path / "sweep"
  shutil.copytree(sweep, root)
  before = {p: p.read_bytes() for p in root.rglob("results.json")}
  args = _sweep_args(teacher, tfds_dir)
  args[args.index("--seeds") + 1] = "3"
  assert cli.main(["sweep", *args, "--workdir", str(root), "--parallel", "2"]) == 0
  assert "4 of 6 cells already finished" in capsys.readouterr().out
  assert {p: p.read_bytes() for p in before} == before
  for m in ("kd", "dkd"):
    r = json.loads((root / f"name={m}" / "seed2" / "results.json").read_text())
    assert (r["method"], r["seed"], r["steps"]) == (m, 2, STEPS)
