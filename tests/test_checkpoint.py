"""Checkpoints and fault tolerance, end to end through ``kdjax.cli``.

Every training run here is the embedded mnist1d ``kd_labelled`` experiment
(cnn1d teacher → mlp student; the KD runs' student has dropout), 24 steps of
batch 64, a checkpoint every 4 steps. The uninterrupted reference runs (kd, DML, CRD) are shared by the
module; a run is interrupted with the documented ``KDJAX_FAULT_AT_STEP`` hook
(``N:KILL`` in a subprocess, ``N:TERM``/``N:NAN`` in-process) at a step drawn
from a seeded RNG, then re-run with the same command, and its final Orbax
state (params, optimizer, adapters, CRD memory bank, RNG key, step) must be
bit-identical to the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt
from kdjax import cli
from kdjax import config as cfg_lib
from kdjax.engine import faults, loop
from kdjax.engine.distiller import Distiller
from kdjax.report.logging import read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY, BATCH = 24, 4, 64
COMMON = [
  "--optim.steps",
  str(STEPS),
  "--run.checkpoint_every",
  str(EVERY),
  "--data.batch_size",
  str(BATCH),
  "--run.log_every",
  "4",
  "--run.quiet",
]
# The KD student has dropout: its masks, drawn from the run's key, must resume exactly too.
# CRD with a small head and few negatives: the memory bank is still updated
# every step (the state that must survive the restart), at a fraction of the cost.
KINDS = {
  "kd": ["--student.name", "mlp_dropout"],
  "dml": ["--mode", "dml"],
  "crd": ["--method.name", "crd", "--method.crd_negatives", "64", "--method.feat_dim", "16"],
}

# Where each interrupted run is stopped: drawn once from a seeded RNG. The CRD
# kill lands on a checkpoint step, i.e. while that step's async save is in flight.
_rng = np.random.default_rng(2026)
KILL_AT = {
  "kd": int(_rng.integers(2, STEPS)),
  "dml": int(_rng.integers(2, STEPS)),
  "crd": EVERY * int(_rng.integers(1, STEPS // EVERY)),
}
TERM_AT = {k: int(_rng.integers(1, STEPS)) for k in KINDS}


def argv(kind: str, workdir: Path, teacher: Path, *extra: str) -> list[str]:
  return [
    "distill",
    "mnist1d_kd",
    "kd_labelled",
    "--workdir",
    str(workdir),
    "--teacher.checkpoint",
    str(teacher),
    *COMMON,
    *KINDS[kind],
    *extra,
  ]


def steps_on_disk(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def final_state(workdir: Path) -> tuple[int, dict]:
  step, state, _ = ckpt.read_checkpoint(workdir / "checkpoints")
  return step, state


def assert_bit_identical(a: Path, b: Path) -> None:
  """Same final Orbax state and the same exported student, leaf by leaf."""
  (sa, ta), (sb, tb) = final_state(a), final_state(b)
  assert sa == sb == STEPS
  la, lb = jax.tree_util.tree_leaves_with_path(ta), jax.tree_util.tree_leaves_with_path(tb)
  assert [p for p, _ in la] == [p for p, _ in lb]
  assert len(la) > 10
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)
  ea, eb = ckpt.load_export(a)[1], ckpt.load_export(b)[1]
  for x, y in zip(jax.tree.leaves(ea), jax.tree.leaves(eb), strict=True):
    assert np.array_equal(x, y)


def results(workdir: Path) -> dict:
  return json.loads((workdir / "results.json").read_text())


def tree_digest(d: Path) -> dict[str, str]:
  """Every file's SHA-256, except the run lock (it names whoever last held it)."""
  return {
    str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(d.rglob("*"))
    if p.is_file() and p.name != ".lock"
  }


EIGHT_DEVICES = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()


def _env(**kw) -> dict:
  env = {k: v for k, v in os.environ.items() if k != faults.FAULT_ENV}
  env.update(
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    **kw,
  )
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return env


