"""Hugging Face checkpoints → kdjax models: ``from_pretrained(directory)``.

Reads a local directory as ``save_pretrained`` / ``huggingface-cli download``
leave it — ``config.json`` and ``model.safetensors`` or several shards with
``model.safetensors.index.json`` — builds the matching
:class:`kdjax.models.decoder.Decoder` and fills it. Every tensor of the
checkpoint must be used exactly once and every shape must match
``config.json``; anything else is one line naming the tensor. With a
``mesh`` each shard of each parameter is read from its own slice of the
memory-mapped file (the model is never whole in host memory). float32,
float16 and bfloat16 tensors are read. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models.decoder import FAMILIES, Decoder, DecoderConfig
from kdjax.parallel import partition

_PREFIXES = ("model.", "transformer.")
# Buffers some checkpoints carry that are not parameters (GPT-2's causal mask, rotary caches).
_IGNORED = re.compile(r"(.*\.attn\.(masked_)?bias|.*rotary_emb\.inv_freq)$")


def _missing(path: Path) -> ConfigError:
  return ConfigError(
    f"no Hugging Face checkpoint at {str(path)!r} (config.json missing); download it on a machine "
    f"with a network, e.g. `huggingface-cli download <org>/<model> --local-dir {path}`, and copy the "
    f"directory here"
  )


def read_config(path: str | Path) -> DecoderConfig:
  """The :class:`DecoderConfig` of the checkpoint directory ``path`` (from its ``config.json``)."""
  path = Path(path)
  if not (path / "config.json").is_file():
    raise _missing(path)
  c = json.loads((path / "config.json").read_text())
  family = c.get("model_type")
  if family not in FAMILIES:
    raise ConfigError(
      f"{path / 'config.json'}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})"
    )
  if family == "gpt2":
    return _gpt2_config(c)
  if c.get("use_bidirectional_attention"):
    raise ConfigError(f"{path / 'config.json'}: bidirectional attention is not supported (kdjax's decoders are causal)")
  params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  full, local = (
    (params.get("full_attention", {}), params.get("sliding_attention"))
    if "full_attention" in params
    else (params, None)
  )
  theta, scaling = _rope(full, c.get("rope_theta", 10000.0))
  heads = int(c["num_attention_heads"])
  gemma = family.startswith("gemma")
  extra = _gemma_extra(c, local) if gemma else {}
  return DecoderConfig(
    family,
    int(c["vocab_size"]),
    int(c["hidden_size"]),
    int(c["num_hidden_layers"]),
    heads,
    int(c.get("num_key_value_heads") or heads),
    int(c.get("head_dim") or int(c["hidden_size"]) // heads),
    int(c["intermediate_size"]),
    int(c["max_position_embeddings"]),
    norm_eps=float(c.get("rms_norm_eps", 1e-6)),
    qkv_bias=bool(c.get("attention_bias", family == "qwen2")),
    out_bias=bool(c.get("attention_bias", False)),
    mlp_bias=bool(c.get("mlp_bias", False)),
    qk_norm=family in ("qwen3", "gemma3_text"),
    tie_embeddings=bool(c.get("tie_word_embeddings", gemma)),
    rope_theta=theta,
    rope_scaling=scaling,
    **extra,
  )


def _gpt2_config(c: dict) -> DecoderConfig:
  """GPT-2's ``config.json``: learned positions, GELU MLP, biases everywhere, tied head."""
  e = int(c["n_embd"])
  return DecoderConfig(
    "gpt2",
    int(c["vocab_size"]),
    e,
    int(c["n_layer"]),
    int(c["n_head"]),
    int(c["n_head"]),
    e // int(c["n_head"]),
    int(c.get("n_inner") or 4 * e),
    int(c["n_positions"]),
    norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    tie_embeddings=bool(c.get("tie_word_embeddings", True)),
  )


