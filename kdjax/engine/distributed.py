"""Multi-host start-up (``jax.distributed.initialize`` from the environment) and the watch on the other processes.

On SLURM (and other clusters JAX knows) ``jax.distributed.initialize()``
reads everything from the environment. For local multi-process runs and tests
set ``KDJAX_COORDINATOR`` (``host:port``), ``KDJAX_NUM_PROCESSES`` and
``KDJAX_PROCESS_ID``.

A process that dies (``kill -9``, a lost host) leaves the others blocked in
their next collective. :class:`PeerWatch` bounds that wait: every process
publishes a heartbeat in the coordination service's key-value store and
reads the others'; when one stops for ``KDJAX_PEER_TIMEOUT`` seconds (default
60), or the coordination service itself (process 0) stops answering, the
process prints one line and exits 75 (as a preempted run: re-run the same
command on every process to resume from the last checkpoint). JAX's own
missing-heartbeat detection, which aborts the process with a crash report,
is given twice that time, so kdjax's line comes first. One case stays
JAX's: when process 0 (which runs the coordination service) dies, JAX's
client in every other process aborts at once (exit 134, its own report);
its callback for that event cannot be replaced from Python.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

from kdjax.errors import ConfigError

PEER_TIMEOUT_ENV = "KDJAX_PEER_TIMEOUT"
PEER_LOST_EXIT = 75  # EX_TEMPFAIL, as a preempted run: re-run to resume
_KEY = "kdjax/peer_watch"


def peer_timeout() -> float:
  """Seconds without a heartbeat after which another process counts as lost (``$KDJAX_PEER_TIMEOUT``, default 60)."""
  raw = os.environ.get(PEER_TIMEOUT_ENV, "60")
  try:
    value = float(raw)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ConfigError(f"{PEER_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0, e.g. {PEER_TIMEOUT_ENV}=60")
  return value


def initialize() -> None:
  coord = os.environ.get("KDJAX_COORDINATOR")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU collectives across processes go through gloo. (Do not query the
    # backend here: that would initialise it before the distributed client.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  heartbeat = max(100, int(2 * peer_timeout()) + 1)  # JAX's own detection only after kdjax's
  if coord:
    jax.distributed.initialize(
      coordinator_address=coord,
      num_processes=int(os.environ["KDJAX_NUM_PROCESSES"]),
      process_id=int(os.environ["KDJAX_PROCESS_ID"]),
      heartbeat_timeout_seconds=heartbeat,
    )
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)


def _lost(what: str) -> None:
  """One line, then exit 75 at once: the main thread may be blocked in a collective with the lost process."""
  sys.stderr.write(
    f"kdjax: {what}; this process stops too — re-run the same command on every process to resume from the "
    f"last checkpoint\n"
  )
  sys.stderr.flush()
  os._exit(PEER_LOST_EXIT)


def _client():
  """The coordination service's client of this process (None outside ``jax.distributed``)."""
  from jax._src import distributed as jax_distributed  # no public accessor for the client

  return getattr(jax_distributed.global_state, "client", None)


class PeerWatch:
  """While active (a context manager), end this process with one line and exit 75 when another process of the
  run is lost: its heartbeat stopped for ``timeout`` seconds, or the coordination service stopped answering.

  A collective with a process that died usually fails at once in the others (gloo: "connection reset by
  peer"); leaving the block with an exception therefore first waits — at most ``timeout`` and a little — until
  every other process has been seen alive, or one is found lost (one line, exit 75). A process that leaves the
  block says so, so the others never take a finished process for a lost one. Does nothing in a
  single-process run.
  """

  def __init__(self, timeout: float | None = None, interval: float | None = None):
    self.client = _client() if jax.process_count() > 1 else None
    self.timeout = (peer_timeout() if timeout is None else timeout) if self.client is not None else 0.0
    self.interval = interval or min(max(self.timeout / 10, 0.2), 5.0)
    self._stop, self._all_alive = threading.Event(), threading.Event()
    self._asked: float | None = None  # when the main thread asked whether every process is alive
    self._thread: threading.Thread | None = None

  def __enter__(self) -> PeerWatch:
    if self.client is not None:
      self._beat(0)
      self._thread = threading.Thread(target=self._run, name="kdjax-peer-watch", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._thread is None:
      return
    if exc is not None and not isinstance(exc, KeyboardInterrupt):  # did a collective fail for a lost process?
      self._asked = time.monotonic()
      self._all_alive.wait(self.timeout + 3 * self.interval)  # (a lost one ends the process in _lost)
    self._stop.set()
    self._thread.join()
    try:
      self.client.key_value_set(f"{_KEY}/done/{jax.process_index()}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the service may be gone already; nothing is waiting on this then
      pass

  def _beat(self, n: int) -> None:
    self.client.key_value_set(f"{_KEY}/beat/{jax.process_index()}", str(n), allow_overwrite=True)

  def _read(self, kind: str) -> dict[int, str]:
    """``{process: value}`` of every process's ``kind`` key ("beat" or "done"), in one request."""
    return {int(k.rsplit("/", 1)[1]): v for k, v in self.client.key_value_dir_get(f"{_KEY}/{kind}/")}

  def _run(self) -> None:
    me, n = jax.process_index(), jax.process_count()
    start = time.monotonic()
    seen = {p: (None, start) for p in range(n) if p != me}  # process → (last heartbeat, when it changed)
    answered, beat = start, 0
    while not self._stop.wait(self.interval):
      now = time.monotonic()
      try:
        beat += 1
        self._beat(beat)
        beats, done = self._read("beat"), self._read("done")
        for p, (last, since) in list(seen.items()):
          if p in done:
            del seen[p]  # it left its run
          elif beats.get(p) != last:
            seen[p] = (beats.get(p), now)
          elif now - since > self.timeout:
            self._lost(f"process {p} of {n} stopped answering (no heartbeat for {self.timeout:g} s)")
        answered = now
        if self._asked is not None and all(since > self._asked for _, since in seen.values()):
          self._all_alive.set()
      except Exception:  # noqa: BLE001 - the coordination service (in process 0) does not answer
        if now - answered > self.timeout:
          self._lost(f"the coordination service (process 0 of {n}) stopped answering for {self.timeout:g} s")

  def _lost(self, what: str) -> None:
    if not self._stop.is_set():
      _lost(what)
