"""The packed top-k cache's codec benchmark: ``kdjax bench --cases cache_codec`` (no pair).

For k in {64, 128} at V = 151,936 (Qwen 2.5's vocabulary) and two kinds of
teacher rows — softmaxes of random logits with a Zipf spectrum over a
frequency-ordered vocabulary (``zipf``: logit −log(id + 1) plus N(0, 1.5²)
noise, as byte-pair vocabularies are ordered) and with ids uniform over the
vocabulary (``uniform``: N(0, 1.5²) logits, the worst case for the id
gaps) — it prints one JSON line per (kind, k) with

  bytes_per_token       packed bytes per distribution (mean; ``_max`` the largest row) beside
                        ``plain_bytes_per_token`` (float16 log-probs + int32 ids: V > 65,536)
  encode_rows_per_sec   :func:`kdjax.data.cache.packed.pack_rows` (host, NumPy)
  decode_rows_per_sec   :func:`~kdjax.data.cache.packed.unpack_rows` on the host (NumPy), what the
                        input pipeline runs
  device_decode_rows_per_sec  the same decoder in JAX, jitted on the default device, the packed bytes
                        copied there first (the alternative: decoding inside the step)
  max_logp_error        max |decoded − true| log-prob (≤ ``LOGP_BOUND``)
  fkl_error, rkl_error  |Δ| of the top-k forward / reverse KL (mean over tokens) against the exact
                        rows, for a random student, on the first 64 rows

The three codec timings are interleaved round by round (median of ``--rounds``) over 2048 rows
(256 with ``--quick``): a batch of 2 × 1024 tokens.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

VOCAB = 151936
TOP_KS = (64, 128)
KINDS = ("zipf", "uniform")


def teacher_rows(kind: str, rows: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Top-k log-probs (decreasing) and ids of ``rows`` softmaxes over V random logits, ``(rows, k)`` each."""
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)
  prior = -np.log(np.arange(VOCAB, dtype=np.float32) + 1) if kind == "zipf" else np.zeros(VOCAB, np.float32)
  lps, ids = [], []
  for lo in range(0, rows, 256):
    z = prior + 1.5 * rng.standard_normal((min(256, rows - lo), VOCAB), np.float32)
    lp, idx = jax.lax.top_k(jax.nn.log_softmax(jnp.asarray(z)), k)
    lps.append(np.asarray(lp, np.float64))
    ids.append(np.asarray(idx))
  return np.concatenate(lps), np.concatenate(ids)


def device_unpack(k: int, step: float):
  """:func:`~kdjax.data.cache.packed.unpack_rows` in JAX (int32, float32), jitted: ``(data, starts) →
  (logp, ids)`` with ``data`` uint8 padded by 4 bytes. The j-th unary terminator of a row is found
  with a prefix count of ones and a binary search instead of NumPy's ``flatnonzero``."""
  import jax
  import jax.numpy as jnp

  from kdjax.data.cache.packed import HEADER_BYTES

  def unpack(data, starts):
    d = data.astype(jnp.int32)
    h = d[starts[:, None] + jnp.arange(HEADER_BYTES)]
    bottom = h[:, 0] << 8 | h[:, 1]
    tail = jax.lax.bitcast_convert_type((h[:, 2] << 8 | h[:, 3]).astype(jnp.uint16), jnp.float16)
    tail = tail.astype(jnp.float32)
    mass = jnp.where(jnp.signbit(tail), -tail, 1.0 - tail)
    count = jnp.cumsum(jnp.unpackbits(data), dtype=jnp.int32)
    bit0 = 8 * (starts + HEADER_BYTES)
    pos = jnp.searchsorted(count, count[bit0 - 1][:, None] + jnp.arange(1, 2 * k + 1), side="left")
    unary = jnp.diff(pos, axis=-1, prepend=(bit0 - 1)[:, None])
    kappa = jnp.concatenate([jnp.repeat(h[:, 4:5] >> 4, k, 1), jnp.repeat(h[:, 4:5] & 15, k, 1)], -1)
    width = unary - 1 + kappa
    off = pos[:, -1:] + 1 + jnp.cumsum(width, -1) - width
    b = off >> 3
    word = (d[b] << 24) | (d[b + 1] << 16) | (d[b + 2] << 8) | d[b + 3]
    v = ((word >> (32 - (off & 7) - width)) & ((1 << width) - 1)) + (1 << width) - (1 << kappa)
    ids = jnp.cumsum(v[:, :k] + 1, -1) - 1
    logp = -(bottom[:, None] - v[:, k:]).astype(jnp.float32) * step
    logp = logp + (jnp.log(mass) - jax.nn.logsumexp(logp, axis=-1))[:, None]
    order = jnp.argsort(-logp, axis=-1, stable=True)
    return jnp.take_along_axis(logp, order, -1), jnp.take_along_axis(ids, order, -1)

  return jax.jit(unpack)


