"""Subprocess for test_pretrained: load a Hugging Face checkpoint onto 8 forced CPU devices, tensor-parallel
over a 4-device ``model`` axis, and compute its logits.

Usage: python tests/_pretrained_devices.py CHECKPOINT_DIR OUT.pkl
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import pickle  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kdjax.engine import sharding  # noqa: E402
from kdjax.models import pretrained  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


def main(path: str, out_path: str) -> None:
  mesh = sharding.make_mesh(model=4)
  model = pretrained.from_pretrained(path, mesh=mesh)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  specs = {".".join(map(str, k)): tuple(v[...].sharding.spec) for k, v in flat.items()}
  logits = jax.jit(lambda m, x: m(x).logits)(model, jnp.asarray(TOKENS, jnp.int32))
  with open(out_path, "wb") as fh:
    pickle.dump({"specs": specs, "logits": np.asarray(logits), **sharding.param_bytes(nnx.state(model))}, fh)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
