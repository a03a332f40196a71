#!/usr/bin/env python
"""Teacher placement: measured step time and memory of each placement next to the cost model's prediction.

On the devices at hand (or ``--cpu-devices N`` forced host devices) it
builds a language-model teacher→student pair, measures what the cost model
(:mod:`kdjax.parallel.cost`) needs — on one device with one device's
share of the batch, the FLOPs of the teacher's forward and of the whole step
(XLA's cost analysis) and the time each takes; how many devices compute at
once (the teacher's forward on one device alone vs on all of them); the
device-to-device bandwidth — then times ``kdjax.train`` under each placement and prints one
JSON line per placement: ``predicted_s``, ``measured_s``, their ratio, and
the teacher's bytes per device, predicted and read from the arrays. A last
line gives the model's recommendation.

    python scripts/placement.py --cpu-devices 8          # 8 forced CPU devices (shares the CPU's cores)
    python scripts/placement.py                          # every local accelerator
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cpu-devices", type=int, default=0, help="force this many host devices (CPU backend)")
  p.add_argument("--teacher", default="4x256", help="layers x width of the teacher transformer")
  p.add_argument("--student", default="2x64", help="layers x width of the student transformer")
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--batch", type=int, default=48, help="global batch (divisible by every sub-mesh tried)")
  p.add_argument("--steps", type=int, default=8, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3, help="timing rounds (median reported)")
  p.add_argument(
    "--placements",
    default="colocated,sharded:2,sharded:4,split:2,split:4,split:4:2",
    help="comma-separated: colocated, sharded:M, split:K[:M]",
  )
  return p.parse_args(argv)


def _size(spec: str) -> tuple[int, int]:
  layers, width = spec.lower().split("x")
  return int(layers), int(width)


def _placement(spec: str):
  import kdjax

  kind, *nums = spec.split(":")
  if kind == "colocated":
    return kdjax.Placement()
  if kind == "sharded":
    return kdjax.Placement(model=int(nums[0]))
  return kdjax.Placement(teacher_devices=int(nums[0]), model=int(nums[1]) if len(nums) > 1 else 1)


def _models(a):
  from flax import nnx

  from kdjax import models

  (tl, tw), (sl, sw) = _size(a.teacher), _size(a.student)
  make = lambda l, w, seed: models.create(
    "transformer_lm",
    num_classes=a.vocab,
    num_layers=l,
    dim=w,  # noqa: E731
    num_heads=max(w // 64, 2),
    max_len=a.length,
    rngs=nnx.Rngs(seed),
  )
  return make(tl, tw, 1), make(sl, sw, 0)


def _batch(a, rows: int | None = None) -> dict:
  import numpy as np

  rng = np.random.default_rng(0)
  t = rng.integers(0, a.vocab, (rows or a.batch, a.length + 1)).astype(np.int32)
  return {"inputs": t[:, :-1], "label": t[:, 1:], "mask": np.ones((len(t), a.length), bool)}


def _distiller(a, placement, mesh=None, rows=None):
  import jax
  import optax

  import kdjax

  teacher, student = _models(a)
  d = kdjax.Distiller(student, teacher, method="forward_kl", optimizer=optax.adam(1e-3), mesh=mesh, placement=placement)
  return d, d.init(jax.random.key(0), _batch(a, rows))


def _time(fn, steps: int, rounds: int) -> float:
  """Median seconds per call over ``rounds`` rounds of ``steps`` calls (after one warm-up call)."""
  fn()
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = fn()
    import jax

    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times)


def _flops(jitted, *args) -> float:
  ca = jitted.lower(*args).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def measure_one_device(a, rows: int) -> dict:
  """FLOPs and seconds of the teacher's forward and of the whole colocated step on one device, for ``rows`` rows
  (one device's share of the global batch), scaled to the global batch."""
  import jax

  from kdjax import batch as B
  from kdjax.parallel import sharding
  from kdjax.engine.step import run_teachers

  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  d, state = _distiller(a, _placement("colocated"), mesh, rows)
  gb = d.global_batch(_batch(a, rows))
  forward = jax.jit(lambda t, x: run_teachers(d.spec, t, x)[0].logits)
  x = gb[B.INPUTS]
  f_t = _flops(forward, d.teacher_state, x)
  step = d.jitted_step()
  f_all = _flops(step, state, d.teacher_state, gb)
  t_t = _time(lambda: forward(d.teacher_state, x), a.steps, a.rounds)
  box = {"state": state}

  def one():
    box["state"], m = step(box["state"], d.teacher_state, gb)
    return m

  t_all = _time(one, a.steps, a.rounds)
  scale = a.batch / rows
  return {
    "teacher_flops": f_t * scale,
    "student_flops": max(f_all - f_t, 1.0) * scale,
    "teacher_s": t_t * scale,
    "student_s": max(t_all - t_t, 1e-9) * scale,
    "step_s": t_all * scale,
    "teacher_bytes": sharding.param_bytes(d.teacher_state)["total"],
    "student_bytes": sharding.param_bytes(box["state"])["total"],
  }


def measure_machine(a, n: int) -> dict:
  """How many devices compute at once — the teacher's forward on one device's rows, alone and on every device
  together — and the device-to-device bandwidth."""
  import jax
  import jax.numpy as jnp

  from kdjax import batch as B
  from kdjax.parallel import sharding
  from kdjax.engine.step import run_teachers

  times = []
  for mesh, rows in ((sharding.make_mesh(devices=jax.devices()[:1]), a.batch // n), (sharding.make_mesh(), a.batch)):
    d, _ = _distiller(a, _placement("colocated"), mesh, rows)
    f = jax.jit(lambda t, x, d=d: run_teachers(d.spec, t, x)[0].logits)
    x = d.global_batch(_batch(a, rows))[B.INPUTS]
    times.append(_time(lambda f=f, d=d, x=x: f(d.teacher_state, x), a.steps, a.rounds))
  alone, together = times
  big = jax.device_put(jnp.ones((16 * 2**20,), jnp.float32), jax.devices()[0])  # 64 MiB
  other = jax.devices()[min(1, n - 1)]
  link = 64 * 2**20 / _time(lambda: jax.device_put(big, other), 2, 3)
  return {"parallelism": n * alone / together, "link_bytes_per_s": link}


def measure_placement(a, spec: str) -> dict:
  import kdjax

  d, state = _distiller(a, _placement(spec))
  batch = _batch(a)
  times: list[float] = []

  class Clock(kdjax.hooks.Hook):
    def after_step(self, progress):
      import jax

      jax.block_until_ready(progress.metrics)
      times.append(time.perf_counter())

  def forever():
    while True:
      yield batch

  steps = 2 + a.steps * a.rounds
  kdjax.train(d, state, forever(), steps=steps, hooks=[Clock()])
  per = [(times[i + a.steps] - times[i]) / a.steps for i in range(1, len(times) - a.steps, a.steps)]
  return {
    "measured_s": statistics.median(per),
    "teacher_bytes_per_device": d.teacher_param_bytes()["max_per_device"],
    "teacher_devices": d.teacher_mesh.size if d.placement.split else 0,
    "student_devices": d.mesh.size,
  }


def main(argv=None) -> int:
  a = parse_args(argv)
  if a.cpu_devices:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.cpu_devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  import jax

  from kdjax.parallel import cost as placement_cost

  n = jax.device_count()
  one, machine = measure_one_device(a, a.batch // n), measure_machine(a, n)
  (tl, tw) = _size(a.teacher)
  w = placement_cost.Workload(
    teacher_flops=one["teacher_flops"],
    student_flops=one["student_flops"],
    teacher_bytes=one["teacher_bytes"],
    student_bytes=one["student_bytes"],
    output_bytes=a.batch * a.length * a.vocab * 4,
    tp_bytes=(2 * tl * tw + a.vocab) * a.batch * a.length * 4,
  )
  rates = placement_cost.Rates(
    teacher_flops_per_s=one["teacher_flops"] / one["teacher_s"],
    student_flops_per_s=one["student_flops"] / one["student_s"],
    parallelism=machine["parallelism"],
    link_bytes_per_s=machine["link_bytes_per_s"],
  )
  head = {
    "case": "placement_inputs",
    "devices": n,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    **{k: float(f"{v:.4g}") for k, v in {**one, **machine}.items()},
    "teacher": a.teacher,
    "student": a.student,
    "vocab": a.vocab,
    "length": a.length,
    "batch": a.batch,
  }
  print(json.dumps(head), flush=True)
  for spec in a.placements.split(","):
    p = _placement(spec)
    pred = placement_cost.predict(w, rates, n, teacher_devices=p.teacher_devices, model=p.model)
    got = measure_placement(a, spec)
    print(
      json.dumps(
        {
          "case": "placement",
          "placement": pred.placement,
          "predicted_s": round(pred.step_seconds, 5),
          "measured_s": round(got["measured_s"], 5),
          "measured_over_predicted": round(got["measured_s"] / pred.step_seconds, 3),
          "teacher_bytes_per_device_predicted": int(pred.teacher_bytes_per_device),
          "teacher_bytes_per_device_measured": got["teacher_bytes_per_device"],
          "tokens_per_sec": round(a.batch * a.length / got["measured_s"], 1),
        }
      ),
      flush=True,
    )
  best, _ = placement_cost.recommend(w, rates, n)
  print(
    json.dumps(
      {"case": "placement_recommendation", "placement": best.placement, "predicted_s": round(best.step_seconds, 5)}
    ),
    flush=True,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
