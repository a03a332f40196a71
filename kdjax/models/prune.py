"""Students cut from a pretrained decoder: fewer layers, narrower MLPs, fewer attention heads.

Depth: :func:`choose_layers` picks the teacher's layers a student keeps — an
explicit list, or every k-th (DistilBERT, Sanh et al. 2019, initialises its
student from every other teacher layer); ``from_pretrained(dir, layers=...)``
reads just those.

Width (Minitron, Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation"): :func:`importance` runs the model on a
calibration batch and scores each MLP neuron by its activation (the input of
the down projection) and each attention head by the norm of its output
(before the output projection), aggregated as the mean over positions and
the L2 norm over examples, per layer (padding left out by a position
mask). :func:`prune_width` keeps the most
important ``mlp_size`` neurons and ``kv_heads`` key/value groups (each
group's score the sum of its query heads') with the ``heads / kv_heads``
most important query heads in each, slicing every weight that reads or
writes them; nothing else changes, so a pruned model is a smaller model of
the same family. :func:`param_counts` / :func:`param_table` report what
remains.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models.decoder import Decoder, DecoderConfig


def choose_layers(num_layers: int, layers: tuple[int, ...] = (), stride: int = 0) -> tuple[int, ...] | None:
  """The layer indices a student keeps: ``layers`` as given, or ``0, k, 2k, …`` for ``stride = k``
  (``None``: every layer)."""
  if layers and stride:
    raise ConfigError(f"layers={list(layers)} and layer_stride={stride}: give one of them")
  if stride < 0:
    raise ConfigError(f"layer_stride={stride}: must be ≥ 1 (keep every k-th layer) or 0 (off)")
  if stride:
    return tuple(range(0, num_layers, stride))
  return tuple(layers) or None


class _Recorder:
  """Stands in for a linear layer inside a traced forward pass: keeps its input, then applies it."""

  def __init__(self, inner, sink: list):
    self.inner, self.sink = inner, sink

  def __call__(self, x):
    self.sink.append(x)
    return self.inner(x)


def _batch_scores(graphdef, state, tokens, mask):
  """Per-example scores ``(B, layers, M)`` of the MLP neurons and ``(B, layers, H)`` of the heads: the mean
  over the positions ``mask`` ``(B, L)`` keeps of ``|a|`` (neurons) and of ``‖head output‖₂`` (heads)."""
  model = nnx.merge(graphdef, state)
  mlp, heads = [], []
  for block in model.blocks:  # the merged copy is local to this trace: swapping its layers changes nothing else
    object.__setattr__(block, "down", _Recorder(block.down, mlp))
    object.__setattr__(block.attn, "o", _Recorder(block.attn.o, heads))
  model(tokens)
  b, t = tokens.shape
  h = model.cfg.num_heads
  w = (mask / jnp.maximum(jnp.sum(mask, 1, keepdims=True), 1.0))[..., None]  # (B, L, 1): a mean over kept positions
  neuron = jnp.stack([jnp.sum(jnp.abs(a.astype(jnp.float32)) * w, 1) for a in mlp], 1)
  norms = [jnp.linalg.norm(a.astype(jnp.float32).reshape(b, t, h, -1), axis=-1) for a in heads]
  return neuron, jnp.stack([jnp.sum(n * w, 1) for n in norms], 1)


def importance(model: Decoder, tokens, mask=None, *, batch_size: int = 32) -> dict[str, np.ndarray]:
  """Minitron's activation importance on the calibration ``tokens`` ``(N, L)``: ``{"mlp": (layers, M),
  "heads": (layers, H)}``, each the L2 norm over the N examples of the per-example score (see the module
  docstring), averaged over the positions ``mask`` ``(N, L)`` keeps (default: all; e.g. not the padding)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or len(tokens) == 0:
    raise ConfigError(f"calibration tokens must be a non-empty (N, L) array, got shape {tokens.shape}")
  mask = np.ones(tokens.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
  if mask.shape != tokens.shape:
    raise ConfigError(f"calibration mask of shape {mask.shape} does not match the tokens' {tokens.shape}")
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x, m: _batch_scores(graphdef, s, x, m))
  sq_mlp, sq_heads = 0.0, 0.0
  for i in range(0, len(tokens), batch_size):
    rows = slice(i, i + batch_size)
    n, h = fn(state, jnp.asarray(tokens[rows], jnp.int32), jnp.asarray(mask[rows]))
    sq_mlp = sq_mlp + np.sum(np.square(np.asarray(n, np.float64)), 0)
    sq_heads = sq_heads + np.sum(np.square(np.asarray(h, np.float64)), 0)
  return {"mlp": np.sqrt(sq_mlp), "heads": np.sqrt(sq_heads)}


