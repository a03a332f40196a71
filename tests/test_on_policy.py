"""Generated responses in the step: on-policy (GKD), SeqKD, their losses against NumPy, accumulation, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kdjax
from kdjax import models
from kdjax.engine.responses import on_policy_rows
from kdjax.responses import ResponseConfig
from kdjax.methods import MethodConfig

V, L, BATCH, MAX_LEN, STOP = 15, 12, 8, 32, 2


def _models():
  teacher = models.create(
    "transformer_lm", num_classes=V, num_layers=2, dim=32, num_heads=4, max_len=MAX_LEN, rngs=nnx.Rngs(1)
  )
  student = models.create(
    "transformer_lm", num_classes=V, num_layers=1, dim=16, num_heads=2, max_len=MAX_LEN, rngs=nnx.Rngs(2)
  )
  return student, teacher


def _rows(seed: int = 0) -> dict:
  """Token rows with prompts of 3–7 tokens and data responses of digits ending in the stop token."""
  rng = np.random.default_rng(seed)
  seq = rng.integers(3, V, (BATCH, L + 1)).astype(np.int32)
  plen = rng.integers(3, 8, BATCH)
  labels = np.full((BATCH, L), -1, np.int32)
  for i, p in enumerate(plen):
    end = min(L + 1, p + rng.integers(2, 5))
    seq[i, end - 1] = STOP
    seq[i, end:] = 0
    labels[i, p - 1 : end - 1] = seq[i, p:end]
  return {"inputs": seq[:, :L], "label": labels, "plen": plen}


def _distiller(method: str, responses: ResponseConfig, **kw) -> tuple[kdjax.Distiller, object, dict]:
  student, teacher = _models()
  d = kdjax.Distiller(
    student, teacher, method=MethodConfig(name=method, **kw), optimizer=optax.sgd(0.1), responses=responses
  )
  rows = _rows()
  batch = {"inputs": rows["inputs"], "label": rows["label"]}
  return d, d.init(jax.random.key(0), batch), batch


_forward = nnx.jit(lambda m, x: m(x).logits)


def _greedy(model, prompt: np.ndarray, room: int) -> list[int]:
  """Greedy continuation by re-running the whole sequence per token (no cache), until the stop token."""
  seq = list(prompt)
  for _ in range(room):
    x = np.zeros((1, MAX_LEN), np.int32)
    x[0, : len(seq)] = seq
    seq.append(int(np.argmax(np.asarray(_forward(model, jnp.asarray(x)))[0, len(seq) - 1])))
    if seq[-1] == STOP:
      break
  return seq[len(prompt) :]


def _row_response(inputs: np.ndarray, labels: np.ndarray) -> tuple[int, list[int]]:
  """(prompt length, response tokens) of a rewritten row, checking its layout on the way."""
  scored = np.flatnonzero(labels >= 0)
  p = scored[0] + 1
  assert np.all(scored == np.arange(p - 1, p - 1 + len(scored))), "a response is one contiguous span"
  response = labels[scored].tolist()
  np.testing.assert_array_equal(inputs[p : p + len(response) - 1], response[:-1])  # labels are the next inputs
  return p, response


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_divergence(name: str, s: np.ndarray, t: np.ndarray) -> np.ndarray:
  ls, lt = _log_softmax(s), _log_softmax(t)
  ps, pt = np.exp(ls), np.exp(lt)
  if name == "reverse_kl":
    return (ps * (ls - lt)).sum(-1)
  if name == "forward_kl":
    return (pt * (lt - ls)).sum(-1)
  if name == "gkd":  # generalized JSD, β = 0.5: ½ KL(T‖M) + ½ KL(S‖M), M = ½ (P_S + P_T)
    lm = np.log(0.5 * ps + 0.5 * pt)
    return 0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)
  if name == "skew_kl":  # KL(T ‖ 0.1·T + 0.9·S)
    return (pt * (lt - np.log(0.1 * pt + 0.9 * ps))).sum(-1)
  raise AssertionError(name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reverse_kl", "gkd", "skew_kl"])
def test_on_policy_loss_at_lambda_one_equals_numpy_on_the_sampled_rows(method):
  d, state, batch = _distiller(method, ResponseConfig(student_fraction=1.0, temperature=1.0, stop_tokens=(STOP,)))
  rows = jax.tree.map(np.asarray, d.train_batch(state, batch))
  x, y = rows["inputs"], rows["label"]
  changed = 0
  for i in range(BATCH):
    p, response = _row_response(x[i], y[i])
    assert p == _rows()["plen"][i]
    np.testing.assert_array_equal(x[i, :p], batch["inputs"][i, :p])  # the prompt is kept
    assert STOP not in response[:-1] and (response[-1] == STOP or p - 1 + len(response) == L)
    changed += response != batch["label"][i][batch["label"][i] >= 0].tolist()
  assert changed >= BATCH // 2  # sampled, not the data's responses

  student, teacher = _models()
  s_logits, t_logits = np.asarray(student(jnp.asarray(x)).logits), np.asarray(teacher(jnp.asarray(x)).logits)
  per_token = _np_divergence(method, s_logits, t_logits)
  want = per_token[y >= 0].mean()  # prompt and post-stop positions excluded
  _, metrics = d.step(state, batch)
  np.testing.assert_allclose(float(metrics["loss/total"]), want, rtol=2e-5)


@pytest.mark.slow
def test_greedy_on_policy_rows_are_the_students_continuations_and_lambda_picks_exactly_that_many():
  d, state, batch = _distiller("reverse_kl", ResponseConfig(student_fraction=0.5, temperature=0.0, stop_tokens=(STOP,)))
  student, _ = _models()
  rows = jax.tree.map(np.asarray, d.train_batch(state, batch))
  on_policy = 0
  for i in range(BATCH):
    p, response = _row_response(rows["inputs"][i], rows["label"][i])
    data = batch["label"][i][batch["label"][i] >= 0].tolist()
    greedy = _greedy(student, batch["inputs"][i, :p], L + 1 - p)
    assert response in (data, greedy)
    assert data != greedy
    on_policy += response == greedy
  assert on_policy == BATCH // 2


def test_seqkd_rows_are_the_teachers_greedy_answers():
  d, state, batch = _distiller("ce", ResponseConfig(others="teacher", stop_tokens=(STOP,)))
  _, teacher = _models()
  rows = jax.tree.map(np.asarray, d.train_batch(state, batch))
  for i in range(BATCH):
    p, response = _row_response(rows["inputs"][i], rows["label"][i])
    assert response == _greedy(teacher, batch["inputs"][i, :p], L + 1 - p)


def test_on_policy_rows_are_an_exact_fraction_of_the_batch():
  for frac, n in ((0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)):
    picked = np.asarray(on_policy_rows(jax.random.key(3), 8, frac))
    assert picked.sum() == n
  a, b = (np.asarray(on_policy_rows(jax.random.key(k), 64, 0.5)) for k in (0, 1))
  assert (a != b).any()


@pytest.mark.slow
def test_on_policy_update_is_the_same_with_gradient_accumulation():
  """Responses are sampled for the whole batch before it is split into micro-batches, and the loss is
  normalised by the batch's response tokens: accumulation over 4 micro-batches gives the same update."""
  cfg = ResponseConfig(student_fraction=0.5, temperature=1.0, stop_tokens=(STOP,))
  params = []
  for accum in (1, 4):
    student, teacher = _models()
    d = kdjax.Distiller(
      student, teacher, method=MethodConfig(name="gkd"), optimizer=optax.sgd(0.5), responses=cfg, grad_accum=accum
    )
    rows = _rows()
    batch = {"inputs": rows["inputs"], "label": rows["label"]}
    state = d.init(jax.random.key(0), batch)
    for _ in range(2):
      state, _ = d.step(state, batch)
    params.append(jax.tree.map(np.asarray, state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *params)


def test_bad_response_settings_are_one_clear_error():
  student, teacher = _models()
  rows = _rows()
  batch = {"inputs": rows["inputs"], "label": rows["label"]}
  on = ResponseConfig(student_fraction=1.0)
  with pytest.raises(ValueError, match="responses.student_fraction must be in"):
    ResponseConfig(student_fraction=1.5)
  with pytest.raises(ValueError, match="not mode='teacher'"):
    kdjax.Distiller(student, None, method="ce", optimizer=optax.sgd(0.1), responses=on).init(jax.random.key(0), batch)
  mlp = models.create("mlp", num_classes=V, input_shape=(L,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cannot generate"):
    kdjax.Distiller(mlp, teacher, method="kd", optimizer=optax.sgd(0.1), responses=on).init(
      jax.random.key(0), {"inputs": np.zeros((BATCH, L), np.float32), "label": np.zeros(BATCH, np.int32)}
    )
  d = kdjax.Distiller(student, teacher, method="reverse_kl", optimizer=optax.sgd(0.1), responses=on)
  state = d.init(jax.random.key(0), batch)
  cached = dict(batch, teacher_logits=np.zeros((BATCH, L, V), np.float32))
  with pytest.raises(ValueError, match="cached teacher outputs"):
    d.step(state, cached)
