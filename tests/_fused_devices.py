"""Subprocess for test_losses_fused: the fused token losses on 8 forced CPU devices.

The same values and gradients (w.r.t. both heads' hidden states and kernels) as the plain losses on full
logits on one device, (a) with the batch split over ``data`` = 8, (b) with the teacher's and the
student's vocabularies split over ``model`` = 4 (data = 2; the teacher's head is tied to its
embedding); and no all-gather of a vocabulary-sized array in the compiled programs.

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
    "wt": jax.random.normal(k[3], (V, DT)),  # the teacher's head tied to its (V, D) embedding
  }
  labels = jax.random.randint(k[4], (B, L), -1, V)
  mask = jnp.arange(L)[None, :] < jax.random.randint(k[5], (B, 1), 3, L + 1)  # right padding
  return x, labels, mask


def losses(x, labels, mask, topk, plain=False):
  """Each loss (fused: 4 positions per chunk, L = 9; or ``plain`` on full logits) and its gradients
  w.r.t. all four producers."""

  def loss(name, x, **hyper):
    s, t = kdl.TokenHead(x["hs"], x["ws"]), kdl.TokenHead(x["ht"], x["wt"], transposed=True)
    if name == "ce":
      return kdl.fused_cross_entropy(s, labels, mask, chunk_size=4)
    target = t if name != "tvd" else topk
    return kdl.fused_token_loss(name, s, target, mask, chunk_size=4, **hyper)

  def plain_loss(name, x, **hyper):
    z_s, z_t = x["hs"] @ x["ws"], x["ht"] @ x["wt"].T
    if name == "ce":
      w = mask & (labels >= 0)
      nll = jax.nn.logsumexp(z_s, -1) - jnp.take_along_axis(z_s, jnp.maximum(labels, 0)[..., None], -1)[..., 0]
      return jnp.sum(nll * w) / jnp.sum(w)
    if name == "tvd":
      return kdl.topk_tvd(z_s, *topk, mask=mask)
    return {"forward_kl": kdl.forward_kl, "generalized_jsd": kdl.generalized_jsd}[name](z_s, z_t, mask=mask, **hyper)

  f = plain_loss if plain else loss
  cases = {"forward_kl": {}, "generalized_jsd": {"beta": 0.4}, "tvd": {}, "ce": {}}
  return {name: jax.value_and_grad(lambda x, n=name, h=hyper: f(n, x, **h))(x) for name, hyper in cases.items()}


def run(x, labels, mask, specs, mesh, plain=False):
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
  xs = {k: put(v, specs[k]) for k, v in x.items()}
  batch = P(*specs["hs"][:1])
  lab, m = put(labels, batch), put(mask, batch)
  topk = jax.tree.map(lambda a: put(a, batch), kdl.teacher_topk(x["ht"] @ x["wt"].T, 5))
  compiled = jax.jit(losses, static_argnums=4).lower(xs, lab, m, topk, plain).compile()
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
  # the reference: the plain losses on full logits, on one device
  want = run(x, labels, mask, {k: P() for k in x}, sharding.make_mesh(devices=jax.devices()[:1]), plain=True)
  data = {"hs": P("data"), "ws": P(), "ht": P("data"), "wt": P()}
  close(run(x, labels, mask, data, sharding.make_mesh()), want)
  split = {"hs": P("data"), "ws": P(None, "model"), "ht": P("data"), "wt": P("model", None)}
  close(run(x, labels, mask, split, sharding.make_mesh(2, 1, model=4)), want)
  print("ok")


if __name__ == "__main__":
  main()
