"""Two ``jax.distributed`` processes run ``kdjax distill`` end to end like one.

The student (``cnn_digits``; its 18,432-weight conv3 kernel is split over
``fsdp``) trains on a ``(data=1, fsdp=2)`` mesh: in one process with two
forced CPU devices, and in two processes with one device each, so the
parameters really live half in each process. The two-process run is killed
(SIGKILL on process 1 right after step 20's checkpoint save started; process
0 is then killed too, as a scheduler would), re-run, resumes, evaluates on the
whole test split, exports and reports — and equals the one-process run. Process 0, blocked in a
collective with the killed process, finds it lost (no heartbeat for ``KDJAX_PEER_TIMEOUT`` seconds)
and stops on its own with one line and exit 75.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import _procs as P
from kdjax import checkpoint as ckpt
from kdjax import models
from kdjax.engine.state import split_model

pytestmark = pytest.mark.procs

STEPS = 30
FLAGS = [
  "--optim.steps",
  str(STEPS),
  "--run.checkpoint_every",
  "10",
  "--run.eval_every",
  "15",
  "--run.log_every",
  "5",
  "--run.mesh_fsdp",
  "2",
  "--run.max_to_keep",
  "5",
  "--run.quiet",
]


def _env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """The test's environment (compile settings kept) with ``devices`` forced CPU devices and ``extra``."""
  env = {k: v for k, v in os.environ.items() if k != "KDJAX_FAULT_AT_STEP"}
  if devices:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _argv(workdir: Path, teacher: Path, tfds_dir: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "kdjax.cli",
    "distill",
    "digits_kd",
    "--workdir",
    str(workdir),
    "--teacher.checkpoint",
    str(teacher),
    "--data.data_dir",
    tfds_dir,
    *FLAGS,
  ]


def _two_processes(workdir: Path, teacher: Path, tfds_dir: str, fault: str | None = None) -> list[subprocess.Popen]:
  port = P.free_port()
  procs = []
  for i in range(2):
    env = _env(
      KDJAX_COORDINATOR=f"localhost:{port}", KDJAX_NUM_PROCESSES="2", KDJAX_PROCESS_ID=str(i), KDJAX_PEER_TIMEOUT="10"
    )
    if fault and i == 1:
      env["KDJAX_FAULT_AT_STEP"] = fault
    procs.append(
      subprocess.Popen(
        _argv(workdir, teacher, tfds_dir) + ["--distributed"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  return procs


def _params(workdir: Path) -> dict:
  return ckpt.load_export(workdir)[1]["params"]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}


def _make_runs(root: Path, tfds_dir: str) -> None:
  from kdjax import data as kd_data

  for split in ("train", "test"):  # prepare once, before two processes would race to
    kd_data.load_arrays("digits", split, data_dir=tfds_dir)
  teacher = root / "teacher"
  m = models.create("cnn_digits", num_classes=10, rngs=nnx.Rngs(5))
  _, params, rest = split_model(m)
  ckpt.export_model(
    teacher / ckpt.EXPORT_DIR,
    model_name="cnn_digits",
    num_classes=10,
    dtype="float32",
    params=params,
    model_state=ckpt.batch_stats(rest),
    extra={},
  )

  one = root / "one"
  r = subprocess.run(
    _argv(one, teacher, tfds_dir),
    env=_env(devices=2),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

  two = root / "two"
  procs = _two_processes(two, teacher, tfds_dir, fault="20:KILL")
  victim, survivor = procs[1], procs[0]
  victim.wait(timeout=600)
  assert victim.returncode == -signal.SIGKILL, victim.stdout.read()[-3000:]
  output = survivor.communicate(timeout=300)[0]  # it stops on its own: its peer is lost
  (root / "survivor.json").write_text(json.dumps({"status": survivor.returncode, "output": output}))
  killed_steps = ckpt.Checkpointer(two / "checkpoints").all_steps()
  procs = _two_processes(two, teacher, tfds_dir)
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  (root / "killed_steps.json").write_text(json.dumps(killed_steps))


@pytest.fixture(scope="module")
def runs(made_once, tfds_dir):
  root = made_once("multihost_fit", lambda d: _make_runs(d, tfds_dir))  # once per test run, shared by the workers
  killed_steps = json.loads((root / "killed_steps.json").read_text())
  return {"one": root / "one", "two": root / "two", "killed_steps": killed_steps, "root": root}


def test_two_processes_resume_after_sigkill_and_equal_one_process(runs):
  one, two = runs["one"], runs["two"]
  assert runs["killed_steps"] and max(runs["killed_steps"]) < STEPS  # it really was interrupted mid-run
  r1 = json.loads((one / "results.json").read_text())
  r2 = json.loads((two / "results.json").read_text())
  assert r2["resumed_from"] and r2["steps"] == r1["steps"] == STEPS
  for k in (
    "test_accuracy",
    "best_test_accuracy",
    "teacher_test_accuracy",
    "agreement",
    "teacher_student_kl",
    "ece",
    "cka",
  ):
    np.testing.assert_allclose(r2[k], r1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  p1, p2 = _flat(_params(one)), _flat(_params(two))
  assert p1.keys() == p2.keys()
  for k in p1:
    np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_lost_process_stops_the_other_with_one_line_and_exit_75(runs):
  survivor = json.loads((runs["root"] / "survivor.json").read_text())
  noise = ("[Gloo] ", "oneDNN custom operations", "All log messages before absl::InitializeLog")
  lines = [line for line in survivor["output"].splitlines() if line.strip() and not any(n in line for n in noise)]
  assert survivor["status"] == 75 and len(lines) == 1, survivor["output"][-3000:]
  assert lines[0].startswith("kdjax: process 1 of 2 stopped answering (no heartbeat for 10 s)")
  assert "re-run the same command on every process to resume" in lines[0]


def test_evaluation_covers_the_whole_split_in_both(runs):
  for d in (runs["one"], runs["two"]):
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert sorted({r["step"] for r in evals}) == [15, 30]
    assert all(int(r["num_examples"]) == 359 for r in evals), evals  # digits' test split


def test_fsdp_really_split_the_student_across_processes(runs):
  """Every device (one per process in the two-process run) holds less than the
  whole student: conv3's kernel is split over ``fsdp``."""
  for d, processes in ((runs["one"], 1), (runs["two"], 2)):
    r = json.loads((d / "results.json").read_text())
    assert r["process_count"] == processes
    b = r["student_param_bytes"]
    big = 3 * 3 * 32 * 64 * 4  # cnn_digits conv3 kernel, float32
    assert b["max_per_device"] == b["total"] - big // 2, b


def test_report_over_both_runs(runs, capsys):
  from kdjax import cli

  out = runs["root"] / "report.md"
  assert cli.main(["report", str(runs["one"]), str(runs["two"]), "--out", str(out)]) == 0
  text = out.read_text()
  assert "cnn_digits→cnn_digits kd" in text and "| 2 |" in text  # one cell, two runs (the same seed)
