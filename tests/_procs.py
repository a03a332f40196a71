"""Test helper: launch subprocess runs together and wait for all of them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def run_together(*commands: list[str], timeout: float = 300) -> None:
  """Run ``python tests/<script> args…`` for each command at once; fail with the log tail of any that fails."""
  procs = [
    subprocess.Popen(
      [sys.executable, str(HERE / c[0]), *map(str, c[1:])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for c in commands
  ]
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


def two_processes(script: str, out, port: int | None = None) -> list[list]:
  """The two commands of a two-process ``jax.distributed`` run of ``script`` (process 0 writes ``out``)."""
  port = port or free_port()
  return [[script, out, i, port] for i in range(2)]


def join(process_id: str, port: str, devices_per_process: int = 1) -> None:
  """In a two-process test script, before JAX starts: CPU backend, the forced device count, then
  ``jax.distributed`` through kdjax's environment variables."""
  import os

  if devices_per_process > 1:
    flag = f"--xla_force_host_platform_device_count={devices_per_process}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  os.environ.update(
    JAX_PLATFORMS="cpu",
    KDJAX_NUM_PROCESSES="2",
    KDJAX_PROCESS_ID=str(process_id),
    KDJAX_COORDINATOR=f"localhost:{port}",
  )
  from kdjax.engine import distributed

  distributed.initialize()


def finish(result, out_path: str) -> None:
  """Process 0 writes ``result`` (pickled) to ``out_path``; both leave ``jax.distributed``."""
  import pickle

  import jax

  if jax.process_index() == 0:
    with open(out_path, "wb") as fh:
      pickle.dump(result, fh)
  jax.distributed.shutdown()
