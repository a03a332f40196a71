"""Subprocess for test_losses_fused: the fused token losses on 8 forced CPU devices.

The same values and gradients (w.r.t. both heads' hidden states and kernels) as on one device, (a) with
the batch split over ``data`` = 8, (b) with the teacher's and the student's vocabularies split over
``model`` = 4 (data = 2); and no all-gather of a vocabulary-sized array in the compiled programs.

Usage: python tests/_fused_devices.py   (sets the 8-device flag itself; prints "ok")
"""

import os
import re

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import kdjax.losses as kdl  # noqa: E402
from kdjax.parallel import sharding  # noqa: E402

B, L, D, DT, V = 8, 9, 8, 12, 96  # V appears in no other dimension: an all-gather to V would show


def inputs():
  k = jax.random.split(jax.random.key(0), 6)
  x = {
    "hs": jax.random.normal(k[0], (B, L, D)),
    "ws": jax.random.normal(k[1], (D, V)),
    "ht": jax.random.normal(k[2], (B, L, DT)),
    "wt": jax.random.normal(k[3], (DT, V)),
  }
  labels = jax.random.randint(k[4], (B, L), -1, V)
  mask = jnp.arange(L)[None, :] < jax.random.randint(k[5], (B, 1), 3, L + 1)  # right padding
  return x, labels, mask


def losses(x, labels, mask, topk):
  """Each fused loss (4 positions per chunk, L = 9) and its gradients w.r.t. all four producers."""
  out = {}
  for name, hyper in (("forward_kl", {}), ("generalized_jsd", {"beta": 0.4})):

    def f(x, name=name, hyper=hyper):
      s, t = kdl.TokenHead(x["hs"], x["ws"]), kdl.TokenHead(x["ht"], x["wt"])
      return kdl.fused_token_loss(name, s, t, mask, chunk_size=4, **hyper)

    out[name] = jax.value_and_grad(f)(x)
  lp, idx = topk
  out["topk_tvd"] = jax.value_and_grad(
    lambda x: kdl.fused_token_loss("tvd", kdl.TokenHead(x["hs"], x["ws"]), (lp, idx), mask, chunk_size=4)
  )(x)
  out["ce"] = jax.value_and_grad(
    lambda x: kdl.fused_cross_entropy(kdl.TokenHead(x["hs"], x["ws"]), labels, mask, chunk_size=4)
  )(x)
  return out


def run(x, labels, mask, specs, mesh):
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
  xs = {k: put(v, specs[k]) for k, v in x.items()}
  batch = P(*specs["hs"][:1])
  lab, m = put(labels, batch), put(mask, batch)
  topk = jax.tree.map(lambda a: put(a, batch), kdl.teacher_topk(x["ht"] @ x["wt"], 5))
  compiled = jax.jit(losses).lower(xs, lab, m, topk).compile()
  gathers = [line for line in compiled.as_text().splitlines() if "all-gather" in line and "=" in line]
  vocab_gathers = [g for g in gathers if re.search(rf"\[[^\]]*\b{V}\b[^\]]*\]", g.split("=")[1].split("all-gather")[0])]
  assert not vocab_gathers, vocab_gathers[:3]
  return jax.device_get(compiled(xs, lab, m, topk))


def close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w))))


def main():
  assert jax.device_count() == 8, jax.devices()
  x, labels, mask = inputs()
  one = sharding.make_mesh(devices=jax.devices()[:1])
  rep = {k: P() for k in x}
  want = run(x, labels, mask, rep, one)
  # the unchunked losses, for reference
  z_s, z_t = x["hs"] @ x["ws"], x["ht"] @ x["wt"]
  np.testing.assert_allclose(want["forward_kl"][0], kdl.forward_kl(z_s, z_t, mask=mask), rtol=1e-5)
  np.testing.assert_allclose(want["generalized_jsd"][0], kdl.generalized_jsd(z_s, z_t, 0.4, mask=mask), rtol=1e-5)
  data = sharding.make_mesh()
  close(run(x, labels, mask, {"hs": P("data"), "ws": P(), "ht": P("data"), "wt": P()}, data), want)
  tp = sharding.make_mesh(2, 1, model=4)
  split = {"hs": P("data"), "ws": P(None, "model"), "ht": P("data"), "wt": P(None, "model")}
  close(run(x, labels, mask, split, tp), want)
  print("ok")


if __name__ == "__main__":
  main()
