"""A small decoder-only Transformer LM (GPT-style) for sequence-level KD.

Token + learned position embeddings, ``num_layers`` pre-LN blocks
(``x + Attn(LN(x))``, ``x + MLP(LN(x))`` with a GELU MLP of width
``mlp_ratio · dim``), causal multi-head self-attention, a final LayerNorm and
an untied linear head to ``num_classes`` (the vocabulary size). Dropout
(``dropout``, default 0) acts on the embedding sum, the attention output and
the MLP output in train mode.

``create("transformer_lm", num_classes=vocab, num_layers=2, dim=64,
num_heads=4, max_len=128)``. Input ``(B, L)`` integer tokens, L ≤ max_len;
logits ``(B, L, V)``. Features:
  ``embed``          (B, L, D)  token + position embedding
  ``block{i}``       (B, L, D)  residual stream after block i (0-based)
  ``pooled``         (B, L, D)  final LayerNorm output, the head's input
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import _layers as L
from kdjax.models.base import ModelOutput

_EMBED_INIT = nnx.initializers.normal(0.02)


class CausalSelfAttention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    self.num_heads = num_heads
    self.qkv = L.dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = L.dense(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(x).reshape(b, l, 3, h, d // h), 3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                       is_causal=True)
    return self.proj(out.reshape(b, l, d))


class Block(nnx.Module):
  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float, *,
               dtype, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype,
                             param_dtype=L.PARAM_DTYPE, rngs=rngs)
    self.attn = CausalSelfAttention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype,
                             param_dtype=L.PARAM_DTYPE, rngs=rngs)
    self.fc1 = L.dense(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
    self.fc2 = L.dense(mlp_ratio * dim, dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def _drop(self, x: jax.Array, train: bool) -> jax.Array:
    return x if self.dropout is None else self.dropout(x, deterministic=not train)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x + self._drop(self.attn(self.ln1(x)), train)
    return x + self._drop(self.fc2(nnx.gelu(self.fc1(self.ln2(x)))), train)


class TransformerLM(nnx.Module):
  """Causal pre-LN Transformer LM; see the module docstring for the features."""

  input_dtype = jnp.int32

  def __init__(self, num_layers: int = 2, dim: int = 64, num_heads: int = 4,
               max_len: int = 128, mlp_ratio: int = 4, dropout: float = 0.0, *,
               num_classes: int = 256, dtype=jnp.float32, rngs: nnx.Rngs,
               name: str = "transformer_lm"):
    self.model_name = name
    self.num_classes = num_classes
    self.input_shape = (max_len,)
    self.max_len = max_len
    self.tok = nnx.Embed(num_classes, dim, embedding_init=_EMBED_INIT, dtype=dtype,
                         param_dtype=L.PARAM_DTYPE, rngs=rngs)
    self.pos = nnx.Embed(max_len, dim, embedding_init=_EMBED_INIT, dtype=dtype,
                         param_dtype=L.PARAM_DTYPE, rngs=rngs)
    self.blocks = L.ModuleList([
        Block(dim, num_heads, mlp_ratio, dropout, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype,
                              param_dtype=L.PARAM_DTYPE, rngs=rngs)
    self.head = L.dense(dim, num_classes, use_bias=False, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, tokens: jax.Array, *, train: bool = False) -> ModelOutput:
    if (tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer)
        or tokens.shape[1] > self.max_len):
      raise ValueError(f"{self.model_name} expects input (B, L) integer tokens with "
                       f"L <= {self.max_len}, got {tuple(tokens.shape)} "
                       f"{tokens.dtype}")
    x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
    if self.dropout is not None:
      x = self.dropout(x, deterministic=not train)
    feats = {"embed": x}
    for i, block in enumerate(self.blocks):
      x = block(x, train)
      feats[f"block{i}"] = x
    x = self.ln_f(x)
    feats["pooled"] = x
    return ModelOutput(self.head(x), feats)
