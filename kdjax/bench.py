"""Benchmark of kdjax's jitted KD train step: ``kdjax bench``, ``python -m kdjax.bench``.

For each teacher→student pair it measures, after warm-up, the training
throughput of these cases and prints one JSON line per case:

  student_only    plain CE training of the student (the floor)
  kd              online KD: frozen teacher forward inside the step
  kd_cached       KD from cached teacher logits (``batch["teacher_logits"]``,
                  what ``--data.teacher_cache`` feeds): no teacher forward;
                  for the language-model pair a top-k cache
                  (``teacher_topk_logp``/``teacher_topk_idx``, k = 64 of
                  V = 8192) and the exact top-k forward KL
  on_policy       language-model pairs: on-policy distillation (GKD, λ = 1):
                  the student samples half of every row (temperature 1)
                  with the KV cache, the teacher scores it and the student
                  is updated on reverse KL, all in the one jitted step;
                  ``generated_tokens_per_sec`` counts the sampled tokens
  torch_eager_kd  the equivalent PyTorch eager loop (same architectures,
                  batch, KD loss, SGD; for the language-model pair the same
                  GPT blocks, CE + per-token forward KL), when torch is
                  importable (``pip install 'kdjax[bench]'``), run inside
                  this process beside JAX (``torch_in_process: true``)
  generate        language-model pairs: greedy generation by the student,
                  a quarter prompt and three quarters new tokens (L = max_len),
                  with the KV cache (``generate_kv``, :mod:`kdjax.generate`)
                  and by re-running the whole sequence for every token
                  (``generate_recompute``), side by side: ``tokens_per_sec``
  input           (opt-in, ``--cases input``; no pair) the training input
                  pipeline (:class:`kdjax.data.Loader` on Grain): examples/s
                  of MNIST-1D (jitter view) and mock CIFAR-100 (cifar view),
                  batch ``--batch``, with 0 and 2 worker processes side by
                  side; and the cold start (a fresh process: import kdjax →
                  first MNIST-1D batch, data already prepared)
  fused_memory    (opt-in, ``--cases fused_memory``; no pair) the fused token
                  losses at a released model's shapes: Qwen2.5-0.5B's
                  vocabulary (V = 151,936) and layout (tied embeddings,
                  grouped-query attention), a d = 896 teacher and a d = 512
                  student, 2 layers each, random weights, 4 × 512 tokens,
                  CE + forward KL. The KD step compiled with the plain
                  (B, L, V) losses (``method.token_chunk = 0``) and with the
                  fused ones (the default): XLA's memory analysis of each
                  (``temp_bytes``: peak temporary memory), the loss of one
                  step from the same state, and the step's seconds.
                  ``--quick``: V = 40,000, d = 64 / 32, 1 layer, 2 × 64
                  tokens, chunks of 16 positions
  cache_codec     (opt-in, ``--cases cache_codec``; no pair) the packed top-k
                  teacher cache (:mod:`kdjax.bench_cache`): bytes per token,
                  log-prob and top-k KL errors, encode and decode rows/s
                  (host NumPy and on-device JAX) for k = 64 and 128 at
                  V = 151,936
  bf16_curve      (opt-in, ``--cases bf16_curve``; no pair) the LM pair distilled
                  200 steps in float32 and in bfloat16 (float32 master weights,
                  a bfloat16-held teacher) from the same weights and batches:
                  max |Δloss|, step seconds and XLA's memory analysis of each,
                  and the remat policies' (:mod:`kdjax.bench_bf16`)
  torch_eager_kd_process  (opt-in) the PyTorch eager loop in a process of its
                  own, A-B-A around the ``kd`` case, and their ratio with the
                  kd step's fraction of the matmul peak (:mod:`kdjax.bench_lm`)
  generate_hf     (opt-in, no pair) kdjax's sampler against transformers'
                  ``generate`` on one random Qwen2 checkpoint at released
                  widths, greedy and sampled (:mod:`kdjax.bench_released`)
  released_kd     (opt-in, no pair) the KD step at Qwen2.5-0.5B's widths and
                  vocabulary: fused, plain and PyTorch, tokens/s and memory
                  (:mod:`kdjax.bench_released`)

Fields: ``case``, ``pair``, ``images_per_sec`` (median over interleaved
rounds), ``images_per_sec_best``, ``compile_seconds``, ``gflop_per_image``
(XLA's cost analysis of the compiled step, per example), ``achieved_gflops``
(= gflop_per_image × images_per_sec), ``devices``, ``backend``, ``batch``,
``dtype``; ``torch_in_process`` on PyTorch lines (true: beside JAX in this
process). A ``matmul_peak`` line gives the measured dense float32 GFLOP/s
of the same device, so every figure reads as a fraction of the hardware.

The kdjax cases run the public core's real step (``kdjax.Distiller``'s jitted
step, state donated) on one batch
already on the device; cases are interleaved round by round so a load spike
on a shared machine hits all of them alike.

XLA:CPU options (``--xla-cpu onednn|xnn|ynn``) must be set before JAX starts,
so the benchmark sets ``XLA_FLAGS`` itself; compare options in separate runs.
Measured on the 2-core dev CPU with jaxlib 0.10.2 (``results/bench.md``):
the oneDNN and XNN options leave the compiled step bit-identical (no-ops),
and bfloat16 is no faster than float32, so float32 stays the default.

``--xla-conv eigen,ynn`` compiles each kdjax case with both CPU convolution
kernels side by side in one process (per-executable compile options, what
``run.xla_cpu_conv`` selects): jaxlib 0.10.2 hands convolutions to YNNPACK
fusions by default; kdjax's default ``eigen`` keeps them on XLA's own kernels
(faster on the CPUs measured, ``results/bench.md``). ``ynn_fusions`` in each line
counts the YNNPACK fusions left in the compiled step.

    kdjax bench                       # resnet32x4→resnet8x4, batch 64
    kdjax bench --pairs all --rounds 5
    kdjax bench --quick               # seconds; used by the tests
    kdjax bench --xla-conv ynn,eigen  # both CPU conv kernels, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PAIRS = {
  "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4", (32, 32, 3), 100),
  "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2", (32, 32, 3), 100),
  "cnn1d-mlp": ("cnn1d", "mlp", (40,), 10),
  # token-level KD: a 4-layer d=256 teacher → 2-layer d=128 student, V = 8192, L = 128
  "lm4x256-lm2x128": ("transformer_lm", "transformer_lm", (128,), 8192),
}
# models.create keyword arguments of each pair's (teacher, student)
PAIR_KWARGS = {
  "lm4x256-lm2x128": (
    {"num_layers": 4, "dim": 256, "num_heads": 4, "max_len": 128},
    {"num_layers": 2, "dim": 128, "num_heads": 2, "max_len": 128},
  ),
}
LM_TOP_K = 64  # kd_cached of a language model: top-k teacher log-probs per position (cache.top_k)
CASES = ("student_only", "kd", "kd_cached", "on_policy", "torch_eager_kd", "generate")
EXTRA_CASES = (
  "input",
  "fused_memory",
  "cache_codec",
  "bf16_curve",
  "torch_eager_kd_process",
  "generate_hf",
  "released_kd",
)
# fused_memory: Qwen2.5-0.5B's vocabulary; teacher at its width, a narrower student; --quick: seconds
FUSED_SHAPES = {"vocab": 151_936, "teacher_dim": 896, "student_dim": 512, "layers": 2, "batch": 4, "length": 512}
FUSED_QUICK = {"vocab": 40_000, "teacher_dim": 64, "student_dim": 32, "layers": 1, "batch": 2, "length": 64}
FUSED_QUICK_CHUNK = 16  # --quick: positions per chunk (the automatic chunk would hold the whole sequence)
XLA_CPU_OPTIONS = {
  "default": "",
  # oneDNN convolutions/matmuls as XLA custom calls (experimental in XLA:CPU)
  "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
  # library fusions of convolutions and dots (XNNPACK / YNNPACK)
  "xnn": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution,dot",
  "ynn": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot",
}
# CPU convolution kernels (``RunConfig.xla_cpu_conv``, ``kdjax.engine.xla_cpu``): per-executable
# compile options, so both compile side by side in ONE process. jaxlib 0.10.2 routes every
# convolution to a YNNPACK library fusion by default ("ynn"); kdjax's default "eigen" leaves
# convolutions to XLA's own kernels and keeps YNN for dots and reductions.
XLA_CONV_OPTIONS = ("eigen", "ynn")
TEMPERATURE, KD_WEIGHT, CE_WEIGHT = 4.0, 0.9, 0.1  # RepDistiller's KD recipe
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="kdjax bench", description=__doc__.split("\n\n")[0])
  p.add_argument("--pairs", default="resnet32x4-resnet8x4", help=f"comma-separated pairs, or 'all': {', '.join(PAIRS)}")
  p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES + EXTRA_CASES))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument(
    "--dtype",
    default="float32",
    help="computation dtype(s) of both models, comma-separated (float32, bfloat16; params stay "
    "float32); every dtype runs the kdjax cases side by side",
  )
  p.add_argument(
    "--xla-cpu",
    default="default",
    choices=tuple(XLA_CPU_OPTIONS),
    help="XLA:CPU option set (set in XLA_FLAGS before JAX starts)",
  )
  p.add_argument(
    "--xla-conv",
    default="eigen",
    help="comma-separated XLA:CPU convolution backends compiled side by side in one process: "
    + ", ".join(XLA_CONV_OPTIONS)
    + " (kdjax's run.xla_cpu_conv)",
  )
  p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
  p.add_argument("--quick", action="store_true", help="tiny sizes (cnn1d→mlp, batch 32, 2 steps): seconds")
  a = p.parse_args(argv)
  if a.quick:
    a.pairs, a.batch, a.steps, a.rounds, a.warmup = "cnn1d-mlp", 32, 2, 1, 1
  a.pairs = list(PAIRS) if a.pairs == "all" else [x for x in a.pairs.split(",") if x]
  for x in a.pairs:
    if x not in PAIRS:
      p.error(f"unknown pair {x!r}; choose from {', '.join(PAIRS)} or 'all'")
  a.dtypes = [d for d in a.dtype.split(",") if d]
  for d in a.dtypes:
    if d not in ("float32", "bfloat16"):
      p.error(f"unknown --dtype {d!r}; choose float32 or bfloat16")
  a.xla_convs = [c for c in a.xla_conv.split(",") if c]
  for c in a.xla_convs:
    if c not in XLA_CONV_OPTIONS:
      p.error(f"unknown --xla-conv {c!r}; choose from {', '.join(XLA_CONV_OPTIONS)}")
  a.cases = [c for c in a.cases.split(",") if c]
  for c in a.cases:
    if c not in CASES + EXTRA_CASES:
      p.error(f"unknown case {c!r}; choose from {', '.join(CASES + EXTRA_CASES)}")
  if a.batch < 1 or a.steps < 1 or a.rounds < 1 or a.warmup < 0:
    p.error("--batch, --steps, --rounds must be ≥ 1 and --warmup ≥ 0")
  return a


# --------------------------------------------------------------------------- input pipeline
COLD_START = """
import sys, time
t = time.perf_counter()
from kdjax import data
loader = data.make_loader("mnist1d", "train", 128, data_dir=sys.argv[1], process_index=0, process_count=1)
next(iter(loader))
print(time.perf_counter() - t)
"""


def _input_iterators(a, root: str) -> dict:
  """Started loaders over MNIST-1D and mock CIFAR-100, with 0 and 2 Grain workers, buffers filled."""
  import contextlib

  import tensorflow_datasets as tfds

  from kdjax import data

  with contextlib.redirect_stdout(sys.stderr):  # TFDS reports its preparation on stdout: keep JSON lines only
    mnist1d = data.load_arrays("mnist1d", "train", root)
    with tfds.testing.mock_data(num_examples=4 * a.batch * max(a.steps, 8)):
      cifar = data.load_arrays("cifar100", "train", download=True)
  sets = {"mnist1d": (mnist1d, data.ViewConfig(kind="jitter")), "cifar100_mock": (cifar, data.default_view("cifar100"))}
  iters = {}
  for name, (ds, view) in sets.items():
    for workers in (0, 2):
      loader = data.Loader(ds, a.batch, seed=0, view=view, process_index=0, process_count=1, worker_count=workers)
      it = iter(loader)
      for _ in range(max(a.warmup, 1) + workers):  # workers started and their buffers filled
        next(it)
      iters[(name, workers)] = it
  return iters


def _cold_start(a, root: str) -> None:
  """Seconds from a fresh process's ``import kdjax`` to its first MNIST-1D batch (data already prepared)."""
  import subprocess

  cold = [
    float(
      subprocess.run(
        [sys.executable, "-c", COLD_START, root], capture_output=True, text=True, check=True
      ).stdout.split()[-1]
    )
    for _ in range(a.rounds)
  ]
  row = {
    "case": "input_cold_start",
    "dataset": "mnist1d",
    "seconds": round(statistics.median(cold), 2),
    "seconds_best": round(min(cold), 2),
  }
  print(json.dumps(row), flush=True)