@pytest.fixture(autouse=True)
def _no_fault(monkeypatch):
  monkeypatch.delenv(faults.FAULT_ENV, raising=False)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent XLA cache for this module's many identical compiles (each
  re-run recompiles the same step); subprocesses share it through the env."""
  d = str(tmp_path_factory.mktemp("xla_cache"))
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (d, 0.0, 0)):
    jax.config.update(n, v)
  yield d
  for n, v in old.items():
    jax.config.update(n, v)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
  t = tmp_path_factory.mktemp("teacher")
  assert (
    cli.main(
      [
        "train-teacher",
        "mnist1d_kd",
        "--workdir",
        str(t),
        "--optim.steps",
        "8",
        "--data.batch_size",
        str(BATCH),
        "--run.quiet",
      ]
    )
    == 0
  )
  return t


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
  """``reference(kind)`` → the workdir of an uninterrupted run (made once)."""
  root, made = tmp_path_factory.mktemp("ref"), {}

  def get(kind: str) -> Path:
    if kind not in made:
      w = root / kind
      assert cli.main(argv(kind, w, teacher)) == 0
      assert results(w)["resumed_from"] == [] and steps_on_disk(w)[-1] == STEPS
      made[kind] = w
    return made[kind]

  return get


# ---------------------------------------------------------------------------
# 1. SIGKILL / SIGTERM at a random step, re-run → bit-identical.


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_then_rerun_is_bit_identical_with_the_same_metric_rows(kind, teacher, reference, tmp_path):
  w, k = tmp_path / "run", KILL_AT[kind]
  proc = subprocess.run(
    [sys.executable, "-m", "kdjax.cli", *argv(kind, w, teacher)],
    cwd=ROOT,
    env=_env(**{faults.FAULT_ENV: f"{k}:KILL"}),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  on_disk = steps_on_disk(w)
  # Only complete saves are steps; one cut short by the kill is not.
  # At most the save of the last checkpoint step (in flight at the kill) is lost.
  assert max(on_disk, default=0) <= k and max(on_disk, default=0) >= k - k % EVERY - EVERY, (k, on_disk)
  assert not (w / "results.json").exists()
  dead = json.loads((w / ".lock").read_text())["pid"]

  assert cli.main(argv(kind, w, teacher)) == 0  # the lock of the killed run does not block
  assert json.loads((w / ".lock").read_text())["pid"] == os.getpid() != dead
  assert results(w)["resumed_from"] == on_disk[-1:]
  assert not any(".orbax-checkpoint-tmp" in p.name for p in (w / "checkpoints").iterdir())
  assert_bit_identical(reference(kind), w)
  # Rows logged after the checkpoint the run resumed from were dropped and logged again: the
  # history is exactly the uninterrupted run's.
  assert read_jsonl(w / "metrics.jsonl") == read_jsonl(reference(kind) / "metrics.jsonl")


def test_sigkill_with_two_input_workers_resumes_bit_identical(teacher, reference, tmp_path):
  """Grain worker processes make the batches ahead; the killed run's successor (workers again) continues with
  exactly the next batch, and the result equals the reference run, made without workers."""
  w, k, two = tmp_path / "run", KILL_AT["kd"], ("--data.workers", "2")
  proc = subprocess.run(
    [sys.executable, "-m", "kdjax.cli", *argv("kd", w, teacher, *two)],
    cwd=ROOT,
    env=_env(**{faults.FAULT_ENV: f"{k}:KILL"}),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  on_disk = steps_on_disk(w)
  assert on_disk and max(on_disk) < STEPS
  assert cli.main(argv("kd", w, teacher, *two)) == 0
  assert results(w)["resumed_from"] == on_disk[-1:]
  assert_bit_identical(reference("kd"), w)
  assert read_jsonl(w / "metrics.jsonl") == read_jsonl(reference("kd") / "metrics.jsonl")


@pytest.mark.parametrize("kind, sig", [(k, "TERM") for k in KINDS] + [("kd", "INT")])
def test_sigterm_saves_exits_75_then_rerun_is_bit_identical(
  kind, sig, teacher, reference, tmp_path, monkeypatch, capsys
):
  w, k = tmp_path / "run", TERM_AT[kind] if sig == "TERM" else STEPS - 1
  monkeypatch.setenv(faults.FAULT_ENV, f"{k}:{sig}")
  assert cli.main(argv(kind, w, teacher)) == faults.PREEMPTED_EXIT == 75
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"kdjax: preempted at step {k}; checkpoint saved, re-run the same command to resume"]
  assert steps_on_disk(w)[-1] == k  # the step in progress was finished and saved
  step, _, meta = ckpt.read_checkpoint(w / "checkpoints")
  assert step == k and meta["step"] == k and meta["data"] == {"epoch": 0, "step_in_epoch": k, "seed": 0}

  monkeypatch.delenv(faults.FAULT_ENV)
  assert cli.main(argv(kind, w, teacher)) == 0
  assert results(w)["resumed_from"] == [k]
  assert_bit_identical(reference(kind), w)


# ---------------------------------------------------------------------------
# 2. A truncated latest checkpoint → warning naming it, resume from the previous.


def test_truncated_latest_checkpoint_resumes_from_previous(reference, teacher, tmp_path):
  ref = reference("kd")
  w = tmp_path / "run"
  shutil.copytree(ref, w)
  (w / "results.json").unlink()
  latest = w / "checkpoints" / str(STEPS)
  files = [p for p in (latest / "state").rglob("*") if p.is_file()]
  assert files
  for p in files:  # truncate every array/metadata file to half its length
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
  # An unfinished save (as a SIGKILL mid-save leaves it) must be ignored too.
  tmp_save = w / "checkpoints" / f"{STEPS + 4}.orbax-checkpoint-tmp-1234"
  tmp_save.mkdir()
  (tmp_save / "partial").write_bytes(b"\0" * 10)

  with pytest.warns(ckpt.CheckpointWarning) as rec:
    assert cli.main(argv("kd", w, teacher)) == 0
  msgs = [str(r.message) for r in rec if "is damaged" in str(r.message)]
  assert len(msgs) == 1 and str(latest) in msgs[0], msgs
  assert results(w)["resumed_from"] == [STEPS - EVERY]
  assert (w / "checkpoints_corrupt" / str(STEPS) / "state").is_dir()  # moved aside, not deleted
  assert not tmp_save.exists()
  assert_bit_identical(ref, w)


def test_checkpointer_restore_skips_unreadable_and_returns_none_when_all_are(tmp_path):
  """Unit level: no good checkpoint → None (the caller decides), each bad one named and set aside."""
  import jax.numpy as jnp

  state = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(3)}
  c = ckpt.Checkpointer(tmp_path / "c", save_every=1, max_to_keep=3)
  assert c.save(1, state, {"step": 1}) and c.save(2, jax.tree.map(lambda x: x, state), {"step": 2})
  assert not c.save(2, state, {"step": 2}, force=True)  # already saved: skipped, not an Orbax error
  c.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  c = ckpt.Checkpointer(tmp_path / "c", save_every=1)
  step, got, meta = c.restore_latest(abstract)
  assert step == 2 and meta["step"] == 2 and set(meta["digest"]) == {"['key']", "['w']"}
  np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(jax.random.key(3)))
  for s in (1, 2):
    for p in (tmp_path / "c" / str(s) / "state").rglob("*"):
      if p.is_file():
        p.write_bytes(b"")
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    assert c.restore_latest(abstract) is None
  named = sorted(str(r.message).split(" is damaged")[0] for r in rec if "is damaged" in str(r.message))
  assert named == [f"checkpoint {tmp_path / 'c' / '1'}", f"checkpoint {tmp_path / 'c' / '2'}"]
  assert c.set_aside_steps() == ["1", "2"] and c.all_steps() == []
  c.close()


def test_a_checkpoint_without_digest_is_refused_unless_allowed_and_a_missing_structure_is_damage(tmp_path):
  """Unit level: no digest → refused, nothing moved (``allow_unverified`` restores it, checked for finiteness);
  a checkpoint whose ``state/_METADATA`` is gone is damage (set aside), not another layout."""
  import jax.numpy as jnp

  from kdjax.errors import ConfigError

  state = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(3)}
  c = ckpt.Checkpointer(tmp_path / "c", save_every=1, max_to_keep=3)
  assert c.save(1, state, {"step": 1}) and c.save(2, state, {"step": 2})
  c.close()
  meta_path = tmp_path / "c" / "2" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  del meta["digest"]
  meta_path.write_text(json.dumps(meta))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  c = ckpt.Checkpointer(tmp_path / "c", save_every=1)
  with pytest.raises(ConfigError, match=r"/c/2 carries no digest .* pass --run.allow_unverified"):
    c.restore_latest(abstract)
  assert c.all_steps() == [1, 2] and c.set_aside_steps() == []
  step, got, _ = c.restore_latest(abstract, allow_unverified=True)
  assert step == 2 and np.array_equal(np.asarray(got["w"]), np.arange(6.0).reshape(2, 3))
  (tmp_path / "c" / "2" / "state" / "_METADATA").unlink()
  with pytest.warns(ckpt.CheckpointWarning, match=r"/c/2 is damaged \(the structure of its arrays"):
    step, _, _ = c.restore_latest(abstract)
  assert step == 1 and c.set_aside_steps() == ["2"]
  c.close()


# ---------------------------------------------------------------------------
# 3. Save on 8 forced CPU devices, restore on 1 (and 1 → 8), continue.

_EIGHT = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from kdjax import cli
    import jax
    assert jax.device_count() == 8, jax.devices()
    out = {}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      out["bad_batch_rc"] = cli.main(json.loads(sys.argv[1]))
    out["bad_batch_err"] = err.getvalue()
    os.environ["KDJAX_FAULT_AT_STEP"] = sys.argv[4]
    with contextlib.redirect_stderr(io.StringIO()):
      out["save8_rc"] = cli.main(json.loads(sys.argv[2]))
    del os.environ["KDJAX_FAULT_AT_STEP"]
    out["resume8_rc"] = cli.main(json.loads(sys.argv[3]))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.procs
def test_mesh_change_8_to_1_and_1_to_8(reference, teacher, tmp_path, monkeypatch):
  ref, k = reference("kd"), 10
  w81, w18 = tmp_path / "w81", tmp_path / "w18"
  monkeypatch.setenv(faults.FAULT_ENV, f"{k}:TERM")  # 1 device: stop at k (saved on 1 device)
  assert cli.main(argv("kd", w18, teacher)) == 75
  monkeypatch.delenv(faults.FAULT_ENV)
  bad = argv("kd", tmp_path / "bad", teacher, "--data.batch_size", "100")
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      _EIGHT,
      json.dumps(bad),
      json.dumps(argv("kd", w81, teacher)),
      json.dumps(argv("kd", w18, teacher)),
      f"{k}:TERM",
    ],
    cwd=ROOT,
    env=_env(XLA_FLAGS=EIGHT_DEVICES),
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1])
  # Batch size not divisible by the device count: one line, exit 1.
  assert out["bad_batch_rc"] == 1
  assert out["bad_batch_err"].strip().splitlines() == [
    "kdjax: error: data.batch_size=100 is not divisible by the 8 devices of the mesh; use a multiple of 8"
  ]
  assert out["save8_rc"] == 75 and out["resume8_rc"] == 0
  _, _, meta = ckpt.read_checkpoint(w81 / "checkpoints")
  assert meta["step"] == k and meta["mesh"] == {"data": 8, "fsdp": 1}
  assert results(w18)["resumed_from"] == [k]

  assert cli.main(argv("kd", w81, teacher)) == 0  # 8 → 1
  assert results(w81)["resumed_from"] == [k]
  _, tr = final_state(ref)
  for w in (w81, w18):
    _, tw = final_state(w)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(tr), jax.tree.leaves(tw), strict=True):
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5, err_msg=f"{w.name} {jax.tree_util.keystr(path)}")


# ---------------------------------------------------------------------------
# 4. Wrong teacher → a clear error before any step runs.


def _forbid_steps(monkeypatch):
  def boom(*a, **k):
    raise AssertionError("a train state was built although the teacher does not fit")

  monkeypatch.setattr(Distiller, "init", boom)


def _make_export(directory: Path, model: str, num_classes: int, *, meta: bool = True) -> Path:
  from flax import nnx

  from kdjax import models

  m = models.create(model, num_classes=num_classes, rngs=nnx.Rngs(0))
  _, params, rest = nnx.split(m, nnx.Param, ...)
  ckpt.export_model(
    directory,
    model_name=model,
    num_classes=num_classes,
    dtype="float32",
    params=params,
    model_state=ckpt.batch_stats(rest),
  )
  if not meta:
    (directory / ckpt.EXPORT_META).unlink()
  return directory


@pytest.mark.parametrize("case", ["architecture", "classes", "architecture_no_meta", "classes_no_meta"])
def test_wrong_teacher_fails_before_any_step(case, teacher, tmp_path, monkeypatch):
  _forbid_steps(monkeypatch)
  if case == "architecture":  # a real cnn1d teacher, the config says mlp
    t, extra, match = teacher, ["--teacher.name", "mlp"], r"holds a 'cnn1d' but the config asks for teacher.name='mlp'"
  elif case == "classes":
    t, extra, match = _make_export(tmp_path / "t5", "cnn1d", 5), [], r"has 5 classes but the dataset has 10"
  elif case == "architecture_no_meta":  # no model.json: the parameter shapes decide
    t, extra = _make_export(tmp_path / "tm", "mlp", 10, meta=False), []
    match = r"does not fit teacher.name='cnn1d' with 10 classes \(checkpoint params do not fit the model"
  else:
    t, extra = _make_export(tmp_path / "t7", "cnn1d", 7, meta=False), []
    match = r"does not fit teacher.name='cnn1d' with 10 classes .*shape mismatch \[.*'linear'\]\['kernel'\]"
  cfg = cli.build_config(argv("kd", tmp_path / "student", t, *extra)[1:])
  with pytest.raises(ValueError, match=match):
    loop.fit(cfg)
  assert not (tmp_path / "student").exists()  # nothing written, nothing compiled


def test_swapped_teacher_or_foreign_checkpoint_refuses_to_resume(teacher, tmp_path):
  """Never silently continue with another teacher or another experiment's state."""
  t2, w = tmp_path / "teacher", tmp_path / "run"
  shutil.copytree(teacher, t2)
  short = ["--optim.steps", "4", "--run.checkpoint_every", "2"]
  assert cli.main(argv("kd", w, t2, *short)) == 0
  _make_export(t2 / "export", "cnn1d", 10)  # retrained in place: same path, other weights
  before = tree_digest(w)
  with pytest.raises(
    ValueError,
    match=r"was trained with teacher [0-9a-f]{16} but the configured teacher is "
    r"[0-9a-f]{16}; use a new --run.workdir",
  ):
    loop.fit(cli.build_config(argv("kd", w, t2, *short)[1:]))
  assert tree_digest(w) == before
  # Checkpoints of another experiment (config.json gone) are not resumed either.
  (w / "config.json").unlink()
  (w / "results.json").unlink()
  before = tree_digest(w)
  with pytest.raises(ValueError, match=r"checkpoint '.*/checkpoints/4' belongs to another experiment"):
    loop.fit(cli.build_config(argv("kd", w, teacher, *short, "--optim.lr", "0.02")[1:]))
  assert tree_digest(w) == before
  (w / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="has an unreadable config.json"):
    loop.fit(cli.build_config(argv("kd", w, teacher, *short)[1:]))


