"""Several teachers on the student's own samples: each row routed to the teacher of its task, or their mixture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _compile import production_compile
from flax import nnx

import kdjax
from kdjax import models
from kdjax.config import Experiment
from kdjax.engine import teachers
from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig
from kdjax.models.base import ModelOutput
from kdjax.responses import ResponseConfig

V, L, BATCH, MAX_LEN, STOP = 15, 12, 8, 32, 2
ON_POLICY = ResponseConfig(student_fraction=1.0, temperature=1.0, stop_tokens=(STOP,))


def _lm(layers: int, dim: int, seed: int):
  return models.create(
    "transformer_lm", num_classes=V, num_layers=layers, dim=dim, num_heads=2, max_len=MAX_LEN, rngs=nnx.Rngs(seed)
  )


def _rows(seed: int = 0) -> dict:
  """Token rows with prompts of 3–7 tokens and data responses ending in the stop token."""
  rng = np.random.default_rng(seed)
  seq = rng.integers(3, V, (BATCH, L + 1)).astype(np.int32)
  plen = rng.integers(3, 8, BATCH)
  labels = np.full((BATCH, L), -1, np.int32)
  for i, p in enumerate(plen):
    end = min(L + 1, p + rng.integers(2, 5))
    seq[i, end - 1] = STOP
    seq[i, end:] = 0
    labels[i, p - 1 : end - 1] = seq[i, p:end]
  return {"inputs": seq[:, :L], "label": labels}


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reverse_kl(s, t):
  ls, lt = _log_softmax(s), _log_softmax(t)
  return (np.exp(ls) * (ls - lt)).sum(-1)


def _distiller(teacher_models, **kw) -> kdjax.Distiller:
  return kdjax.Distiller(
    _lm(1, 16, 2), teacher_models, method="reverse_kl", optimizer=optax.sgd(0.5), responses=ON_POLICY, **kw
  )


def _run(d: kdjax.Distiller, task, steps: int = 2, rows: bool = False):
  """Metrics of each of ``steps`` on-policy steps from a fresh state, the rows of the first (when asked),
  the final student parameters."""
  batch = dict(_rows(), **({} if task is None else {"task": task}))
  state = d.init(jax.random.key(0), batch)
  rows = jax.tree.map(np.asarray, d.train_batch(state, batch)) if rows else None
  metrics = []
  for _ in range(steps):
    state, m = d.step(state, batch)
    metrics.append(jax.tree.map(np.asarray, m))
  return metrics, rows, jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def runs():
  """One teacher alone; the same teacher routed every row among two; the two routed half and half (one
  compiled step: which teacher scores a row is data). Two programs compared bit for bit: compiled as
  outside the test suite."""
  with production_compile():
    single = _run(_distiller(_lm(2, 32, 1)), None)
    routed = _distiller([_lm(2, 32, 1), _lm(2, 32, 7)], multi_teacher="route")
    all_first = _run(routed, np.zeros(BATCH, np.int32))
    mixed = _run(routed, np.arange(BATCH, dtype=np.int32) % 2, 1, True)
  return single, all_first, mixed


@pytest.mark.slow
def test_every_row_routed_to_one_teacher_is_that_teacher_alone_bit_for_bit(runs):
  (m1, _, p1), (m2, _, p2), _ = runs
  for a, b in zip(m1, m2):
    for name in ("loss/total", "loss/reverse_kl", "train/accuracy", "train/grad_norm"):
      np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(b["loss/reverse_kl/teacher0"], a["loss/reverse_kl"])
    assert b["train/agreement/teacher1"] == 0.0  # no row of the second teacher
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


@pytest.mark.slow
def test_routed_loss_scores_each_row_with_its_own_teacher_equal_to_numpy(runs):
  _, _, (m, rows, _) = runs
  x, y = jnp.asarray(rows["inputs"]), rows["label"]
  task = np.arange(BATCH) % 2
  s = np.asarray(_lm(1, 16, 2)(x).logits)
  t = [np.asarray(_lm(2, 32, seed)(x).logits) for seed in (1, 7)]
  routed = np.where(task[:, None, None] == 1, t[1], t[0])
  per_token = _reverse_kl(s, routed)
  scored = y >= 0
  np.testing.assert_allclose(m[0]["loss/total"], per_token[scored].mean(), rtol=2e-5)
  for k in (0, 1):
    rows_k = scored & (task[:, None] == k)
    np.testing.assert_allclose(m[0][f"loss/reverse_kl/teacher{k}"], per_token[rows_k].mean(), rtol=2e-5)
    agree = (s.argmax(-1) == t[k].argmax(-1))[rows_k].mean()
    np.testing.assert_allclose(m[0][f"train/agreement/teacher{k}"], agree, rtol=1e-6)
  # the cross-expert view differs: the other teacher on these rows gives another loss
  assert abs(_reverse_kl(s, t[1])[scored & (task[:, None] == 0)].mean() - m[0]["loss/reverse_kl/teacher0"]) > 1e-3


def test_route_picks_each_rows_teacher_and_mixture_is_the_mixed_distribution():
  rng = np.random.default_rng(0)
  z = [rng.normal(size=(4, 3, 5)).astype(np.float32) for _ in range(3)]
  f = [{"h": rng.normal(size=(4, 2)).astype(np.float32)} for _ in range(3)]
  task = np.array([2, 0, 1, 2], np.int32)
  out = teachers.route([ModelOutput(jnp.asarray(a), b) for a, b in zip(z, f)], jnp.asarray(task))
  np.testing.assert_array_equal(out.logits, np.stack([z[k][i] for i, k in enumerate(task)]))
  np.testing.assert_array_equal(out.features["h"], np.stack([f[k]["h"][i] for i, k in enumerate(task)]))
  w = np.array([1.0, 2.0, 1.0])
  mix = teachers.mixture([ModelOutput(jnp.asarray(a), {}) for a in z], teachers.normalized(w, 3))
  want = sum(wi / w.sum() * np.exp(_log_softmax(a)) for wi, a in zip(w, z))
  np.testing.assert_allclose(np.exp(_log_softmax(np.asarray(mix.logits))), want, rtol=1e-5)


def test_routing_without_task_ids_or_seqkd_with_several_teachers_is_one_line():
  pair = [teachers.FunctionTeacher(lambda p, x: x, None) for _ in range(2)]
  source = teachers.from_mode("multi_teacher", 1, pair, combine="route")
  outs = [ModelOutput(jnp.zeros((2, 3)), {})] * 2
  with pytest.raises(ConfigError, match=r"reads each row's teacher from batch\['task'\]"):
    source.targets(0, [], outs, {"inputs": jnp.zeros((2, 3))})
  with pytest.raises(ConfigError, match="multi_teacher='nearest'"):
    teachers.from_mode("multi_teacher", 1, pair, combine="nearest")
  with pytest.raises(ConfigError, match="SeqKD"):
    kdjax.Distiller(
      nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
      pair,
      method="ce",
      optimizer=optax.sgd(0.1),
      responses=ResponseConfig(others="teacher"),
    )
  with pytest.raises(ConfigError, match="method.multi_teacher"):
    MethodConfig(multi_teacher="nearest")
  with pytest.raises(ConfigError, match="without others=teacher"):
    Experiment(mode="multi_teacher", extra_teachers=(Experiment().teacher,), responses=ResponseConfig(others="teacher"))
