"""A small decoder-only Transformer LM (GPT-style) for sequence-level KD.

Token + learned position embeddings, ``num_layers`` pre-LN blocks
(``x + Attn(LN(x))``, ``x + MLP(LN(x))`` with a GELU MLP of width
``mlp_ratio · dim``), causal multi-head self-attention, a final LayerNorm and
an untied linear head to ``num_classes`` (the vocabulary size). Dropout
(``dropout``, default 0) acts on the embedding sum, the attention output and
the MLP output in train mode. ``remat`` names a rematerialisation policy for
the blocks (:mod:`kdjax.models.remat`; default ``none``).

``create("transformer_lm", num_classes=vocab, num_layers=2, dim=64,
num_heads=4, max_len=128)``. Input ``(B, L)`` integer tokens, L ≤ max_len;
logits ``(B, L, V)``, and the unapplied head (``ModelOutput.head``, a
:class:`kdjax.losses.TokenHead`) for the fused token losses. Generation
(:mod:`kdjax.generate`) uses ``init_cache`` / ``decode``: a per-block key/value cache ``(B, S, H, D/H)``
written at given positions. Features:
  ``embed``          (B, L, D)  token + position embedding
  ``block{i}``       (B, L, D)  residual stream after block i (0-based)
  ``pooled``         (B, L, D)  final LayerNorm output, the head's input
Tapped by path (:mod:`kdjax.engine.taps`): ``blocks.{i}.attn.probs``
(B, H, L, L) attention probabilities (formed only while tapped; otherwise
the fused ``jax.nn.dot_product_attention`` runs), ``blocks.{i}.attn.queries``,
``.keys`` and ``.values`` (B, L, H, D/H).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.losses.fused import TokenHead
from kdjax.models import _layers as layer_lib
from kdjax.models import remat as remat_lib
from kdjax.models.base import ModelOutput
from kdjax.models.probe import Probe, tapped

_EMBED_INIT = nnx.initializers.normal(0.02)


def packed_mask(segment_ids: jax.Array) -> jax.Array:
  """Attention mask ``(B, 1, L, L)`` of packed rows: query ``i`` sees key ``j`` when ``j ≤ i`` and both lie in
  one example, ``segment_ids[i] == segment_ids[j]`` (Krell et al., 2021, packing without cross-contamination)."""
  causal = jnp.tril(jnp.ones((segment_ids.shape[1],) * 2, bool))
  return (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, probe: Probe) -> jax.Array:
  """``softmax(q·kᵀ/√d) v`` with the probabilities ``(B, H, L, L)`` formed in float32 and passed through
  ``probe``; q, k, v ``(B, L, H, d)``, ``visible`` broadcastable to ``(B, H, L, L)``. Returns ``(B, L, H, d)``."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
  p = probe(jax.nn.softmax(jnp.where(visible, s, jnp.finfo(jnp.float32).min), axis=-1))
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)