# ---------------------------------------------------------------------------
# 5. NaN in a loss term → stop with step and term; last good checkpoint intact.


def test_nan_loss_stops_with_step_and_term_and_keeps_last_good(reference, teacher, tmp_path, monkeypatch, capsys):
  w = tmp_path / "run"
  monkeypatch.setenv(faults.FAULT_ENV, "10:NAN:loss/kd")
  assert cli.main(argv("kd", w, teacher)) == faults.NONFINITE_EXIT == 65
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["kdjax: non-finite loss at step 10 in loss/kd; last good checkpoint: step 8"]
  assert steps_on_disk(w) == [4, 8]  # step 12 (after the NaN) was never written
  step, state, meta = ckpt.read_checkpoint(w / "checkpoints")
  assert step == 8 and meta["step"] == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))
  assert not (w / "results.json").exists() and not (w / "export").exists()
  # The kept checkpoint is exactly the reference's step 8: resuming from it
  # reproduces the uninterrupted run bit for bit.
  monkeypatch.delenv(faults.FAULT_ENV)
  assert cli.main(argv("kd", w, teacher)) == 0
  assert results(w)["resumed_from"] == [8]
  assert_bit_identical(reference("kd"), w)


def test_nan_loss_with_stop_on_nan_off_runs_to_the_end(teacher, tmp_path, monkeypatch):
  w = tmp_path / "run"
  monkeypatch.setenv(faults.FAULT_ENV, "10:NAN:loss/kd")
  assert cli.main(argv("kd", w, teacher, "--run.no-stop_on_nan")) == 0
  res = results(w)
  final_step, _ = final_state(w)
  assert res["steps"] == final_step > 10
  # The poisoned step is in the log as non-finite, and nothing stopped the run.
  rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if any(k.startswith("loss/") for k in r)]
  assert train and any(
    not np.isfinite(v) for r in train for k, v in r.items() if k.startswith("loss/") and isinstance(v, float)
  )


