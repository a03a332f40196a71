"""Packed top-k rows: quantised log-probabilities and delta-coded ids, ~1.6 bytes per entry.

A top-k teacher distribution is k log-probabilities a_j ≤ 0 at distinct
token ids i_j. Stored as float16 + uint16 it costs 4 bytes an entry (256 B
per token at k = 64), and ids need 18 bits past V = 65,536. A packed row
(``CacheSpec(encoding="packed")``) stores the same entries in a
variable-length, byte-aligned record:

  header (5 bytes): M (uint16, the row's smallest log-prob as a level
    n = round(−a / s)), the teacher's top-k mass (float16: the tail
    1 − Σ exp(a_j) when it is ≤ 1/2, else −Σ exp(a_j)), and the two
    exp-Golomb orders (4 bits each);
  then, with the entries sorted by id, a bit stream of
    the ids as gaps g_j = i_j − i_{j−1} − 1 (g_1 = i_1) and the levels as
    heights h_j = M − n_j, each in an order-κ exp-Golomb code
    (x = v + 2^κ written as ⌊log2 x⌋ − κ zeros, a one, and the low
    ⌊log2 x⌋ bits of x), κ chosen per row and stream to minimise its length;
    the unary prefixes of all 2k codes first, then their payloads, so a
    decoder finds every field with array operations (:func:`unpack_rows`).

Ids come back exact. Log-probabilities come back on the grid of step
s = :data:`LOGP_STEP` (1/32 nat), shifted by one constant per row so that the
k probabilities again sum to the stored top-k mass — the teacher's tail
mass, which the top-k losses read as 1 − Σ exp(a_j), is kept to float16
precision instead of absorbing the rounding of all k entries. The error
bound (tested) is

  |â_j − a_j| ≤ s/2 (rounding) + s/2 (the row's shift) + 2^−10 = s + 2^−10 ≈ 0.0322 nat

for log-probs above −2047 nat (lower ones are stored as −2047) when the top-k mass is ≥ 2^−14
(float16's normal range). Entries come back sorted by decreasing decoded
log-prob, ties by id (their order in the original row when the rounding
kept them apart).

Size: the levels take ~5.5–7 bits each (their spread below the row's top
thins out geometrically in a Zipf-like spectrum), the ids ≈ log2 of the
mean gap + 2 bits each, so the size depends on where the ids lie: k = 128 at
V = 151,936 measured 198 B per token when the top-k ids follow a
frequency-ordered vocabulary (a Zipf prior over ids, as byte-pair
vocabularies are ordered) and 284 B when they are uniform over the
vocabulary, where choosing 128 ids alone takes ≥ 186 B (``results/bench.md``).
A cache records what it stores in ``cache.json`` (``bytes_per_token``).

Decoding runs on the host, in the input pipeline: there the NumPy decoder
was 4.2–6.7× the same decoder jitted with JAX (``kdjax bench --cases
cache_codec``, CPU; ~30,000 rows/s at k = 128 on one shared core).
"""

from __future__ import annotations

import numpy as np

LOGP_STEP = 1.0 / 32  # s: log-probs are stored as multiples of s nat
LOGP_BOUND = LOGP_STEP + 2.0**-10  # max |decoded − true| log-prob (see the module docstring)
MAX_LEVEL = 65535  # levels are uint16: log-probs below −MAX_LEVEL·s are stored at −MAX_LEVEL·s
HEADER_BYTES = 5
_MAX_ORDER = 15  # κ fits in 4 bits


def _exp_golomb_sizes(v: np.ndarray) -> np.ndarray:
  """Bits of ``v`` (R, k) ≥ 0 in an order-κ exp-Golomb code, each κ in 0…15: ``(R, 16)``.

  A value costs 2·e − 1 − κ bits, e the bit length of x = v + 2^κ (``frexp``'s exponent).
  """
  kappa = np.arange(_MAX_ORDER + 1, dtype=np.int64)
  e = np.frexp((v[:, None, :] + (np.int64(1) << kappa)[None, :, None]).astype(np.float64))[1]  # (R, 16, k)
  return 2 * e.sum(-1, dtype=np.int64) - v.shape[-1] * (1 + kappa)