class CausalSelfAttention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ConfigError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    self.num_heads = num_heads
    self.probs, self.queries, self.keys, self.values = Probe(), Probe(), Probe(), Probe()
    self.qkv = layer_lib.dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = layer_lib.dense(dim, dim, dtype=dtype, rngs=rngs)

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(B, L, D)`` → q, k, v each ``(B, L, H, D/H)``."""
    b, l, d = x.shape
    qkv = self.qkv(x).reshape(b, l, 3, self.num_heads, d // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Causal attention over ``x`` ``(B, L, D)``, or where ``mask`` ``(B, 1, L, L)`` allows (packed rows)."""
    q, k, v = self._qkv(x)
    q, k, v = self.queries(q), self.keys(k), self.values(v)
    if tapped(self.probs):
      visible = jnp.tril(jnp.ones((x.shape[1],) * 2, bool))
      out = explicit_attention(q, k, v, visible if mask is None else mask, self.probs)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=mask is None, mask=mask)
    return self.proj(out.reshape(x.shape))

  def decode(self, x: jax.Array, positions: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Attend from ``x`` ``(B, T, D)`` at ``positions`` ``(B, T)`` to the cached positions ≤ each one.

    The keys/values of ``x`` are first written into ``cache`` (``{"k", "v"}``,
    ``(B, S, H, D/H)``) at ``positions``.
    """
    q, k, v = self._qkv(x)
    rows = jnp.arange(x.shape[0])[:, None]
    cache = {
      "k": cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype)),
      "v": cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype)),
    }
    visible = jnp.arange(cache["k"].shape[1])[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, S)
    out = jax.nn.dot_product_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), mask=visible)
    return self.proj(out.reshape(x.shape)), cache


class Block(nnx.Module):
  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=layer_lib.PARAM_DTYPE, rngs=rngs)
    self.attn = CausalSelfAttention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=layer_lib.PARAM_DTYPE, rngs=rngs)
    self.fc1 = layer_lib.dense(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
    self.fc2 = layer_lib.dense(mlp_ratio * dim, dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def _drop(self, x: jax.Array, train: bool) -> jax.Array:
    return x if self.dropout is None else self.dropout(x, deterministic=not train)

  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    x = x + self._drop(self.attn(self.ln1(x), mask), train)
    return x + self._drop(self.fc2(nnx.gelu(self.fc1(self.ln2(x)))), train)

  def decode(self, x: jax.Array, positions: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    a, cache = self.attn.decode(self.ln1(x), positions, cache)
    x = x + a
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x)))), cache


class TransformerLM(nnx.Module):
  """Causal pre-LN Transformer LM; see the module docstring for the features."""

  input_dtype = jnp.int32
  # Tensor-parallel layout of a sharded teacher (kdjax.parallel.partition): attention and MLP split
  # the Megatron way (column-parallel qkv/fc1, row-parallel proj/fc2), embedding and head over the vocabulary.
  PARTITION_RULES = (
    (r"blocks\.\d+\.attn\.qkv\.kernel", ("embed", "heads")),
    (r"blocks\.\d+\.attn\.qkv\.bias", ("heads",)),
    (r"blocks\.\d+\.attn\.proj\.kernel", ("heads", "embed")),
    (r"blocks\.\d+\.fc2\.kernel", ("mlp", "embed")),
    (r"blocks\.\d+\.(attn\.proj|fc2)\.bias", ("embed",)),
    (r"tok\.embedding", ("vocab", "embed")),
    (r"head\.kernel", ("embed", "vocab")),
  )

  def __init__(
    self,
    num_layers: int = 2,
    dim: int = 64,
    num_heads: int = 4,
    max_len: int = 128,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    remat: str = "none",
    *,
    num_classes: int = 256,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "transformer_lm",
  ):
    self.model_name = name
    self.num_classes = num_classes
    self.input_shape = (max_len,)
    self.max_len = max_len
    self.dim, self.num_heads, self.compute_dtype = dim, num_heads, dtype
    self.remat = remat_lib.check_policy(remat)
    self.tok = nnx.Embed(
      num_classes, dim, embedding_init=_EMBED_INIT, dtype=dtype, param_dtype=layer_lib.PARAM_DTYPE, rngs=rngs
    )
    self.pos = nnx.Embed(
      max_len, dim, embedding_init=_EMBED_INIT, dtype=dtype, param_dtype=layer_lib.PARAM_DTYPE, rngs=rngs
    )
    self.blocks = layer_lib.ModuleList(
      [Block(dim, num_heads, mlp_ratio, dropout, dtype=dtype, rngs=rngs) for _ in range(num_layers)]
    )
    self.ln_f = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=layer_lib.PARAM_DTYPE, rngs=rngs)
    self.head = layer_lib.dense(dim, num_classes, use_bias=False, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(
    self, tokens: jax.Array, *, train: bool = False, segment_ids: jax.Array | None = None, positions=None
  ) -> ModelOutput:
    """Logits of ``tokens`` ``(B, L)``; packed rows pass ``segment_ids`` and ``positions`` ``(B, L)`` (each
    example attends within itself and is embedded from position 0: :func:`packed_mask`)."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.shape[1] > self.max_len:
      raise ConfigError(
        f"{self.model_name} expects input (B, L) integer tokens with "
        f"L <= {self.max_len}, got {tuple(tokens.shape)} "
        f"{tokens.dtype}"
      )
    x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1])[None] if positions is None else positions)
    mask = None if segment_ids is None else packed_mask(segment_ids)
    if self.dropout is not None:
      x = self.dropout(x, deterministic=not train)
    feats = {"embed": x}
    for i, block in enumerate(self.blocks):
      x = remat_lib.block_call(block, self.remat, static_argnums=(2,))(block, x, train, mask)
      feats[f"block{i}"] = x
    x = self.ln_f(x)
    feats["pooled"] = x
    return ModelOutput(self.head(x), feats, head=TokenHead(x, self.head.kernel[...]))

  def init_cache(self, batch_size: int, max_len: int | None = None) -> list[dict]:
    """An empty key/value cache for :meth:`decode`: per block ``{"k", "v"}`` of ``(B, S, H, D/H)``."""
    s = self.max_len if max_len is None else max_len
    if s > self.max_len:
      raise ConfigError(
        f"{self.model_name} holds {self.max_len} positions; a cache of {s} needs a model created with max_len ≥ {s}"
      )
    shape = (batch_size, s, self.num_heads, self.dim // self.num_heads)
    return [{"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype)} for _ in self.blocks]

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: list[dict]) -> tuple[jax.Array, list[dict]]:
    """Logits ``(B, T, V)`` of ``tokens`` ``(B, T)`` at ``positions`` ``(B, T)``, reading and extending ``cache``.

    Eval mode (no dropout). With ``positions = arange(T)`` and an empty cache
    this equals ``self(tokens).logits``.
    """
    x = self.tok(tokens) + self.pos(positions)
    new = []
    for block, c in zip(self.blocks, cache):
      x, c = block.decode(x, positions, c)
      new.append(c)
    return self.head(self.ln_f(x)), new
