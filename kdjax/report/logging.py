"""Run outputs: ``metrics.jsonl`` + TensorBoard scalars, the run's log file, atomic JSON, JSONL reading.

Every run writes, under its workdir::

    metrics.jsonl   one JSON object per line: {"step": int, "split": "train"|"eval", "<name>": float, …}
    tb/             TensorBoard event files, tags "<split>/<name>" (e.g. "train/loss/total", "eval/ece")

Only process 0 should construct a ``MetricWriter`` in multi-host runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

import numpy as np

from kdjax.errors import ConfigError

__all__ = ["LogFile", "MetricWriter", "is_disk_full", "write_json", "read_jsonl", "to_python_scalar"]

SPLITS = ("train", "eval")


def to_python_scalar(name: str, value: Any) -> float | str:
  """A jax/numpy/Python number (size-1 array) as a Python float; strings pass through."""
  if isinstance(value, str):
    return value
  if isinstance(value, numbers.Number) and not isinstance(value, complex):
    return float(value)
  try:
    arr = np.asarray(value)
  except Exception as e:  # noqa: BLE001 — report which metric was bad
    raise TypeError(f"metric {name!r} has type {type(value).__name__}; log numbers or scalar arrays") from e
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise TypeError(
      f"metric {name!r} is an array of shape {arr.shape} and dtype {arr.dtype}; "
      "log scalars (reduce it first, e.g. with .mean())"
    )
  return float(arr.reshape(()))


def is_disk_full(e: BaseException) -> bool:
  """Whether an ``OSError`` says the disk (or the user's quota) is full."""
  return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class LogFile(logging.FileHandler):
  """A run's log file (``workdir/kdjax.log``) that never disturbs the run.

  A record it cannot write (a full disk, a file that became unwritable) is
  dropped, as are all after it; no ``--- Logging error ---`` report, no
  exception. The first failure is said once, as one line on stderr
  (``kdjax: warning: …``): at once, or — for a full disk, which the run
  reports itself when it next writes a checkpoint — when :meth:`report` is
  called at the end of the run.
  """

  def __init__(self, path: str | os.PathLike):
    super().__init__(path, encoding="utf-8", delay=True)
    self.failure: OSError | None = None
    self.dropped = 0

  def emit(self, record: logging.LogRecord) -> None:
    if self.failure is not None:
      self.dropped += 1
      return
    try:
      super().emit(record)  # (opening the file, on the first record, raises here rather than in handleError)
    except OSError as e:
      self.dropped += 1
      self._fail(e)

  def handleError(self, record: logging.LogRecord) -> None:
    error = sys.exc_info()[1]
    if not isinstance(error, OSError):
      super().handleError(record)  # a record that cannot be formatted is a bug: keep logging's report
      return
    self.dropped += 1
    self._fail(error)

  def flush(self) -> None:
    try:
      super().flush()
    except OSError as e:
      self._fail(e)

  def close(self) -> None:
    try:
      super().close()
    except OSError as e:
      self._fail(e)

  def _fail(self, error: OSError) -> None:
    if self.failure is not None:
      return
    self.failure, stream, self.stream = error, self.stream, None
    with contextlib.suppress(OSError):  # its buffer cannot be written either: let it go
      if stream is not None:
        stream.close()
    if not is_disk_full(error):
      self.report()

  def report(self) -> None:
    """One line on stderr if a record could not be written (nothing otherwise)."""
    if self.failure is not None:
      print(
        f"kdjax: warning: the run's log {self.baseFilename} could not be written "
        f"({self.failure.strerror or self.failure}); its records are dropped, the run goes on",
        file=sys.stderr,
      )


class MetricWriter:
  """Appends metric rows to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``).

  Rows are appended: a resumed run keeps its history. A run resumed from
  the checkpoint of step ``start_step`` first drops the rows logged after it
  (they will be logged again), in ``metrics.jsonl`` and, through
  TensorBoard's ``purge_step``, in the event files, so the history holds
  exactly one row per logged step after any kill. :meth:`flush` makes the
  rows durable (call it before each checkpoint). Non-finite values are
  written as JSON ``NaN`` / ``Infinity``, which Python's ``json`` reads back.
  A full disk raises its ``OSError`` (ENOSPC) from :meth:`write` or
  :meth:`flush`, so a run stops before it saves a checkpoint whose metric
  rows were lost; any other failed write is reported once as a warning and
  stops logging, but not the run. After a failure :meth:`close` is silent.

  Args:
    workdir: the run directory (created if missing).
    quiet: when False, eval rows are also echoed as one line on stderr
      (through ``tqdm.write``, so a progress bar stays intact).
    tensorboard: write TensorBoard event files (needs ``tensorboardX``).
    start_step: the step the run continues from (None: keep every row).

  Usage::

    with MetricWriter(workdir) as w:
      w.write(step, "train", {"loss/total": loss})
  """

  def __init__(
    self, workdir: str | os.PathLike, quiet: bool = False, tensorboard: bool = True, start_step: int | None = None
  ):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / "metrics.jsonl"
    self.quiet = quiet
    if start_step is not None and self.path.exists():
      _truncate_after(self.path, start_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._failed = False
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # lazy: importing it costs ~1 s

      purge = start_step + 1 if start_step else None
      self._tb = SummaryWriter(logdir=str(self.workdir / "tb"), purge_step=purge)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Log one row of scalars for ``split`` ("train" or "eval") at ``step``; returns the row."""
    if self._file is None:
      raise ConfigError(f"MetricWriter for {str(self.workdir)!r} is closed; create a new one")
    if split not in SPLITS:
      raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    row: dict[str, Any] = {"step": int(step), "split": split}
    for k, v in metrics.items():
      if k in ("step", "split"):
        raise ConfigError(f"metric name {k!r} is reserved; rename the metric")
      row[k] = to_python_scalar(k, v)
    with self._guard():
      if self._failed:
        return row
      self._file.write(json.dumps(row) + "\n")
      if self._tb is not None:
        for k, v in row.items():
          if k not in ("step", "split") and isinstance(v, float):
            self._tb.add_scalar(f"{split}/{k}", v, int(step))
    if split == "eval" and not self.quiet:
      self._echo(row)
    return row

  def _echo(self, row: Mapping[str, Any]) -> None:
    from tqdm import tqdm

    parts = []
    for k, v in row.items():
      if k in ("step", "split"):
        continue
      parts.append(f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}")
    tqdm.write(f"[eval step {row['step']}] " + " · ".join(parts), file=sys.stderr)

  def flush(self) -> None:
    """Make every row written so far durable (file flushed and fsynced, event files flushed)."""
    with self._guard():
      if self._file is not None and not self._failed:
        self._file.flush()
        os.fsync(self._file.fileno())
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    """Close ``metrics.jsonl`` and the event files (each, whatever the other does). After a failed write their
    buffered bytes are dropped; a full disk found only now is raised."""
    error = None
    for part, where in ((self._file, self.path), (self._tb, self.workdir / "tb")):
      if part is None:
        continue
      try:
        with self._guard():
          if self._failed:
            _let_go(part, where)
          else:
            part.close()
      except OSError as e:  # a full disk: close the rest, then say so
        error = error or e
        _let_go(part, where)
    self._file = self._tb = None
    if error is not None:
      raise error

  @contextlib.contextmanager
  def _guard(self):
    """The first failed write (``OSError``): a full disk is raised, anything else is one warning; callers skip
    writing after it."""
    try:
      yield
    except OSError as e:
      if self._failed:
        return
      self._failed = True
      if is_disk_full(e):
        raise
      warnings.warn(
        f"writing metrics under {self.workdir} failed ({e.strerror or e}); no further metrics are logged by this run",
        RuntimeWarning,
        stacklevel=3,
      )

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _let_go(part: Any, path: Path) -> None:
  """Close ``part`` (a file, or tensorboardX's writer) whose buffered bytes cannot be written (a full disk).

  Its descriptors of ``path`` (or of files under it) are pointed at an anonymous in-memory file first (Linux),
  so closing — flush, fsync, close — drops those bytes instead of failing again, now and in tensorboardX's own
  exit hook.
  """
  fds, real = Path("/proc/self/fd"), os.path.realpath(path)
  if fds.is_dir():
    for fd in fds.iterdir():
      with contextlib.suppress(OSError, ValueError, AttributeError):  # (no os.memfd_create: the bytes stay)
        target = os.readlink(fd)
        if target == real or target.startswith(real + os.sep):
          scratch = os.memfd_create("kdjax-dropped")
          os.dup2(scratch, int(fd.name))
          os.close(scratch)
  with contextlib.suppress(OSError, ValueError):
    part.close()


def _truncate_after(path: Path, step: int) -> None:
  """Drop the rows of ``path`` whose step is past ``step`` (and a torn last line); atomic."""
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except json.JSONDecodeError:
      continue  # a line torn by a kill
  if len(keep) != len(lines):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Write ``obj`` as indented JSON atomically (temp file in the same dir + ``os.replace``)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, default=_json_default)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _json_default(o: Any) -> Any:
  if isinstance(o, os.PathLike):
    return os.fspath(o)
  try:
    arr = np.asarray(o)
  except Exception:  # noqa: BLE001
    return str(o)
  if arr.dtype != object:
    return arr.tolist()
  return str(o)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All rows of a JSONL file. A truncated last line (a run killed mid-write) is skipped;
  a malformed line elsewhere raises ``ValueError`` naming the file and line."""
  return list(_iter_jsonl(Path(path)))


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
  lines = path.read_text(encoding="utf-8").splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      yield json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        return
      raise ConfigError(f"{path}:{i + 1} is not valid JSON ({e.msg}); fix or delete that line") from None
