"""Pretrained decoder-only language models in Flax NNX: the Llama and GPT-2 families.

One :class:`Decoder` covers the layouts of today's small open models, set by
a :class:`DecoderConfig` (built from a Hugging Face ``config.json`` by
:func:`kdjax.models.pretrained.from_pretrained`):

* Llama style (``llama``, ``mistral``, ``qwen2``, ``qwen3``): pre-RMSNorm
  blocks, rotary position embedding (RoPE, halves rotated; ``default``,
  ``linear`` and ``llama3`` frequency scaling), grouped-query attention
  (``kv_heads`` ≤ ``heads``), optional q/k/v biases (Qwen 2) and per-head
  RMSNorm of queries and keys (Qwen 3), SwiGLU MLP ``down(silu(gate(x)) ·
  up(x))``, untied or tied head.
* Gemma 2 / Gemma 3 (``gemma2``, ``gemma3_text``): as Llama, plus the token
  embedding scaled by √hidden, RMSNorm weights as offsets ``(1 + w)``, a norm
  after attention and around the MLP (four per block), tanh-GELU gating,
  queries scaled by ``query_pre_attn_scalar^-½``, sliding-window layers
  alternating with global ones, tanh soft-capping of attention scores and
  final logits (Gemma 2), per-head q/k norms and a separate RoPE base for the
  local layers (Gemma 3); tied head.
* GPT-2 (``gpt2``): learned positions, pre-LayerNorm blocks, tanh-GELU MLP,
  biases everywhere, head tied to the token embedding.

Input ``(B, L)`` int tokens; ``ModelOutput(logits (B, L, V), features)`` with
``embed``, ``block{i}`` (the residual stream after block i) and ``pooled``
(the final norm's output), and the unapplied head (``ModelOutput.head``, a
:class:`kdjax.losses.TokenHead`, tied embeddings included) for the fused token
losses. Generation (:mod:`kdjax.generate`) uses ``init_cache`` / ``decode``
like the zoo transformer; ``PARTITION_RULES`` split it tensor-parallel (:mod:`kdjax.parallel.partition`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.losses.fused import TokenHead
from kdjax.models.base import ModelOutput
from kdjax.models.probe import Probe
from kdjax.models import remat as remat_lib

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a :class:`Decoder` (names follow Hugging Face's where they exist)."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_positions: int
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, float | str], ...] = ()  # (key, value) pairs of HF's rope parameters
  # Gemma: sliding-window layers ("sliding") alternate with global ones ("full"); 0: every layer global.
  sliding_window: int = 0
  layer_types: tuple[str, ...] = ()
  local_rope_theta: float = 0.0  # RoPE base of the sliding layers (Gemma 3); 0: as the global layers
  local_rope_scaling: tuple[tuple[str, float | str], ...] = ()
  query_scale: float = 0.0  # attention scores × this (0: 1/√head_dim)
  attn_softcap: float = 0.0  # s ↦ c·tanh(s/c) on attention scores (0: off)
  final_softcap: float = 0.0  # the same on the logits
  # Logits over the first output_vocab token ids only (0: all vocab_size). A checkpoint whose embedding
  # is padded past its tokenizer (to a multiple of 64 or 128) then scores exactly a student's vocabulary
  # of that tokenizer: the padding ids get no probability, are never generated and never cached.
  output_vocab: int = 0

  @property
  def gpt2(self) -> bool:
    return self.family == "gpt2"

  @property
  def gemma(self) -> bool:
    return self.family.startswith("gemma")

  def sliding(self, layer: int) -> bool:
    return bool(self.sliding_window) and bool(self.layer_types) and self.layer_types[layer] == "sliding"


class RMSNorm(nnx.Module):
  """``w · x / √(mean(x²) + ε)`` in float32 (Zhang & Sennrich 2019, as Llama uses it); with ``offset``
  the weight is ``1 + w``, multiplied before the cast back (as Gemma uses it)."""

  def __init__(self, dim: int, eps: float, *, offset: bool = False, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32) if offset else jnp.ones((dim,), jnp.float32))
    self.eps, self.offset, self.dtype = eps, offset, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)  # parameters may be held in bfloat16
    if self.offset:
      return (y * (1.0 + w)).astype(self.dtype)
    return w.astype(self.dtype) * y.astype(self.dtype)


def layer_rope(cfg: DecoderConfig, sliding: bool) -> DecoderConfig:
  """The config whose ``rope_theta`` / ``rope_scaling`` a layer uses: the local ones on Gemma 3's sliding layers."""
  if sliding and cfg.local_rope_theta:
    return dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_scaling=cfg.local_rope_scaling)
  return cfg


