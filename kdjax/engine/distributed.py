"""Multi-host start-up: ``jax.distributed.initialize`` from the environment.

On SLURM (and other clusters JAX knows) ``jax.distributed.initialize()``
reads everything from the environment. For local multi-process runs and tests
set ``KDJAX_COORDINATOR`` (``host:port``), ``KDJAX_NUM_PROCESSES`` and
``KDJAX_PROCESS_ID``.
"""

from __future__ import annotations

import os

import jax


def initialize() -> None:
  coord = os.environ.get("KDJAX_COORDINATOR")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU collectives across processes go through gloo. (Do not query the
    # backend here: that would initialise it before the distributed client.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coord:
    jax.distributed.initialize(
      coordinator_address=coord,
      num_processes=int(os.environ["KDJAX_NUM_PROCESSES"]),
      process_id=int(os.environ["KDJAX_PROCESS_ID"]),
    )
  else:
    jax.distributed.initialize()
