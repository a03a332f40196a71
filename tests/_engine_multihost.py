"""Subprocess for test_engine: one of two local processes joined with
``jax.distributed`` (CPU, gloo) running the same 20 CRD+KD steps as the
single-device reference, each process feeding its half of every batch.

Usage: python tests/_engine_multihost.py OUT.pkl PROCESS_ID PORT
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["KDJAX_NUM_PROCESSES"] = "2"
os.environ["KDJAX_PROCESS_ID"] = sys.argv[2]
os.environ["KDJAX_COORDINATOR"] = f"localhost:{sys.argv[3]}"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pickle  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kdjax.engine import distributed  # noqa: E402

distributed.initialize()

import _engine_setup as E  # noqa: E402
from kdjax.engine import sharding  # noqa: E402

STEPS = 20


def local_rows(batch: dict, mesh) -> dict:
  """This process's rows of a global batch, in the order of its devices."""
  n = len(batch["label"])
  idx = sharding.batch_sharding(mesh).addressable_devices_indices_map((n,))
  rows = np.concatenate([np.arange(n)[idx[d][0]] for d in sorted(idx, key=lambda d: idx[d][0].start or 0)])
  return {k: v[rows] for k, v in batch.items()}


def main(out_path: str) -> None:
  assert jax.process_count() == 2 and jax.device_count() == 2, (jax.process_count(), jax.devices())
  mesh = sharding.make_mesh()
  s = E.setup("crd+kd", mesh=mesh)
  batches = [local_rows(E.digits_batch(i), mesh) for i in range(4)]
  state, hist = E.run_steps(s, batches, STEPS)
  res = {"state": E.host(state), "metrics": hist, "process_count": jax.process_count(),
         "local_rows": len(batches[0]["label"])}
  if jax.process_index() == 0:
    with open(out_path, "wb") as fh:
      pickle.dump(res, fh)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1])
