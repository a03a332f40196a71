"""Bad input through the CLI: one clear line, a non-zero exit, nothing lost.

Table-driven and in-process (``kdjax.cli.main`` with stderr captured). Every
case points at an existing, finished run (or its teacher) and the test hashes
every file of both workdirs before and after: a rejected command must not
change or remove anything. (The batch-not-divisible-by-8-devices case needs
forced devices and runs in ``tests/test_checkpoint.py``'s 8-device subprocess.)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from kdjax import cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
  """A finished teacher run, a finished student run and a few odd paths."""
  root = tmp_path_factory.mktemp("cli_errors")
  t, s = root / "teacher", root / "student"
  assert (
    cli.main(
      [
        "train-teacher",
        "mnist1d_kd",
        "--workdir",
        str(t),
        "--optim.steps",
        "3",
        "--data.batch_size",
        "64",
        "--run.quiet",
      ]
    )
    == 0
  )
  assert cli.main(student_argv(s, t)) == 0
  (root / "a_file").write_text("not a directory")
  (root / "not_an_experiment.py").write_text("def get_config():\n  return 42\n")
  (root / "unfinished" / "checkpoints").mkdir(parents=True)
  return {"teacher": t, "student": s, "root": root}


def student_argv(workdir: Path, teacher: Path, *extra: str, config: str = "kd_labelled") -> list[str]:
  return [
    "distill",
    "mnist1d_kd",
    config,
    "--workdir",
    str(workdir),
    "--teacher.checkpoint",
    str(teacher),
    "--optim.steps",
    "3",
    "--data.batch_size",
    "64",
    "--run.quiet",
    *extra,
  ]


def digest(d: Path) -> dict[str, str]:
  """Every file's SHA-256, except the run lock (it names whoever last held it)."""
  return {
    str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(d.rglob("*"))
    if p.is_file() and p.name != ".lock"
  }