def test_fault_env_parsing():
  assert faults.fault_from_env({}) is None
  assert faults.fault_from_env({faults.FAULT_ENV: "7:term"}) == faults.Fault(7, "TERM")
  assert faults.fault_from_env({faults.FAULT_ENV: "3:NAN:s1/loss/kd"}) == faults.Fault(3, "NAN", "s1/loss/kd")
  for bad in ("x:KILL", "0:KILL", "4:BOOM"):
    with pytest.raises(ValueError, match=faults.FAULT_ENV):
      faults.fault_from_env({faults.FAULT_ENV: bad})


# ---------------------------------------------------------------------------
# Metadata and export.


def _versions() -> dict:
  import flax
  import optax
  import orbax.checkpoint

  import kdjax

  return {
    "kdjax": kdjax.__version__,
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "orbax": orbax.checkpoint.__version__,
  }


def test_metadata_in_every_checkpoint_config_and_results(reference, teacher):
  w = reference("kd")
  cfg = cli.build_config(argv("kd", w, teacher)[1:])
  expected_config = json.loads(json.dumps(__import__("dataclasses").asdict(cfg), default=str))
  teacher_hash = hashlib.sha256((teacher / "export" / "model.msgpack").read_bytes()).hexdigest()[:16]
  docs = [json.loads((w / "config.json").read_text()), results(w)]
  docs += [ckpt.read_checkpoint(w / "checkpoints", s)[2] for s in steps_on_disk(w)]
  assert len(docs) == 2 + 2  # max_to_keep=2 checkpoints
  for d in docs:
    assert d["config"] == expected_config
    assert d["config"]["method"]["name"] == "kd" and d["config"]["optim"]["steps"] == STEPS
    assert d["config_hash"] == cfg_lib.config_hash(cfg) == cfg_lib.config_hash(cfg_lib.from_dict(d["config"]))
    assert len(d["config_hash"]) == 16
    assert d["teacher_hash"] == teacher_hash
    assert d["versions"] == _versions()
    assert d["git_commit"] == docs[0]["git_commit"]
  # The recorded commit is a real commit of this checkout (HEAD may have moved on since).
  sha = docs[0]["git_commit"]
  if (ROOT / ".git").exists():
    assert len(sha) == 40 and subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=ROOT).returncode == 0
  else:
    assert sha is None
  # The same experiment in another workdir has the same hash; another lr does not.
  assert cfg_lib.config_hash(
    cfg.replace(run=cfg.run.__class__(**{**cfg_lib.to_dict(cfg.run), "workdir": "/x"}))
  ) == cfg_lib.config_hash(cfg)
  assert cfg_lib.config_hash(cli.build_config(argv("kd", w, teacher, "--optim.lr", "0.02")[1:])) != cfg_lib.config_hash(
    cfg
  )


