"""Test helper: train a user's model with RNG streams through ``kdjax.train`` with checkpoints, resuming
from the newest one; ``KILL_AT`` (optional) sends SIGKILL to this process right after that step.

  python tests/_user_models_resume.py KIND WORKDIR STEPS [KILL_AT]

KIND is ``dropout`` (an NNX model holding dropout streams) or ``linen`` (a Linen model with dropout
through ``nnx.bridge``); both distil with KD plus attention transfer on a tapped layer. The final state's leaves go to ``WORKDIR/final.npz``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_user_models as U  # noqa: E402

import kdjax  # noqa: E402
from kdjax.engine import faults, hooks  # noqa: E402

EVERY = 2


def models(kind: str):
  if kind == "dropout":
    return U.DropoutNet(8, rngs=nnx.Rngs(1)), U.DropoutNet(16, rngs=nnx.Rngs(0))
  return U.linen(8, 1), U.linen(16, 0)


def main(kind: str, workdir: str, steps: int, kill_at: int | None = None) -> None:
  student, teacher = models(kind)
  taps = {"stage1": "conv1" if kind == "dropout" else "Conv_0"}
  distiller = kdjax.Distiller(
    student, teacher, method="kd+at", taps=taps, teacher_taps=taps, optimizer=optax.adam(3e-3)
  )
  state = distiller.init(jax.random.key(0), U.blobs(0))
  checkpointer = kdjax.Checkpointer(Path(workdir) / "checkpoints", save_every=EVERY)
  restored = checkpointer.restore_latest(distiller.abstract_state)
  if restored is not None:
    state = restored[1]
  start = int(state.step)
  run_hooks = [hooks.Checkpoint(checkpointer, meta=lambda step: {"step": step})]
  if kill_at is not None:
    run_hooks.append(hooks.InjectFault(faults.Fault(kill_at, "KILL"), "signal"))
  batches = (U.blobs(i % 4) for i in range(start, steps))
  state = kdjax.train(distiller, state, batches, steps=steps, hooks=run_hooks)
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  np.savez(Path(workdir) / "final.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