def _top(scores: np.ndarray, k: int) -> np.ndarray:
  """The indices of the ``k`` largest ``scores``, in increasing index order (ties: the lower index)."""
  return np.sort(np.argsort(-scores, kind="stable")[:k])


def head_choice(scores: np.ndarray, kv_heads: int, group: int, new_kv: int, new_group: int):
  """``(query heads, key/value groups)`` kept from one layer's head ``scores`` ``(kv_heads · group,)``: the
  ``new_kv`` groups of the highest summed score, in each its ``new_group`` best heads (head h is in group
  h // group, as in grouped-query attention)."""
  by_group = scores.reshape(kv_heads, group)
  groups = _top(by_group.sum(1), new_kv)
  return np.concatenate([g * group + _top(by_group[g], new_group) for g in groups]), groups


def _check_width(cfg: DecoderConfig, mlp_size: int, heads: int, kv_heads: int) -> tuple[int, int, int]:
  m = mlp_size or cfg.intermediate_size
  mha = cfg.num_kv_heads == cfg.num_heads  # one key/value head per query head: they are pruned together
  kv = kv_heads or (heads if heads and mha else cfg.num_kv_heads)
  h = heads or kv * (cfg.num_heads // cfg.num_kv_heads)
  if not 1 <= m <= cfg.intermediate_size:
    raise ConfigError(f"mlp_size={mlp_size}: must lie in [1, {cfg.intermediate_size}] (the model's MLP width)")
  if not 1 <= kv <= cfg.num_kv_heads:
    raise ConfigError(f"kv_heads={kv_heads}: must lie in [1, {cfg.num_kv_heads}] (the model's key/value heads)")
  if h % kv or not kv <= h <= kv * (cfg.num_heads // cfg.num_kv_heads):
    raise ConfigError(
      f"heads={h} with kv_heads={kv}: each of the {kv} key/value groups keeps the same number of query heads, "
      f"at most its {cfg.num_heads // cfg.num_kv_heads}"
    )
  if cfg.gpt2 and h != cfg.num_heads:
    raise ConfigError("heads: GPT-2's head size is hidden / heads, so its heads cannot be pruned (prune mlp_size)")
  return m, h, kv


def prune_width(model: Decoder, tokens, mask=None, *, mlp_size: int = 0, heads: int = 0, kv_heads: int = 0) -> Decoder:
  """``model`` with its ``mlp_size`` most important MLP neurons and ``heads`` query heads in ``kv_heads``
  key/value groups per layer (0: keep as is), by :func:`importance` on the calibration ``tokens`` ``(N, L)``
  (at the positions ``mask`` keeps)."""
  cfg = model.cfg
  m, h, kv = _check_width(cfg, mlp_size, heads, kv_heads)
  new = dataclasses.replace(cfg, intermediate_size=m, num_heads=h, num_kv_heads=kv)
  if new == cfg:
    return model
  scores = importance(model, tokens, mask)
  flat = {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for i in range(cfg.num_layers):
    keep_m = _top(scores["mlp"][i], m)
    keep_h, keep_kv = head_choice(scores["heads"][i], cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, kv, h // kv)
    _slice_block(flat, f"blocks.{i}.", cfg, keep_m, keep_h, keep_kv)
  return _rebuilt(model, new, flat)


def _slice_block(flat: dict, b: str, cfg: DecoderConfig, keep_m, keep_h, keep_kv) -> None:
  """One block's weights cut to the kept neurons, query heads and key/value groups (in place)."""
  d = cfg.head_dim
  cols = lambda idx: (np.asarray(idx)[:, None] * d + np.arange(d)).reshape(-1)  # noqa: E731  (head → its columns)
  for name in ("gate", "up"):
    if f"{b}{name}.kernel" in flat:
      flat[f"{b}{name}.kernel"] = flat[f"{b}{name}.kernel"][:, keep_m]
      if f"{b}{name}.bias" in flat:
        flat[f"{b}{name}.bias"] = flat[f"{b}{name}.bias"][keep_m]
  flat[f"{b}down.kernel"] = flat[f"{b}down.kernel"][keep_m]
  for name, idx in (("q", cols(keep_h)), ("k", cols(keep_kv)), ("v", cols(keep_kv))):
    flat[f"{b}attn.{name}.kernel"] = flat[f"{b}attn.{name}.kernel"][:, idx]
    if f"{b}attn.{name}.bias" in flat:
      flat[f"{b}attn.{name}.bias"] = flat[f"{b}attn.{name}.bias"][idx]
  flat[f"{b}attn.o.kernel"] = flat[f"{b}attn.o.kernel"][cols(keep_h)]


def _rebuilt(model: Decoder, cfg: DecoderConfig, flat: dict) -> Decoder:
  """A :class:`Decoder` of ``cfg`` holding the arrays ``flat`` (dotted path → array), in ``model``'s dtypes."""
  shell = nnx.eval_shape(lambda: Decoder(cfg, dtype=model.compute_dtype, rngs=nnx.Rngs(0), name=model.model_name))
  graphdef, state = nnx.split(shell)
  old = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  items = {}
  for key, var in nnx.to_flat_state(state):
    dotted = ".".join(map(str, key))
    value = jnp.asarray(flat[dotted], old[dotted][...].dtype)
    if value.shape != var.shape:
      raise RuntimeError(f"pruned {dotted} has shape {value.shape}, the pruned config needs {var.shape}")
    items[key] = var.replace(value)
  out = nnx.merge(graphdef, nnx.from_flat_state(items))
  if hasattr(model, "hf_source"):
    out.hf_source = model.hf_source
  return out


COMPONENTS = ("embedding", "attention", "mlp", "norms", "head")


def _component(path: str) -> str:
  if path.startswith(("embed.", "pos.")):
    return "embedding"
  if path.startswith("head."):
    return "head"
  if "norm" in path.split(".")[-2]:
    return "norms"
  return "attention" if ".attn." in path else "mlp"


def param_counts(model: nnx.Module) -> dict[str, int]:
  """Parameters of a :class:`Decoder` per component (embedding, attention, mlp, norms, head) and ``total``
  (a tied head counts once, under embedding)."""
  out = dict.fromkeys(COMPONENTS, 0)
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    out[_component(".".join(map(str, key)))] += int(np.prod(var.shape))
  out["total"] = sum(out.values())
  return out


def param_table(model: nnx.Module, before: nnx.Module | None = None) -> str:
  """A Markdown table of :func:`param_counts` (with the ``before`` model's counts and the share kept)."""
  now = param_counts(model)
  was = param_counts(before) if before is not None else None
  head = "| component | parameters |" + (" before | kept |" if was else "")
  rows = [head, "|---|---:|" + ("---:|---:|" if was else "")]
  for k in (*COMPONENTS, "total"):
    if not now[k] and not (was and was[k]):
      continue
    row = f"| {k} | {now[k]:,} |"
    if was:
      row += f" {was[k]:,} | {100 * now[k] / was[k]:.1f}% |" if was[k] else " 0 | |"
    rows.append(row)
  return "\n".join(rows)