def _numpy_mlp(params: dict, x: np.ndarray) -> np.ndarray:
  """The 40-100-100-10 ReLU MLP written out in NumPy (float64)."""
  h = x.reshape(len(x), -1).astype(np.float64)
  layers = params["layers"]
  for i in sorted(layers, key=int):
    h = np.maximum(h @ layers[i]["kernel"] + layers[i]["bias"], 0.0)
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def test_export_cli_and_predict_match_engine_eval(reference, tmp_path, capsys):
  from kdjax import data as kd_data
  from kdjax import export

  w = reference("kd")
  out = tmp_path / "exported"
  assert cli.main(["export", str(w), "--out", str(out)]) == 0
  assert "kdjax.export.load" in capsys.readouterr().out
  params = export.load(out)
  assert (
    params["model"] == "mlp_dropout" and params["num_classes"] == 10 and params["hash"] == results(w)["student_hash"]
  )
  test = kd_data.load_arrays("mnist1d", "test")
  images = kd_data.views.normalize(kd_data.ViewConfig(), test.images)
  logits = export.predict(params, images, batch_size=300)
  assert logits.shape == (len(test.labels), 10) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, _numpy_mlp(params["params"], images), rtol=1e-4, atol=1e-4)
  # Same predictions as the engine's evaluation of the trained student.
  acc = float(np.mean(np.argmax(logits, -1) == test.labels))
  assert acc == pytest.approx(results(w)["test_accuracy"], abs=1e-9)
  # The exported params are the final checkpoint's student params.
  _, state = final_state(w)
  for x, y in zip(jax.tree.leaves(state["params"][0]), jax.tree.leaves(params["params"]), strict=True):
    np.testing.assert_array_equal(x, y)


