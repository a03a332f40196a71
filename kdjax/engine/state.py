"""Train state and the functional model path (``nnx.split`` → jit → ``nnx.merge``)."""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.engine.taps import call_model, capture, resolve
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
  # The model's RNG streams (dropout, stochastic depth), as a template: each forward draws them anew.
  rngs: Any = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class FunctionDef:
  """A teacher given as a pure function ``fn(params, inputs) -> logits``."""

  fn: Callable[[Any, jax.Array], jax.Array]
  info: ModelInfo


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
  """``(graphdef, params, rest)``: trainable ``nnx.Param`` vs everything else but RNG streams (BatchNorm
  statistics, …); the streams are the model's :func:`rng_template`, drawn anew for each forward."""
  graphdef, params, _, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return graphdef, params, rest


def rng_template(model: nnx.Module) -> nnx.State | None:
  """The model's RNG stream state (keys and counts), or None when it holds no ``nnx.Rngs``."""
  rngs = nnx.state(model, nnx.RngState)
  return rngs if jax.tree.leaves(rngs) else None


def fresh_rngs(template: nnx.State, key: jax.Array) -> nnx.State:
  """The streams of ``template`` drawn from ``key``: each stream's key is ``key`` folded with its path
  (split to the stream's shape in ``nnx.scan``/``nnx.vmap`` stacks), its count 0. A pure function of
  ``key``: a step's dropout masks depend on the run's key and step only, not on the devices or a resume."""

  def one(path, var):
    if isinstance(var, nnx.RngKey):
      where = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
      k = jax.random.fold_in(key, zlib.crc32(where.encode()) & 0x7FFFFFFF)
      shape = tuple(var.shape)
      return var.replace(jax.random.split(k, shape) if shape else k)
    if isinstance(var, nnx.RngCount):
      return var.replace(jnp.zeros(var.shape, var.dtype))
    return var

  return jax.tree_util.tree_map_with_path(one, template, is_leaf=lambda x: isinstance(x, nnx.Variable))


EVAL_KEY_SEED = 0  # the streams' key outside training (eval-mode dropout draws nothing)


def merge_model(graphdef, params, rest, rngs: nnx.State | None = None, key: jax.Array | None = None) -> nnx.Module:
  """The module from its split halves, its RNG streams (if any) drawn from ``key``."""
  if rngs is None:
    return nnx.merge(graphdef, params, rest, copy=True)
  key = key if key is not None else jax.random.key(EVAL_KEY_SEED)
  return nnx.merge(graphdef, params, fresh_rngs(rngs, key), rest, copy=True)


def abstract_output(graphdef, params, rest, x, taps=(), rngs=None) -> ModelOutput:
  """The eval-mode output of a split model on inputs like ``x``, as shapes (traced once per shape)."""
  leaves, treedef = jax.tree.flatten((params, rest, rngs))
  shapes = tuple((tuple(a.shape), a.dtype) for a in leaves)
  return _abstract_output(graphdef, treedef, shapes, jax.ShapeDtypeStruct(x.shape, x.dtype), tuple(taps))


@functools.lru_cache(maxsize=256)
def _abstract_output(graphdef, treedef, shapes, x, taps) -> ModelOutput:
  params, rest, rngs = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])

  def forward(p, r, g, x):
    return apply_model(graphdef, p, r, x, train=False, taps=taps, rngs=g)[0]

  return jax.eval_shape(forward, params, rest, rngs, x)


def apply_model(
  graphdef, params, rest, x, *, train: bool, taps: Taps = (), rngs: nnx.State | None = None, key=None, extra=None
) -> tuple[ModelOutput, nnx.State]:
  """Pure forward: the output (tapped layers added to its features) and the updated non-param state.

  ``rngs``: the model's RNG stream template (:func:`rng_template`), drawn from ``key`` for this call;
  ``extra``: keyword arguments of the call (packed rows' segment ids: :func:`kdjax.batch.model_kwargs`).
  """
  # copy=True: the Variables inside ``params``/``rest`` were made at an outer
  # trace level (jit); mutating them (BatchNorm statistics) inside grad fails.
  model = merge_model(graphdef, params, rest, rngs, key)
  if taps:
    with capture(model, dict(taps)) as captured:
      out = call_model(model, x, train=train, key=key, extra=extra)
    out = out._replace(features={**out.features, **captured})
  else:
    out = call_model(model, x, train=train, key=key, extra=extra)
  return out, nnx.split(model, nnx.Param, nnx.RngState, ...)[3]


def describe(model: nnx.Module, x: jax.ShapeDtypeStruct, taps: Taps) -> tuple[ModelDef, nnx.State, nnx.State]:
  """``(static half, params, rest)`` of ``model``, its description (classes, feature shapes) read from its
  eval-mode output on inputs like ``x`` (traced abstractly)."""
  for _, path in taps:  # eagerly, so a misspelt path is one clean error before anything is traced
    resolve(model, path)
  g, p, r = split_model(model)
  rngs = rng_template(model)
  out = abstract_output(g, p, r, x, taps, rngs)
  info = ModelInfo(
    name=getattr(model, "model_name", type(model).__name__),
    num_classes=int(out.logits.shape[-1]),
    feature_shapes={k: tuple(v.shape[1:]) for k, v in out.features.items()},
  )
  return ModelDef(g, info, tuple(x.shape[1:]), taps, rngs), p, r


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
