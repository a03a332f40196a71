"""The README's library example runs as written and trains."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_library_example_runs_and_lowers_the_loss():
  blocks = _python_blocks()
  assert blocks, "README has no python example"
  ns: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), ns)  # noqa: S102 - our own README
  x = jax.random.normal(jax.random.key(0), (32, 40))
  y = jnp.arange(32) % 10
  t_before = np.asarray(ns["teacher"](x, train=False).logits)
  losses = [float(ns["train_step"](ns["student"], ns["teacher"], ns["opt"], x, y)) for _ in range(10)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  import kdjax.losses as kdl
  t = ns["teacher"](x, train=False).logits
  np.testing.assert_array_equal(np.asarray(t), t_before)  # the teacher is frozen
  s = ns["student"](x, train=False).logits
  # Independent NumPy KD value at T=4 vs the library's, on the trained models.
  p = np.exp(np.asarray(t, np.float64) / 4); p /= p.sum(-1, keepdims=True)
  q = np.exp(np.asarray(s, np.float64) / 4); q /= q.sum(-1, keepdims=True)
  ref = 16 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  np.testing.assert_allclose(float(kdl.kd(s, t, temperature=4.0)), ref, rtol=1e-4)
