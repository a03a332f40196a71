"""The README's library example runs as written, trains, and computes KD exactly."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run_library_example(**edits: str) -> dict:
  """The README's first example executed as written (after ``edits``: old text → new); its namespace."""
  block = _python_blocks()[0] if _python_blocks() else pytest.fail("README has no python example")
  for old, new in edits.items():
    assert old in block, old
    block = block.replace(old, new)
  ns: dict = {}
  with contextlib.redirect_stdout(io.StringIO()):
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own README
  return ns


def _log_softmax(z, temperature=4.0):
  z = z / temperature - (z / temperature).max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kd(teacher_logits, student_logits):
  """KD (T = 4) in float64: T² · mean over rows of KL(teacher ‖ student)."""
  lp, lq = _log_softmax(teacher_logits), _log_softmax(student_logits)
  return 16.0 * np.mean(np.sum(np.exp(lp) * (lp - lq), -1))


def test_library_example_trains_its_dropout_student_and_evaluates_it_deterministically():
  import kdjax

  ns = _run_library_example()
  d, state = ns["distiller"], ns["state"]
  assert int(state.step) == 100
  evals = [kdjax.evaluate(d, state, [next(ns["batches"](8))]) for _ in range(2)]
  assert evals[0] == evals[1]  # dropout is off in evaluation
  assert 0.0 <= evals[0]["agreement"] <= 1.0 and evals[0]["num_examples"] == 32
  # It trained: KD between the teacher and the trained student (eval mode) is far below a fresh student's.
  x = jnp.asarray(next(ns["batches"](7))["inputs"])
  trained, fresh = kdjax.student_model(d, state), ns["Net"](8, rngs=nnx.Rngs(1))
  trained.eval(), fresh.eval()
  t = np.asarray(ns["teacher"](x), np.float64)
  assert _kd(t, np.asarray(trained(x), np.float64)) < 0.5 * _kd(t, np.asarray(fresh(x), np.float64))


def test_library_example_step_computes_kd_exactly():
  """The loss the step reports equals KD(T=4) computed here in float64 from the models' own outputs (the
  example with its dropout rate set to 0, so the student's training forward is its plain forward)."""
  import kdjax

  ns = _run_library_example(**{"nnx.Dropout(0.1": "nnx.Dropout(0.0", "range(100)": "range(3)"})
  d, state = ns["distiller"], ns["state"]
  batch = next(ns["batches"](7))
  before = kdjax.student_model(d, state)
  s = np.asarray(before(jnp.asarray(batch["inputs"])), np.float64)
  t = np.asarray(ns["teacher"](jnp.asarray(batch["inputs"])), np.float64)
  _, m = d.step(state, batch)
  ref = _kd(t, s)
  atol = 16.0 * 10 * np.finfo(np.float32).eps * max(1.0, np.abs(np.r_[s, t]).max() / 4.0)  # T²·C ulp of |z/T|
  np.testing.assert_allclose(float(m["loss/kd"]), ref, rtol=0, atol=atol)
  assert ref > 10 * atol


def test_generation_example_runs_with_the_names_it_assumes():
  import jax
  from flax import nnx

  from kdjax import models
  from kdjax.parallel.sharding import make_mesh

  block = next(b for b in _python_blocks() if "Generator(" in b)
  lm = models.create("transformer_lm", num_classes=13, num_layers=1, dim=16, num_heads=2, max_len=40, rngs=nnx.Rngs(0))
  ns = {
    "jax": jax,
    "lm": lm,
    "eos": 3,
    "mesh": make_mesh(),
    "prompts": np.ones((2, 5), np.int32),
    "prompt_lengths": np.array([5, 2], np.int32),
  }
  exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own README
  out = ns["out"]
  assert out.tokens.shape == out.logprobs.shape == (2, 32) and out.lengths.shape == (2,)
  assert all(1 <= n <= 32 for n in np.asarray(out.lengths))


