"""Per-executable XLA:CPU compile options for kdjax's jitted steps.

jaxlib 0.10.2 hands every convolution on the CPU backend to a YNNPACK library
fusion (``"__ynn_fusion"`` in the compiled HLO). On the CPUs kdjax has been
measured on, XLA's own (Eigen) convolutions are faster for its steps
(``results/bench.md``). Removing convolutions from the YNN fusion list while
keeping YNN's dots and reductions (the other two default fusion types) is
what ``conv="eigen"`` does. Results agree with the YNN kernels to float32
rounding (``tests/test_conv_impl.py``).

The options go to ``jax.jit(..., compiler_options=...)``, so they apply to one
executable and need no process-wide ``XLA_FLAGS``. Other backends get ``None``
(GPU/TPU convolutions are untouched). If a jaxlib does not know the option,
:func:`compiler_options` falls back to ``None`` (XLA's defaults) after a
one-time probe instead of failing every compile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError

CONV_BACKENDS = ("eigen", "ynn")
# YNN fusion types that stay on (jaxlib 0.10.2 defaults minus convolutions).
_YNN_NO_CONV = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
_OPTIONS = {"eigen": {"xla_cpu_experimental_ynn_fusion_type": _YNN_NO_CONV}, "ynn": None}


def check_conv_backend(conv: str) -> str:
  if conv not in CONV_BACKENDS:
    raise ConfigError(f"run.xla_cpu_conv must be one of {', '.join(CONV_BACKENDS)}, got {conv!r}")
  return conv


@functools.cache
def _supported(key: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib compiles a trivial program with these options."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=dict(key))
  except Exception:  # unknown option or enum value in another jaxlib  # noqa: BLE001
    return False
  return True


def compiler_options(conv: str = "eigen", backend: str | None = None) -> dict[str, str] | None:
  """``compiler_options`` for ``jax.jit`` selecting the CPU convolution kernels.

  Args:
    conv: ``"eigen"`` (XLA's own convolutions; the default, faster on the CPUs
      measured) or ``"ynn"`` (jaxlib's default YNNPACK convolutions).
    backend: the JAX backend the program compiles for (default:
      ``jax.default_backend()``); options only apply to ``"cpu"``.

  Returns:
    A dict for ``jax.jit(compiler_options=...)``, or ``None`` for XLA's
    defaults (non-CPU backend, ``"ynn"``, or an option this jaxlib lacks).
  """
  opts = _OPTIONS[check_conv_backend(conv)]
  if opts is None or (backend or jax.default_backend()) != "cpu":
    return None
  return dict(opts) if _supported(tuple(sorted(opts.items()))) else None
