"""Train state and the functional model path (``nnx.split`` → jit → ``nnx.merge``)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.engine.taps import call_model, capture
from kdjax.methods.base import ModelInfo
from kdjax.models.base import ModelOutput
from kdjax.parallel import sharding

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


def abstract_output(graphdef, params, rest, x, taps=()) -> ModelOutput:
  """The eval-mode output of a split model on inputs like ``x``, as shapes (traced once per shape)."""
  leaves, treedef = jax.tree.flatten((params, rest))
  shapes = tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in leaves)
  return _abstract_output(graphdef, treedef, shapes, jax.ShapeDtypeStruct(x.shape, x.dtype), tuple(taps))


@functools.lru_cache(maxsize=256)
def _abstract_output(graphdef, treedef, shapes, x, taps) -> ModelOutput:
  params, rest = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
  return jax.eval_shape(lambda p, r, x: apply_model(graphdef, p, r, x, train=False, taps=taps)[0], params, rest, x)


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


def state_shardings(state: Any, mesh: Mesh, fsdp: bool = True) -> Any:
  """Shardings for a ``TrainState``: :func:`param_shardings`, except that
  method-state tables (the CRD memory bank, ``(N, D)``) have their rows split
  over ``data`` when N divides evenly (else they stay replicated).

  Each device then holds N / data rows; the step's gathers and scatters into
  the bank become collectives that XLA inserts.
  """
  out = sharding.param_shardings(state, mesh, fsdp)
  data = mesh.shape["data"]

  def bank(x, s):
    shape = tuple(getattr(x, "shape", ()))
    if data > 1 and len(shape) == 2 and shape[0] % data == 0:
      return NamedSharding(mesh, PartitionSpec("data", None))
    return s

  return out.replace(method_state=jax.tree.map(bank, state.method_state, out.method_state))