def rope_frequencies(cfg: DecoderConfig) -> jax.Array:
  """Inverse frequencies ``(head_dim / 2,)`` of RoPE (Su et al. 2021) with the config's scaling:
  ``linear`` divides them by ``factor``; ``llama3`` (Llama 3.1) divides the low ones by ``factor`` and
  interpolates between ``low_freq_factor`` and ``high_freq_factor`` wavelengths; ``yarn``: :func:`yarn`."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  s = dict(cfg.rope_scaling)
  kind = s.get("rope_type", "default")
  if kind == "linear":
    return inv / float(s["factor"])
  if kind == "llama3":
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return jnp.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  if kind == "yarn":
    return yarn(inv, s, cfg)
  if kind != "default":
    raise ConfigError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3, yarn)")
  return inv


def yarn(inv: jax.Array, s: dict, cfg: DecoderConfig) -> jax.Array:
  """YaRN's frequencies (Peng, Quesnelle, Fan & Shippole 2023, "YaRN: Efficient Context Window Extension"):
  dimension i keeps its frequency (extrapolation) when it turns more than ``beta_fast`` times over the
  original context L₀, is divided by ``factor`` (interpolation) below ``beta_slow`` turns, and blends
  linearly between; the turn count r ↦ dimension is ``d · ln(L₀ / 2πr) / (2 ln θ)``, rounded outward.
  The cos/sin gain is :func:`rope_score_gain`."""
  d, theta = cfg.head_dim, cfg.rope_theta
  old = float(s["original_max_position_embeddings"])
  factor = float(s.get("factor") or cfg.max_positions / old)
  dim_of = lambda turns: d * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
  lo, hi = dim_of(float(s.get("beta_fast") or 32)), dim_of(float(s.get("beta_slow") or 1))
  if s.get("truncate", True):
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, d - 1)
  hi = hi + 0.001 if lo == hi else hi
  keep = 1 - jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - lo) / (hi - lo), 0, 1)
  return inv / factor * (1 - keep) + inv * keep


def rope_score_gain(cfg: DecoderConfig) -> float:
  """What RoPE scaling multiplies attention scores by: YaRN scales cos and sin (so q and k) by its
  attention factor a = 0.1 · ln(factor) + 1 (or ``attention_factor``, or DeepSeek's mscale ratio), the
  scores by a²; 1 for every other scaling."""
  s = dict(cfg.rope_scaling)
  if s.get("rope_type") != "yarn":
    return 1.0
  factor = float(s.get("factor") or cfg.max_positions / float(s["original_max_position_embeddings"]))
  m = lambda scale, k=1.0: 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0  # noqa: E731
  a = s.get("attention_factor")
  if a is None:
    ms, ms_all = s.get("mscale"), s.get("mscale_all_dim")
    a = m(factor, float(ms)) / m(factor, float(ms_all)) if ms and ms_all else m(factor)
  return float(a) ** 2


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate ``x`` ``(B, T, H, D)`` by angle ``position · inv_freq``, halves paired (``x[:D/2]`` with ``x[D/2:]``)."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """``cap · tanh(x / cap)`` (Gemma 2's soft-capping); ``cap = 0`` leaves ``x``."""
  return cap * jnp.tanh(x / cap) if cap else x


def attend(
  q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, scale: float = 0.0, cap: float = 0.0, probe=None
) -> jax.Array:
  """Softmax attention of ``q`` ``(B, T, H, D)`` over ``k``/``v`` ``(B, S, K, D)`` (K divides H: grouped-query),
  where ``visible`` ``(B, T, S)``; scores scaled by ``scale`` (default 1/√D) and soft-capped at ``cap``,
  softmax in float32. ``probe`` (a :class:`~kdjax.models.probe.Probe`) sees the probabilities ``(B, H, T, S)``
  in float32 (head h reads key/value head h // (H/K), as Hugging Face's ``repeat_kv``). Returns ``(B, T, H·D)``."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, h // kh, d)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * (scale or 1.0 / math.sqrt(d))
  s = jnp.where(visible[:, None, None], softcap(s, cap), jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  if probe is not None:
    p = probe(p.reshape(b, h, t, -1)).reshape(p.shape)
  p = p.astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h * d)


def _linear(i: int, o: int, bias: bool, dtype, rngs) -> nnx.Linear:
  return nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head (grouped-query) attention; its probes name for the taps the attention probabilities ``probs``
  ``(B, H, L, L)`` and the ``queries`` ``(B, L, H, D)``, ``keys`` and ``values`` ``(B, L, K, D)`` (after the
  projections and q/k norms, before RoPE)."""

  def __init__(self, cfg: DecoderConfig, layer: int, *, dtype, rngs: nnx.Rngs):
    h, kv, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    self.cfg, self.window = cfg, cfg.sliding_window if cfg.sliding(layer) else 0
    self.q = _linear(e, h * d, cfg.qkv_bias, dtype, rngs)
    self.k = _linear(e, kv * d, cfg.qkv_bias, dtype, rngs)
    self.v = _linear(e, kv * d, cfg.qkv_bias, dtype, rngs)
    self.o = _linear(h * d, e, cfg.out_bias, dtype, rngs)
    self.q_norm = RMSNorm(d, cfg.norm_eps, offset=cfg.gemma, dtype=dtype) if cfg.qk_norm else None
    self.k_norm = RMSNorm(d, cfg.norm_eps, offset=cfg.gemma, dtype=dtype) if cfg.qk_norm else None
    gain = 1.0 if cfg.gpt2 else rope_score_gain(layer_rope(cfg, cfg.sliding(layer)))
    self.score_scale = (cfg.query_scale or 1.0 / math.sqrt(d)) * gain
    self.probs, self.queries, self.keys, self.values = Probe(), Probe(), Probe(), Probe()

  def __call__(self, x: jax.Array, positions: jax.Array, inv_freq, cache: dict | None, segments=None):
    cfg, (b, t, _) = self.cfg, x.shape
    q = self.q(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = self.queries(q), self.keys(k), self.values(v)
    if inv_freq is not None:
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is None:
      key_pos = positions[:, None, :]
    else:  # write this step's keys/values at their positions, attend to every filled slot up to each query
      rows = jnp.arange(b)[:, None]
      cache = {
        "k": cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype)),
        "v": cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype)),
      }
      k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
      key_pos = jnp.arange(k.shape[1])[None, None, :]
    visible = key_pos <= positions[:, :, None]
    if self.window:  # a sliding layer sees the last `window` positions only
      visible &= key_pos > positions[:, :, None] - self.window
    if segments is not None:  # packed rows: each example attends within itself (positions restart in each)
      visible &= segments[:, :, None] == segments[:, None, :]
    return self.o(attend(q, k, v, visible, self.score_scale, cfg.attn_softcap, self.probs)), cache


