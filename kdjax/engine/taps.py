"""Any Flax NNX module as a distillation model: outputs, train/eval mode, layers tapped by path.

kdjax's zoo models return ``ModelOutput(logits, features)``. Any other NNX
module works too: :func:`call_model` accepts modules that return a bare
logits array and modules whose ``__call__`` has no ``train`` argument (their
dropout/BatchNorm mode is set with ``Module.train()`` / ``Module.eval()``),
and :func:`capture` records the outputs of submodules named by their path
(``"layers.1"``, ``"encoder.block3.conv2"``) during one forward pass,
without editing the model: for the duration of the call each tapped
submodule's class is given a ``__call__`` that records what the instance
returns (other instances of the class are untouched). A digit after a
module that ``nnx.vmap`` stacked (``"blocks.3"``, ``"blocks.3.attn"``) taps
that layer of the stack: inside ``nnx.scan``/``nnx.vmap`` each layer's copy
stores its output as a variable, the transform stacks them over the layers,
and the tap reads the one asked for.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from typing import Any
from collections.abc import Iterable, Iterator, Mapping

import jax
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig
from kdjax.methods.registry import tap_templates
from kdjax.models.base import ModelOutput
from kdjax.models.probe import TAP_MARK

Taps = tuple[tuple[str, str], ...]  # (feature name, module path) pairs


def module_paths(model: nnx.Module) -> list[str]:
  """Dotted paths of every submodule of ``model`` (``""`` is the model itself)."""
  return sorted(".".join(str(p) for p in path) for path, _ in nnx.iter_modules(model) if path)


def _child(node: Any, part: str) -> nnx.Module | None:
  try:
    child = node[int(part)] if part.isdigit() else getattr(node, part)
  except (AttributeError, IndexError, KeyError, TypeError):
    return None
  return child if isinstance(child, nnx.Module) else None


def stack_size(module: nnx.Module) -> int:
  """How many layers ``module`` stacks: the leading length its variables share when it was made by
  ``nnx.vmap`` (and runs under ``nnx.scan``/``nnx.vmap``); 0 when they share none."""
  sizes = {tuple(x.shape)[:1] for x in jax.tree.leaves(nnx.state(module))}
  return sizes.pop()[0] if len(sizes) == 1 and () not in sizes else 0


def locate(model: nnx.Module, path: str) -> tuple[nnx.Module, int | None, int]:
  """``(submodule, layer, stack length)`` at dotted ``path``.

  A digit after a stacked module (one ``nnx.vmap`` made, run by ``nnx.scan``
  or ``nnx.vmap``) picks a layer of the stack: ``"blocks.3.attn"`` is the
  ``attn`` of the stack ``blocks`` at layer 3 (``layer`` 3; ``None`` outside
  a stack). ``ConfigError`` listing the valid paths when there is no such layer.
  """
  node: Any = model
  layer, size = None, 0
  for part in path.split("."):
    child = _child(node, part)
    if child is None and part.isdigit() and layer is None and isinstance(node, nnx.Module):
      n = stack_size(node)
      if int(part) < n:
        layer, size = int(part), n
        continue
    node = child
    if node is None:
      break
  if not isinstance(node, nnx.Module):
    valid = module_paths(model)
    raise ConfigError(f"no layer {path!r} in {type(model).__name__}; valid layer paths: {', '.join(valid)}")
  return node, layer, size


def linen_site(model: nnx.Module, path: str) -> tuple[nnx.Module, tuple[str, ...]] | None:
  """``(wrapper, Linen path)`` when ``path`` goes into a Linen model wrapped by ``nnx.bridge.ToNNX``
  (``"Conv_1"``, ``"encoder.Block_0.Dense_1"``): the wrapper and the Linen submodule's path inside it
  (checked when the model runs); None otherwise."""
  node: Any = model
  parts = path.split(".")
  for i, part in enumerate(parts):
    if isinstance(node, nnx.bridge.ToNNX):
      return node, tuple(parts[i:])
    node = _child(node, part)
    if node is None:
      return None
  return None


def resolve(model: nnx.Module, path: str) -> nnx.Module:
  """The submodule at dotted ``path`` (the stacked module itself for a layer of a stack, the wrapper for
  a Linen submodule); ``ConfigError`` listing the valid paths."""
  site = linen_site(model, path)
  return site[0] if site is not None else locate(model, path)[0]


_PLAIN, _STACKED = 1, 2
_SLOT = "_kdjax_tap_out"  # where a stacked layer's output lands: nnx.scan/vmap stack it over the layers


class _TapOut(nnx.Variable):
  """A tapped output recorded inside an ``nnx.scan``/``nnx.vmap`` stack (stacked by the transform)."""


def _recorder(original, captured: dict, names_of: dict, stacks: dict):
  @functools.wraps(original)
  def recording(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    value = out.logits if isinstance(out, ModelOutput) else out
    for name in names_of.get(id(self), ()):
      captured[name] = value
    if id(self) in stacks:
      raise ConfigError(
        f"tapped layer {stacks[id(self)]!r} names one layer of a stack, but its {type(self).__name__} runs as one "
        f"module (not under nnx.scan/nnx.vmap); tap it without the layer index"
      )
    if getattr(self, TAP_MARK, 0) == _STACKED:  # this layer's copy inside the transform
      setattr(self, _SLOT, _TapOut(value))
    return out

  return recording


def _collect_stacked(found: dict, captured: dict) -> None:
  for name, (sub, layer, size) in found.items():
    if layer is None or not hasattr(sub, _SLOT):
      continue
    stacked = getattr(sub, _SLOT)[...]
    if tuple(stacked.shape)[:1] != (size,):
      raise ConfigError(f"tap {name!r}: the stack's outputs have shape {stacked.shape}, not {size} layers first")
    captured[name] = stacked[layer]


def _pop_linen_output(wrapper: nnx.Module, linen_path: tuple[str, ...], seen: list) -> jax.Array:
  """The last output of Linen submodule ``linen_path`` that ``capture_intermediates`` stored among the
  wrapper's variables, removed from them (with the attributes the call added) so its state is unchanged."""
  holder: Any = getattr(wrapper, linen_path[0], None)
  for part in linen_path[1:]:
    holder = holder.get(part) if isinstance(holder, dict) else None
  record = holder.pop("__call__", None) if isinstance(holder, dict) else None
  if record is None:
    valid = sorted({".".join(p) for p in seen if p})
    raise ConfigError(
      f"no Linen submodule {'.'.join(linen_path)!r} in {type(wrapper.to_nnx__module).__name__}; "
      f"its submodules: {', '.join(valid)}"
    )
  return record.get_value()[-1]


