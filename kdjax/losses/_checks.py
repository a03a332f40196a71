"""Eager input validation shared by the loss functions.

Shape checks use static shapes, so they also run under ``jax.jit``. Value
checks (a temperature that is a plain number, labels that are concrete
arrays) run eagerly and are skipped silently for tracers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import ConfigError


def as_f32(x: Any) -> jax.Array:
  """Casts an array (f32, bf16, f16 …) to float32 for the loss math."""
  return jnp.asarray(x).astype(jnp.float32)


def concrete_value(x: Any) -> np.ndarray | None:
  """Returns ``x`` as a NumPy array, or ``None`` if it is a tracer."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_rank(x: Any, name: str, ranks: int | Sequence[int]) -> None:
  """Raises if ``x.ndim`` is not one of ``ranks``."""
  allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  ndim = jnp.ndim(x)
  if ndim not in allowed:
    want = " or ".join(str(r) for r in allowed)
    raise ConfigError(f"{name} must have rank {want}, got shape {jnp.shape(x)} (rank {ndim}).")


def check_min_rank(x: Any, name: str, min_rank: int) -> None:
  """Raises if ``x.ndim < min_rank``."""
  if jnp.ndim(x) < min_rank:
    raise ConfigError(f"{name} must have rank >= {min_rank}, got shape {jnp.shape(x)}.")


def check_same_batch(a: Any, b: Any, name_a: str, name_b: str) -> None:
  """Raises if the leading (batch) dimensions of ``a`` and ``b`` differ."""
  sa, sb = jnp.shape(a), jnp.shape(b)
  if not sa or not sb or sa[0] != sb[0]:
    raise ConfigError(
      f"{name_a} and {name_b} must have the same batch size (leading "
      f"dimension), got {name_a}.shape={sa} and {name_b}.shape={sb}."
    )


def check_same_shape(a: Any, b: Any, name_a: str, name_b: str) -> None:
  """Raises if ``a`` and ``b`` have different shapes."""
  sa, sb = jnp.shape(a), jnp.shape(b)
  if sa != sb:
    # Name the batch mismatch specifically; it is the common mistake.
    if sa and sb and sa[0] != sb[0]:
      check_same_batch(a, b, name_a, name_b)
    raise ConfigError(
      f"{name_a} and {name_b} must have the same shape, got {name_a}.shape={sa} and {name_b}.shape={sb}."
    )


def check_dim(x: Any, axis: int, size: int, name: str, what: str) -> None:
  """Raises if ``x.shape[axis] != size``."""
  if jnp.shape(x)[axis] != size:
    raise ConfigError(f"{name} must have {what} = {size} along axis {axis}, got shape {jnp.shape(x)}.")


def check_positive(value: Any, name: str) -> None:
  """Raises if a concrete ``value`` is not > 0 (tracers are not checked)."""
  v = concrete_value(value)
  if v is not None and np.any(~(v > 0)):
    raise ConfigError(f"{name} must be > 0, got {value!r}.")


def check_nonnegative(value: Any, name: str) -> None:
  """Raises if a concrete ``value`` is < 0 (tracers are not checked)."""
  v = concrete_value(value)
  if v is not None and np.any(~(v >= 0)):
    raise ConfigError(f"{name} must be >= 0, got {value!r}.")


def check_in_unit_interval(value: Any, name: str) -> None:
  """Raises if a concrete ``value`` lies outside ``[0, 1]``."""
  v = concrete_value(value)
  if v is not None and np.any(~((v >= 0) & (v <= 1))):
    raise ConfigError(f"{name} must lie in [0, 1], got {value!r}.")


def check_labels(labels: Any, batch_shape: tuple[int, ...], num_classes: int, name: str = "labels") -> None:
  """Checks integer class labels: shape ``batch_shape``, values in range."""
  if jnp.shape(labels) != tuple(batch_shape):
    raise ConfigError(
      f"{name} must have shape {tuple(batch_shape)} (one class index per example), got {jnp.shape(labels)}."
    )
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ConfigError(f"{name} must be integer class indices, got dtype {jnp.result_type(labels)}.")
  v = concrete_value(labels)
  if v is not None and v.size and (v.min() < 0 or v.max() >= num_classes):
    raise ConfigError(f"{name} must lie in [0, {num_classes}), got values in [{v.min()}, {v.max()}].")


def check_indices(idx: Any, size: int, name: str) -> None:
  """Checks concrete integer indices lie in ``[0, size)``."""
  if not jnp.issubdtype(jnp.result_type(idx), jnp.integer):
    raise ConfigError(f"{name} must be integer indices, got dtype {jnp.result_type(idx)}.")
  v = concrete_value(idx)
  if v is not None and v.size and (v.min() < 0 or v.max() >= size):
    raise ConfigError(f"{name} must lie in [0, {size}), got values in [{v.min()}, {v.max()}].")


def check_mask(mask: Any, shape: tuple[int, ...], name: str = "mask") -> None:
  """Checks that a token mask has shape ``shape`` (``(B, L)``)."""
  if mask is None:
    return
  if jnp.shape(mask) != tuple(shape):
    raise ConfigError(f"{name} must have shape {tuple(shape)} (batch, length), got {jnp.shape(mask)}.")
