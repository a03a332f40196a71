"""Any Flax NNX module as a distillation model: outputs, train/eval mode, layers tapped by path.

kdjax's zoo models return ``ModelOutput(logits, features)``. Any other NNX
module works too: :func:`call_model` accepts modules that return a bare
logits array and modules whose ``__call__`` has no ``train`` argument (their
dropout/BatchNorm mode is set with ``Module.train()`` / ``Module.eval()``),
and :func:`capture` records the outputs of submodules named by their path
(``"layers.1"``, ``"encoder.block3.conv2"``) during one forward pass,
without editing the model: for the duration of the call each tapped
submodule's class is given a ``__call__`` that records what the instance
returns (other instances of the class are untouched).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any
from collections.abc import Iterator, Mapping

import jax
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.models.base import ModelOutput


def module_paths(model: nnx.Module) -> list[str]:
  """Dotted paths of every submodule of ``model`` (``""`` is the model itself)."""
  return sorted(".".join(str(p) for p in path) for path, _ in nnx.iter_modules(model) if path)


def resolve(model: nnx.Module, path: str) -> nnx.Module:
  """The submodule at dotted ``path``; ``ValueError`` listing the valid paths."""
  node: Any = model
  for part in path.split("."):
    try:
      node = node[int(part)] if part.isdigit() else getattr(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
      node = None
    if not isinstance(node, nnx.Module):
      break
  if not isinstance(node, nnx.Module):
    valid = module_paths(model)
    raise ConfigError(f"no layer {path!r} in {type(model).__name__}; valid layer paths: {', '.join(valid)}")
  return node


@contextlib.contextmanager
def capture(model: nnx.Module, taps: Mapping[str, str]) -> Iterator[dict[str, jax.Array]]:
  """Record, under feature name ``name``, the output of submodule ``taps[name]``.

  Yields the dict the outputs land in (filled when the model runs inside the
  ``with`` block). A submodule called several times keeps its last output.
  """
  found = {name: resolve(model, path) for name, path in taps.items()}
  names_of: dict[int, list[str]] = {}
  for name, sub in found.items():
    names_of.setdefault(id(sub), []).append(name)
  captured: dict[str, jax.Array] = {}
  patched: dict[type, Any] = {}
  for sub in found.values():
    cls = type(sub)
    if cls in patched:
      continue
    original = cls.__call__

    @functools.wraps(original)
    def recording(self, *args, __original=original, **kwargs):
      out = __original(self, *args, **kwargs)
      for name in names_of.get(id(self), ()):
        captured[name] = out.logits if isinstance(out, ModelOutput) else out
      return out

    patched[cls] = original
    cls.__call__ = recording
  try:
    yield captured
  finally:
    for cls, original in patched.items():
      cls.__call__ = original


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


def call_model(model: nnx.Module, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> ModelOutput:
  """``model(x)`` in train or eval mode, as a :class:`ModelOutput`.

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
  out = model(x, **kwargs)
  if isinstance(out, ModelOutput):
    return out
  if isinstance(out, jax.Array):
    return ModelOutput(out, {})
  raise TypeError(
    f"{type(model).__name__} returned {type(out).__name__}; a distillation model returns logits "
    f"(an array) or kdjax.models.ModelOutput(logits, features)"
  )
