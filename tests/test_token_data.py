"""The embedded token dataset (addition with worked carries) and token-level evaluation with (B, L) masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kdjax
from kdjax import data as kd
from kdjax import models
from kdjax.data.builders import arithmetic as A


@pytest.fixture(scope="module")
def splits(tfds_dir):
  return {s: kd.load_arrays("arithmetic", s, tfds_dir) for s in ("train", "test")}


def _parse(text: str) -> tuple[int, int, str]:
  """``<bos>a+b=answer<eos>`` (digits least significant first) → (a, b, answer text)."""
  body = text.removeprefix("<bos>")
  a, rest = body.split("+")
  b, answer = rest.split("=")
  return int(a[::-1]), int(b[::-1]), answer


def test_every_example_is_a_correct_worked_sum(splits):
  assert len(splits["train"]) == 30_000 and len(splits["test"]) == 1_000
  for name, ds in splits.items():
    assert ds.images.shape[1] == ds.labels.shape[1] == 20 and ds.images.dtype == np.int32
    pairs = set()
    for x, y in zip(ds.images[:300], ds.labels[:300]):
      seq = np.concatenate([x, y[-1:]])  # inputs + the last target = the whole sequence
      np.testing.assert_array_equal(y[y >= 0], seq[1:][y >= 0])  # targets are the next tokens
      n_prompt = int(np.argmax(y >= 0)) + 1
      assert (y[: n_prompt - 1] == -1).all() and (y[n_prompt - 1 :] >= 0).all()  # only answers are scored
      a, b, answer = _parse(A.decode(seq))
      assert answer.endswith("<eos>") and len(answer) - len("<eos>") + 1 >= 8
      digits = answer.removesuffix("<eos>")
      carry, sums, carries = 0, [], []
      for da, db in zip(str(a).zfill(4)[::-1], str(b).zfill(4)[::-1]):
        s = int(da) + int(db) + carry
        carry = s // 10
        sums.append(s % 10)
        carries.append(carry)
      want = "".join(f"{s}{c}" for s, c in zip(sums, carries)) + str(carry)
      assert digits == want and int(digits[0::2][::-1]) == a + b
      assert A.answer_value(seq[n_prompt:]) == a + b
      pairs.add((a, b))
    splits[name].pairs = pairs
  assert not splits["train"].pairs & splits["test"].pairs


def test_info_view_and_tokenizer(tfds_dir):
  spec = kd.get_info("arithmetic", tfds_dir)
  assert spec.num_classes == len(A.VOCAB) == 15 and spec.image_shape == (20,) and spec.image_dtype == "int32"
  assert kd.default_view("arithmetic").kind == "tokens"
  assert A.decode(A.encode("12+34=")) == "12+34="
  with pytest.raises(ValueError, match="no token for 'x'"):
    A.encode("1x2")
  assert A.answer_value(A.encode("3")) == 3 and A.answer_value(A.encode("31")) is None  # malformed: even length


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.slow
def test_token_evaluation_counts_answer_positions_of_real_examples_only(splits):
  """Accuracy, NLL, perplexity, agreement and KL over answer tokens equal a NumPy computation; prompt
  positions (target −1) and the padding rows of the last batch are excluded."""
  ds = kd.ArrayDataset(splits["test"].images[:37], splits["test"].labels[:37], np.arange(37))
  student = models.create("transformer_lm", num_classes=15, rngs=nnx.Rngs(0))
  teacher = models.create("transformer_lm", num_classes=15, num_layers=1, rngs=nnx.Rngs(1))
  d = kdjax.Distiller(student, teacher, method="forward_kl", optimizer=optax.adam(1e-3))
  view = kd.ViewConfig(kind="tokens")
  batches = list(kd.eval_batches(ds, 16, view=view, process_index=0, process_count=1))
  state = d.init(jax.random.key(0), batches[0])
  got = d.evaluate(state, batches)
  trained = nnx.merge(d.spec.students[0].graphdef, state.params[0], state.model_state[0])
  s = np.asarray(trained(jnp.asarray(ds.images)).logits, np.float64)
  t = np.asarray(teacher(jnp.asarray(ds.images)).logits, np.float64)
  y = ds.labels
  m = y >= 0
  ls, lt = _log_softmax(s), _log_softmax(t)
  nll = -np.take_along_axis(ls, np.maximum(y, 0)[..., None], -1)[..., 0]
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  want = {
    "test_accuracy": (s.argmax(-1) == y)[m].mean(),
    "test_nll": nll[m].mean(),
    "teacher_test_accuracy": (t.argmax(-1) == y)[m].mean(),
    "agreement": (s.argmax(-1) == t.argmax(-1))[m].mean(),
    "teacher_student_kl": kl[m].mean(),
  }
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=2e-5, atol=2e-6, err_msg=k)
  np.testing.assert_allclose(got["perplexity"], np.exp(want["test_nll"]), rtol=2e-5)
  assert got["num_examples"] == m.sum() == 37 * 10  # answer tokens of the 37 real rows


@pytest.mark.slow
def test_fit_on_the_token_dataset_evaluates_and_reports_perplexity(tfds_dir, tmp_path):
  import json

  from kdjax import engine, report
  from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig

  cfg = Experiment(
    name="arith",
    mode="teacher",
    student=ModelConfig(name="transformer_lm"),
    method=MethodConfig(name="ce"),
    data=DataConfig(name="arithmetic", data_dir=tfds_dir, view="tokens", batch_size=32, eval_batch_size=250),
    optim=OptimConfig(steps=8, lr=3e-3),
    run=RunConfig(workdir=str(tmp_path / "lm"), quiet=True, eval_every=4),
  )
  res = engine.fit(cfg)
  assert res["steps"] == 8 and 1.0 < res["perplexity"] < 15.0  # 15 tokens: uniform guessing is 15
  np.testing.assert_allclose(res["perplexity"], np.exp(res["test_nll"]), rtol=1e-6)
  rows = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [4, 8] and evals[1]["perplexity"] < evals[0]["perplexity"]
  assert 0.0 <= res["exact_match"] <= 1.0 and all("exact_match" in r for r in evals)
  md = report.make_report([str(tmp_path / "lm")], str(tmp_path / "table.md"))
  header = md.splitlines()[0]
  assert "perplexity" in header and "exact match (%)" in header and "per scored token" in md


def test_prompts_and_answers_split_rows_at_their_first_scored_target():
  from kdjax import generate as G

  inputs = np.array([[1, 5, 6, 7, 8], [1, 9, 4, 4, 0], [1, 2, 3, 3, 3]])
  targets = np.array([[-1, -1, 7, 8, 2], [-1, 4, 4, 2, -1], [-1] * 5])
  prompts, lengths, answers = G.prompts_and_answers(inputs, targets)
  np.testing.assert_array_equal(lengths, [3, 2, 5])
  np.testing.assert_array_equal(prompts, [[1, 5, 6, 0, 0], [1, 9, 0, 0, 0], [1, 2, 3, 3, 3]])
  np.testing.assert_array_equal(answers, [[7, 8, 2, -1], [4, 4, 2, -1], [-1, -1, -1, -1]])
  tokens = np.array([[7, 8, 2, 0], [4, 4, 3, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(G.answers_match(tokens, answers)), [True, False, True])


@pytest.mark.slow
def test_exact_match_of_greedy_answers_equals_a_token_by_token_decode(splits):
  """The Distiller's exact match equals greedy decoding written out here (full recompute per token)."""
  ds = kd.ArrayDataset(splits["test"].images[:24], splits["test"].labels[:24], np.arange(24))
  student = models.create("transformer_lm", num_classes=15, rngs=nnx.Rngs(3))
  d = kdjax.Distiller(student, None, method="ce", optimizer=optax.adam(1e-2), mode="teacher")
  batches = list(kd.eval_batches(ds, 16, view=kd.ViewConfig(kind="tokens"), process_index=0, process_count=1))
  state = d.init(jax.random.key(0), batches[0])
  # make some answers right and some wrong: memorise the first batch's rows only
  for _ in range(60):
    state, _ = d.step(state, batches[0])
  got = d.exact_match(state, batches)["exact_match"]
  model = nnx.merge(d.spec.students[0].graphdef, state.params[0], state.model_state[0])
  forward = jax.jit(lambda x: model(x).logits)  # causal: a row's padding never changes its earlier logits
  x, y = np.asarray(ds.images), np.asarray(ds.labels)
  n, length = x.shape
  p = np.argmax(y >= 0, axis=1) + 1  # prompt lengths; each row continues to L + 1 tokens
  seq = np.zeros((n, length + 1), np.int64)
  seq[:, :length] = np.where(np.arange(length) < p[:, None], x, 0)
  for t in range(length + 1 - p.min()):  # full recompute for every new token, no cache
    live = p + t <= length
    logits = np.asarray(forward(jnp.asarray(seq[:, :length])))
    nxt = logits[np.arange(n), np.minimum(p + t - 1, length - 1)].argmax(-1)
    seq[live, (p + t)[live]] = nxt[live]
  hits = sum(seq[i, p[i] :].tolist() == y[i, p[i] - 1 :].tolist() for i in range(n))
  assert 0 < hits < 24 and got == hits / 24