def _norm(cfg: DecoderConfig, dtype, rngs) -> nnx.Module:
  if cfg.gpt2:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
  return RMSNorm(cfg.hidden_size, cfg.norm_eps, offset=cfg.gemma, dtype=dtype)


class Block(nnx.Module):
  def __init__(self, cfg: DecoderConfig, layer: int, *, dtype, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    self.gpt2, self.gemma, self.sliding = cfg.gpt2, cfg.gemma, cfg.sliding(layer)
    self.attn_norm, self.mlp_norm = _norm(cfg, dtype, rngs), _norm(cfg, dtype, rngs)
    self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
    # Gemma's sandwich: a norm on the attention output and on the MLP output too.
    self.post_attn_norm = _norm(cfg, dtype, rngs) if cfg.gemma else None
    self.post_mlp_norm = _norm(cfg, dtype, rngs) if cfg.gemma else None
    self.gate = None if cfg.gpt2 else _linear(e, m, cfg.mlp_bias, dtype, rngs)
    self.up = _linear(e, m, cfg.mlp_bias, dtype, rngs)
    self.down = _linear(m, e, cfg.mlp_bias, dtype, rngs)

  def _mlp(self, h):
    if self.gpt2:
      return self.down(jax.nn.gelu(self.up(h), approximate=True))
    act = (lambda z: jax.nn.gelu(z, approximate=True)) if self.gemma else jax.nn.silu
    return self.down(act(self.gate(h)) * self.up(h))

  def __call__(self, x, positions, rope, cache=None, segments=None):
    inv_freq = rope[1] if self.sliding else rope[0]
    a, cache = self.attn(self.attn_norm(x), positions, inv_freq, cache, segments)
    x = x + (a if self.post_attn_norm is None else self.post_attn_norm(a))
    h = self._mlp(self.mlp_norm(x))
    return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h)), cache


