"""Subprocess for test_placement: one of two local processes (2 forced CPU devices each) joined with
``jax.distributed``, running the 20 CRD+KD steps with a ``split`` placement — one teacher device and
one student device per process — each process feeding its rows of every batch.

Usage: python tests/_placement_multihost.py OUT.pkl PROCESS_ID PORT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _procs as P  # noqa: E402

P.join(sys.argv[2], sys.argv[3], devices_per_process=2)

import jax  # noqa: E402

import _engine_setup as E  # noqa: E402
import kdjax  # noqa: E402

ROWS = 24


def main(out_path: str) -> None:
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
  s = E.setup("crd+kd", placement=kdjax.Placement(teacher_devices=2), batch_rows=ROWS // 2)
  batches = [E.local_rows(E.digits_batch(i, batch=ROWS), s.distiller.mesh) for i in range(4)]
  state, metrics = E.train(s, E.cycle(batches), 20)
  P.finish(
    {
      "state": E.host(state),
      "metrics": metrics,
      "local_rows": len(batches[0]["label"]),
      "teacher_devices": [d.process_index for d in s.distiller.teacher_mesh.devices.flat],
      "student_devices": [d.process_index for d in s.distiller.mesh.devices.flat],
    },
    out_path,
  )


if __name__ == "__main__":
  main(sys.argv[1])