# (id, argv builder (student workdir, teacher workdir, scratch root) → argv, what the line must say)
CASES = [
  ("unknown_dataset", lambda s, t, r: student_argv(s, t, "--data.name", "mnist1e"), "unknown TFDS dataset 'mnist1e'"),
  (
    "unknown_student_model",
    lambda s, t, r: student_argv(s, t, "--student.name", "resnet9000"),
    "unknown model 'resnet9000'; available: ",
  ),
  (
    "unknown_teacher_model",
    lambda s, t, r: student_argv(s, t, "--teacher.name", "cnn2d"),
    "unknown model 'cnn2d'; available: ",
  ),
  ("unknown_method", lambda s, t, r: student_argv(s, t, "--method.name", "kdd"), "method.name: unknown method 'kdd'"),
  (
    "negative_lr",
    lambda s, t, r: student_argv(s, t, "--optim.lr", "-0.1"),
    "optim.lr: must be > 0 and finite, got -0.1",
  ),
  (
    "lr_not_a_number",
    lambda s, t, r: student_argv(s, t, "--optim.lr", "fast"),
    "--optim.lr: could not convert string to float: 'fast'",
  ),
  ("unknown_optimizer", lambda s, t, r: student_argv(s, t, "--optim.name", "lion"), "invalid choice 'lion'"),
  (
    "zero_batch",
    lambda s, t, r: student_argv(s, t, "--data.batch_size", "0"),
    "data.batch_size: must be positive, got 0",
  ),
  (
    "mesh_larger_than_devices",
    lambda s, t, r: student_argv(s, t, "--run.mesh_data", "3"),
    "run.mesh_data=3 × run.mesh_fsdp=1 must equal the device count 1",
  ),
  (
    "fsdp_not_dividing_devices",
    lambda s, t, r: student_argv(s, t, "--run.mesh_fsdp", "2"),
    "run.mesh_fsdp=2 must divide the device count 1",
  ),
  (
    "missing_teacher",
    lambda s, t, r: student_argv(s, r / "no_such_teacher"),
    "(no such file or directory); train one with `kdjax train-teacher",
  ),
  (
    "unfinished_teacher",
    lambda s, t, r: student_argv(s, r / "unfinished"),
    "has checkpoints but did not finish; re-run its command to resume and export it",
  ),
  (
    "teacher_wrong_architecture",
    lambda s, t, r: student_argv(s, t, "--teacher.name", "mlp"),
    "holds a 'cnn1d' but the config asks for teacher.name='mlp'",
  ),
  (
    "unwritable_workdir",
    lambda s, t, r: student_argv(r / "a_file" / "run", t),
    "is not writable (Not a directory); choose another --run.workdir",
  ),
  (
    "workdir_of_another_experiment",
    lambda s, t, r: student_argv(s, t, "--optim.lr", "0.02"),
    "holds another experiment (differs in optim.lr: 0.01 → 0.02)",
  ),
  (
    "conflict_multi_teacher_without_extra",
    lambda s, t, r: student_argv(s, t, "--mode", "multi_teacher"),
    "extra_teachers: multi_teacher mode needs at least one extra teacher",
  ),
  (
    "conflict_teacher_on_transfer_set",
    lambda s, t, r: ["train-teacher", "mnist1d_kd", "--workdir", str(t), "--data.transfer_split", "transfer"],
    "data.transfer_split: the transfer set is unlabelled; it cannot train a teacher",
  ),
  (
    "conflict_no_length",
    lambda s, t, r: student_argv(s, t, "--optim.steps", "0", "--optim.epochs", "0"),
    "optim.epochs/optim.steps: one of them must be positive",
  ),
  (
    "wrong_feature_name",
    lambda s, t, r: student_argv(s, t, "--method.name", "fitnet", "--method.hint_layer", "nope"),
    "needs feature 'nope', but model 'mlp' exposes",
  ),
  (
    "zero_temperature",
    lambda s, t, r: student_argv(s, t, "--method.temperature", "0"),
    "method.temperature: must be > 0 and finite, got 0.0",
  ),
  (
    "negative_temperature",
    lambda s, t, r: student_argv(s, t, "--method.temperature", "-4"),
    "method.temperature: must be > 0 and finite, got -4.0",
  ),
  (
    "misspelt_flag",
    lambda s, t, r: student_argv(s, t, "--method.temprature", "4"),
    "unknown flag --method.temprature; did you mean --method.temperature?",
  ),
  (
    "unknown_experiment",
    lambda s, t, r: ["distill", "mnist2d_kd", "--workdir", str(s)],
    "unknown experiment 'mnist2d_kd'",
  ),
  (
    "unknown_named_config",
    lambda s, t, r: student_argv(s, t, config="kd_unlabelled"),
    "has no config 'kd_unlabelled'; available: kd, kd_labelled, scratch",
  ),
  (
    "export_unfinished_run",
    lambda s, t, r: ["export", str(r / "unfinished"), "--out", str(r / "exported")],
    "run to export",
  ),
  ("unknown_command", lambda s, t, r: ["distil", "mnist1d_kd"], "unknown command 'distil'; did you mean 'distill'?"),
  (
    "get_config_not_an_experiment",
    lambda s, t, r: ["distill", str(r / "not_an_experiment.py"), "--workdir", str(s)],
    "not_an_experiment.py: get_config() gave int 42, not a kdjax.config.Experiment",
  ),
  ("infinite_lr", lambda s, t, r: student_argv(s, t, "--optim.lr", "inf"), "optim.lr: must be > 0 and finite, got inf"),
  (
    "infinite_temperature",
    lambda s, t, r: student_argv(s, t, "--method.temperature", "inf"),
    "method.temperature: must be > 0 and finite, got inf",
  ),
  (
    "nan_term_weight",
    lambda s, t, r: student_argv(s, t, "--method.terms", "kd=nan"),
    "method.terms: weight of 'kd' must be finite, got 'nan'",
  ),
  (
    "init_epochs_single_stage",
    lambda s, t, r: student_argv(s, t, "--method.init_epochs", "1"),
    "method.init_epochs=1.0: method 'kd' has no init stage",
  ),
  (
    "unprepared_cifar100",
    lambda s, t, r: student_argv(s, t, "--data.name", "cifar100", "--data.data_dir", str(r / "empty_tfds")),
    "dataset 'cifar100' is not prepared in data_dir",
  ),
  (
    "student_checkpoint_missing",
    lambda s, t, r: student_argv(s, t, "--student.checkpoint", str(r / "nope")),
    "student checkpoint",
  ),
]


