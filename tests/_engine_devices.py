"""Subprocess for test_engine: the same 20 CRD+KD steps on 1 device, on 8
forced CPU devices (data=8) and with an FSDP mesh (data=4 × fsdp=2).

Usage: python tests/_engine_devices.py OUT.pkl   (sets the 8-device flag itself)
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pickle  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _engine_setup as E  # noqa: E402
from kdjax.parallel import sharding  # noqa: E402
from kdjax.engine.state import apply_model  # noqa: E402

STEPS = 20


def main(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  batches = [E.digits_batch(i) for i in range(4)]
  res = {}
  meshes = {
    "one": sharding.make_mesh(devices=jax.devices()[:1]),
    "eight": sharding.make_mesh(),
    "fsdp": sharding.make_mesh(4, 2),
  }
  setups = {}
  for name, mesh in meshes.items():
    s = E.setup("crd+kd", mesh=mesh, fsdp=name == "fsdp")
    setups[name] = s
    state, hist = E.run_steps(s, batches, STEPS)
    res[name] = {
      "state": E.host(state),
      "metrics": hist,
      "mesh_size": mesh.size,
      "bank_spec": tuple(state.method_state[0]["crd"].student.sharding.spec),
      "teacher_specs": [tuple(x.sharding.spec) for x in jax.tree.leaves(s.teacher)],
    }
  # Teacher outputs: FSDP-sharded teacher vs the replicated one, same inputs.
  x = np.concatenate([b["inputs"] for b in batches])
  for name in ("eight", "fsdp"):
    s = setups[name]
    td = s.spec.teachers[0]
    f = jax.jit(lambda p, r, x: apply_model(td.graphdef, p, r, x, train=False)[0])
    out = f(s.teacher.params[0], s.teacher.model_state[0], sharding.shard_batch({"x": x}, s.mesh)["x"])
    res[name]["teacher_out"] = E.host({"logits": out.logits, **out.features})
  res["generate"] = generation(meshes)
  res["on_policy"] = on_policy(meshes)
  res["dropout"] = dropout(meshes)
  with open(out_path, "wb") as fh:
    pickle.dump(res, fh)


def generation(meshes) -> dict:
  """Greedy and sampled continuations of 8 prompts with the batch split over each mesh."""
  from flax import nnx

  from kdjax import models
  from kdjax.generate import Generator, Sampling

  lm = models.create("transformer_lm", num_classes=19, num_layers=2, dim=32, num_heads=4, max_len=24, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  prompts, lengths = rng.integers(1, 19, (8, 6)).astype(np.int32), rng.integers(1, 7, 8).astype(np.int32)
  out = {}
  for name, mesh in meshes.items():
    for kind, sampling in (("greedy", Sampling(10, temperature=0.0)), ("sampled", Sampling(10, top_k=5))):
      g = Generator(lm, sampling, mesh=mesh)(prompts, lengths, jax.random.key(4))
      out[f"{name}/{kind}"] = {
        "tokens": E.host(g.tokens),
        "logprobs": E.host(g.logprobs),
        "spec": tuple(g.tokens.sharding.spec),
      }
  return out


def on_policy(meshes) -> dict:
  """Three on-policy GKD steps (half the rows sampled from the student inside the step) on each mesh."""
  import optax
  from flax import nnx

  import kdjax
  from kdjax import models

  rng = np.random.default_rng(0)
  seq = rng.integers(3, 19, (8, 13)).astype(np.int32)
  label = np.where(np.arange(12) >= rng.integers(2, 6, (8, 1)), seq[:, 1:], -1).astype(np.int32)
  batch = {"inputs": seq[:, :-1], "label": label}
  out = {}
  for name, mesh in meshes.items():
    lm = lambda layers, seed: models.create(
      "transformer_lm",
      num_classes=19,
      num_layers=layers,
      dim=32,  # noqa: E731
      num_heads=4,
      max_len=16,
      rngs=nnx.Rngs(seed),
    )
    d = kdjax.Distiller(
      lm(1, 0),
      lm(2, 1),
      method="gkd",
      optimizer=optax.sgd(0.5),
      mesh=mesh,
      fsdp=name == "fsdp",
      responses=kdjax.ResponseConfig(student_fraction=0.5, stop_tokens=(2,)),
    )
    state = d.init(jax.random.key(0), batch)
    rows = E.host(d.train_batch(state, batch))
    hist = []
    for _ in range(3):
      state, m = d.step(state, batch)
      hist.append(E.host(m))
    out[name] = {"params": E.host(state.params), "rows": rows, "metrics": hist}
  return out


def dropout(meshes) -> dict:
  """Five steps of a user's models with dropout on each mesh, KD and a tapped layer's attention transfer: an
  NNX model holding its streams and a Linen model through ``nnx.bridge``."""
  import optax
  from flax import nnx

  import kdjax
  from test_user_models import DropoutNet, blobs, linen

  models = {
    "nnx": (lambda: (DropoutNet(8, rngs=nnx.Rngs(1)), DropoutNet(16, rngs=nnx.Rngs(0))), {"stage1": "conv1"}),
    "linen": (lambda: (linen(8, 1), linen(16, 0)), {"stage1": "Conv_0"}),
  }
  out = {}
  for kind, (make, taps) in models.items():
    for name in ("one", "eight"):
      student, teacher, mesh = *make(), meshes[name]
      d = kdjax.Distiller(
        student, teacher, method="kd+at", taps=taps, teacher_taps=taps, optimizer=optax.sgd(0.1), mesh=mesh
      )
      state = d.init(jax.random.key(0), blobs(0))
      hist = []
      for i in range(5):
        state, m = d.step(state, blobs(i))
        hist.append(E.host(m))
      out[f"{kind}/{name}"] = {"params": E.host(state.params), "metrics": hist}
  return out


if __name__ == "__main__":
  main(sys.argv[1])
