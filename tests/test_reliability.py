"""Reliability under real faults, from outside the process: damaged files on disk,
``kill -9`` / SIGTERM / SIGSTOP to real ``kdjax`` processes, two runs on one
workdir, a full disk (a small tmpfs in a private mount namespace), files the
process has no permission to read, odd workdir layouts.

Every run is the embedded mnist1d ``kd_labelled`` experiment of
``test_checkpoint`` (24 steps, a checkpoint every 4), compared with the same
uninterrupted reference run, bit for bit.
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
import time
from pathlib import Path

import numpy as np
import pytest

from kdjax import checkpoint as ckpt
from kdjax import cli
from kdjax.report.logging import MetricWriter, read_jsonl
from test_checkpoint import (  # noqa: F401  (fixtures, re-bound by name as test arguments)
  COMMON,
  EVERY,
  KINDS,
  STEPS,
  _env,
  _no_fault,
  argv,
  assert_bit_identical,
  compile_cache,
  reference,
  results,
  steps_on_disk,
  teacher,
)

pytestmark = pytest.mark.slow

TIMEOUT = 300
NOISE = ("oneDNN custom operations", "All log messages before absl::InitializeLog")


def kdjax(args: list[str], **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "kdjax", *map(str, args)], env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT
  )


def start(args: list[str], **kw) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "kdjax", *map(str, args)],
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kw,
  )


def said(stderr: str) -> list[str]:
  """What a run told the user: stderr without the C++ libraries' start-up banners."""
  return [line for line in stderr.splitlines() if line.strip() and not any(n in line for n in NOISE)]


def digest(d: Path) -> dict[str, str]:
  return {
    str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
  }


def resumable_copy(ref: Path, w: Path) -> Path:
  """A copy of a finished run that will continue from its checkpoints (results and export removed)."""
  shutil.copytree(ref, w)
  (w / "results.json").unlink()
  shutil.rmtree(w / "export")
  return w


def damage(step_dir: Path, how: str) -> Path:
  """Flip one bit in, or write 64 random bytes into the middle of, the checkpoint's largest array file."""
  path = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  if how == "flip":
    data[mid] ^= 0x10
  else:
    data[mid : mid + 64] = np.random.default_rng(7).integers(0, 256, 64, dtype=np.uint8).tobytes()
  path.write_bytes(bytes(data))
  return path


# ---------------------------------------------------------------------------
# 1. Integrity: a damaged checkpoint is never restored.


def test_one_flipped_bit_is_caught_by_the_digest(reference, teacher, tmp_path):
  ref = reference("kd")
  w = resumable_copy(ref, tmp_path / "run")
  damage(w / "checkpoints" / str(STEPS), "flip")
  with pytest.warns(ckpt.CheckpointWarning) as rec:
    assert cli.main(argv("kd", w, teacher)) == 0
  # Where the bit lands in Orbax's compressed chunks decides who notices: the decompressor, or —
  # when the chunk still decodes, to other values — the digest.
  assert len(rec) == 1 and f"checkpoints/{STEPS} is damaged" in str(rec[0].message)
  assert results(w)["resumed_from"] == [STEPS - EVERY]
  assert_bit_identical(ref, w)


