"""Subprocess for test_engine: one of two local processes joined with
``jax.distributed`` (CPU, gloo) running the same 20 CRD+KD steps as the
single-device reference, each process feeding its half of every batch.

Usage: python tests/_engine_multihost.py OUT.pkl PROCESS_ID PORT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _procs as P  # noqa: E402

P.join(sys.argv[2], sys.argv[3])

import jax  # noqa: E402

import _engine_setup as E  # noqa: E402
from kdjax.parallel import sharding  # noqa: E402

STEPS = 20


def main(out_path: str) -> None:
  assert jax.process_count() == 2 and jax.device_count() == 2, (jax.process_count(), jax.devices())
  mesh = sharding.make_mesh()
  s = E.setup("crd+kd", mesh=mesh)
  batches = [E.local_rows(E.digits_batch(i), mesh) for i in range(4)]
  state, hist = E.run_steps(s, batches, STEPS)
  P.finish(
    {
      "state": E.host(state),
      "metrics": hist,
      "process_count": jax.process_count(),
      "local_rows": len(batches[0]["label"]),
    },
    out_path,
  )


if __name__ == "__main__":
  main(sys.argv[1])