def _kl_errors(lp, idx, got_lp, got_idx, rows: int = 64) -> tuple[float, float]:
  """|Δ| of the top-k forward and reverse KL for a random student, over the first ``rows`` rows."""
  import jax.numpy as jnp

  from kdjax import losses as kdl

  student = jnp.asarray(np.random.default_rng(1).standard_normal((1, rows, VOCAB), np.float32) * 2)
  out = []
  for fn in (kdl.topk_forward_kl, kdl.topk_reverse_kl):
    exact = fn(student, jnp.asarray(lp[None, :rows], jnp.float32), jnp.asarray(idx[None, :rows]))
    quantised = fn(student, jnp.asarray(got_lp[None, :rows]), jnp.asarray(got_idx[None, :rows]))
    out.append(float(abs(quantised - exact)))
  return out[0], out[1]


def _timed(fn, rounds: int) -> list[float]:
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def bench_case(kind: str, lp: np.ndarray, idx: np.ndarray, rounds: int) -> dict:
  """One JSON line: sizes, errors and codec throughput for top-k rows ``lp``, ``idx`` ``(rows, k)``."""
  import jax

  from kdjax.data.cache import packed

  rows, k = lp.shape
  data, nbytes = packed.pack_rows(lp, idx)
  starts = np.cumsum(nbytes.astype(np.int64)) - nbytes
  got_lp, got_idx = packed.unpack_rows(data, starts, k)
  order = np.argsort(idx, -1), np.argsort(got_idx, -1)
  err = np.abs(np.take_along_axis(lp, order[0], -1) - np.take_along_axis(got_lp, order[1], -1)).max()
  dev = device_unpack(k, packed.LOGP_STEP)
  padded = np.concatenate([data, np.zeros(4, np.uint8)])
  dev_args = lambda: (jax.device_put(padded), jax.device_put(starts.astype(np.int32)))  # noqa: E731
  d_lp, d_idx = jax.block_until_ready(dev(*dev_args()))  # compiled once, then checked against the host
  np.testing.assert_array_equal(np.sort(np.asarray(d_idx), -1), np.sort(got_idx, -1))
  np.testing.assert_allclose(np.sort(np.asarray(d_lp), -1), np.sort(got_lp, -1), atol=1e-5)
  enc, dec, ddec = [], [], []
  for _ in range(rounds):  # interleaved: a load spike hits all three alike
    enc += _timed(lambda: packed.pack_rows(lp, idx), 1)
    dec += _timed(lambda: packed.unpack_rows(data, starts, k), 1)
    ddec += _timed(lambda: jax.block_until_ready(dev(*dev_args())), 1)
  fkl, rkl = _kl_errors(lp, idx, got_lp, got_idx)
  return {
    "case": "cache_codec",
    "kind": kind,
    "vocab": VOCAB,
    "top_k": k,
    "rows": rows,
    "bytes_per_token": round(float(nbytes.mean()), 1),
    "bytes_per_token_max": int(nbytes.max()),
    "plain_bytes_per_token": k * 6,
    "encode_rows_per_sec": round(rows / statistics.median(enc)),
    "decode_rows_per_sec": round(rows / statistics.median(dec)),
    "device_decode_rows_per_sec": round(rows / statistics.median(ddec)),
    "device": jax.devices()[0].platform,
    "max_logp_error": round(float(err), 4),
    "logp_bound": round(packed.LOGP_BOUND, 4),
    "fkl_error": float(f"{fkl:.2g}"),
    "rkl_error": float(f"{rkl:.2g}"),
  }


def bench_cache_codec(rows: int = 2048, rounds: int = 3) -> None:
  """Print one line per (kind, k)."""
  for kind in KINDS:
    lp, idx = teacher_rows(kind, rows, max(TOP_KS))  # the top-64 rows are the first 64 of the top-128
    for k in TOP_KS:
      print(json.dumps(bench_case(kind, lp[:, :k], idx[:, :k], rounds)), flush=True)