def test_a_restored_state_that_differs_from_its_digest_is_set_aside(tmp_path):
  import jax
  import jax.numpy as jnp

  state = {"w": jnp.arange(12.0).reshape(3, 4), "n": jnp.int32(7), "key": jax.random.key(0)}
  abstract = jax.eval_shape(lambda: state)
  c = ckpt.Checkpointer(tmp_path / "c", save_every=1, max_to_keep=3)
  c.save(1, state, {"step": 1})
  c.save(2, {**state, "w": state["w"] + 1}, {"step": 2})
  c.close()
  # What a silently corrupted array would read back as: step 2's digest of "w" no longer matches.
  meta_path = tmp_path / "c" / "2" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  digest = meta["digest"]["['w']"]
  meta["digest"]["['w']"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
  meta_path.write_text(json.dumps(meta))
  c = ckpt.Checkpointer(tmp_path / "c", save_every=1)
  with pytest.warns(ckpt.CheckpointWarning, match=r"1 arrays differ from the digest saved with them, e.g. \['w'\]"):
    step, got, _ = c.restore_latest(abstract)
  c.close()
  assert step == 1 and np.array_equal(np.asarray(got["w"]), np.arange(12.0).reshape(3, 4))
  assert c.set_aside_steps() == ["2"]


def test_when_no_checkpoint_verifies_the_run_refuses_until_restart_is_asked(reference, teacher, tmp_path, capsys):
  ref = reference("kd")
  w = resumable_copy(ref, tmp_path / "run")
  for step in steps_on_disk(w):
    damage(w / "checkpoints" / str(step), "flip")
  with pytest.warns(ckpt.CheckpointWarning) as rec:
    assert cli.main(argv("kd", w, teacher)) == 1
  assert len(rec) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no checkpoint in" in err[0] and "--run.restart" in err[0], err
  assert steps_on_disk(w) == [] and not (w / "results.json").exists()
  assert cli.main(argv("kd", w, teacher, "--run.restart")) == 0
  assert results(w)["resumed_from"] == []
  assert_bit_identical(ref, w)
  assert read_jsonl(w / "metrics.jsonl") == read_jsonl(ref / "metrics.jsonl")  # the old history was dropped


def test_damaged_teacher_cache_shard_is_named_and_nothing_trains(teacher, tmp_path):
  d = tmp_path / "cache"
  flags = ["--teacher.checkpoint", teacher, "--data.view", "jitter"]
  assert (
    cli.main(
      [
        "cache",
        "mnist1d_kd",
        "kd_labelled",
        *map(str, flags),
        "--cache.dir",
        str(d),
        "--cache.views",
        "2",
        "--cache.shard-size",
        "1000",
        "--cache.batch-size",
        "500",
      ]
    )
    == 0
  )
  logits = d / "shard-00002-of-00004" / "logits.npy"
  data = bytearray(logits.read_bytes())
  data[-40:] = np.full(10, 3.0e4, np.float32).tobytes()  # plausible values, header intact
  logits.write_bytes(bytes(data))
  w = tmp_path / "run"
  r = kdjax(argv("kd", w, teacher, "--data.view", "jitter", "--data.teacher_cache", d))
  lines = said(r.stderr)
  assert r.returncode == 1 and len(lines) == 1, lines
  assert "shard-00002-of-00004 is damaged" in lines[0] and "kdjax cache" in lines[0]
  assert steps_on_disk(w) == []


# ---------------------------------------------------------------------------
# 2. Another configuration: refused with the differing field, nothing moved.


def test_missing_config_json_and_another_method_is_refused_naming_the_field(reference, teacher, tmp_path, capsys):
  w = resumable_copy(reference("kd"), tmp_path / "run")
  (w / "config.json").unlink()
  before = digest(w / "checkpoints")
  assert cli.main(argv("kd", w, teacher, "--method.name", "dkd")) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "belongs to another experiment" in err[0] and "method.name: 'kd' → 'dkd'" in err[0], err
  assert digest(w / "checkpoints") == before and not (w / "checkpoints_corrupt").exists()


# ---------------------------------------------------------------------------
# 3. One run per workdir.


def _lock_holder(w: Path, procs: list[subprocess.Popen]) -> int:
  deadline = time.time() + TIMEOUT
  while time.time() < deadline:
    try:
      return int(json.loads((w / ".lock").read_text())["pid"])
    except (OSError, ValueError, KeyError):
      assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
      time.sleep(0.1)
  raise AssertionError("no run took the workdir lock")


def test_a_second_run_on_a_workdir_exits_1_and_the_first_is_undisturbed(reference, teacher, tmp_path):
  """Two runs started together, then a third while the first holds the lock (paused with SIGSTOP,
  so the runs surely overlap): the others exit 1 naming the holder; the first ends bit-identical."""
  ref, w = reference("kd"), tmp_path / "run"
  together = [start(argv("kd", w, teacher)), start(argv("kd", w, teacher))]
  holder = _lock_holder(w, together)
  os.kill(holder, signal.SIGSTOP)
  try:
    others = [p for p in together if p.pid != holder] + [start(argv("kd", w, teacher))]
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in others]
  finally:
    os.kill(holder, signal.SIGCONT)
  first = next(p for p in together if p.pid == holder)
  _, first_err = first.communicate(timeout=TIMEOUT)
  for p, err in zip(others, errs):
    lines = said(err)
    assert p.returncode == 1 and len(lines) == 1, lines
    assert "is in use by another kdjax run" in lines[0] and f"pid {holder} on " in lines[0]
  assert first.returncode == 0, first_err[-2000:]
  assert len(read_jsonl(w / "metrics.jsonl")) == len(read_jsonl(ref / "metrics.jsonl"))
  assert_bit_identical(ref, w)