@pytest.mark.slow
def test_on_policy_example_runs_with_the_names_it_assumes():
  import jax
  import optax
  from flax import nnx

  import kdjax
  from kdjax import models

  block = next(b for b in _python_blocks() if "ResponseConfig(" in b)
  lm = lambda layers, seed: models.create(
    "transformer_lm",
    num_classes=13,
    num_layers=layers,
    dim=16,  # noqa: E731
    num_heads=2,
    max_len=16,
    rngs=nnx.Rngs(seed),
  )
  tokens = np.random.default_rng(0).integers(4, 13, (4, 9)).astype(np.int32)
  label = np.where(np.arange(8) >= 3, tokens[:, 1:], -1).astype(np.int32)
  ns = {
    "jax": jax,
    "optax": optax,
    "kdjax": kdjax,
    "student": lm(1, 0),
    "teacher": lm(2, 1),
    "eos": 3,
    "batch": {"inputs": tokens[:, :-1], "label": label},
  }
  exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own README
  rows, metrics = ns["rows"], ns["metrics"]
  np.testing.assert_array_equal(np.asarray(rows["inputs"])[:, :4], tokens[:, :4])  # prompts kept
  assert (np.asarray(rows["label"])[:, :3] == -1).all() and (np.asarray(rows["label"])[:, 3] >= 0).all()
  assert int(ns["state"].step) == 1 and np.isfinite(float(metrics["loss/total"]))


@pytest.mark.slow
def test_hidden_state_example_pairs_the_layers_it_names():
  import jax
  import optax

  import kdjax
  from kdjax import models

  block = next(b for b in _python_blocks() if 'name="tinybert"' in b)
  lm = lambda layers, dim, seed: models.create(  # noqa: E731
    "transformer_lm", num_classes=13, num_layers=layers, dim=dim, num_heads=2, max_len=16, rngs=nnx.Rngs(seed)
  )
  tokens = np.random.default_rng(0).integers(4, 13, (4, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "label": tokens[:, 1:]}
  ns = {"jax": jax, "optax": optax, "kdjax": kdjax, "student": lm(2, 32, 0), "teacher": lm(4, 64, 1), "batch": batch}
  exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own README
  assert float(ns["metrics"]["loss/hidden_mse"]) > 0
  # The pairs named: student block0 ↔ teacher block1, block1 ↔ block3, each through a learned 32 → 64 projection.
  projections = ns["state"].adapter_params[0]["hidden_mse"]
  assert set(projections) == {"block0->block1", "block1->block3"}
  assert all(np.shape(p["w"]) == (32, 64) for p in projections.values())


def test_cross_tokenizer_example_runs_with_the_names_it_assumes(tmp_path):
  """The Hugging Face library example, on a Llama made here by transformers with a word-level tokenizer of
  its own (another vocabulary than the student's characters): one ULD step trains."""
  import jax
  import jax.numpy as jnp
  import optax
  import torch
  import transformers as T
  from flax import nnx
  from tokenizers import Regex, Tokenizer, models as tok_models, pre_tokenizers

  import kdjax
  from kdjax import models
  from kdjax.data import ArrayDataset
  from kdjax.data.builders import arithmetic as A

  words = ["<unk>", "<s>", "</s>"] + [str(i) for i in range(100)] + ["+", "="]
  tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d?|[+=]"), behavior="isolated")
  tok.save(str(tmp_path / "tokenizer.json"))
  torch.manual_seed(0)
  T.LlamaForCausalLM(
    T.LlamaConfig(
      vocab_size=len(words),
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      bos_token_id=1,
      eos_token_id=2,
      max_position_embeddings=64,
    )
  ).save_pretrained(tmp_path)
  rows = [A.example_tokens(a, b, 4) for a, b in [(1234, 5678), (5, 60), (9999, 9999), (42, 7)]]
  x = np.asarray([(p + q)[:-1] for p, q in rows], np.int32)
  y = np.asarray([[-1] * (len(p) - 1) + q for p, q in rows], np.int32)
  block = next(b for b in _python_blocks() if "retokenize.Retokenizer(" in b)
  ns = {
    "jax": jax,
    "jnp": jnp,
    "optax": optax,
    "kdjax": kdjax,
    "path": str(tmp_path),
    "student_tokenizer": A.tokenizer(),
    "train_ds": ArrayDataset(x, y, np.arange(4)),
    "student": models.create("lm_1x32", num_classes=len(A.VOCAB), rngs=nnx.Rngs(0)),
  }
  exec(compile(block.replace("batch_size=32", "batch_size=4"), "README.md", "exec"), ns)  # noqa: S102
  batch = next(iter(ns["loader"]))
  assert batch["teacher_inputs"].shape == (4, 64) and batch["teacher_mask"].sum() > 0
  _, metrics = ns["distiller"].step(ns["state"], batch)
  assert np.isfinite(float(metrics["loss/uld"])) and float(metrics["loss/uld"]) > 0