def _exp_golomb_fields(v: np.ndarray, kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Order-κ (one per row) exp-Golomb codes of ``v`` (R, k): unary widths, payload values and widths."""
  x = v + (np.int64(1) << kappa[:, None])
  bits = np.floor(np.log2(x.astype(np.float64))).astype(np.int64)  # ⌊log2 x⌋ (exact below 2^52)
  return bits - kappa[:, None] + 1, x - (np.int64(1) << bits), bits


def _row_fields(logp: np.ndarray, idx: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
  """Every field of each row, in stream order: values and bit widths, ``(R, 3 + 4k)`` int64 each."""
  order = np.argsort(idx, axis=-1, kind="stable")
  ids = np.take_along_axis(idx.astype(np.int64), order, -1)
  lp = np.take_along_axis(logp.astype(np.float64), order, -1)
  level = np.clip(np.rint(-lp / step), 0, MAX_LEVEL).astype(np.int64)
  bottom = level.max(-1)
  mass = np.exp(lp).sum(-1)
  tail = np.where(mass >= 0.5, np.clip(1.0 - mass, 0.0, None), -mass).astype(">f2").view(">u2").astype(np.int64)
  gaps = np.diff(ids, axis=-1, prepend=-1) - 1
  heights = bottom[:, None] - level
  k_id, k_lp = (np.argmin(_exp_golomb_sizes(v), axis=-1) for v in (gaps, heights))
  u_id, p_id, w_id = _exp_golomb_fields(gaps, k_id)
  u_lp, p_lp, w_lp = _exp_golomb_fields(heights, k_lp)
  ones = np.ones_like(u_id)
  header_v = np.stack([bottom, tail, k_id << 4 | k_lp], -1)
  header_w = np.broadcast_to(np.array([16, 16, 8]), header_v.shape)
  values = np.concatenate([header_v, ones, ones, p_id, p_lp], -1)
  widths = np.concatenate([header_w, u_id, u_lp, w_id, w_lp], -1)
  return values, widths


def pack_rows(logp: np.ndarray, idx: np.ndarray, step: float = LOGP_STEP) -> tuple[np.ndarray, np.ndarray]:
  """Top-k rows → packed bytes.

  Args:
    logp: ``(R, k)`` log-probabilities ≤ 0 (any float dtype, any order).
    idx: ``(R, k)`` distinct int ids per row, ``0 ≤ id < 2^31``.
    step: s, the log-prob grid.

  Returns:
    ``(data, nbytes)``: the rows' records concatenated, uint8 ``(Σ nbytes,)``, and each row's
    length, uint16 ``(R,)``.
  """
  values, widths = _row_fields(np.asarray(logp), np.asarray(idx), step)
  row_bits = widths.sum(-1)
  row_bytes = -(-row_bits // 8)
  row_start = 8 * (np.cumsum(row_bytes) - row_bytes)
  starts = (row_start[:, None] + np.cumsum(widths, -1) - widths).ravel()
  values, widths = values.ravel(), widths.ravel()
  bits = np.zeros(8 * int(row_bytes.sum()), np.uint8)
  for t in range(int(widths.max(initial=0))):  # bit t of every field at once (MSB first)
    m = t < widths
    bits[starts[m] + t] = (values[m] >> (widths[m] - 1 - t)) & 1
  return np.packbits(bits), row_bytes.astype(np.uint16)


def _read_bits(data: np.ndarray, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
  """The ``width``-bit (≤ 25) big-endian numbers at bit offsets ``pos`` of ``data`` (uint8, padded by 4 bytes)."""
  d = data.astype(np.uint32)
  words = d[:-3] << 24 | d[1:-2] << 16 | d[2:-1] << 8 | d[3:]  # the 4 bytes from each offset, big-endian
  word = words[pos >> 3].astype(np.int64)
  return (word >> (32 - (pos & 7) - width)) & ((np.int64(1) << width) - 1)


def _header(data: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, ...]:
  """Each row's bottom level, top-k mass (float64) and exp-Golomb orders: ``(R,)`` each."""
  h = data[starts[:, None] + np.arange(HEADER_BYTES)].astype(np.int64)
  bottom = h[:, 0] << 8 | h[:, 1]
  tail = (h[:, 2] << 8 | h[:, 3]).astype(">u2").view(">f2").astype(np.float64)
  mass = np.where(np.signbit(tail), -tail, 1.0 - tail)
  return bottom, mass, h[:, 4] >> 4, h[:, 4] & 15


def unpack_rows(
  data: np.ndarray, starts: np.ndarray, k: int, step: float = LOGP_STEP, renormalise: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Packed rows → top-k log-probabilities and ids, by decreasing log-prob (ties by id).

  Args:
    data: uint8 bytes holding the rows (:func:`pack_rows`).
    starts: ``(R,)`` byte offset of each row in ``data``.
    k: entries per row.
    step: the grid the rows were packed on.
    renormalise: shift each row so its probabilities sum to the stored top-k mass (as stored rows are
      read); ``False`` leaves the rounded grid values (the bound is then s/2).

  Returns:
    ``(logp, ids)``: float32 and int32 ``(R, k)``.
  """
  data = np.concatenate([np.asarray(data, np.uint8), np.zeros(4, np.uint8)])
  starts = np.asarray(starts, np.int64)
  bottom, mass, k_id, k_lp = _header(data, starts)
  bit0 = 8 * (starts + HEADER_BYTES)
  ones = np.flatnonzero(np.unpackbits(data[:-4]).view(bool))  # a bool view: NumPy's fast nonzero
  first = np.searchsorted(ones, bit0)
  pos = ones[first[:, None] + np.arange(2 * k)]  # the 2k unary terminators of each row
  unary = np.diff(pos, axis=-1, prepend=(bit0 - 1)[:, None])  # ⌊log2 x⌋ − κ + 1 per code
  kappa = np.concatenate([np.repeat(k_id[:, None], k, 1), np.repeat(k_lp[:, None], k, 1)], -1)
  width = unary - 1 + kappa
  offset = pos[:, -1:] + 1 + np.cumsum(width, -1) - width
  v = _read_bits(data, offset, width) + (np.int64(1) << width) - (np.int64(1) << kappa)
  ids = np.cumsum(v[:, :k] + 1, -1) - 1
  logp = -(bottom[:, None] - v[:, k:]) * step
  if renormalise:
    got = np.log(np.exp(logp).sum(-1))
    logp = logp + np.where(mass > 0, np.log(np.maximum(mass, 1e-300)) - got, 0.0)[:, None]
  # decreasing log-prob = decreasing height; a stable sort of uint16 keys is a radix sort, ties stay in id order
  order = np.argsort((MAX_LEVEL - v[:, k:]).astype(np.uint16), axis=-1, kind="stable")
  return np.take_along_axis(logp, order, -1).astype(np.float32), np.take_along_axis(ids, order, -1).astype(np.int32)
