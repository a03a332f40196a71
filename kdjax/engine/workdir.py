"""A run's workdir: what it may hold, one run at a time (an OS lock), its config, and how two configs differ.

Before a run touches a workdir, :func:`check_layout` refuses one whose
entries are not what kdjax writes there (``config.json`` a directory,
``checkpoints`` a file …) or that this process may not read and write, so a
refused run changes nothing.

The lock is ``fcntl.flock`` on ``workdir/.lock``, taken by process 0 before
the workdir's config and checkpoints are read and held until the run exits.
The kernel drops it when the process ends in any way (``kill -9`` included),
so a lock is never stale; the file records who holds it (pid, host, start
time) for the message a second run prints, written only once the run has
accepted the workdir (:meth:`Lock.claim`), so a refused run leaves it as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import jax

from kdjax import checkpoint as ckpt
from kdjax import config as cfg_lib
from kdjax.errors import ConfigError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
LOG_FILE = "kdjax.log"  # library log records and tracebacks of a run
CHECKPOINTS = "checkpoints"

# What kdjax keeps in a workdir: name → (is a directory, what it is)
LAYOUT = {
  CONFIG_FILE: (False, "the run's config"),
  "metrics.jsonl": (False, "the metric rows"),
  "results.json": (False, "the results"),
  LOG_FILE: (False, "the run's log"),
  LOCK_FILE: (False, "the run lock"),
  CHECKPOINTS: (True, "the checkpoints"),
  CHECKPOINTS + "_corrupt": (True, "the damaged checkpoints"),
  "tb": (True, "the TensorBoard events"),
  "export": (True, "the exported model"),
}


def prepare(path: str | os.PathLike) -> Path:
  """Create ``path`` (and parents) and check it is writable; ``ValueError`` if not."""
  workdir = Path(path)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(
      f"run.workdir {str(workdir)!r} is not writable ({e.strerror}); choose another --run.workdir"
    ) from None
  return workdir


def check_layout(workdir: Path) -> None:
  """Refuse (``ConfigError``, nothing written) a workdir whose entries are not what kdjax keeps there, or that
  this process may not read and write: ``config.json`` that is a directory, ``checkpoints`` that is a file, an
  unreadable checkpoint directory …"""
  for name, (is_dir, what) in LAYOUT.items():
    path = workdir / name
    if not (path.exists() or path.is_symlink()):
      continue
    if path.is_dir() != is_dir or not (path.is_dir() or path.is_file()):
      kind = "a directory" if path.is_dir() else "a file" if path.is_file() else "not a regular file"
      raise ConfigError(
        f"run.workdir {str(workdir)!r} holds {name} as {kind}, where kdjax keeps {what} "
        f"({'a directory' if is_dir else 'a file'}); move it away or use a new --run.workdir"
      )
    if not is_dir and not os.access(path, os.R_OK | os.W_OK):
      raise ckpt.no_access(workdir, path)
  for name, (is_dir, _) in LAYOUT.items():
    if is_dir and (workdir / name).is_dir():
      ckpt.check_access(workdir / name)


class Lock:
  """A held run lock; :meth:`claim` records this run as its holder once the run has accepted the workdir."""

  def __init__(self, fd: int | None):
    self.fd = fd

  def claim(self) -> None:
    if self.fd is not None:
      _write_holder(self.fd)


@contextlib.contextmanager
def lock(workdir: Path) -> Iterator[Lock]:
  """Hold ``workdir``'s run lock (process 0 takes it; every process learns whether it got it).

  Taking it writes nothing (the file is created if missing); the run calls
  :meth:`Lock.claim` to record itself as the holder once nothing can refuse it.

  Raises:
    ConfigError: another run holds it (the message names its pid, host and start).
  """
  fd, ok = None, True
  if jax.process_index() == 0:
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      ok = False
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    ok = bool(multihost_utils.broadcast_one_to_all(ok))
  if not ok:
    holder = _read_holder(fd)
    if fd is not None:
      os.close(fd)
    raise ConfigError(
      f"run.workdir {str(workdir)!r} is in use by another kdjax run ({holder}); wait for it to "
      f"finish or use another --run.workdir"
    )
  try:
    yield Lock(fd)
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def _write_holder(fd: int) -> None:
  start = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": start}).encode(), 0)


def _read_holder(fd: int | None, wait: float = 5.0) -> str:
  """Who holds the lock, in words. A run records itself only once it has accepted the workdir, so a holder
  that just started may not have yet (the file still names an earlier run, or nothing): wait up to ``wait``
  seconds for it."""
  deadline = time.monotonic() + wait
  while True:
    try:
      h = json.loads(os.pread(fd, 4096, 0)) if fd is not None else {}
      if h["host"] != socket.gethostname() or _alive(int(h["pid"])):
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
      if fd is None:
        return "holder unknown"
    if time.monotonic() > deadline:
      return "it started moments ago and has not recorded its pid yet"
    time.sleep(0.1)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def config_diff(old: dict, new: dict, limit: int = 4) -> str:
  """The fields whose values differ between two config dicts, in words: ``"method.name: 'kd' → 'dkd'"``.

  Fields excluded from :func:`kdjax.config.config_hash` (paths, verbosity,
  checkpoint cadence) are not differences.
  """
  a, b = cfg_lib.hashed_fields(old), cfg_lib.hashed_fields(new)
  keys = sorted(k for k in set(a) | set(b) if a.get(k, "(unset)") != b.get(k, "(unset)"))
  shown = [f"{k}: {a.get(k, '(unset)')!r} → {b.get(k, '(unset)')!r}" for k in keys[:limit]]
  return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "none"


def check_config(workdir: Path, cfg: Any) -> None:
  """Refuse a workdir whose ``config.json`` holds another experiment (naming what differs)."""
  path = workdir / CONFIG_FILE
  if not path.exists():
    return
  try:
    old = json.loads(path.read_text())
    old_hash, old_cfg = old.get("config_hash"), old.get("config")
  except (ValueError, AttributeError):
    raise ConfigError(
      f"run.workdir {str(workdir)!r} has an unreadable {CONFIG_FILE}; move it away (the checkpoints "
      f"carry the config too) or use a new --run.workdir"
    ) from None
  if isinstance(old_cfg, dict):
    diff = config_diff(old_cfg, cfg_lib.to_dict(cfg))
    if diff != "none":
      raise ConfigError(
        f"run.workdir {str(workdir)!r} holds another experiment (differs in {diff}); use a new "
        f"--run.workdir to keep both"
      )
  elif old_hash and old_hash != cfg_lib.config_hash(cfg):
    raise ConfigError(
      f"run.workdir {str(workdir)!r} holds another experiment (config hash {old_hash}, this one "
      f"{cfg_lib.config_hash(cfg)}); use a new --run.workdir to keep both"
    )


def write_json(path: Path, obj: Any) -> None:
  """Atomically write ``obj`` as JSON (process 0 only)."""
  if jax.process_index() != 0:
    return
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  os.replace(tmp, path)