@pytest.mark.parametrize("make, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_loses_nothing(make, needle, runs, capsys):
  t, s, r = runs["teacher"], runs["student"], runs["root"]
  before = {"teacher": digest(t), "student": digest(s)}
  assert before["student"] and "export/model.msgpack" in before["teacher"]
  capsys.readouterr()
  rc = cli.main(make(s, t, r))
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert rc != 0
  assert len(lines) == 1 and lines[0].startswith("kdjax: "), lines
  assert needle in lines[0], lines[0]
  assert "Traceback" not in err and out == ""
  assert {"teacher": digest(t), "student": digest(s)} == before
  assert not (r / "exported").exists() and not (r / "a_file" / "run").exists()


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "kdjax.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
  )


@pytest.mark.slow
def test_a_bug_keeps_its_traceback_and_exits_70_bad_input_is_one_line(tmp_path):
  """An experiment file's ConfigError is bad input (one line, exit 1); anything
  else — a plain ValueError it raises, a KeyError, a ValueError inside NumPy —
  is a bug (traceback, exit 70)."""
  (tmp_path / "bad_value.py").write_text(
    "from kdjax.errors import ConfigError\n"
    "def get_config():\n  raise ConfigError('lr must be set for this experiment')\n"
  )
  (tmp_path / "bug_value.py").write_text("def get_config():\n  raise ValueError('not a ConfigError')\n")
  (tmp_path / "bug_key.py").write_text("def get_config():\n  return {}['missing']\n")
  (tmp_path / "bug_numpy.py").write_text("import numpy as np\ndef get_config():\n  return np.zeros(-1)\n")
  r = _run_cli("distill", "bad_value.py", cwd=tmp_path)
  assert r.returncode == 1 and r.stderr.strip() == "kdjax: error: lr must be set for this experiment", r.stderr
  bugs = {
    "bug_value.py": "ValueError: not a ConfigError",
    "bug_key.py": "KeyError: 'missing'",
    "bug_numpy.py": "ValueError: negative dimensions",
  }
  for name, needle in bugs.items():
    r = _run_cli("distill", name, cwd=tmp_path)
    assert r.returncode == cli.INTERNAL_ERROR_EXIT == 70, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and needle in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("kdjax: internal error (exit 70)")


def test_in_process_a_library_valueerror_propagates(monkeypatch):
  """``cli.main`` lets a bug propagate to its caller instead of printing a line."""
  import numpy as np

  def broken_fit(cfg):
    return np.ones(3).reshape(2, 2)

  monkeypatch.setattr("kdjax.engine.fit", broken_fit)
  with pytest.raises(ValueError, match="cannot reshape"):
    cli.main(["distill", "mnist1d_kd", "scratch", "--run.quiet", "--optim.steps", "1"])


def test_a_swallowed_ctrl_c_prints_no_ignored_exception_traceback(monkeypatch):
  """A Ctrl-C that lands in a garbage-collection callback is remembered (and re-raised before the first step);
  Python's "Exception ignored in …" report of it is dropped, any other unraisable exception is reported."""
  import types

  from kdjax import _interrupt

  reported = []
  hook = _interrupt._quiet_swallowed_sigint(reported.append)
  ctrl_c, other = types.SimpleNamespace(exc_type=KeyboardInterrupt), types.SimpleNamespace(exc_type=ValueError)
  hook(ctrl_c)  # not remembered: a KeyboardInterrupt of someone else's making is reported
  monkeypatch.setattr(_interrupt, "_sigint_seen", True)
  hook(ctrl_c)
  hook(other)
  assert reported == [ctrl_c, other]