_SPLIT = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from kdjax import cli
    import jax
    assert jax.device_count() == 8, jax.devices()
    runs, out = json.loads(sys.argv[1]), {}
    for name, (args, fault) in runs.items():
      if fault:
        os.environ["KDJAX_FAULT_AT_STEP"] = fault
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        out[name] = [cli.main(args), err.getvalue()]
      os.environ.pop("KDJAX_FAULT_AT_STEP", None)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.procs
def test_split_placement_resumes_bit_exact_and_restores_colocated(reference, teacher, tmp_path):
  """On 8 devices, a run with the teacher on 4 devices of its own (one batch ahead) stopped at step k and
  re-run ends bit-identical to the uninterrupted split run (the data position saved is the trained one,
  not the batch drawn ahead); the same checkpoint resumed with the teacher colocated ends where the
  colocated run does, to float32 rounding."""
  k = TERM_AT["kd"]
  split = ["--placement.teacher_devices", "4"]
  w = {n: tmp_path / n for n in ("ref", "resumed", "across")}
  runs = {
    "ref": (argv("kd", w["ref"], teacher, *split), None),
    "stop": (argv("kd", w["resumed"], teacher, *split), f"{k}:TERM"),
    "resume": (argv("kd", w["resumed"], teacher, *split), None),
    "stop_across": (argv("kd", w["across"], teacher, *split), f"{k}:TERM"),
    "resume_across": (argv("kd", w["across"], teacher), None),
    "bad": (argv("kd", tmp_path / "bad", teacher, "--placement.teacher_devices", "3"), None),
  }
  proc = subprocess.run(
    [sys.executable, "-c", _SPLIT, json.dumps({n: [list(map(str, a)), f] for n, (a, f) in runs.items()})],
    cwd=ROOT,
    env=_env(XLA_FLAGS=EIGHT_DEVICES),
    capture_output=True,
    text=True,
    timeout=500,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert {n: rc for n, (rc, _) in out.items()} == {
    "ref": 0,
    "stop": 75,
    "resume": 0,
    "stop_across": 75,
    "resume_across": 0,
    "bad": 1,
  }
  assert out["bad"][1].strip().splitlines() == [
    "kdjax: error: data.batch_size=64 does not split over the teacher's 3 data-parallel devices "
    "(placement.teacher_devices=3 of 8); use a multiple of 3 or another placement.teacher_devices"
  ]
  assert results(w["resumed"])["resumed_from"] == [k]
  assert_bit_identical(w["ref"], w["resumed"])
  _, tr = final_state(reference("kd"))
  for name in ("ref", "across"):
    _, tw = final_state(w[name])
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(tr), jax.tree.leaves(tw), strict=True):
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5, err_msg=f"{name} {jax.tree_util.keystr(path)}")
