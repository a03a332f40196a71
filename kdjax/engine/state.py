"""Train state and the functional model path (``nnx.split`` → jit → ``nnx.merge``)."""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.engine.taps import call_model, capture
from kdjax.methods.base import ModelInfo
from kdjax.models.base import ModelOutput

PyTree = Any


Taps = tuple[tuple[str, str], ...]  # (feature name, module path) pairs


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Static half of a split model: its graph, description and tapped layers."""

  graphdef: Any
  info: ModelInfo
  input_shape: tuple[int, ...]
  taps: Taps = ()


@dataclasses.dataclass(frozen=True)
class FunctionDef:
  """A teacher given as a pure function ``fn(params, inputs) -> logits``."""

  fn: Callable[[Any, jax.Array], jax.Array]
  info: ModelInfo


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
  """``(graphdef, params, rest)``: trainable ``nnx.Param`` vs everything else
  (BatchNorm statistics, dropout RNG counters)."""
  return nnx.split(model, nnx.Param, ...)


def apply_model(graphdef, params, rest, x, *, train: bool, taps: Taps = ()) -> tuple[ModelOutput, nnx.State]:
  """Pure forward: the output (tapped layers added to its features) and the updated non-param state."""
  # copy=True: the Variables inside ``params``/``rest`` were made at an outer
  # trace level (jit); mutating them (BatchNorm statistics) inside grad fails.
  model = nnx.merge(graphdef, params, rest, copy=True)
  if taps:
    with capture(model, dict(taps)) as captured:
      out = call_model(model, x, train=train)
    out = out._replace(features={**out.features, **captured})
  else:
    out = call_model(model, x, train=train)
  _, _, new_rest = nnx.split(model, nnx.Param, ...)
  return out, new_rest


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; a checkpoint saves all of it.

  Attributes:
    step: optimizer steps done (int32 scalar).
    params: per-student ``nnx.Param`` state (a tuple: DML trains several).
    model_state: per-student non-param state (BatchNorm stats, RNG counts).
    opt_state: optax state over ``{"students": params, "adapters": …}``.
    adapter_params: per-student method adapters (dict keyed by term name).
    method_state: per-student method state (e.g. the CRD memory bank).
    key: raw PRNG key data (``jax.random.key_data``); the step folds in the
      step number, so no key is ever reused.
    ema: EMA of the student's params and state (self-distillation), else ().
  """

  step: jax.Array
  params: tuple
  model_state: tuple
  opt_state: PyTree
  adapter_params: tuple
  method_state: tuple
  key: jax.Array
  ema: tuple = ()

  def trainable(self) -> dict:
    return {"students": self.params, "adapters": self.adapter_params}


class TeacherState(flax.struct.PyTreeNode):
  """Frozen teacher(s): a jit *argument*, never a closed-over constant."""

  params: tuple
  model_state: tuple


def rng_key(key_data: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(key_data)


def tree_bytes(tree: PyTree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def to_float32(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