def bench_input(a) -> None:
  """Loader examples/s with 0 and 2 Grain workers, interleaved rounds; then the cold start."""
  import tempfile

  root = tempfile.mkdtemp(prefix="kdjax_bench_input_")
  iters = _input_iterators(a, root)
  rates = {k: [] for k in iters}
  for _ in range(a.rounds):
    for k, it in iters.items():
      t = time.perf_counter()
      for _ in range(a.steps):
        next(it)
      rates[k].append(a.steps * a.batch / (time.perf_counter() - t))
  for (name, workers), r in rates.items():
    iters[(name, workers)].close()
    row = {
      "case": "input",
      "dataset": name,
      "workers": workers,
      "batch": a.batch,
      "examples_per_sec": round(statistics.median(r), 1),
      "examples_per_sec_best": round(max(r), 1),
      "cpu_count": os.cpu_count(),
    }
    print(json.dumps(row), flush=True)
  _cold_start(a, root)


# --------------------------------------------------------------------------- fused token losses


def _qwen_like(dim: int, layers: int, vocab: int, length: int, seed: int):
  """A random Qwen 2-layout Decoder (tied embeddings, q/k/v biases, 2 key/value heads of 64 or 32 dims)."""
  from flax import nnx

  from kdjax.models.decoder import Decoder, DecoderConfig

  head_dim = 64 if dim >= 256 else 32
  cfg = DecoderConfig(
    family="qwen2", vocab_size=vocab, hidden_size=dim, num_layers=layers, num_heads=dim // head_dim,
    num_kv_heads=min(2, dim // head_dim), head_dim=head_dim, intermediate_size=dim * 11 // 2, max_positions=length, qkv_bias=True,
    tie_embeddings=True, rope_theta=1e6,
  )  # fmt: skip
  return Decoder(cfg, rngs=nnx.Rngs(seed))


def _fused_step(shapes: dict, token_chunk: int | None, host: dict) -> dict:
  """Compile the CE + forward-KL step at ``shapes`` with ``token_chunk``; its memory analysis and one step."""
  import jax

  import kdjax
  from kdjax.config import OptimConfig
  from kdjax.engine.optim import make_optimizer

  v, n = shapes["vocab"], shapes["length"]
  student = _qwen_like(shapes["student_dim"], shapes["layers"], v, n, 0)
  teacher = _qwen_like(shapes["teacher_dim"], shapes["layers"], v, n, 1)
  terms = (f"ce={CE_WEIGHT}", f"forward_kl={KD_WEIGHT}")
  method = kdjax.MethodConfig(name="forward_kl", temperature=1.0, terms=terms, token_chunk=token_chunk)
  tx, _ = make_optimizer(OptimConfig(name="sgd", lr=LR, momentum=MOMENTUM, steps=10**6), 100, 10**6)
  d = kdjax.Distiller(student, teacher, method=method, optimizer=tx, mode="offline", num_examples=100)
  state = d.init(jax.random.key(0), host)
  batch = d.global_batch(host)
  t0 = time.perf_counter()
  compiled = d.jitted_step("main").lower(state, d.teacher_state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  t0 = time.perf_counter()
  _, metrics = compiled(state, d.teacher_state, batch)
  loss = float(metrics["loss/total"])
  return {
    "temp_bytes": int(mem.temp_size_in_bytes),
    "argument_bytes": int(mem.argument_size_in_bytes),
    "loss": loss,
    "step_seconds": round(time.perf_counter() - t0, 2),
    "compile_seconds": round(compile_s, 2),
  }


def token_rows(shapes: dict, chunk: int | None = None) -> tuple[dict, int]:
  """Random next-token rows of ``shapes`` (``batch``, ``length``, ``vocab``) on the host, and the fused
  losses' chunk for them (``chunk``, or the automatic one: :func:`kdjax.losses.resolve_chunk`)."""
  import jax
  import numpy as np

  from kdjax.losses import TokenHead, resolve_chunk

  b, n, v = shapes["batch"], shapes["length"], shapes["vocab"]
  tokens = np.random.default_rng(0).integers(0, v, (b, n + 1)).astype(np.int32)
  head = TokenHead(jax.ShapeDtypeStruct((b, n, 1), np.float32), jax.ShapeDtypeStruct((1, v), np.float32))
  return {"inputs": tokens[:, :-1], "label": tokens[:, 1:]}, resolve_chunk(head, chunk)


def bench_fused_memory(a) -> None:
  """The KD step at a released vocabulary with the plain and the fused token losses: one JSON line."""
  shapes = FUSED_QUICK if a.quick else FUSED_SHAPES
  host, chunk = token_rows(shapes, FUSED_QUICK_CHUNK if a.quick else None)
  plain, fused = _fused_step(shapes, 0, host), _fused_step(shapes, chunk, host)
  row = {
    "case": "fused_memory",
    **shapes,
    "chunk_positions": chunk,
    "temp_bytes_plain": plain["temp_bytes"],
    "temp_bytes_fused": fused["temp_bytes"],
    "temp_ratio": round(fused["temp_bytes"] / plain["temp_bytes"], 4),
    "argument_bytes": fused["argument_bytes"],
    "loss_plain": plain["loss"],
    "loss_fused": fused["loss"],
    "loss_rel_diff": float(f"{abs(fused['loss'] - plain['loss']) / abs(plain['loss']):.3g}"),
    "step_seconds_plain": plain["step_seconds"],
    "step_seconds_fused": fused["step_seconds"],
    "compile_seconds_plain": plain["compile_seconds"],
    "compile_seconds_fused": fused["compile_seconds"],
  }
  print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------- generation


def recompute_generate(model, prompts, lengths, key, sampling):
  """The baseline :mod:`kdjax.generate` is measured against: every token re-runs the whole
  sequence (one compiled full-length forward per token, no cache), greedy or sampled alike."""
  import jax
  import jax.numpy as jnp

  from kdjax.generate import sample

  b, p = prompts.shape
  n = sampling.max_new_tokens
  buf = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompts)

  def body(i, carry):
    buf, pos = carry
    logits = model(buf).logits
    last = jnp.take_along_axis(logits, (pos - 1)[:, None, None], axis=1)[:, 0]
    tok = sample(jax.random.fold_in(key, i), last, sampling)
    return buf.at[jnp.arange(b), pos].set(tok), pos + 1

  buf, _ = jax.lax.fori_loop(0, n, body, (buf, lengths))
  return buf


def bench_generate(a, pair: str) -> None:
  """``generate_kv`` (KV cache) vs ``generate_recompute`` tokens/s on the pair's student, side by side."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from kdjax import models
  from kdjax.generate import Sampling, generate

  _, student, shape, vocab = PAIRS[pair]
  kw = dict(PAIR_KWARGS[pair][1])
  model = models.create(student, num_classes=vocab, rngs=nnx.Rngs(0), **kw)
  total = shape[0]
  p = total // 4  # a quarter prompt, three quarters generated: L = max_len
  sampling = Sampling(max_new_tokens=total - p, temperature=0.0)
  prompts = jnp.asarray(np.random.default_rng(0).integers(1, vocab, (a.batch, p)), jnp.int32)
  lengths = jnp.full((a.batch,), p, jnp.int32)
  gd, state = nnx.split(model)
  fns = {
    "generate_kv": jax.jit(lambda s, x, l, k: generate(nnx.merge(gd, s), x, l, k, sampling).tokens),
    "generate_recompute": jax.jit(lambda s, x, l, k: recompute_generate(nnx.merge(gd, s), x, l, k, sampling)),
  }
  compile_s, rates = {}, {c: [] for c in fns}
  for c, f in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(f(state, prompts, lengths, jax.random.key(0)))
    compile_s[c] = time.perf_counter() - t0
  for r in range(a.rounds):
    for c, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(state, prompts, lengths, jax.random.key(r)))
      rates[c].append(a.batch * sampling.max_new_tokens / (time.perf_counter() - t0))
  for c in fns:
    print(
      json.dumps(
        {
          "case": c,
          "pair": pair,
          "model": "student",
          "tokens_per_sec": round(statistics.median(rates[c]), 1),
          "tokens_per_sec_best": round(max(rates[c]), 1),
          "first_call_seconds": round(compile_s[c], 3),
          "batch": a.batch,
          "prompt_len": p,
          "new_tokens": sampling.max_new_tokens,
          "devices": jax.device_count(),
          "backend": jax.default_backend(),
        }
      ),
      flush=True,
    )


# --------------------------------------------------------------------------- kdjax cases


def _cost_flops(compiled) -> float | None:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and "flops" in ca else None


def _distiller(case: str, pair: str, dtype: str, seed: int, xla_conv: str, token_chunk: int | None = None):
  """The engine's Distiller for one case: RepDistiller's KD recipe on SGD, or what the case changes
  (``token_chunk``: the method's, default automatic)."""
  import jax.numpy as jnp
  from flax import nnx

  import kdjax
  from kdjax import models
  from kdjax.config import OptimConfig
  from kdjax.engine.optim import make_optimizer

  t_name, s_name, _, classes = PAIRS[pair]
  t_kw, s_kw = PAIR_KWARGS.get(pair, ({}, {}))
  lm = t_name == "transformer_lm"
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  student = models.create(s_name, num_classes=classes, rngs=nnx.Rngs(seed), dtype=dt, **s_kw)
  teacher = models.create(t_name, num_classes=classes, rngs=nnx.Rngs(seed + 1), dtype=dt, **t_kw)
  # token-level KD: forward KL(teacher ‖ student) per position, T = 1 (GKD's β = 0)
  kd_term, temp = ("forward_kl", 1.0) if lm else ("kd", TEMPERATURE)
  method = (
    kdjax.MethodConfig(name="ce", token_chunk=token_chunk)
    if case == "student_only"
    else kdjax.MethodConfig(
      name=kd_term, temperature=temp, terms=(f"ce={CE_WEIGHT}", f"{kd_term}={KD_WEIGHT}"), token_chunk=token_chunk
    )
  )
  responses = None
  if case == "on_policy":  # GKD: every response sampled from the student (λ = 1), reverse KL scored by the teacher
    method = kdjax.MethodConfig(name="reverse_kl", token_chunk=token_chunk)
    responses = kdjax.ResponseConfig(student_fraction=1.0, temperature=1.0)
  tx, _ = make_optimizer(
    OptimConfig(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, steps=10**6),
    steps_per_epoch=782,
    total_steps=10**6,
  )
  # kd: the teacher runs in the step; kd_cached: its outputs ride in the batch (no teacher in the program)
  return kdjax.Distiller(
    student,
    teacher if case in ("kd", "on_policy") else None,
    method=method,
    optimizer=tx,
    mode="teacher" if case == "student_only" else "offline",
    num_examples=50000,
    steps_per_epoch=782,
    xla_cpu_conv=xla_conv,
    responses=responses,
  )


def _host_batch(case: str, pair: str, batch: int, seed: int) -> dict:
  """One random batch of the pair's shapes, with what the case's step reads (labels, cached teacher outputs)."""
  import jax.numpy as jnp
  import numpy as np

  import kdjax.losses as kdl

  t_name, _, shape, classes = PAIRS[pair]
  lm = t_name == "transformer_lm"
  rng = np.random.default_rng(seed)
  if lm:
    tokens = rng.integers(0, classes, (batch, shape[0] + 1)).astype(np.int32)
    host = {"inputs": tokens[:, :-1], "label": tokens[:, 1:]}
    if case == "on_policy":  # half prompt, half response: the student generates L/2 tokens per row
      host["label"] = np.where(np.arange(shape[0]) >= shape[0] // 2 - 1, host["label"], -1).astype(np.int32)
  else:
    host = {
      "inputs": rng.normal(size=(batch, *shape)).astype(np.float32),
      "label": rng.integers(0, classes, batch).astype(np.int32),
    }
  if case == "kd_cached" and lm:  # a top-k cache: k log-probs + ids per position, never (B, L, V) logits
    z = rng.normal(size=(batch, shape[0], classes)).astype(np.float32) * 3
    lp, idx = kdl.teacher_topk(jnp.asarray(z), LM_TOP_K)
    host["teacher_topk_logp"] = np.asarray(lp).astype(np.float16).astype(np.float32)
    host["teacher_topk_idx"] = np.asarray(idx)
  elif case == "kd_cached":  # what the cache serves: float16 storage, float32 in the batch
    host["teacher_logits"] = (rng.normal(size=(batch, classes)) * 3).astype(np.float16).astype(np.float32)
  return host


def _plain_twin(case: str, pair: str, dtype: str, seed: int, xla_conv: str, host: dict):
  """A language-model case's step compiled with the plain ``(B, L, V)`` token losses: XLA's cost analysis counts a
  fused step's chunk loop once, so its FLOPs (the same products) are read from this twin."""
  import jax

  distiller = _distiller(case, pair, dtype, seed, xla_conv, token_chunk=0)
  state = distiller.init(jax.random.key(seed), host)
  return distiller.jitted_step("main").lower(state, distiller.teacher_state, distiller.global_batch(host)).compile()


class JaxCase:
  """One compiled engine step and its (donated) state."""

  def __init__(self, case: str, pair: str, batch: int, dtype: str, seed: int = 0, xla_conv: str = "eigen"):
    import jax

    t_name, _, shape, _ = PAIRS[pair]
    lm = t_name == "transformer_lm"
    self.case, self.pair, self.batch, self.dtype, self.xla_conv = case, pair, batch, dtype, xla_conv
    self.tokens_per_example = shape[0] if lm else None
    if lm and case == "on_policy":  # the second half of every row and its last target are sampled
      self.generated_per_example = shape[0] - shape[0] // 2 + 1
    distiller = _distiller(case, pair, dtype, seed, xla_conv)
    host = _host_batch(case, pair, batch, seed)
    state = distiller.init(jax.random.key(seed), host)
    tstate = distiller.teacher_state
    self.batch_arrays = distiller.global_batch(host)
    jitted = distiller.jitted_step("main")
    t0 = time.perf_counter()
    self.compiled = jitted.lower(state, tstate, self.batch_arrays).compile()
    self.compile_seconds = time.perf_counter() - t0
    self.jitted = jitted
    text = self.compiled.as_text() or ""
    # oneDNN custom calls XLA:CPU emitted (0 when --xla_cpu_experimental_onednn_custom_call has no effect)
    self.onednn_custom_calls = text.count("onednn")
    self.ynn_fusions = text.count('"__ynn_fusion"')  # library (YNNPACK) fusions in the step
    flops = _cost_flops(self.compiled if not lm else _plain_twin(case, pair, dtype, seed, xla_conv, host))
    self.gflop_per_image = None if flops is None else flops / batch / 1e9
    self.state, self.teacher = state, tstate
    self.devices = jax.device_count()
    self.backend = jax.default_backend()

  def run(self, steps: int) -> float:
    """Run ``steps`` steps; returns seconds (waits for the device)."""
    import jax

    t0 = time.perf_counter()
    state = self.state
    for _ in range(steps):
      state, metrics = self.compiled(state, self.teacher, self.batch_arrays)
    jax.block_until_ready((state, metrics))
    self.state = state
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- torch reference


def _torch_resnet(nn, F):
  """PyTorch CIFAR ResNet (RepDistiller's resnet8x4/resnet32x4 layout)."""

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.down = (
        nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        if stride != 1 or cin != cout
        else None
      )

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + (x if self.down is None else self.down(x)))

  class CifarResNet(nn.Module):
    def __init__(self, depth, widths, classes):
      super().__init__()
      n = (depth - 2) // 6
      self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
      blocks, cin = [], widths[0]
      for i, w in enumerate(widths[1:]):
        for j in range(n):
          blocks.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
          cin = w
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(cin, classes)

    def forward(self, x):
      return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

  return CifarResNet


def _torch_wide_resnet(nn, F):
  """PyTorch Wide ResNet (wrn_16_2/wrn_40_2)."""

  class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.equal = cin == cout and stride == 1
      self.short = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
      act = F.relu(self.bn1(x))
      out = self.conv2(F.relu(self.bn2(self.conv1(act))))
      return out + (x if self.equal else self.short(act))

  class WideResNet(nn.Module):
    def __init__(self, depth, k, classes):
      super().__init__()
      n = (depth - 4) // 6
      widths = [16, 16 * k, 32 * k, 64 * k]
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      blocks, cin = [], 16
      for i, w in enumerate(widths[1:]):
        for j in range(n):
          blocks.append(WideBlock(cin, w, 2 if i > 0 and j == 0 else 1))
          cin = w
      self.blocks = nn.Sequential(*blocks)
      self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, classes)

    def forward(self, x):
      return self.fc(F.relu(self.bn(self.blocks(self.conv1(x)))).mean((2, 3)))

  return WideResNet


def _torch_cnn1d(nn, F):
  """PyTorch MNIST-1D CNN (kdjax's cnn1d)."""

  class CNN1D(nn.Module):
    def __init__(self, classes=10, ch=25):
      super().__init__()
      self.convs = nn.ModuleList([nn.Conv1d(1, ch, 5, 2, 1), nn.Conv1d(ch, ch, 3, 2, 1), nn.Conv1d(ch, ch, 3, 2, 1)])
      self.fc = nn.Linear(5 * ch, classes)

    def forward(self, x):
      x = x[:, None, :]
      for c in self.convs:
        x = F.relu(c(x))
      return self.fc(x.flatten(1))

  return CNN1D


def _torch_transformer_lm(torch, nn, F):
  """PyTorch GPT decoder with kdjax's transformer_lm blocks: pre-LN, causal attention, tanh-GELU MLP."""

  class Block(nn.Module):
    def __init__(self, d, heads, ratio=4):
      super().__init__()
      self.heads = heads
      self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
      self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.fc1, self.fc2 = nn.Linear(d, ratio * d), nn.Linear(ratio * d, d)

    def forward(self, x):
      b, n, d = x.shape
      q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
      return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

  class TransformerLM(nn.Module):
    def __init__(self, classes, num_layers, dim, num_heads, max_len):
      super().__init__()
      self.tok, self.pos = nn.Embedding(classes, dim), nn.Embedding(max_len, dim)
      self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(num_layers)])
      self.ln_f, self.head = nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, classes, bias=False)

    def forward(self, tokens):
      x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))[None]
      for blk in self.blocks:
        x = blk(x)
      return self.head(self.ln_f(x))

  return TransformerLM