def _linen_recorder(original, captured: dict, sites: dict):
  """``ToNNX.__call__`` that, for a wrapper with tapped Linen submodules, runs the Linen model with
  ``capture_intermediates`` for exactly those and records their outputs."""

  @functools.wraps(original)
  def recording(self, *args, **kwargs):
    wanted = sites.get(id(self))
    if not wanted:
      return original(self, *args, **kwargs)
    seen: list[tuple[str, ...]] = []

    def keep(module, method_name: str) -> bool:
      seen.append(tuple(module.path))
      return method_name == "__call__" and tuple(module.path) in wanted

    before = set(vars(self))
    out = original(self, *args, capture_intermediates=keep, mutable=["intermediates"], **kwargs)
    added = set(vars(self)) - before
    for linen_path, names in wanted.items():
      value = _pop_linen_output(self, linen_path, seen)
      for name in names:
        captured[name] = value
    for attr in added:  # attributes the call created only to hold intermediates
      delattr(self, attr)
    return out

  return recording


@contextlib.contextmanager
def _capture_linen(model: nnx.Module, taps: Mapping[str, str], captured: dict) -> Iterator[None]:
  """Patch ``nnx.bridge.ToNNX`` while ``taps`` (Linen submodule paths) are recorded into ``captured``."""
  if not taps:
    yield
    return
  sites: dict[int, dict[tuple[str, ...], list[str]]] = {}
  for name, path in taps.items():
    wrapper, linen_path = linen_site(model, path)
    sites.setdefault(id(wrapper), {}).setdefault(linen_path, []).append(name)
  original = nnx.bridge.ToNNX.__call__
  nnx.bridge.ToNNX.__call__ = _linen_recorder(original, captured, sites)
  try:
    yield
  finally:
    nnx.bridge.ToNNX.__call__ = original


