"""kdjax decoders → Hugging Face checkpoints: ``to_pretrained(model, directory)``.

The inverse of :func:`kdjax.models.pretrained.from_pretrained`: writes
``config.json``, ``model.safetensors`` (float32 or bfloat16, through the
``safetensors`` library) and the tokenizer files of the checkpoint the model
came from, so that ``transformers.AutoModelForCausalLM.from_pretrained(directory)``
loads it as it is. Tensor names and layouts are transformers' own — the same
name map the loader reads, run backwards (torch ``Linear`` weights transposed
back, GPT-2's q/k/v packed into ``c_attn`` again) — and a tied head writes no
``lm_head.weight``, as ``save_pretrained`` does.

``config.json`` is the source checkpoint's with the architecture fields a
cut or a pruning changed (layers, heads, MLP width, layer types); a decoder
with no source checkpoint gets one written from its :class:`DecoderConfig`
(Llama, Mistral, Qwen 2/3 and GPT-2 families).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models.decoder import Decoder, DecoderConfig
from kdjax.models.pretrained import _names

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# The files of a checkpoint directory that describe its tokenizer and generation defaults.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "chat_template.jinja",
  "chat_template.json",
  "generation_config.json",
)
_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3_text": "Gemma3ForCausalLM",
  "gpt2": "GPT2LMHeadModel",
}


def tensors(model: Decoder, dtype: str = "float32") -> dict[str, np.ndarray]:
  """The model's parameters under their transformers names (``model.…`` / ``transformer.…``, ``lm_head.weight``),
  in transformers' layouts, as ``dtype`` NumPy arrays."""
  cfg = model.cfg
  flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  parts: dict[str, list[tuple[int, np.ndarray]]] = {}
  for mine, (theirs, layout) in _names(cfg).items():
    w = _host(flat[mine][...])
    w = w.T if layout.transpose else w
    parts.setdefault(theirs, []).append((layout.part[0] if layout.part else 0, w))
  prefix = "transformer." if cfg.gpt2 else "model."
  out = {}
  for theirs, ws in parts.items():
    w = np.concatenate([w for _, w in sorted(ws, key=lambda p: p[0])], axis=-1) if len(ws) > 1 else ws[0][1]
    name = theirs if theirs == "lm_head.weight" else prefix + theirs
    out[name] = np.ascontiguousarray(w.astype(DTYPES[dtype]))
  return out


def _host(x) -> np.ndarray:
  """A parameter as one NumPy array on every process (gathered when split across processes)."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def layer_types(cfg: DecoderConfig) -> list[str]:
  """transformers' ``layer_types``: each layer's attention kind."""
  return ["sliding_attention" if cfg.sliding(i) else "full_attention" for i in range(cfg.num_layers)]


def config(cfg: DecoderConfig, base: dict | None = None, dtype: str = "float32") -> dict:
  """``config.json`` of a decoder of ``cfg``: ``base`` (the source checkpoint's) with the architecture fields
  ``cfg`` sets, or one built from ``cfg`` alone."""
  out = {k: v for k, v in base.items() if k != "transformers_version"} if base is not None else _fresh_config(cfg)
  if cfg.gpt2:
    out.update(n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size, n_embd=cfg.hidden_size)
  else:
    out.update(
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      intermediate_size=cfg.intermediate_size,
      hidden_size=cfg.hidden_size,
    )
    if "layer_types" in out or cfg.layer_types:
      out["layer_types"] = layer_types(cfg)
  out.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
  out.setdefault("architectures", [_ARCHITECTURES[cfg.family]])
  out["torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"] = dtype
  return out


def _fresh_config(cfg: DecoderConfig) -> dict:
  """A ``config.json`` from the :class:`DecoderConfig` alone (no source checkpoint to start from)."""
  if cfg.gemma:
    raise ConfigError(
      f"{cfg.family}: writing a Hugging Face checkpoint needs the source checkpoint's config.json "
      f"(pass source=<its directory>)"
    )
  base = {"model_type": cfg.family, "max_position_embeddings" if not cfg.gpt2 else "n_positions": cfg.max_positions}
  if cfg.gpt2:
    return {**base, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new"}
  rope = {"rope_type": "default", **dict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
  legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
  out = {
    **base,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_parameters": rope,
    "rope_scaling": None if legacy["rope_type"] == "default" else legacy,
  }
  if cfg.family != "qwen2":  # Qwen 2 always has q/k/v biases; the others say so
    out["attention_bias"] = cfg.qkv_bias
  if cfg.family == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  return out


def describe(model: Any) -> dict:
  """What an export records to rebuild ``model`` as a Hugging Face checkpoint later (``{}`` for a non-decoder)."""
  if not isinstance(model, Decoder):
    return {}
  return {"decoder": dataclasses.asdict(model.cfg), "hf_source": getattr(model, "hf_source", None)}


def decoder_config(d: dict) -> DecoderConfig:
  """The :class:`DecoderConfig` of a :func:`describe` record (JSON lists back to tuples)."""
  pairs = ("rope_scaling", "local_rope_scaling")
  fix = {k: tuple(tuple(p) for p in d[k]) if k in pairs else tuple(d[k]) for k in d if isinstance(d[k], list)}
  return DecoderConfig(**{**d, **fix})


def to_pretrained(
  model: Decoder, directory: str | Path, *, dtype: str = "float32", source: str | Path | None = None
) -> Path:
  """Write ``model`` as a Hugging Face checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.

  Args:
    model: a :class:`Decoder` (``from_pretrained``'s, cut, pruned or
      trained; ``kdjax.student_model(distiller, state)`` for a distilled one).
    directory: where ``config.json``, ``model.safetensors`` and the
      tokenizer files go (created; files of these names are replaced).
    dtype: ``"float32"`` or ``"bfloat16"`` tensors.
    source: the checkpoint directory whose ``config.json`` (the fields the
      cut left alone: token ids, RoPE, norms…) and tokenizer files are
      copied; default: the one the model was loaded from.

  Every process must call it (parameters split across processes are
  gathered); process 0 writes. Returns ``directory``.
  """
  if not isinstance(model, Decoder):
    raise ConfigError(
      f"a Hugging Face checkpoint is written for kdjax's decoders (Llama, Qwen, Gemma, GPT-2 families), "
      f"not a {type(model).__name__}; export it with format='kdjax'"
    )
  if dtype not in DTYPES:
    raise ConfigError(f"dtype={dtype!r}: a Hugging Face export is written as one of {sorted(DTYPES)}")
  source = source if source is not None else getattr(model, "hf_source", None)
  src = Path(source) if source is not None else None
  if src is not None and not (src / "config.json").is_file():
    raise ConfigError(f"source={str(src)!r} holds no config.json; pass the checkpoint directory the model came from")
  out = Path(directory)
  if src is not None and out.resolve() == src.resolve():
    raise ConfigError(f"{str(out)!r} is the checkpoint the model came from; write the export to another directory")
  base = json.loads((src / "config.json").read_text()) if src is not None else None
  arrays = tensors(model, dtype)
  if jax.process_index() != 0:
    return out
  out.mkdir(parents=True, exist_ok=True)
  from safetensors.numpy import save_file

  tmp = out / "model.safetensors.tmp"
  save_file(arrays, tmp, metadata={"format": "pt"})
  os.replace(tmp, out / "model.safetensors")
  for name in TOKENIZER_FILES if src is not None else ():
    if (src / name).is_file():
      shutil.copy(src / name, out / name)
  _write_json(out / "config.json", config(model.cfg, base, dtype))
  return out


export_hf = to_pretrained


def _write_json(path: Path, data: dict) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)