def _torch_models():
  """Small PyTorch versions of the kdjax architectures (NCHW / NCL layouts), by kdjax model name.

  The classes are built here, not at import, because torch is optional (the ``bench`` extra).
  """
  import torch
  import torch.nn.functional as F
  from torch import nn

  resnet, wide_resnet, cnn1d = _torch_resnet(nn, F), _torch_wide_resnet(nn, F), _torch_cnn1d(nn, F)
  transformer_lm = _torch_transformer_lm(torch, nn, F)

  def mlp(classes=10):
    return nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, classes))

  return {
    "resnet32x4": lambda c: resnet(32, (32, 64, 128, 256), c),
    "resnet8x4": lambda c: resnet(8, (32, 64, 128, 256), c),
    "wrn_40_2": lambda c: wide_resnet(40, 2, c),
    "wrn_16_2": lambda c: wide_resnet(16, 2, c),
    "cnn1d": lambda c: cnn1d(c),
    "mlp": mlp,
    "transformer_lm": lambda c, **kw: transformer_lm(c, **kw),
  }, torch


class TorchCase:
  """The loop a PyTorch user would write: eager, teacher in eval + no_grad."""

  def __init__(self, pair: str, batch: int, threads: int = 0, seed: int = 0):
    zoo, torch = _torch_models()
    import torch.nn.functional as F

    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t_name, s_name, shape, classes = PAIRS[pair]
    t_kw, s_kw = PAIR_KWARGS.get(pair, ({}, {}))
    self.case, self.pair, self.batch = "torch_eager_kd", pair, batch
    self.teacher = zoo[t_name](classes, **t_kw).eval()
    self.student = zoo[s_name](classes, **s_kw).train()
    self.lm = t_name == "transformer_lm"
    self.tokens_per_example = shape[0] if self.lm else None
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.opt = torch.optim.SGD(self.student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x_shape = (batch, shape[2], shape[0], shape[1]) if len(shape) == 3 else (batch, *shape)
    if self.lm:  # next-token rows like the kdjax case's
      tokens = torch.randint(0, classes, (batch, shape[0] + 1))
      self.x, self.y = tokens[:, :-1], tokens[:, 1:]
    else:
      self.x = torch.randn(*x_shape)
      self.y = torch.randint(0, classes, (batch,))
    self.torch, self.F = torch, F
    self.compile_seconds = 0.0
    self.gflop_per_image = None
    self.devices, self.backend = 1, f"torch-{torch.__version__}-cpu"
    self.dtype, self.onednn_custom_calls = "float32", None
    self.xla_conv, self.ynn_fusions = None, None

  def step(self):
    torch, F, t = self.torch, self.F, TEMPERATURE
    with torch.no_grad():
      t_logits = self.teacher(self.x)
    s_logits = self.student(self.x)
    if self.lm:  # per-token forward KL at T = 1, mean over tokens (the kdjax case's forward_kl term)
      s_logits, t_logits, t = s_logits.flatten(0, 1), t_logits.flatten(0, 1), 1.0
    ce = F.cross_entropy(s_logits, self.y.flatten())
    kd = (
      F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1), reduction="batchmean", log_target=True)
      * t
      * t
    )
    loss = CE_WEIGHT * ce + KD_WEIGHT * kd
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def run(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = self.step()
    loss.item()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- peak


def matmul_peak(n: int, reps: int, rounds: int) -> dict:
  """Measured dense float32 matmul GFLOP/s (best round) of the default device."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = 0.0
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      c = f(a, b)
    c.block_until_ready()
    best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
  return {
    "case": "matmul_peak",
    "pair": None,
    "n": n,
    "gflops": round(best, 2),
    "devices": jax.device_count(),
    "backend": jax.default_backend(),
  }


# --------------------------------------------------------------------------- main


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def _pair_cases(a, pair: str) -> list:
  """The pair's timed cases; a case that does not apply to it prints a ``skipped`` line instead."""
  cases = []
  for c in a.cases:
    if c in EXTRA_CASES:
      continue
    if c == "generate":
      if pair in PAIR_KWARGS:
        bench_generate(a, pair)
      else:
        print(json.dumps({"case": c, "pair": pair, "skipped": "generation: language-model pairs only"}))
    elif c == "on_policy" and pair not in PAIR_KWARGS:
      print(json.dumps({"case": c, "pair": pair, "skipped": "on-policy distillation: language-model pairs only"}))
    elif c == "torch_eager_kd":
      if _torch_available():
        cases.append(TorchCase(pair, a.batch, a.torch_threads))
      else:
        print(json.dumps({"case": c, "pair": pair, "skipped": "torch is not installed (pip install kdjax[bench])"}))
    else:
      cases += [JaxCase(c, pair, a.batch, d, xla_conv=v) for d in a.dtypes for v in a.xla_convs]
  return cases


def _row(a, pair: str, case, rates: list[float], gflop_per_image: float | None) -> dict:
  """One case's JSON line."""
  ips = statistics.median(rates)
  g = gflop_per_image
  row = {
    "case": case.case,
    "pair": pair,
    "images_per_sec": round(ips, 2),
    "images_per_sec_best": round(max(rates), 2),
    "compile_seconds": round(case.compile_seconds, 3),
    "gflop_per_image": None if g is None else float(f"{g:.4g}"),
    "achieved_gflops": None if g is None else float(f"{g * ips:.4g}"),
    "devices": case.devices,
    "backend": case.backend,
    "batch": a.batch,
    "dtype": case.dtype,
    "xla_cpu": a.xla_cpu,
    "xla_conv": case.xla_conv,
    "ynn_fusions": case.ynn_fusions,
    "onednn_custom_calls": case.onednn_custom_calls,
  }
  if isinstance(case, TorchCase):  # beside JAX in this process (torch_eager_kd_process: a process of its own)
    row["torch_in_process"] = True
  if getattr(case, "tokens_per_example", None):  # language models: an "image" is one sequence
    row["tokens_per_sec"] = round(ips * case.tokens_per_example, 1)
  if getattr(case, "generated_per_example", None):  # on-policy: sampled, scored and trained on per second
    row["generated_tokens_per_sec"] = round(ips * case.generated_per_example, 1)
  return row


def _time_cases(a, pair: str, cases: list) -> None:
  """Warm up, time the cases in interleaved rounds, and print one line per case."""
  for case in cases:
    case.run(a.warmup) if a.warmup else None
  rates = {id(c): [] for c in cases}
  for _ in range(a.rounds):
    for case in cases:
      rates[id(case)].append(a.steps * a.batch / case.run(a.steps))
  flops_kd = {
    c.case: c.gflop_per_image
    for c in cases
    if isinstance(c, JaxCase) and c.dtype == "float32" and c.xla_conv == a.xla_convs[0]
  }
  for case in cases:
    # torch runs the same computation as the kdjax online-KD step: count its work with XLA's figure.
    g = case.gflop_per_image if case.gflop_per_image is not None else flops_kd.get("kd")
    print(json.dumps(_row(a, pair, case, rates[id(case)], g)), flush=True)


def main(argv=None) -> int:
  a = parse_args(argv)
  flags = XLA_CPU_OPTIONS[a.xla_cpu]
  if flags:  # read by XLA when the backend starts: a no-op if JAX already ran in this process
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
  peak = matmul_peak(256 if a.quick else 2048, 2 if a.quick else 5, 1 if a.quick else a.rounds)
  peak.update(xla_cpu=a.xla_cpu, load_avg_1min=round(os.getloadavg()[0], 2), cpu_count=os.cpu_count())
  print(json.dumps(peak), flush=True)
  if "input" in a.cases:
    bench_input(a)
  if "fused_memory" in a.cases:
    bench_fused_memory(a)
  if "cache_codec" in a.cases:
    from kdjax.bench_cache import bench_cache_codec

    bench_cache_codec(rows=256 if a.quick else 2048, rounds=a.rounds)
  if "bf16_curve" in a.cases:
    from kdjax.bench_bf16 import bench_bf16_curve

    bench_bf16_curve(quick=a.quick)
  _released_cases(a)
  for pair in a.pairs:
    _time_cases(a, pair, _pair_cases(a, pair))
    if "torch_eager_kd_process" in a.cases:
      from kdjax.bench_lm import bench_torch_process

      bench_torch_process(a, pair, peak["gflops"])
  return 0


def _released_cases(a) -> None:
  """The opt-in cases at a released model's shapes (:mod:`kdjax.bench_released`)."""
  from kdjax import bench_released

  if "generate_hf" in a.cases:
    bench_released.bench_generate_hf(a)
  if "released_kd" in a.cases:
    bench_released.bench_released_kd(a)


if __name__ == "__main__":
  sys.exit(main())
