"""kdjax's KD step against the PyTorch eager loop run in a process of its own:
``kdjax bench --cases torch_eager_kd_process``.

How a PyTorch user compares the two: the PyTorch script in its own process,
then kdjax's, then PyTorch's again (A-B-A, so drift of a shared machine's
speed shows as a difference between the two PyTorch runs). Here:

  A  a fresh worker process (:class:`kdjax.bench_torch.TorchWorker`, torch
     only: no JAX in it) builds the pair's eager loop (``TorchCase``: same
     architectures, batch, CE + KD loss and SGD as the ``kd`` case), runs
     ``--warmup`` steps, then ``--rounds`` × ``--steps`` timed steps, and exits;
  B  the ``kd`` case (the engine's jitted step, compiled before A starts) times
     the same rounds in the benchmark's process, idle while A runs;
  A  a second fresh worker, as the first.

Lines: ``torch_eager_kd_process`` (``order``: ``before``/``after``; the same
fields as ``torch_eager_kd`` with ``torch_in_process: false``, ``peak_rss_bytes``
of the worker and ``jax_imported``), the B ``kd`` line (``aba: true``) and
``kd_vs_torch_process``: ``ratio`` = kd ÷ the mean of the two PyTorch medians,
``achieved_gflops`` of the kd step (XLA's cost analysis × its rate) and
``peak_fraction`` of the ``matmul_peak`` measured at the start of the run.
Then ``kd_profile``: where the kd step's time goes (:func:`step_profile`).
"""

from __future__ import annotations

import json
import statistics


def _threads(a) -> int:
  """The worker's torch threads: ``--torch-threads``, else torch's default (one with ``--quick``: tiny loops on a
  busy machine lose whole time slices in OpenMP barriers)."""
  return a.torch_threads or (1 if a.quick else 0)


def _rates(run, a) -> list[float]:
  """Examples/s of ``a.rounds`` rounds of ``a.steps`` steps after ``a.warmup`` untimed ones."""
  if a.warmup:
    run(a.warmup)
  return [a.steps * a.batch / run(a.steps) for _ in range(a.rounds)]


def _worker(a, pair: str):
  from kdjax.bench_torch import TorchWorker

  return TorchWorker({"kind": "kd", "pair": pair, "batch": a.batch, "threads": _threads(a)})


def _torch_line(a, pair: str, order: str, gflop: float | None, w) -> dict:
  """One A run on the fresh worker ``w``: warm-up, the timed rounds, its exit; the ``torch_eager_kd_process`` line."""
  from kdjax import bench

  rates = _rates(w.run, a)
  info = w.close()
  ips = statistics.median(rates)
  row = {
    "case": "torch_eager_kd_process",
    "pair": pair,
    "order": order,
    "images_per_sec": round(ips, 2),
    "images_per_sec_best": round(max(rates), 2),
    "achieved_gflops": None if gflop is None else float(f"{gflop * ips:.4g}"),
    "batch": a.batch,
    "torch_in_process": False,
    "jax_imported": info["jax_imported"],
    "threads": info["threads"],
    "peak_rss_bytes": info["peak_rss_bytes"],
    "backend": f"torch-{info['torch']}-cpu",
  }
  tokens = bench.PAIRS[pair][2][0] if pair in bench.PAIR_KWARGS else None
  if tokens:
    row["tokens_per_sec"] = round(ips * tokens, 1)
  return row


def bench_torch_process(a, pair: str, peak_gflops: float) -> dict:
  """A-B-A: PyTorch worker, kdjax's ``kd`` step in this process, PyTorch worker again; prints four lines."""
  from kdjax import bench

  first = _worker(a, pair)  # starts (imports torch, builds its models) while kdjax compiles
  kd = bench.JaxCase("kd", pair, a.batch, "float32")
  kd.run(max(a.warmup, 1))
  g = kd.gflop_per_image
  before = _torch_line(a, pair, "before", g, first)
  print(json.dumps(before), flush=True)
  rates = [a.steps * a.batch / kd.run(a.steps) for _ in range(a.rounds)]
  row = bench._row(a, pair, kd, rates, g) | {"aba": True}
  print(json.dumps(row), flush=True)
  after = _torch_line(a, pair, "after", g, _worker(a, pair))
  print(json.dumps(after), flush=True)
  torch_mean = (before["images_per_sec"] + after["images_per_sec"]) / 2
  achieved = row["achieved_gflops"]
  summary = {
    "case": "kd_vs_torch_process",
    "pair": pair,
    "kd_images_per_sec": row["images_per_sec"],
    "torch_images_per_sec": [before["images_per_sec"], after["images_per_sec"]],
    "ratio": round(row["images_per_sec"] / torch_mean, 3),
    "ratio_best": round(
      row["images_per_sec_best"] / max(before["images_per_sec_best"], after["images_per_sec_best"]), 3
    ),
    "gflop_per_image": g,
    "achieved_gflops": achieved,
    "matmul_peak_gflops": peak_gflops,
    "peak_fraction": None if achieved is None else round(achieved / peak_gflops, 3),
    "batch": a.batch,
  }
  print(json.dumps(summary), flush=True)
  prof = step_profile(kd, bench.PAIRS[pair][3])
  print(json.dumps({"case": "kd_profile", "pair": pair, "batch": a.batch, **prof}), flush=True)
  return summary


# --------------------------------------------------------------------------- where the step's time goes


def _hlo_ops(text: str) -> dict:
  """Each named instruction of the compiled HLO ``text`` → (result shape, the ops it computes: its own or, for a
  fusion, those of its fused computation)."""
  import re

  bodies = dict(re.findall(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S))
  out = {}
  for name, shape, op, rest in re.findall(r"\n\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(([^\n]*)", text):
    called = re.search(r"calls=%([\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else ""
    out[name] = (shape, set(re.findall(r"= \S+ ([\w\-]+)\(", body)) or {op})
  return out


def _kind(shape: str, ops: set, vocab: int) -> str:
  """The profile's categories: matmuls, layout copies, vocabulary-wide elementwise work, the rest."""
  if ops & {"dot", "convolution"}:
    return "matmul"
  if ops <= {"copy", "transpose", "bitcast", "parameter"}:
    return "copy"
  return "vocab_elementwise" if f",{vocab}]" in shape or f"[{vocab}," in shape else "other"


def step_profile(case, vocab: int, steps: int = 3) -> dict:
  """Thread-milliseconds per step of the compiled step's operations (``jax.profiler`` trace of ``steps`` steps),
  summed by kind, and the eight largest, with XLA's cost analysis (FLOPs and bytes accessed)."""
  import collections
  import glob
  import tempfile

  import jax

  ops = _hlo_ops(case.compiled.as_text() or "")
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      wall = case.run(steps) / steps
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  per = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in ops:
          per[ev.name] += ev.duration_ns / 1e6 / steps
  kinds = collections.Counter()
  for name, ms in per.items():
    kinds[_kind(ops[name][0], ops[name][1], vocab)] += ms
  ca = case.compiled.cost_analysis()
  ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else (ca or {})
  return {
    "step_seconds": round(wall, 4),
    "thread_ms": {k: round(v, 1) for k, v in kinds.most_common()},
    "top_ops": [[n, ops[n][0], round(ms, 1)] for n, ms in per.most_common(8)],
    "cost_flops": ca.get("flops"),
    "cost_bytes_accessed": ca.get("bytes accessed"),
  }
