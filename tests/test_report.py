"""kdjax.report: MetricWriter, tables (mean ± std over seeds), CSV, plots, make_report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import report
from kdjax.report import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# two cells × three seeds; accuracies are fractions as the engine writes them
CELLS = {
  "cnn1d→mlp kd T=4": dict(
    last=[0.801, 0.812, 0.795],
    best=[0.815, 0.820, 0.799],
    agree=[0.90, 0.91, 0.88],
    kl=[0.21, 0.19, 0.25],
    ece=[0.031, 0.045, 0.038],
    published=74.92,
  ),
  "mlp scratch": dict(
    last=[0.702, 0.688, 0.710],
    best=[0.712, 0.701, 0.716],
    agree=[None, None, None],
    kl=[None, None, None],
    ece=[0.052, 0.061, 0.049],
    published=None,
  ),
}


def _write_run(d: Path, group: str, seed: int, c: dict, i: int, teacher: bool = True) -> None:
  d.mkdir(parents=True)
  res = {
    "test_accuracy": c["last"][i],
    "best_test_accuracy": c["best"][i],
    "best_step": 200,
    "teacher_test_accuracy": 0.9 if teacher else None,
    "agreement": c["agree"][i],
    "teacher_student_kl": c["kl"][i],
    "ece": c["ece"][i],
    "cka": 0.8,
    "steps": 300,
    "seconds": 12.0,
    "config_hash": "abc",
    "teacher_hash": "def",
    "group": group,
    "seed": seed,
    "method": "kd",
    "teacher": "cnn1d",
    "student": "mlp",
    "experiment": "mnist1d_kd",
    "published": c["published"],
  }
  (d / "results.json").write_text(json.dumps(res))
  # eval curve: steps 100, 200, 300 ending at the last-epoch accuracy; seed-dependent
  curve = {100: 0.5 + 0.01 * seed, 200: c["best"][i], 300: c["last"][i]}
  lines = [json.dumps({"step": 10, "split": "train", "loss/total": 1.0})]
  lines += [json.dumps({"step": s, "split": "eval", "test_accuracy": v}) for s, v in curve.items()]
  if seed == 1:  # a resumed run re-logs step 100; the later row must win
    lines.insert(1, json.dumps({"step": 100, "split": "eval", "test_accuracy": 0.0}))
  (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def runs(tmp_path) -> Path:
  root = tmp_path / "sweep"
  for j, (group, c) in enumerate(CELLS.items()):
    for i, seed in enumerate((0, 1, 2)):
      _write_run(root / f"cell{j}" / f"seed{seed}", group, seed, c, i)
  return root


def _fmt(vals, scale=1.0, decimals=2):
  v = np.asarray(vals, np.float64) * scale
  return f"{v.mean():.{decimals}f} ± {v.std(ddof=1):.{decimals}f}"


def _md_rows(md: str) -> dict[str, list[str]]:
  out = {}
  for line in md.splitlines():
    if line.startswith("| ") and not line.startswith("| cell"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      out[cells[0]] = cells
  return out


# ---------------------------------------------------------------- tables
def test_collect_finds_runs_recursively_and_once(runs):
  recs = report.collect([runs, runs / "cell0" / "seed1", runs / "cell1" / "seed2" / "results.json"])
  assert len(recs) == 6
  assert sorted((r.group, r.seed) for r in recs) == sorted((g, s) for g in CELLS for s in (0, 1, 2))
  r1 = next(r for r in recs if r.group == "cnn1d→mlp kd T=4" and r.seed == 1)
  steps, vals = r1.curve()
  np.testing.assert_array_equal(steps, [100, 200, 300])
  np.testing.assert_allclose(vals, [0.51, 0.820, 0.812])  # the re-logged step 100 row won
  with pytest.raises(ValueError, match="no such workdir"):
    report.collect([runs / "nope"])


def test_markdown_mean_std_matches_numpy(runs):
  rows = report.summarize(report.collect([runs]))
  assert [r.group for r in rows] == list(CELLS)
  md = report.to_markdown(rows)
  assert md.splitlines()[0] == (
    "| cell | seeds | last-epoch acc. (%) | best-epoch acc. (%) | agreement | KL(T‖S) | ECE | published |"
  )
  table = _md_rows(md)
  kd, sc = CELLS["cnn1d→mlp kd T=4"], CELLS["mlp scratch"]
  assert table["cnn1d→mlp kd T=4"] == [
    "cnn1d→mlp kd T=4",
    "3",
    _fmt(kd["last"], 100),
    _fmt(kd["best"], 100),
    _fmt(kd["agree"], 1, 3),
    _fmt(kd["kl"], 1, 3),
    _fmt(kd["ece"], 1, 3),
    "74.92",
  ]
  assert table["mlp scratch"] == [
    "mlp scratch",
    "3",
    _fmt(sc["last"], 100),
    _fmt(sc["best"], 100),
    "n/a",
    "n/a",
    _fmt(sc["ece"], 1, 3),
    "–",
  ]
  # last and best really are different columns here
  assert _fmt(kd["last"], 100) != _fmt(kd["best"], 100)
  assert "last = final evaluation" in md
  assert "best = max over evaluations" in md and "optimistic" in md
  assert "sample std" in md
  # Row numbers themselves
  r = rows[0]
  np.testing.assert_allclose(r.last_acc.mean, 100 * np.mean(kd["last"]))
  np.testing.assert_allclose(r.last_acc.std, 100 * np.std(kd["last"], ddof=1))
  np.testing.assert_allclose(r.best_acc.std, 100 * np.std(kd["best"], ddof=1))
  assert r.seeds == (0, 1, 2) and r.n == 3


def test_single_seed_and_partial_values(tmp_path):
  c = dict(last=[0.5, 0.6], best=[0.55, 0.65], agree=[0.7, None], kl=[0.1, 0.2], ece=[0.01, 0.02], published=None)
  _write_run(tmp_path / "a" / "s0", "one seed", 0, c, 0)
  _write_run(tmp_path / "b" / "s0", "two seeds", 0, c, 0)
  _write_run(tmp_path / "b" / "s1", "two seeds", 1, c, 1)
  table = _md_rows(report.to_markdown(report.summarize(report.collect([tmp_path]))))
  assert table["one seed"][1:4] == ["1", "50.00 ± –", "55.00 ± –"]
  assert table["two seeds"][4] == "0.700 ± – (n=1)"  # agreement missing in one of two runs


def test_runs_differing_in_a_setting_are_separate_cells(tmp_path):
  """A sweep over optim.lr: same group name, two cells; per-seed teacher
  paths and the seed itself do not split a cell."""
  c = dict(last=[0.5, 0.6], best=[0.55, 0.65], agree=[0.7, 0.8], kl=[0.1, 0.2], ece=[0.01, 0.02], published=None)
  accs = {}
  for lr, shift in ((0.01, 0.0), (0.003, 0.1)):
    for i, seed in enumerate((0, 1)):
      d = tmp_path / f"lr{lr}" / f"seed{seed}"
      _write_run(d, "cnn1d→mlp kd", seed, dict(c, last=[v + shift for v in c["last"]]), i)
      res = json.loads((d / "results.json").read_text())
      res["config"] = {
        "optim": {"lr": lr, "name": "adam"},
        "run": {"seed": seed, "workdir": str(d)},
        "teacher": {"name": "cnn1d", "checkpoint": f"teachers/seed{seed}"},
      }
      (d / "results.json").write_text(json.dumps(res))
      accs.setdefault(lr, []).append(res["test_accuracy"])
  table = _md_rows(report.to_markdown(report.summarize(report.collect([tmp_path]))))
  assert set(table) == {"cnn1d→mlp kd (optim.lr=0.01)", "cnn1d→mlp kd (optim.lr=0.003)"}
  for lr, vals in accs.items():
    row = table[f"cnn1d→mlp kd (optim.lr={lr})"]
    assert row[1] == "2" and row[2] == _fmt(vals, 100)


def test_csv_content(runs, tmp_path):
  rows = report.summarize(report.collect([runs]))
  path = tmp_path / "out" / "t.csv"
  report.to_csv(rows, path)
  with open(path, newline="", encoding="utf-8") as f:
    got = list(csv.DictReader(f))
  assert [g["group"] for g in got] == list(CELLS)
  kd = CELLS["cnn1d→mlp kd T=4"]
  g = got[0]
  assert g["seeds"] == "3" and g["seed_list"] == "0;1;2"
  np.testing.assert_allclose(float(g["last_acc_pct_mean"]), 100 * np.mean(kd["last"]), rtol=1e-12)
  np.testing.assert_allclose(float(g["last_acc_pct_std"]), 100 * np.std(kd["last"], ddof=1), rtol=1e-12)
  np.testing.assert_allclose(float(g["best_acc_pct_mean"]), 100 * np.mean(kd["best"]), rtol=1e-12)
  np.testing.assert_allclose(float(g["best_acc_pct_std"]), 100 * np.std(kd["best"], ddof=1), rtol=1e-12)
  np.testing.assert_allclose(float(g["teacher_student_kl_mean"]), np.mean(kd["kl"]), rtol=1e-12)
  np.testing.assert_allclose(float(g["published_pct"]), 74.92)
  assert got[1]["agreement_mean"] == "" and got[1]["agreement_n"] == "0" and got[1]["published_pct"] == ""


def test_curve_stats_mean_std_over_seeds(runs):
  recs = [r for r in report.collect([runs]) if r.group == "cnn1d→mlp kd T=4"]
  steps, mean, std = report.plots.curve_stats(recs)
  kd = CELLS["cnn1d→mlp kd T=4"]
  np.testing.assert_array_equal(steps, [100, 200, 300])
  np.testing.assert_allclose(mean, [0.51, np.mean(kd["best"]), np.mean(kd["last"])])
  np.testing.assert_allclose(
    std, [np.std([0.5, 0.51, 0.52], ddof=1), np.std(kd["best"], ddof=1), np.std(kd["last"], ddof=1)]
  )


def test_make_report_writes_md_csv_pngs(runs, tmp_path):
  out = tmp_path / "rep" / "results.md"
  md = report.make_report([str(runs)], str(out))
  page = out.read_text(encoding="utf-8")
  assert md in page and page.startswith(compare.BEGIN) and page.rstrip().endswith(compare.END)
  out.write_text("# Title\n\nwords before\n" + page + "\nA reading after.\n", encoding="utf-8")
  assert report.make_report([str(runs)], str(out)) == md  # regenerated: the text around the table stays
  assert out.read_text(encoding="utf-8") == "# Title\n\nwords before\n" + page + "\nA reading after.\n"
  assert (tmp_path / "rep" / "results.csv").exists()
  for name in ("results_curves.png", "results_bars.png"):
    p = tmp_path / "rep" / name
    data = p.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, name
    assert f"]({name})" in md  # linked relative to the markdown file
  # explicit csv / plots locations
  md2 = report.make_report([runs], tmp_path / "r2.md", csv_path=tmp_path / "x" / "c.csv", plots_dir=tmp_path / "p")
  assert (tmp_path / "x" / "c.csv").exists() and (tmp_path / "p" / "r2_bars.png").read_bytes()[:8] == PNG_MAGIC
  assert "](p/r2_curves.png)" in md2
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="no results.json"):
    report.make_report([empty], tmp_path / "e.md")


# ---------------------------------------------------------------- logging
def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  with report.MetricWriter(tmp_path / "run", quiet=True) as w:
    w.write(10, "train", {"loss/total": jnp.float32(1.5), "lr": np.float64(0.1), "epoch": 1})
    w.write(20, "eval", {"test_accuracy": jnp.asarray([0.75]), "ece": np.float32(0.05)})
    with pytest.raises(TypeError, match="loss"):
      w.write(30, "train", {"loss": np.ones(3)})
    with pytest.raises(ValueError, match="split"):
      w.write(30, "test", {"x": 1.0})
  rows = report.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert rows == [
    {"step": 10, "split": "train", "loss/total": 1.5, "lr": 0.1, "epoch": 1.0},
    {"step": 20, "split": "eval", "test_accuracy": 0.75, "ece": pytest.approx(0.05)},
  ]
  assert all(type(v) is float for r in rows for k, v in r.items() if k not in ("step", "split"))
  events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 1
  blob = events[0].read_bytes()
  assert b"train/loss/total" in blob and b"eval/test_accuracy" in blob
  # appending on resume keeps history
  with report.MetricWriter(tmp_path / "run", quiet=True, tensorboard=False) as w:
    w.write(30, "train", {"loss/total": 1.0})
  assert len(report.read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3


def test_write_json_atomic_and_read_jsonl_truncated(tmp_path):
  p = tmp_path / "d" / "results.json"
  report.write_json(p, {"a": np.float32(1.5), "b": [1, 2]})
  report.write_json(p, {"a": 2.0, "p": tmp_path})
  assert json.loads(p.read_text()) == {"a": 2.0, "p": str(tmp_path)}
  assert [f.name for f in p.parent.iterdir()] == ["results.json"]  # no temp file left
  j = tmp_path / "m.jsonl"
  j.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "spl')  # killed mid-write
  assert report.read_jsonl(j) == [{"step": 1}, {"step": 2}]
  j.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match="m.jsonl:2"):
    report.read_jsonl(j)


def test_progress_passthrough():
  assert list(report.progress(range(5), total=5, desc="x", quiet=True)) == [0, 1, 2, 3, 4]
  assert list(report.progress(iter("ab"))) == ["a", "b"]
