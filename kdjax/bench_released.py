"""Benchmarks at a released model's shapes (Qwen2.5-0.5B's vocabulary and layout, random weights):
``kdjax bench --cases generate_hf,released_kd`` (no pair).

generate_hf   the sampler against transformers' ``generate``: a random ``Qwen2ForCausalLM``
              (d = 512, 2 layers, 8 query / 2 key-value heads, V = 151,936, tied embeddings)
              made from a ``Qwen2Config`` and saved to a temporary directory; kdjax loads it
              with :func:`kdjax.models.pretrained.from_pretrained` and runs
              :func:`kdjax.generate.generate` (KV cache, one jitted program), PyTorch runs
              ``model.generate`` (KV cache, float32, CPU) on the same weights in a process of its
              own (:class:`kdjax.bench_torch.TorchWorker`); the same ``(B, P)`` prompts and N new
              tokens (no stop token), greedy and sampled (temperature 1, no top-k/top-p), the
              four timings interleaved round by round. One line per mode: ``tokens_per_sec``
              (B·N ÷ seconds of one call, median over ``--rounds``) of both, their ``ratio``, each
              round's own ratio (``round_ratios``: kdjax's call over the PyTorch call after it), and
              for greedy decoding how many generated tokens are equal (``greedy_equal_tokens``
              of ``greedy_tokens``).
released_kd   the online KD step (CE 0.1 + forward KL(teacher ‖ student) 0.9 per token, T = 1,
              SGD with momentum) of a d = 896 teacher and a d = 512 student in Qwen 2's layout
              (``bench._qwen_like``; 2 layers each, V = 151,936) on 2 × 256 tokens, three ways,
              interleaved: kdjax with the fused token losses (the default), kdjax with the plain
              ``(B, L, V)`` losses (``method.token_chunk = 0``), and the PyTorch eager loop of
              the same widths and vocabulary (transformers' ``Qwen2ForCausalLM``) in its own
              process. ``tokens_per_sec_*``, XLA's memory analysis of both compiled steps
              (``temp_bytes``, ``argument_bytes``, ``output_bytes``), the first step's loss of
              both from the same weights, process peak RSS (``resource.getrusage``:
              ``peak_rss_bytes`` of this process, ``torch_peak_rss_bytes`` of the worker) and
              the resident memory each kdjax step added at its peak (``rss_added_*``: Linux's
              VmHWM, reset before each step is built, minus VmRSS then).

``--quick``: a d = 64 / 32, 1-layer pair at V = 4,096 (``generate_hf``: V = 1,000), 2 × 32
tokens and chunks of 8 positions: seconds.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

GEN_SHAPES = {
  "hidden": 512,
  "layers": 2,
  "heads": 8,
  "kv_heads": 2,
  "vocab": 151_936,
  "batch": 8,
  "prompt": 32,
  "new": 96,
}
GEN_QUICK = {"hidden": 64, "layers": 1, "heads": 2, "kv_heads": 1, "vocab": 1000, "batch": 2, "prompt": 4, "new": 6}
KD_SHAPES = {"vocab": 151_936, "teacher_dim": 896, "student_dim": 512, "layers": 2, "batch": 2, "length": 256}
KD_QUICK = {"vocab": 4096, "teacher_dim": 64, "student_dim": 32, "layers": 1, "batch": 2, "length": 32}
QUICK_CHUNK = 8  # --quick: positions per chunk (V = 4,096 is below the automatic threshold)


def _threads(a) -> int:
  """The workers' torch threads: ``--torch-threads``, else torch's default (one with ``--quick``: tiny loops on a
  busy machine lose whole time slices in OpenMP barriers)."""
  return a.torch_threads or (1 if a.quick else 0)


# --------------------------------------------------------------------------- generate_hf


def qwen2_config(s: dict) -> dict:
  """``Qwen2Config`` keyword arguments of the generation model ``s`` (GEN_SHAPES): tied, GQA, no stop token."""
  return {
    "vocab_size": s["vocab"], "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
    "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "intermediate_size": s["hidden"] * 11 // 2,
    "max_position_embeddings": s["prompt"] + s["new"], "tie_word_embeddings": True, "rope_theta": 1e6,
    "initializer_range": 0.2,
  }  # fmt: skip


def _kdjax_generators(path: str, s: dict):
  """The checkpoint loaded into kdjax and its jitted greedy and sampled :func:`~kdjax.generate.generate`."""
  import jax
  from flax import nnx

  from kdjax.generate import Sampling, generate
  from kdjax.models.pretrained import from_pretrained

  gd, state = nnx.split(from_pretrained(path))
  fns = {}
  for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
    sampling = Sampling(max_new_tokens=s["new"], temperature=temp)
    fns[mode] = jax.jit(lambda st, x, n, k, _s=sampling: generate(nnx.merge(gd, st), x, n, k, _s).tokens)
  return fns, state


def _gen_rounds(fns, state, worker, prompts, rounds: int) -> tuple[dict, dict, object]:
  """Interleaved rounds (kdjax greedy, torch greedy, kdjax sampled, torch sampled): seconds per call."""
  import jax
  import jax.numpy as jnp

  x = jnp.asarray(prompts, jnp.int32)
  n = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
  first, secs = {}, {(lib, m): [] for lib in ("kdjax", "torch") for m in fns}
  for m, f in fns.items():  # compile (kdjax) and warm up (both)
    t0 = time.perf_counter()
    first[m] = (jax.block_until_ready(f(state, x, n, jax.random.key(0))), time.perf_counter() - t0)
    worker.run(1, sample=m == "sampled")
  for r in range(rounds):
    for m, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(state, x, n, jax.random.key(r + 1)))
      secs[("kdjax", m)].append(time.perf_counter() - t0)
      secs[("torch", m)].append(worker.run(1, sample=m == "sampled", seed=r + 1))
  return secs, {m: t for m, (_, t) in first.items()}, first["greedy"][0]


def bench_generate_hf(a) -> list[dict]:
  """kdjax's generate vs transformers' ``generate`` on one random Qwen 2 checkpoint: one line per mode."""
  import jax
  import numpy as np

  from kdjax.bench_torch import TorchWorker

  s = GEN_QUICK if a.quick else GEN_SHAPES
  tmp = tempfile.TemporaryDirectory(prefix="kdjax_bench_qwen2_")
  path = tmp.name
  prompts = np.random.default_rng(0).integers(1, s["vocab"], (s["batch"], s["prompt"])).tolist()
  setup = {"kind": "hf_generate", "config": qwen2_config(s), "path": path, "prompts": prompts, "new_tokens": s["new"]}
  worker = TorchWorker(setup | {"threads": _threads(a)})
  worker.call({"info": True})  # the worker has saved the checkpoint
  fns, state = _kdjax_generators(path, s)
  secs, first, greedy = _gen_rounds(fns, state, worker, prompts, a.rounds)
  worker.run(1, sample=False)
  hf_greedy = np.asarray(worker.call({"tokens": True})["tokens"])
  info = worker.close()
  tmp.cleanup()
  equal = int((np.asarray(greedy) == hf_greedy).sum())
  rows = []
  for m in fns:
    tps = {lib: [s["batch"] * s["new"] / t for t in secs[(lib, m)]] for lib in ("kdjax", "torch")}
    row = {
      "case": "generate_hf", "mode": m, **s, "kdjax_tokens_per_sec": round(statistics.median(tps["kdjax"]), 1),
      "torch_tokens_per_sec": round(statistics.median(tps["torch"]), 1),
      "ratio": round(statistics.median(tps["kdjax"]) / statistics.median(tps["torch"]), 3),
      "round_ratios": [round(k / t, 3) for k, t in zip(tps["kdjax"], tps["torch"])],
      "kdjax_tokens_per_sec_best": round(max(tps["kdjax"]), 1), "torch_tokens_per_sec_best": round(max(tps["torch"]), 1),
      "kdjax_first_call_seconds": round(first[m], 2), "rounds": a.rounds, "torch_in_process": False,
      "torch_jax_imported": info["jax_imported"], "torch_threads": info["threads"], "backend": jax.default_backend(),
    }  # fmt: skip
    if m == "greedy":
      row |= {"greedy_equal_tokens": equal, "greedy_tokens": int(hf_greedy.size)}
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


# --------------------------------------------------------------------------- released_kd


def _status_bytes(field: str) -> int | None:
  """``VmHWM`` / ``VmRSS`` of this process in bytes (Linux), else None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def _reset_peak_rss() -> None:
  """Reset Linux's VmHWM to the current RSS (``/proc/self/clear_refs``: 5); nothing elsewhere."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


class _KdStep:
  """The compiled KD step of the released-shape pair with ``token_chunk``: its analyses, first loss and timing."""

  def __init__(self, shapes: dict, token_chunk: int | None, host: dict):
    import jax

    import kdjax
    from kdjax import bench
    from kdjax.config import OptimConfig
    from kdjax.engine.optim import make_optimizer

    _reset_peak_rss()
    rss0 = _status_bytes("VmRSS")
    v, n = shapes["vocab"], shapes["length"]
    student = bench._qwen_like(shapes["student_dim"], shapes["layers"], v, n, 0)
    teacher = bench._qwen_like(shapes["teacher_dim"], shapes["layers"], v, n, 1)
    terms = (f"ce={bench.CE_WEIGHT}", f"forward_kl={bench.KD_WEIGHT}")
    method = kdjax.MethodConfig(name="forward_kl", temperature=1.0, terms=terms, token_chunk=token_chunk)
    tx, _ = make_optimizer(OptimConfig(name="sgd", lr=bench.LR, momentum=bench.MOMENTUM, steps=10**6), 100, 10**6)
    d = kdjax.Distiller(student, teacher, method=method, optimizer=tx, mode="offline", num_examples=100)
    self.state, self.teacher = d.init(jax.random.key(0), host), d.teacher_state
    self.batch = d.global_batch(host)
    t0 = time.perf_counter()
    self.compiled = d.jitted_step("main").lower(self.state, self.teacher, self.batch).compile()
    self.compile_seconds = time.perf_counter() - t0
    self.memory = self.compiled.memory_analysis()
    self.flops = bench._cost_flops(self.compiled)
    self.state, metrics = self.compiled(self.state, self.teacher, self.batch)
    self.loss = float(metrics["loss/total"])  # the first step, from the seeds' weights
    self.rss_added = None if rss0 is None else _status_bytes("VmHWM") - rss0

  def run(self, steps: int) -> float:
    import jax

    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.teacher, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


def _torch_kd_setup(s: dict, threads: int) -> dict:
  """The worker's ``hf_kd`` setup: Qwen2 configs of ``bench._qwen_like``'s shapes (tied, 2 kv heads, SwiGLU)."""

  def cfg(dim: int) -> dict:
    hd = 64 if dim >= 256 else 32
    return {
      "vocab_size": s["vocab"], "hidden_size": dim, "num_hidden_layers": s["layers"], "num_attention_heads": dim // hd,
      "num_key_value_heads": min(2, dim // hd), "intermediate_size": dim * 11 // 2, "max_position_embeddings": s["length"],
      "tie_word_embeddings": True, "rope_theta": 1e6,
    }  # fmt: skip

  return {"kind": "hf_kd", "teacher": cfg(s["teacher_dim"]), "student": cfg(s["student_dim"]), "threads": threads,
          "batch": s["batch"], "length": s["length"]}  # fmt: skip


def _kd_row(s: dict, chunk, steps: dict, rates: dict, info: dict) -> dict:
  """The ``released_kd`` line from the two kdjax steps, the three rates and the worker's info."""
  import resource

  fused, plain = steps["fused"], steps["plain"]
  med = {k: statistics.median(r) * s["length"] for k, r in rates.items()}  # tokens/s
  mem = {k: st.memory for k, st in steps.items()}
  return {
    "case": "released_kd", **s, "chunk_positions": chunk,
    **{f"tokens_per_sec_{k}": round(v, 1) for k, v in med.items()},
    **{f"tokens_per_sec_best_{k}": round(max(r) * s["length"], 1) for k, r in rates.items()},
    "fused_over_plain": round(med["fused"] / med["plain"], 3), "fused_over_torch": round(med["fused"] / med["torch"], 3),
    "temp_bytes_fused": int(mem["fused"].temp_size_in_bytes), "temp_bytes_plain": int(mem["plain"].temp_size_in_bytes),
    "temp_ratio": round(mem["fused"].temp_size_in_bytes / mem["plain"].temp_size_in_bytes, 4),
    "argument_bytes": int(mem["fused"].argument_size_in_bytes),
    "output_bytes_fused": int(mem["fused"].output_size_in_bytes), "output_bytes_plain": int(mem["plain"].output_size_in_bytes),
    "gflop_per_step": None if plain.flops is None else round(plain.flops / 1e9, 2),
    "achieved_gflops_fused": None if plain.flops is None else round(plain.flops / 1e9 * med["fused"] / (s["batch"] * s["length"]), 1),
    "loss_fused": fused.loss, "loss_plain": plain.loss,
    "compile_seconds_fused": round(fused.compile_seconds, 1), "compile_seconds_plain": round(plain.compile_seconds, 1),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "rss_added_fused": fused.rss_added, "rss_added_plain": plain.rss_added,
    "torch_peak_rss_bytes": info["peak_rss_bytes"], "torch_jax_imported": info["jax_imported"],
    "torch_threads": info["threads"], "torch_in_process": False,
  }  # fmt: skip


def bench_released_kd(a) -> dict:
  """Fused and plain kdjax KD steps and the PyTorch loop at released shapes, interleaved: one line."""
  from kdjax import bench
  from kdjax.bench_torch import TorchWorker

  s = KD_QUICK if a.quick else KD_SHAPES
  host, chunk = bench.token_rows(s, QUICK_CHUNK if a.quick else None)
  worker = TorchWorker(_torch_kd_setup(s, _threads(a)))  # builds its models while kdjax compiles
  steps = {"fused": _KdStep(s, chunk, host), "plain": _KdStep(s, 0, host)}
  runs = {**{k: st.run for k, st in steps.items()}, "torch": worker.run}
  for run in runs.values():  # kdjax's steps ran once when built
    run(max(a.warmup, 1)) if run is worker.run or a.warmup else None
  rates = {k: [] for k in runs}
  for _ in range(a.rounds):
    for k, run in runs.items():
      rates[k].append(a.steps * s["batch"] / run(a.steps))
  row = _kd_row(s, chunk, steps, rates, worker.close())
  row |= {"steps": a.steps, "rounds": a.rounds, "load_avg_1min": round(os.getloadavg()[0], 2)}
  print(json.dumps(row), flush=True)
  return row