class Decoder(nnx.Module):
  """A pretrained decoder-only LM (Llama, Mistral, Qwen, Gemma or GPT-2 family); see the module docstring."""

  input_dtype = jnp.int32
  PARTITION_RULES = (
    (r"blocks\.\d+\.attn\.[qkv]\.kernel", ("embed", "heads")),
    (r"blocks\.\d+\.attn\.[qkv]\.bias", ("heads",)),
    (r"blocks\.\d+\.attn\.o\.kernel", ("heads", "embed")),
    (r"blocks\.\d+\.down\.kernel", ("mlp", "embed")),
    (r"blocks\.\d+\.(attn\.o|down)\.bias", ("embed",)),
    (r"embed\.embedding", ("vocab", "embed")),
    (r"pos\.embedding", (None, "embed")),
    (r"head\.kernel", ("embed", "vocab")),
  )

  def __init__(
    self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, name: str | None = None, remat: str = "none"
  ):
    if cfg.family not in FAMILIES:
      raise ConfigError(f"decoder family {cfg.family!r} is not supported (supported: {', '.join(FAMILIES)})")
    self.cfg, self.compute_dtype = cfg, dtype
    self.remat = remat_lib.check_policy(remat)  # the blocks' rematerialisation policy (kdjax.models.remat)
    self.model_name = name or cfg.family
    if not 0 <= cfg.output_vocab <= cfg.vocab_size:
      raise ConfigError(f"output_vocab={cfg.output_vocab} must lie in [1, vocab_size={cfg.vocab_size}] (0: all)")
    self.num_classes = cfg.output_vocab or cfg.vocab_size
    self.max_len, self.input_shape = cfg.max_positions, (cfg.max_positions,)
    emb = lambda n: nnx.Embed(n, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)  # noqa: E731
    self.embed = emb(cfg.vocab_size)
    self.pos = emb(cfg.max_positions) if cfg.gpt2 else None
    self.blocks = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
    self.norm = _norm(cfg, dtype, rngs)
    self.head = None if cfg.tie_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)

  @property
  def vocab_major_logits(self) -> bool:
    """:meth:`decode`'s logits are the transpose of a ``(V, B·T)`` product (the tied head as E·xᵀ), which
    :func:`kdjax.generate.generate` reads without transposing them back."""
    return self.head is None

  def _inv_freq(self) -> tuple:
    """RoPE inverse frequencies of the global and the sliding layers (None, None for GPT-2)."""
    cfg = self.cfg
    if cfg.gpt2:
      return None, None
    return rope_frequencies(cfg), rope_frequencies(layer_rope(cfg, sliding=True))

  def _embed(self, tokens, positions):
    x = self.embed(tokens)
    if self.cfg.gemma:  # √hidden, rounded to the compute dtype first as Gemma does
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), x.dtype)
    return x + self.pos(positions) if self.pos is not None else x

  def _logits(self, x, decoding: bool = False):
    if self.head is not None:
      z = self.head(x)
    elif decoding:  # E·xᵀ: at a decode step's few rows XLA:CPU's product is faster with the vocabulary as its rows
      query, embedding = self.embed.promote_dtype((x, self.embed.embedding[...]), dtype=self.embed.dtype)
      z = jnp.moveaxis(jnp.einsum("vd,...d->v...", embedding, query), 0, -1)
    else:
      z = self.embed.attend(x)
    z = softcap(z, self.cfg.final_softcap)
    return z[..., : self.num_classes] if self.num_classes < self.cfg.vocab_size else z

  def token_head(self, x: jax.Array) -> TokenHead:
    """The head of :meth:`_logits` unapplied on the final hidden states ``x`` ``(B, L, D)`` (tied: the
    embedding, ``(V, D)``), for the fused token losses."""
    tied = self.head is None
    kernel = self.embed.embedding[...] if tied else self.head.kernel[...]
    cut = self.num_classes if self.num_classes < self.cfg.vocab_size else 0
    return TokenHead(x, kernel, None, softcap=self.cfg.final_softcap, vocab=cut, transposed=tied)

  def __call__(
    self, tokens: jax.Array, *, train: bool = False, segment_ids: jax.Array | None = None, positions=None
  ) -> ModelOutput:
    """Logits of ``tokens`` ``(B, L)``; packed rows pass ``segment_ids`` and ``positions`` ``(B, L)`` (each
    example attends within itself, from position 0)."""
    del train  # no dropout: a pretrained teacher runs in eval mode
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ConfigError(f"{self.model_name} expects (B, L) tokens with L ≤ {self.max_len}, got {tuple(tokens.shape)}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, inv = self._embed(tokens, positions), self._inv_freq()
    feats = {"embed": x}
    for i, block in enumerate(self.blocks):
      x, _ = remat_lib.block_call(block, self.remat)(block, x, positions, inv, None, segment_ids)
      feats[f"block{i}"] = x
    x = self.norm(x)
    feats["pooled"] = x
    return ModelOutput(self._logits(x), feats, head=self.token_head(x))

  def init_cache(self, batch_size: int, max_len: int | None = None) -> list[dict]:
    """An empty key/value cache: per block ``{"k", "v"}`` of ``(B, S, kv_heads, head_dim)``."""
    s = self.max_len if max_len is None else max_len
    if s > self.max_len:
      raise ConfigError(f"{self.model_name} holds {self.max_len} positions; a cache of {s} is too long")
    shape = (batch_size, s, self.cfg.num_kv_heads, self.cfg.head_dim)
    return [{"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype)} for _ in self.blocks]

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: list[dict]) -> tuple[jax.Array, list[dict]]:
    """Logits ``(B, T, V)`` of ``tokens`` at ``positions`` ``(B, T)``, reading and extending ``cache``."""
    x, inv, new = self._embed(tokens, positions), self._inv_freq(), []
    for block, c in zip(self.blocks, cache):
      x, c = block(x, positions, inv, c)
      new.append(c)
    return self._logits(self.norm(x), decoding=True), new
