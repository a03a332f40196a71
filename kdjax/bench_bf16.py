"""bfloat16 against float32 training of a language-model pair: ``kdjax bench --cases bf16_curve`` (no pair).

The benchmark LM pair (``lm4x256-lm2x128``: a 4-layer d = 256 teacher and a
2-layer d = 128 student, V = 8,192, L = 128) is distilled for 200 steps
(batch 8, Adam 1e-3, CE 0.1 + forward KL(teacher ‖ student) 0.9 per token)
on rows of a random sparse first-order Markov language (every token has 4
successors), twice from the same initial weights and the same batches:

  float32   both models compute and hold their weights in float32
  bfloat16  both compute in bfloat16; the student keeps float32 master weights
            (the optimizer updates them; the losses compute in float32), the
            frozen teacher's weights are held in bfloat16 (cast once when placed)

One JSON line: ``max_abs_dloss`` (max over the steps of |loss_bf16 − loss_f32|),
``final_loss_*``, the median step seconds (first step excluded), XLA's memory
analysis of each compiled step (``temp_bytes``: peak temporary memory;
``argument_bytes``: state, teacher and batch), and for each rematerialisation
policy of the student's blocks (:mod:`kdjax.models.remat`) the temporary bytes
and median step seconds of the float32 step (``remat``; ``none`` is the
float32 run above, the others run ``REMAT_STEPS`` steps).
``--quick``: a 2×32 → 1×16 pair, V = 256, L = 32, 20 steps.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

SHAPES = {
  "teacher": {"num_layers": 4, "dim": 256, "num_heads": 4},
  "student": {"num_layers": 2, "dim": 128, "num_heads": 2},
  "vocab": 8192,
  "length": 128,
  "batch": 8,
  "steps": 200,
}
QUICK = {
  "teacher": {"num_layers": 2, "dim": 32, "num_heads": 2},
  "student": {"num_layers": 1, "dim": 16, "num_heads": 2},
  "vocab": 256,
  "length": 32,
  "batch": 4,
  "steps": 20,
}
REMAT_STEPS = 10  # timed steps of each remat policy


def markov_batches(vocab: int, length: int, batch: int, steps: int, seed: int = 0) -> list[dict]:
  """``steps`` batches of ``batch`` rows of ``length + 1`` tokens from a random first-order Markov chain
  (each token's 4 successors with Dirichlet(1) probabilities), as ``{"inputs", "label"}`` ``(B, L)`` int32."""
  rng = np.random.default_rng(seed)
  succ = rng.integers(0, vocab, (vocab, 4))
  probs = rng.dirichlet(np.ones(4), vocab).cumsum(1)
  out = []
  for _ in range(steps):
    rows = np.empty((batch, length + 1), np.int64)
    rows[:, 0] = rng.integers(0, vocab, batch)
    for t in range(length):
      pick = (rng.random(batch)[:, None] > probs[rows[:, t]]).sum(1)
      rows[:, t + 1] = succ[rows[:, t], pick]
    rows = rows.astype(np.int32)
    out.append({"inputs": rows[:, :-1], "label": rows[:, 1:]})
  return out


def distiller(shapes: dict, dtype: str, remat: str = "none"):
  """The pair's Distiller (compute ``dtype``; the student's blocks under ``remat``), same weights for any dtype."""
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import kdjax
  from kdjax import models

  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  v, n = shapes["vocab"], shapes["length"]
  student = models.create(
    "transformer_lm", num_classes=v, rngs=nnx.Rngs(0), dtype=dt, max_len=n, remat=remat, **shapes["student"]
  )
  teacher = models.create("transformer_lm", num_classes=v, rngs=nnx.Rngs(1), dtype=dt, max_len=n, **shapes["teacher"])
  method = kdjax.MethodConfig(name="forward_kl", temperature=1.0, terms=("ce=0.1", "forward_kl=0.9"))
  return kdjax.Distiller(student, teacher, method=method, optimizer=optax.adam(1e-3), mode="offline")


def train(shapes: dict, dtype: str, batches: list[dict], remat: str = "none") -> dict:
  """Compile the KD step and run it over ``batches``: losses, step seconds and XLA's memory analysis."""
  import jax

  d = distiller(shapes, dtype, remat)
  state = d.init(jax.random.key(0), batches[0])
  compiled = d.jitted_step("main").lower(state, d.teacher_state, d.global_batch(batches[0])).compile()
  mem = compiled.memory_analysis()
  losses, seconds = [], []
  for b in batches:
    arrays = d.global_batch(b)
    t0 = time.perf_counter()
    state, metrics = compiled(state, d.teacher_state, arrays)
    losses.append(float(metrics["loss/total"]))
    seconds.append(time.perf_counter() - t0)
  return {
    "losses": losses,
    "step_seconds": round(statistics.median(seconds[1:] or seconds), 4),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "argument_bytes": int(mem.argument_size_in_bytes),
  }


def bench_bf16_curve(quick: bool = False) -> dict:
  """The float32 and bfloat16 runs side by side, and the remat policies' memory and time: one JSON line."""
  import os

  import jax

  from kdjax.models.remat import POLICIES

  shapes = QUICK if quick else SHAPES
  batches = markov_batches(shapes["vocab"], shapes["length"], shapes["batch"], shapes["steps"])
  runs = {dt: train(shapes, dt, batches) for dt in ("float32", "bfloat16")}
  f32, b16 = runs["float32"], runs["bfloat16"]
  remat = {"none": {k: v for k, v in f32.items() if k != "losses"}}
  for p in POLICIES[1:]:
    remat[p] = {k: v for k, v in train(shapes, "float32", batches[: REMAT_STEPS + 1], p).items() if k != "losses"}
  row = {
    "case": "bf16_curve",
    "pair": "lm4x256-lm2x128" if not quick else "quick",
    **{k: shapes[k] for k in ("vocab", "length", "batch", "steps")},
    "max_abs_dloss": round(max(abs(a - b) for a, b in zip(f32["losses"], b16["losses"])), 5),
    "first_loss_float32": round(f32["losses"][0], 5),
    "final_loss_float32": round(f32["losses"][-1], 5),
    "final_loss_bfloat16": round(b16["losses"][-1], 5),
    **{f"{k}_{dt}": r[k] for dt, r in runs.items() for k in ("step_seconds", "temp_bytes", "argument_bytes")},
    "remat": remat,
    "backend": jax.default_backend(),
    "load_avg_1min": round(os.getloadavg()[0], 2),
  }
  print(json.dumps(row), flush=True)
  return row
