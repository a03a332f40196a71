"""The language-model experiment through the CLI: on-policy GKD and SeqKD evaluate, checkpoint and resume
bit-exact (the sampling key included), and the report shows exact match and perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt
from kdjax import cli, report
from kdjax.engine import faults

pytestmark = pytest.mark.slow

EXP = "arithmetic_gkd"
COMMON = ["--data.batch_size", "32", "--data.eval_batch_size", "500", "--run.quiet", "--run.log_every", "2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tfds_dir) -> Path:
  t = tmp_path_factory.mktemp("lm_teacher")
  assert (
    cli.main(["train-teacher", EXP, "--workdir", str(t), "--optim.steps", "6", "--data.data_dir", tfds_dir, *COMMON])
    == 0
  )
  return t


def _argv(config: str, workdir: Path, teacher: Path, tfds_dir: str) -> list[str]:
  return [
    "distill",
    EXP,
    config,
    "--workdir",
    str(workdir),
    "--teacher.checkpoint",
    str(teacher),
    "--data.data_dir",
    tfds_dir,
    "--optim.steps",
    "8",
    "--run.checkpoint_every",
    "2",
    "--run.eval_every",
    "4",
    *COMMON,
  ]


def _final(workdir: Path):
  step, state, _ = ckpt.read_checkpoint(workdir / "checkpoints")
  return step, jax.tree_util.tree_leaves_with_path(state)


def test_generated_response_runs_resume_bit_identical(teacher, tfds_dir, tmp_path, monkeypatch):
  """Half of each batch's rows sampled from the student (on-policy, the sampling key in the state), the other
  half the teacher's greedy answers (SeqKD): one run exercises both kinds of generated rows."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  argv = lambda w: [*_argv("seqkd", w, teacher, tfds_dir), "--responses.student_fraction", "0.5"]  # noqa: E731
  assert cli.main(argv(ref)) == 0
  monkeypatch.setenv(faults.FAULT_ENV, "5:TERM")  # stopped after step 5: it resumes from the step-4 checkpoint
  assert cli.main(argv(run)) == faults.PREEMPTED_EXIT
  monkeypatch.delenv(faults.FAULT_ENV)
  assert cli.main(argv(run)) == 0
  res = json.loads((run / "results.json").read_text())
  assert res["resumed_from"] and res["steps"] == 8
  (sa, la), (sb, lb) = _final(ref), _final(run)
  assert sa == sb == 8 and [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert np.array_equal(x, y), jax.tree_util.keystr(path)
  for key in ("exact_match", "teacher_exact_match", "perplexity", "test_nll"):
    assert res[key] == json.loads((ref / "results.json").read_text())[key], key
  assert 0.0 <= res["exact_match"] <= 1.0 and res["perplexity"] > 1.0
  md = report.make_report([str(ref)], str(tmp_path / "table.md"))
  assert "exact match (%)" in md.splitlines()[0] and "seqkd on-policy λ=0.5" in md
