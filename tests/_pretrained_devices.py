"""Subprocess for test_pretrained: load a Hugging Face checkpoint onto 8 forced CPU devices, tensor-parallel
over a 4-device ``model`` axis, and compute its logits; and as the CLI loads a teacher for
``Placement(teacher_devices=4, model=2)``: onto the split teacher sub-mesh.

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

from kdjax import Placement  # noqa: E402
from kdjax.config import ModelConfig  # noqa: E402
from kdjax.engine import experiment
from kdjax.parallel import sharding  # noqa: E402
from kdjax.parallel.placement import placement_meshes  # noqa: E402
from kdjax.models import pretrained  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


def main(path: str, out_path: str) -> None:
  mesh = sharding.make_mesh(model=4)
  model = pretrained.from_pretrained(path, mesh=mesh)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  specs = {".".join(map(str, k)): tuple(v[...].sharding.spec) for k, v in flat.items()}
  logits = jax.jit(lambda m, x: m(x).logits)(model, jnp.asarray(TOKENS, jnp.int32))
  _, teacher_mesh = placement_meshes(sharding.make_mesh(), Placement(teacher_devices=4, model=2))
  split, _ = experiment.load_teacher(
    ModelConfig(name="hf", checkpoint=path), pretrained.read_config(path).vocab_size, mesh=teacher_mesh
  )
  arrays = [v[...] for v in jax.tree.leaves(nnx.state(split), is_leaf=lambda x: isinstance(x, nnx.Variable))]
  with open(out_path, "wb") as fh:
    pickle.dump(
      {
        "specs": specs,
        "logits": np.asarray(logits),
        **sharding.param_bytes(nnx.state(model)),
        "split_devices": sorted({d.id for a in arrays for d in a.sharding.device_set}),
        "teacher_devices": sorted(d.id for d in teacher_mesh.devices.flat),
        "split_q_spec": tuple(split.blocks[0].attn.q.kernel[...].sharding.spec),
        "split_logits": np.asarray(jax.jit(lambda m, x: m(x).logits)(split, jnp.asarray(TOKENS, jnp.int32))),
      },
      fh,
    )


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