@contextlib.contextmanager
def capture(model: nnx.Module, taps: Mapping[str, str]) -> Iterator[dict[str, jax.Array]]:
  """Record, under feature name ``name``, the output of submodule ``taps[name]``.

  Yields the dict the outputs land in (filled when the model runs inside the
  ``with`` block; a layer of an ``nnx.scan``/``nnx.vmap`` stack when the block
  ends). A submodule called several times keeps its last output. A Linen submodule of a model wrapped by
  ``nnx.bridge.ToNNX`` is recorded through Linen's ``capture_intermediates``.
  """
  linen = {name: path for name, path in taps.items() if linen_site(model, path) is not None}
  found = {name: locate(model, path) for name, path in taps.items() if name not in linen}
  names_of: dict[int, list[str]] = {}
  stacks: dict[int, str] = {}
  for name, (sub, layer, _) in found.items():
    if layer is None:
      names_of.setdefault(id(sub), []).append(name)
    else:
      stacks[id(sub)] = taps[name]
    setattr(sub, TAP_MARK, _PLAIN if layer is None else _STACKED)
  captured: dict[str, jax.Array] = {}
  patched: dict[type, Any] = {}
  for sub, _, _ in found.values():
    cls = type(sub)
    if cls not in patched:
      patched[cls] = cls.__call__
      cls.__call__ = _recorder(cls.__call__, captured, names_of, stacks)
  try:
    with _capture_linen(model, linen, captured):
      yield captured
    _collect_stacked(found, captured)
  finally:
    for cls, original in patched.items():
      cls.__call__ = original
    for sub, _, _ in found.values():
      for attr in (TAP_MARK, _SLOT):
        if hasattr(sub, attr):
          delattr(sub, attr)


def template_paths(model: nnx.Module, templates: Iterable[str]) -> list[str]:
  """The module paths ``templates`` name in ``model``: each ``{i}`` template for i = 0, 1, … while the path
  exists (the layers of a list or of a stack), each literal path if it exists."""
  paths = []
  for template in templates:
    for i in itertools.count() if "{i}" in template else (0,):
      path = template.format(i=i)
      try:
        locate(model, path)
      except ConfigError:
        break
      paths.append(path)
  return paths


def method_taps(method: Any, model: Any, taps: Taps, student: bool) -> Taps:
  """``taps`` plus the layers a method's layer map reads in ``model`` (its hidden-state layers and attention
  probes given as module paths, :func:`kdjax.methods.tap_templates`), each tapped under its path."""
  cfg = MethodConfig(name=method) if isinstance(method, str) else method
  if not isinstance(cfg, MethodConfig) or not isinstance(model, nnx.Module):
    return taps
  found = dict(taps)
  for path in template_paths(model, tap_templates(cfg)[0 if student else 1]):
    found.setdefault(path, path)
  return tuple(sorted(found.items()))


def _check_takes(model: nnx.Module, extra: Mapping) -> None:
  """``model.__call__`` names every argument in ``extra`` (a model that ignored segment ids would attend
  across the examples of a packed row)."""
  try:
    params = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return
  missing = [k for k in extra if k not in params]
  if missing:
    raise ConfigError(
      f"{type(model).__name__} takes no {missing[0]}= argument, which packed token rows need (each example attends "
      f"within itself): use a model that does (transformer_lm, the Hugging Face decoders) or unpacked data"
    )


@functools.cache
def _call_arguments(cls: type) -> set[str]:
  """The mode arguments ``cls.__call__`` takes by name (``train``, ``deterministic``, ``rngs``); ``train`` for a
  ``**kwargs`` signature (a wrapper such as ``nnx.bridge.ToNNX`` passes it on to the model it wraps)."""
  try:
    params = inspect.signature(cls.__call__).parameters
  except (TypeError, ValueError):
    return set()
  found = {name for name in ("train", "deterministic", "rngs") if name in params}
  if not found & {"train", "deterministic"} and any(p.kind is p.VAR_KEYWORD for p in params.values()):
    found.add("train")
  return found


def call_model(
  model: nnx.Module, x: jax.Array, *, train: bool, key: jax.Array | None = None, extra: Mapping | None = None
) -> ModelOutput:
  """``model(x, **extra)`` in train or eval mode, as a :class:`ModelOutput` (``extra``: packed token rows'
  ``segment_ids`` and ``positions``, :func:`kdjax.batch.model_kwargs`).

  The mode reaches the model as its author wrote it: a ``train=`` or
  ``deterministic=`` argument, else ``Module.train()`` / ``Module.eval()``
  (which switch ``nnx.Dropout``, ``nnx.BatchNorm``, …). A model whose
  ``__call__`` takes ``rngs=`` gets ``nnx.Rngs(key)`` in training.
  """
  args = _call_arguments(type(model))
  kwargs: dict[str, Any] = {}
  if "train" in args:
    kwargs["train"] = train
  elif "deterministic" in args:
    kwargs["deterministic"] = not train
  elif train:
    model.train()
  else:
    model.eval()
  if "rngs" in args and train and key is not None:
    kwargs["rngs"] = nnx.Rngs(key)
  if extra:
    _check_takes(model, extra)
  out = model(x, **kwargs, **(extra or {}))
  if isinstance(out, ModelOutput):
    return out
  if isinstance(out, jax.Array):
    return ModelOutput(out, {})
  raise TypeError(
    f"{type(model).__name__} returned {type(out).__name__}; a distillation model returns logits "
    f"(an array) or kdjax.models.ModelOutput(logits, features)"
  )