# ---------------------------------------------------------------------------
# 4. Durable metrics (kill -9 then resume: test_checkpoint's SIGKILL test compares the rows).


def test_metric_writer_drops_rows_past_the_resumed_step_and_a_torn_line(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as m:
    for step in (2, 4, 6, 8):
      m.write(step, "train", {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 10, "split": "tr')  # a kill in the middle of a line
  with MetricWriter(tmp_path, tensorboard=False, start_step=4) as m:
    m.write(6, "train", {"loss": 60.0})
  assert read_jsonl(tmp_path / "metrics.jsonl") == [
    {"step": 2, "split": "train", "loss": 2.0},
    {"step": 4, "split": "train", "loss": 4.0},
    {"step": 6, "split": "train", "loss": 60.0},
  ]


def test_metric_writer_warns_once_on_a_failed_write_and_raises_a_full_disk(tmp_path, monkeypatch):
  """A failed write (here an I/O error) is one warning and the run goes on; a full disk is raised, so the run stops
  before it saves a checkpoint whose metric rows were lost."""
  import errno

  m = MetricWriter(tmp_path, tensorboard=False)
  m.write(1, "train", {"loss": 1.0})

  def failing(code):
    def write(*a, **k):
      raise OSError(code, os.strerror(code))

    return write

  monkeypatch.setattr(m._file, "write", failing(errno.EIO))  # noqa: SLF001 - the file object a bad disk would fail
  with pytest.warns(RuntimeWarning, match="Input/output error") as rec:
    for step in (2, 3):
      assert m.write(step, "train", {"loss": float(step)})["step"] == step
    m.flush()
  assert len(rec) == 1
  m.close()

  m = MetricWriter(tmp_path / "full", tensorboard=False)
  monkeypatch.setattr(m._file, "write", failing(errno.ENOSPC))  # noqa: SLF001
  with pytest.raises(OSError, match="No space left on device"):
    m.write(1, "train", {"loss": 1.0})
  m.close()  # silent after the failure


# ---------------------------------------------------------------------------
# 5. Sweeps obey SIGTERM.


def _session_processes(sid: int) -> list[int]:
  out = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[3]) == sid and fields[0] != "Z":
      out.append(int(stat.parent.name))
  return out


@pytest.fixture(scope="module")
def seed1_reference(teacher, tmp_path_factory) -> Path:
  """An uninterrupted run of the sweep's second cell (seed 1)."""
  w = tmp_path_factory.mktemp("ref_seed1") / "run"
  assert cli.main(argv("kd", w, teacher, "--run.seed", "1")) == 0
  return w


@pytest.mark.parametrize("parallel", [1, pytest.param(2, marks=pytest.mark.procs)])
def test_sigterm_to_a_sweep_exits_75_leaves_no_process_and_a_rerun_finishes(
  parallel, reference, seed1_reference, teacher, tmp_path
):
  root = tmp_path / "sweep"
  args = [
    "sweep",
    "mnist1d_kd",
    "kd_labelled",
    "--seeds",
    "2",
    "--workdir",
    root,
    "--teacher.checkpoint",
    teacher,
    *COMMON,
    *KINDS["kd"],
    "--parallel",
    parallel,
  ]
  sweep = start(args, start_new_session=True)
  deadline = time.time() + TIMEOUT
  while not any(p.name.isdigit() for p in root.glob("base/*/checkpoints/*")):
    assert sweep.poll() is None and time.time() < deadline, sweep.communicate()
    time.sleep(0.1)
  sweep.send_signal(signal.SIGTERM)
  _, err = sweep.communicate(timeout=TIMEOUT)
  assert sweep.returncode == 75, err[-2000:]
  assert "Traceback" not in err and "stopped by a signal" in err
  time.sleep(0.5)
  assert _session_processes(sweep.pid) == []
  assert not list(root.glob("base/*/results.json"))  # no cell ran to its end
  assert cli.main([*map(str, args[:-2]), "--parallel", "1"]) == 0
  assert sorted(p.parent.name for p in root.glob("base/*/results.json")) == ["seed0", "seed1"]
  # Every cell ends where an uninterrupted run of its config ends.
  assert_bit_identical(reference("kd"), root / "base" / "seed0")
  assert_bit_identical(seed1_reference, root / "base" / "seed1")


@pytest.mark.parametrize(
  "sig, status, says",
  [(signal.SIGINT, 130, "kdjax: interrupted"), (signal.SIGTERM, 143, "kdjax: terminated by SIGTERM")],
)
def test_a_signal_before_training_is_one_line(sig, status, says, teacher, tmp_path):
  """Ctrl-C or a scheduler's SIGTERM while the run starts (importing, building): one line, 130 / 143."""
  # SIGINT as a terminal delivers it (a shell's background job would inherit it ignored).
  interactive = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('kdjax', run_name='__main__')"
  )
  p = subprocess.Popen(
    [sys.executable, "-c", interactive, *map(str, argv("kd", tmp_path / "run", teacher))],
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(1.5)  # still importing / building: no training step has run
  p.send_signal(sig)
  _, err = p.communicate(timeout=TIMEOUT)
  lines = said(err)
  assert p.returncode == status and len(lines) == 1 and lines[0].startswith(says), err[-2000:]
  assert steps_on_disk(tmp_path / "run") == []


# ---------------------------------------------------------------------------
# 6. Faults on disk through the real command, one process for all cases (the start-up is paid once): each
#    case runs as ``kdjax`` does (``cli.run``, its stderr the case's terminal), in a private mount namespace
#    where the whole workdir of one run is a 700 kB tmpfs (a full disk: two checkpoints fit), and without the
#    capabilities that let root read any file, so ``chmod 000`` is a real permission problem.

_DRIVER = textwrap.dedent("""
    import json, os, sys
    from kdjax import cli
    cases, out = json.loads(sys.argv[1]), {}
    for name, args in cases.items():
      err = os.open(os.path.join(sys.argv[2], name + ".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      saved = os.dup(2)
      os.dup2(err, 2)
      try:
        out[name] = cli.run(args)
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(err)
    print("RESULT " + json.dumps(out))
""")

_NAMESPACE = """
set -u
mount -t tmpfs -o size=700k tmpfs "$FULL" || exit 99
"$@"; rc=$?
cp -r "$FULL" "$FULL.out"
exit $rc
"""

# case → (how its workdir is made from a finished run's copy, exit status, what its one line says)
REFUSED = {
  "checkpoints_unreadable": (lambda w: (w / "checkpoints").chmod(0), "checkpoints (permission denied)"),
  "steps_unreadable": (
    lambda w: [(w / "checkpoints" / str(s)).chmod(0) for s in steps_on_disk(w)],
    "(permission denied); kdjax needs read and write access",
  ),
  "state_unreadable": (lambda w: (w / "checkpoints" / str(STEPS) / "state").chmod(0), f"{STEPS}/state (permission"),
  "no_digest": (lambda w: _drop_digest(w, flip=True), "carries no digest of its arrays, so it cannot be verified"),
  "config_json_a_directory": (
    lambda w: ((w / "config.json").unlink(), (w / "config.json").mkdir()),
    "holds config.json as a directory, where kdjax keeps the run's config",
  ),
  "checkpoints_a_file": (
    lambda w: (shutil.rmtree(w / "checkpoints"), (w / "checkpoints").write_text("x")),
    "holds checkpoints as a file, where kdjax keeps the checkpoints",
  ),
}


def _drop_digest(w: Path, flip: bool) -> None:
  """The newest checkpoint without its digest (and, with ``flip``, one bit of its arrays flipped)."""
  meta_path = w / "checkpoints" / str(STEPS) / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  del meta["digest"]
  meta_path.write_text(json.dumps(meta))
  if flip:
    damage(w / "checkpoints" / str(STEPS), "flip")


@pytest.fixture(scope="module")
def faults_on_disk(reference, teacher, tmp_path_factory) -> dict:
  """Every case's workdir, its digest before, exit status and stderr lines; made by one driver process."""
  unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
  if unshare is None or setpriv is None:
    pytest.skip("needs unshare(1) and setpriv(1) (util-linux)")
  root, ref = tmp_path_factory.mktemp("faults_on_disk"), reference("kd")
  cases, made = {}, {}
  for name, (make, _) in REFUSED.items():
    w = resumable_copy(ref, root / name)
    make(w)
    made[name] = (w, digest(w))  # (root reads what the driver may not)
    cases[name] = argv("kd", w, teacher)
  meta = resumable_copy(ref, root / "no_metadata")
  (meta / "checkpoints" / str(STEPS) / "state" / "_METADATA").unlink()
  cases["no_metadata"] = argv("kd", meta, teacher)
  damaged = resumable_copy(ref, root / "random_bytes")
  damage(damaged / "checkpoints" / str(STEPS), "bytes")
  cases["random_bytes"] = argv("kd", damaged, teacher)
  full = root / "full"
  full.mkdir()
  cases["disk_full"] = argv("kd", full, teacher, "--run.max_to_keep", "10")
  drop = ["--bounding-set", "-dac_override,-dac_read_search"]  # root obeys file permissions
  cmd = [unshare, "-m" if os.geteuid() == 0 else "-rm", "sh", "-c", _NAMESPACE, "sh", setpriv, *drop]
  cmd += [sys.executable, "-c", _DRIVER, json.dumps({k: list(map(str, v)) for k, v in cases.items()}), str(root)]
  r = subprocess.run(cmd, env=_env(FULL=str(full)), capture_output=True, text=True, timeout=3 * TIMEOUT)
  for name in ("checkpoints_unreadable", "steps_unreadable", "state_unreadable"):  # let pytest clean up
    for p in [made[name][0], *made[name][0].rglob("*")]:
      p.chmod(0o755)
  if r.returncode == 99:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[-300:]}")
  assert r.returncode == 0 and "RESULT " in r.stdout, r.stderr[-3000:]
  status = json.loads(r.stdout.split("RESULT ", 1)[1])
  said_by = {n: said((root / f"{n}.err").read_text()) for n in cases}
  fell_back = {"no_metadata": meta, "random_bytes": damaged}
  return {"made": made, "status": status, "said": said_by, "fell_back": fell_back, "full": Path(f"{full}.out")}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_workdir_is_one_line_exit_1_and_unchanged(case, faults_on_disk):
  """Unreadable checkpoints (a permission problem, not damage), a checkpoint without its digest, odd layouts:
  refused before anything in the workdir is written (``.lock``, ``config.json`` and ``metrics.jsonl`` too)."""
  w, before = faults_on_disk["made"][case]
  lines = faults_on_disk["said"][case]
  assert faults_on_disk["status"][case] == 1 and len(lines) == 1, lines
  assert lines[0].startswith("kdjax: error: ") and REFUSED[case][1] in lines[0], lines[0]
  if "unreadable" in case:
    assert "chmod -R u+rwX" in lines[0]
  if case == "no_digest":
    assert "--run.allow_unverified" in lines[0]
  assert digest(w) == before and not (w / "checkpoints_corrupt").exists()


@pytest.mark.parametrize(
  "case, why", [("no_metadata", "(the structure of its arrays (state/_METADATA)"), ("random_bytes", "(")]
)
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumes(case, why, faults_on_disk, reference):
  """64 random bytes in the newest checkpoint's data, or no ``state/_METADATA`` (not another configuration: its
  structure is gone): set aside with one warning line, and the run resumes from the checkpoint before, bit for
  bit."""
  w, lines = faults_on_disk["fell_back"][case], faults_on_disk["said"][case]
  assert faults_on_disk["status"][case] == 0 and len(lines) == 1, lines
  assert lines[0].startswith("kdjax: warning: ") and f"checkpoints/{STEPS} is damaged {why}" in lines[0]
  assert "trying the previous" in lines[0]
  assert results(w)["resumed_from"] == [STEPS - EVERY]
  assert (w / "checkpoints_corrupt" / str(STEPS) / "state").is_dir()  # moved aside, never deleted
  assert_bit_identical(reference("kd"), w)


def test_a_full_disk_under_the_whole_workdir_is_one_line_and_the_run_resumes(faults_on_disk, reference, teacher):
  """The run's log, metrics, events and checkpoints share a 700 kB disk: the third save fails. One line, exit 1;
  copied out of the full disk, the same command resumes from the previous checkpoint, bit for bit."""
  lines = faults_on_disk["said"]["disk_full"]
  assert faults_on_disk["status"]["disk_full"] == 1 and len(lines) == 1, lines
  assert lines[0].startswith("kdjax: error: disk full") and f"the checkpoint of step {2 * EVERY} is intact" in lines[0]
  out = faults_on_disk["full"]
  assert steps_on_disk(out) == [EVERY, 2 * EVERY]  # the failed save left no step behind
  assert cli.main(argv("kd", out, teacher, "--run.max_to_keep", "10")) == 0
  assert results(out)["resumed_from"] == [2 * EVERY]
  assert_bit_identical(reference("kd"), out)
  assert read_jsonl(out / "metrics.jsonl") == read_jsonl(reference("kd") / "metrics.jsonl")


def test_the_log_file_drops_what_it_cannot_write_and_says_so_once(tmp_path, capsys):
  """A log file that cannot be written costs one line on stderr, no ``--- Logging error ---`` report and no
  exception; a full disk's line waits for the end of the run (whose own error usually says it)."""
  import errno
  import logging

  from kdjax.report.logging import LogFile

  (tmp_path / "a_file").write_text("")
  logger = logging.getLogger("kdjax_test_log_file")
  logger.propagate = False
  handler = LogFile(tmp_path / "a_file" / "kdjax.log")  # its directory is a file: it cannot be opened
  logger.addHandler(handler)
  try:
    for i in range(3):
      logger.warning("record %d", i)
  finally:
    logger.removeHandler(handler)
    handler.close()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("kdjax: warning: the run's log ") and "Not a directory" in err[0], err
  assert handler.dropped == 3

  class FullDisk:
    def write(self, text):
      raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
      raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
      pass

  full = LogFile(tmp_path / "full.log")
  full.stream = FullDisk()
  logger.addHandler(full)
  try:
    logger.warning("lost")
  finally:
    logger.removeHandler(full)
    full.close()
  assert capsys.readouterr().err == ""  # not yet: the run reports its full disk itself
  full.report()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "No space left on device" in err[0], err


# ---------------------------------------------------------------------------
# 7. Edge inputs: refused with one line at config time, nothing written.

EDGE = [
  (["--run.workdir", ""], "run.workdir: must name a directory"),
  (["--optim.lr", "inf"], "optim.lr: must be > 0 and finite"),
  (["--method.temperature", "inf"], "method.temperature: must be > 0 and finite"),
  (["--method.terms", "kd=nan"], "method.terms: weight of 'kd' must be finite"),
  (["--method.dkd_alpha", "nan"], "method.dkd_alpha: must be a finite number"),
  (["--data.mixup_alpha", "inf"], "data.mixup_alpha: must be a finite number"),
  (["--method.name", "dkdd"], "method.name: unknown method 'dkdd'"),
]


@pytest.mark.parametrize("extra,message", EDGE, ids=[e[0][0] for e in EDGE])
def test_edge_inputs_are_one_line_at_config_time(extra, message, teacher, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  w = tmp_path / "run"
  args = [*argv("kd", w, teacher), *extra]
  if extra[0] == "--run.workdir":
    args = [a for a in args[: args.index("--workdir")] + args[args.index("--workdir") + 2 :]]
  assert cli.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_a_checkpoint_step_as_teacher_names_its_run(reference, tmp_path, capsys):
  ref = reference("kd")
  step_dir = ref / "checkpoints" / str(STEPS)
  assert cli.main(argv("kd", tmp_path / "run", step_dir)) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is a training checkpoint (step 24) of the run" in err[0] and str(ref) in err[0], err


def test_a_moved_teacher_or_another_checkpoint_interval_resumes(reference, teacher, tmp_path):
  """Paths and checkpoint cadence do not change what a run computes: both resume, bit for bit."""
  ref = reference("kd")
  w = resumable_copy(ref, tmp_path / "run")
  shutil.rmtree(w / "checkpoints" / str(STEPS))
  moved = tmp_path / "teacher_moved"
  shutil.copytree(teacher, moved)
  assert cli.main(argv("kd", w, moved, "--run.checkpoint_every", "2")) == 0
  assert results(w)["resumed_from"] == [STEPS - EVERY]
  assert_bit_identical(ref, w)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_that_python_swallows_still_stops_before_the_first_step():
  """A SIGINT landing in a ``__del__`` (or a GC callback) is printed as "Exception ignored" and lost to the
  code that was running; kdjax remembers it and stops when training would start."""
  import gc

  from kdjax import _interrupt
  from kdjax.engine import faults, hooks

  old, old_term, old_hook = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    faults.record_sigint()

    class InterruptedWhileCollected:
      def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs here, inside __del__: its KeyboardInterrupt is swallowed

    InterruptedWhileCollected()
    gc.collect()
    guard = hooks.Preemption()
    with pytest.raises(KeyboardInterrupt):
      guard.start(None)
    assert not guard.old  # nothing was installed: the run stops before its first step
  finally:
    _interrupt._sigint_seen = False
    signal.signal(signal.SIGINT, old)
    signal.signal(signal.SIGTERM, old_term)
    sys.unraisablehook = old_hook