def _gemma_extra(c: dict, local: dict | None) -> dict:
  """Gemma 2/3's extra fields: sliding-window layers, query scale, soft-capping, a local RoPE base."""
  kinds = tuple("sliding" if t == "sliding_attention" else "full" for t in c.get("layer_types") or ())
  extra = dict(
    sliding_window=int(c.get("sliding_window") or 0),
    layer_types=kinds,
    query_scale=float(c.get("query_pre_attn_scalar") or c.get("head_dim")) ** -0.5,
    attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
    final_softcap=float(c.get("final_logit_softcapping") or 0.0),
  )
  if local is not None:
    extra["local_rope_theta"], extra["local_rope_scaling"] = _rope(local, c.get("rope_local_base_freq", 10000.0))
  return extra


def _rope(params: dict, default_theta: float) -> tuple[float, tuple]:
  """``(theta, scaling pairs)`` from one RoPE parameter dict (``rope_parameters`` or the older ``rope_scaling``)."""
  p = dict(params)
  theta = float(p.pop("rope_theta", default_theta))
  p.setdefault("rope_type", p.pop("type", "default"))
  return theta, tuple(sorted((k, v) for k, v in p.items() if v is not None))


# ---------------------------------------------------------------- names and layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a checkpoint tensor becomes a kdjax parameter: the columns ``part = (j, width)`` of its last axis
  (GPT-2's packed q/k/v), then transposed or not (torch ``Linear`` is (out, in), NNX kernels (in, out))."""

  transpose: bool = False
  part: tuple[int, int] | None = None

  def __call__(self, w):
    if self.part is not None:
      j, e = self.part
      w = w[..., j * e : (j + 1) * e]
    return self.orient(w)

  def orient(self, w):
    """A slice the :meth:`source` of some index picked, in kdjax's axis order."""
    return w.T if self.transpose else w

  def source(self, idx: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The checkpoint slices that hold ``param[idx]`` (``idx`` a tuple of slices of a param of ``shape``)."""
    sl = tuple(slice(*i.indices(n)) for i, n in zip(idx, shape))
    sl = sl[::-1] if self.transpose else sl
    if self.part is not None:
      j, e = self.part
      sl = sl[:-1] + (slice(j * e + sl[-1].start, j * e + sl[-1].stop),)
    return sl


def _names(cfg: DecoderConfig, layers: tuple[int, ...] | None = None) -> dict[str, tuple[str, Layout]]:
  """kdjax parameter path → (checkpoint tensor name without prefix, layout change to kdjax's); block ``i``
  reads the checkpoint's layer ``layers[i]`` (default: layer ``i``)."""
  src = tuple(range(cfg.num_layers)) if layers is None else tuple(layers)
  t, same = Layout(transpose=True), Layout()
  out: dict[str, tuple[str, Layout]] = {}
  if cfg.gpt2:
    e = cfg.hidden_size
    part = lambda i: Layout(part=(i, e))  # noqa: E731  (c_attn packs q, k, v)
    out.update(
      {
        "embed.embedding": ("wte.weight", same),
        "pos.embedding": ("wpe.weight", same),
        "norm.scale": ("ln_f.weight", same),
        "norm.bias": ("ln_f.bias", same),
      }
    )
    for i in range(cfg.num_layers):
      b, h = f"blocks.{i}.", f"h.{src[i]}."
      for j, n in enumerate("qkv"):
        out[f"{b}attn.{n}.kernel"] = (h + "attn.c_attn.weight", part(j))
        out[f"{b}attn.{n}.bias"] = (h + "attn.c_attn.bias", part(j))
      for mine, theirs in (("attn.o", "attn.c_proj"), ("up", "mlp.c_fc"), ("down", "mlp.c_proj")):
        out[f"{b}{mine}.kernel"], out[f"{b}{mine}.bias"] = (h + theirs + ".weight", same), (h + theirs + ".bias", same)
      for mine, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out[f"{b}{mine}.scale"], out[f"{b}{mine}.bias"] = (h + theirs + ".weight", same), (h + theirs + ".bias", same)
    return out
  out.update({"embed.embedding": ("embed_tokens.weight", same), "norm.scale": ("norm.weight", same)})
  if not cfg.tie_embeddings:
    out["head.kernel"] = ("lm_head.weight", t)
  for i in range(cfg.num_layers):
    b, h = f"blocks.{i}.", f"layers.{src[i]}."
    lin = {
      "attn.q": "self_attn.q_proj",
      "attn.k": "self_attn.k_proj",
      "attn.v": "self_attn.v_proj",
      "attn.o": "self_attn.o_proj",
      "gate": "mlp.gate_proj",
      "up": "mlp.up_proj",
      "down": "mlp.down_proj",
    }
    bias = {"attn.q": cfg.qkv_bias, "attn.k": cfg.qkv_bias, "attn.v": cfg.qkv_bias, "attn.o": cfg.out_bias}
    for mine, theirs in lin.items():
      out[f"{b}{mine}.kernel"] = (f"{h}{theirs}.weight", t)
      if bias.get(mine, cfg.mlp_bias):
        out[f"{b}{mine}.bias"] = (f"{h}{theirs}.bias", same)
    out[f"{b}attn_norm.scale"] = (h + "input_layernorm.weight", same)
    if cfg.gemma:  # Gemma's post_attention_layernorm follows attention; pre_feedforward_layernorm precedes the MLP
      out[f"{b}post_attn_norm.scale"] = (h + "post_attention_layernorm.weight", same)
      out[f"{b}mlp_norm.scale"] = (h + "pre_feedforward_layernorm.weight", same)
      out[f"{b}post_mlp_norm.scale"] = (h + "post_feedforward_layernorm.weight", same)
    else:
      out[f"{b}mlp_norm.scale"] = (h + "post_attention_layernorm.weight", same)
    if cfg.qk_norm:
      out[f"{b}attn.q_norm.scale"] = (h + "self_attn.q_norm.weight", same)
      out[f"{b}attn.k_norm.scale"] = (h + "self_attn.k_norm.weight", same)
  return out


class _Tensors:
  """The checkpoint's tensors by name (prefix stripped), opened lazily from their safetensors files."""

  def __init__(self, path: Path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
      files = {n: path / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    elif (path / "model.safetensors").is_file():
      files = {n: path / "model.safetensors" for n in _header(path / "model.safetensors")[0] if n != "__metadata__"}
    else:
      raise ConfigError(
        f"{str(path)!r} has config.json but no model.safetensors(.index.json); kdjax reads "
        f"safetensors checkpoints (save with save_pretrained(..., safe_serialization=True))"
      )
    self.files, self.path = {}, path
    for name, file in files.items():
      short = next((name[len(p) :] for p in _PREFIXES if name.startswith(p)), name)
      if short == "lm_head.weight" or not _IGNORED.fullmatch(short):
        self.files[short] = (name, file)
    self._headers: dict[Path, tuple[dict, int]] = {}

  def array(self, short: str) -> np.ndarray:
    """The tensor as a read-only memory map: slicing it reads only the bytes of the slice."""
    name, file = self.files[short]
    if file not in self._headers:
      self._headers[file] = _header(file)
    header, start = self._headers[file]
    if name not in header:
      raise ConfigError(f"{file}: the index names tensor {name!r} but the file does not hold it")
    entry = header[name]
    if entry["dtype"] not in _DTYPES:
      raise ConfigError(
        f"{file}: tensor {name!r} is stored as {entry['dtype']}; kdjax reads {', '.join(sorted(_DTYPES))}"
      )
    lo, hi = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if hi - lo == 0:
      return np.zeros(shape, _DTYPES[entry["dtype"]])
    return np.memmap(file, _DTYPES[entry["dtype"]], "r", offset=start + lo, shape=shape)

  def shape(self, short: str) -> tuple[int, ...]:
    return tuple(self.array(short).shape)


# safetensors dtype → NumPy (bfloat16 through ml_dtypes: the safetensors package's NumPy reader refuses it,
# and nearly every released checkpoint is stored in it).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def _header(file: Path) -> tuple[dict, int]:
  """A safetensors file's JSON header and where its data starts: an 8-byte little-endian header size, the
  header (name → dtype, shape, data_offsets relative to the data), then the data."""
  with open(file, "rb") as fh:
    size = int.from_bytes(fh.read(8), "little")
    return json.loads(fh.read(size)), 8 + size


def from_pretrained(
  path: str | Path,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  mesh: jax.sharding.Mesh | None = None,
  model_axis: str = "model",
  vocab_size: int | None = None,
  layers: tuple[int, ...] | None = None,
) -> Decoder:
  """The model in the Hugging Face checkpoint directory ``path``, its weights loaded.

  Args:
    path: a local directory with ``config.json`` and safetensors weights.
    dtype: compute dtype.
    param_dtype: the dtype parameters are held in: float32 (default), or
      bfloat16 for a frozen teacher computing in bfloat16 — half the memory,
      the same logits (matmuls read bfloat16 weights either way; norms
      compute in float32), and a bfloat16 checkpoint's weights exactly.
    mesh: place the parameters on this mesh, split over its ``model_axis``
      by the model's ``PARTITION_RULES`` (replicated when the mesh has no
      such axis), one tensor at a time.
    vocab_size: keep the logits of the first ``vocab_size`` token ids only
      (default: all). For a student of the same tokenizer whose vocabulary
      the checkpoint pads (embedding rows past the tokenizer's last id); the
      weights are loaded whole.
    layers: keep only these layers of the checkpoint, in this order
      (:func:`keep_layers`; DistilBERT's initialisation of a student from
      its teacher's layers); the other layers' tensors are never read.

  Raises:
    ConfigError: no checkpoint there, an unsupported architecture, a layer
      index out of range, or a tensor missing, unused or of the wrong shape
      (one line naming it).
  """
  path = Path(path)
  cfg = read_config(path)
  depth = cfg.num_layers
  if layers is not None:
    layers = check_layers(layers, depth, str(path))
    cfg = keep_layers(cfg, layers)
  if vocab_size is not None:
    if not 1 <= vocab_size <= cfg.vocab_size:
      raise ConfigError(
        f"{path}: vocab_size={vocab_size} must lie in [1, {cfg.vocab_size}] (the checkpoint's vocabulary)"
      )
    cfg = dataclasses.replace(cfg, output_vocab=vocab_size)
  model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0), name=path.name or cfg.family))
  model = _filled(model, path, cfg, mesh, model_axis, param_dtype, layers, depth)
  model.hf_source = str(path.resolve())  # where kdjax.models.hf_export finds the config and tokenizer files
  return model


def check_layers(layers, num_layers: int, where: str) -> tuple[int, ...]:
  """``layers`` as a tuple of distinct indices into ``num_layers`` layers, or a one-line :class:`ConfigError`."""
  layers = tuple(int(i) for i in layers)
  if not layers:
    raise ConfigError(f"{where}: keep at least one layer (layers=() given)")
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ConfigError(f"{where}: layer index {bad[0]} is out of range (the checkpoint has layers 0..{num_layers - 1})")
  if len(set(layers)) != len(layers):
    raise ConfigError(f"{where}: layers {list(layers)} name a layer twice")
  return layers


def keep_layers(cfg: DecoderConfig, layers: tuple[int, ...]) -> DecoderConfig:
  """The config of a decoder made of ``cfg``'s layers ``layers`` (each keeps its sliding/global kind)."""
  kinds = tuple(cfg.layer_types[i] for i in layers) if cfg.layer_types else ()
  return dataclasses.replace(cfg, num_layers=len(layers), layer_types=kinds)


def _filled(
  model: Decoder, path: Path, cfg: DecoderConfig, mesh, model_axis: str, param_dtype, layers=None, depth=0
) -> Decoder:
  """``model`` (abstract) with every parameter read from its checkpoint tensor; each tensor used exactly once
  (with ``layers``, the dropped layers' tensors are not read)."""
  tensors = _Tensors(path)
  names = _names(cfg, layers)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  used = {theirs for theirs, _ in names.values()}
  if layers is not None:  # the tensors of every layer left out count as used
    used |= {t for t, _ in _names(dataclasses.replace(cfg, num_layers=depth)).values()}
  extra = sorted(set(tensors.files) - used)
  if extra:
    raise ConfigError(
      f"{path}: tensor {tensors.files[extra[0]][0]!r} is not used by a {cfg.family} model with this "
      f"config.json" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    )
  specs = _specs(model, flat, mesh, model_axis)
  for key, var in flat.items():
    mine = ".".join(map(str, key))
    if mine not in names:
      raise RuntimeError(f"{cfg.family} parameter {mine!r} has no checkpoint tensor name (the name map is incomplete)")
    theirs, layout = names[mine]
    if theirs not in tensors.files:
      raise ConfigError(
        f"{path}: tensor {theirs!r} is missing (a {cfg.family} model with {cfg.num_layers} layers needs it)"
      )
    want, shape = tuple(var.shape), tensors.shape(theirs)
    if layout(np.broadcast_to(np.zeros((), np.uint8), shape)).shape != want:  # a view: nothing is allocated
      raise ConfigError(
        f"{path}: tensor {theirs!r} has shape {shape}, which does not fit the {want} that "
        f"config.json implies for {mine!r}"
      )
    flat[key] = var.replace(_place(tensors.array(theirs), layout, want, specs.get(key), mesh, param_dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _specs(model, flat, mesh, model_axis) -> dict:
  if mesh is None:
    return {}
  size = mesh.shape.get(model_axis, 1)
  axes = partition.logical_axes(model) if size > 1 else {}
  out = {}
  for key, var in flat.items():
    dotted = ".".join(map(str, key))
    spec = partition.spec_for(dotted, tuple(var.shape), axes.get(dotted), size, f"mesh axis {model_axis!r}")
    out[key] = jax.sharding.NamedSharding(mesh, spec)
  return out


def _place(stored: np.ndarray, layout: Layout, shape, sharding, mesh, dtype) -> jax.Array:
  """The parameter from its memory-mapped checkpoint tensor, as ``dtype``: whole without a mesh, else each
  of this process's shards read from its own slice of the file."""
  dtype = np.dtype(dtype)
  if mesh is None:
    return jnp.asarray(np.asarray(layout(stored)).astype(dtype))

  def shard(idx):
    return np.asarray(layout.orient(stored[layout.source(idx, shape)])).astype(dtype)

  return jax.make_array_from_callback(shape, sharding, shard)


def special_token_ids(path: str | Path) -> dict[str, int]:
  """``{"bos", "eos", "pad"}`` → id, from the checkpoint's ``config.json`` (those it names; the first of a list)."""
  raw = json.loads((Path(path) / "config.json").read_text())
  out = {}
  for name in ("bos", "eos", "pad"):
    v = raw.get(f"{name}_token_id")
    v = v[0] if isinstance(v, list) and v else v
    if isinstance(v, int):
      out[name] = v
  return out


def load_tokenizer(path: str | Path):
  """The checkpoint's tokenizer (``tokenizer.json``) with the ``tokenizers`` library."""
  from tokenizers import Tokenizer

  f = Path(path) / "tokenizer.json"
  if not f.is_file():
    raise ConfigError(
      f"no tokenizer.json in {str(path)!r}; copy it from the model's download (huggingface-cli "
      f"download <org>/<model> tokenizer.json --local-dir {path})"
    )
  return Tokenizer.from_file(str(f))
