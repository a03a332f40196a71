"""Teachers whose vocabulary is not the student's: a padded vocabulary of the student's tokenizer (cut to the
student's tokens) and another tokenizer altogether (the text retokenized, ULD across vocabularies)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as T
from flax import nnx

from kdjax import Distiller
from kdjax import batch as B
from kdjax.data import retokenize
from kdjax.data.builders import arithmetic as A
from kdjax.models import pretrained

LLAMA = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
)


def _bpe():
  """A BPE tokenizer trained here on arithmetic text: digit pairs merge, so its rows are shorter."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("=", behavior="isolated")
  tok.decoder = decoders.BPEDecoder()
  rng = np.random.default_rng(0)
  text = [f"{a}+{b}={a + b}" for a, b in rng.integers(0, 10_000, (300, 2))]
  tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=48, special_tokens=["<unk>", "<s>", "</s>"]))
  return tok


def _rows(pairs, n=4):
  """Arithmetic rows as the dataset writes them: inputs, targets (−1 on the prompt) ``(N, L)``."""
  xs, ys = [], []
  for a, b in pairs:
    prompt, answer = A.example_tokens(a, b, n)
    seq = prompt + answer
    xs.append(seq[:-1])
    ys.append([-1] * (len(prompt) - 1) + answer)
  return np.asarray(xs, np.int32), np.asarray(ys, np.int32)


def _text(tokens) -> str:
  return "".join(A.VOCAB[t] for t in tokens if t > 2)


def test_arithmetic_tokenizer_encodes_like_the_dataset():
  tok = A.tokenizer()
  prompt, answer = A.example_tokens(1234, 5678, 4)
  assert tok.encode(A.decode(prompt + answer), add_special_tokens=False).ids == prompt + answer
  assert tok.decode(prompt + answer, skip_special_tokens=True) == _text(prompt + answer)


@pytest.mark.parametrize("length", [24, 9])
def test_retokenized_rows_hold_the_same_prompt_and_response(length):
  """Each teacher row reads the student row's prompt and response text in the teacher's tokens (bos first,
  eos after the answer); the mask marks exactly the positions that predict response tokens. At length 9
  the sequence is cut and the mask stops with it."""
  bpe = _bpe()
  bos, eos = bpe.token_to_id("<s>"), bpe.token_to_id("</s>")
  pairs = [(1234, 5678), (9999, 1), (7, 30)]
  x, y = _rows(pairs)
  r = retokenize.Retokenizer(A.tokenizer(), bpe, length=length, teacher_bos=bos, teacher_eos=eos, pad=0)
  out = r({B.INPUTS: x, B.LABEL: y, "id": np.arange(3)})
  assert out[B.TEACHER_INPUTS].shape == (3, length) and out[B.TEACHER_MASK].shape == (3, length)
  for i, (a, b) in enumerate(pairs):
    prompt, answer = A.example_tokens(a, b, 4)
    want_prompt = [bos] + bpe.encode(_text(prompt)).ids
    want_answer = bpe.encode(_text(answer)).ids + [eos]
    seq = (want_prompt + want_answer)[: length + 1]
    assert out[B.TEACHER_INPUTS][i, : len(seq) - 1].tolist() == seq[:-1]
    predicted = [seq[p + 1] for p in np.flatnonzero(out[B.TEACHER_MASK][i])]
    assert predicted == want_answer[: max(len(seq) - len(want_prompt), 0)]
    if len(seq) > len(want_prompt):
      assert _text(answer).startswith(bpe.decode(predicted, skip_special_tokens=True).replace(" ", ""))
    assert not out[B.TEACHER_MASK][i, : len(want_prompt) - 1].any()


def _np_uld(s_logits, t_logits, s_mask, t_mask):
  """ULD by its definition, in NumPy: i-th student response token with the i-th teacher one; Σ |sorted p_S −
  sorted p_T| (zero-padded), averaged over the pairs."""

  def probs(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return -np.sort(-(e / e.sum(-1, keepdims=True)), axis=-1)

  size, values = max(s_logits.shape[-1], t_logits.shape[-1]), []
  for b in range(len(s_logits)):
    ps, pt = np.flatnonzero(s_mask[b]), np.flatnonzero(t_mask[b])
    for i, j in zip(ps, pt):
      p, q = probs(s_logits[b, i]), probs(t_logits[b, j])
      values.append(np.abs(np.pad(p, (0, size - len(p))) - np.pad(q, (0, size - len(q)))).sum())
  return np.mean(values), len(values)


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory):
  """A tiny Llama made by transformers over the BPE tokenizer's vocabulary, saved with that tokenizer."""
  d = tmp_path_factory.mktemp("bpe_teacher")
  bpe = _bpe()
  torch.manual_seed(0)
  model = T.LlamaForCausalLM(
    T.LlamaConfig(
      vocab_size=bpe.get_vocab_size(),
      bos_token_id=bpe.token_to_id("<s>"),
      eos_token_id=bpe.token_to_id("</s>"),
      **LLAMA,
    )
  ).eval()
  model.save_pretrained(d)
  bpe.save(str(d / "tokenizer.json"))
  return d, model


@pytest.mark.slow
def test_uld_step_loss_equals_numpy_on_transformers_logits(bpe_teacher):
  """A zoo student on characters and a Llama teacher on BPE tokens: the step's ULD term equals ULD computed
  in NumPy from the student's logits and transformers' own teacher logits on the retokenized rows; under
  gradient accumulation (2 micro-batches of uneven pair counts) it is the same mean over the batch's pairs."""
  from kdjax import models

  d, hf = bpe_teacher
  teacher = pretrained.from_pretrained(d)
  ids = pretrained.special_token_ids(d)
  x, y = _rows([(1234, 5678), (9999, 1), (7, 30), (5050, 5050)])
  r = retokenize.Retokenizer(
    A.tokenizer(), pretrained.load_tokenizer(d), length=x.shape[1], teacher_bos=ids["bos"], teacher_eos=ids["eos"]
  )
  batch = r({B.INPUTS: x, B.LABEL: y, B.ID: np.arange(4, dtype=np.int32)})
  with torch.no_grad():
    t_logits = hf(torch.as_tensor(batch[B.TEACHER_INPUTS], dtype=torch.long)).logits.numpy()
  losses = {}
  for accum in (1, 2):
    student = models.create("lm_1x32", num_classes=len(A.VOCAB), rngs=nnx.Rngs(0))
    s_logits = np.asarray(student(jnp.asarray(x)).logits)
    dist = Distiller(student, teacher, method="uld", optimizer=optax.sgd(0.0), grad_accum=accum)
    state = dist.init(jax.random.key(0), batch)
    _, metrics = dist.step(state, batch)
    losses[accum] = float(metrics["loss/uld"])
  want, pairs = _np_uld(s_logits, t_logits, y >= 0, batch[B.TEACHER_MASK])
  assert pairs > 4 and dist.cross_tokenizer
  np.testing.assert_allclose(losses[1], want, rtol=2e-5)
  np.testing.assert_allclose(losses[2], want, rtol=2e-5)


@pytest.mark.slow
def test_padded_vocabulary_is_cut_to_the_students(tmp_path):
  """A checkpoint of the student's tokenizer padded to 32 ids: with ``vocab_size=15`` its logits are
  transformers' first 15, and a token-level method accepts it; loaded whole it is refused with the fix."""
  torch.manual_seed(0)
  hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, **LLAMA)).eval()
  hf.save_pretrained(tmp_path)
  x, y = _rows([(1234, 5678), (42, 58)])
  cut = pretrained.from_pretrained(tmp_path, vocab_size=len(A.VOCAB))
  with torch.no_grad():
    want = hf(torch.as_tensor(x, dtype=torch.long)).logits.numpy()[..., : len(A.VOCAB)]
  np.testing.assert_allclose(np.asarray(cut(jnp.asarray(x)).logits), want, atol=1e-4)
  from kdjax import models

  student = models.create("lm_1x32", num_classes=len(A.VOCAB), rngs=nnx.Rngs(0))
  batch = {B.INPUTS: x, B.LABEL: y}
  Distiller(student, cut, method="forward_kl", optimizer=optax.sgd(0.1)).init(jax.random.key(0), batch)
  with pytest.raises(ValueError, match=r"vocab_size=15\).*'uld'"):
    Distiller(student, pretrained.from_pretrained(tmp_path), method="forward_kl", optimizer=optax.sgd(0.1)).init(
      jax.random.key(0), batch
    )
  with pytest.raises(ValueError, match=r"vocab_size=40 must lie in \[1, 32\]"):
    pretrained.from_pretrained(tmp_path, vocab_size=40)


def test_uld_without_teacher_rows_and_with_responses_are_one_line(bpe_teacher):
  from kdjax import ResponseConfig, models

  d, _ = bpe_teacher
  x, y = _rows([(1, 2), (3, 4)])
  student = models.create("lm_1x32", num_classes=len(A.VOCAB), rngs=nnx.Rngs(0))
  dist = Distiller(student, pretrained.from_pretrained(d), method="uld", optimizer=optax.sgd(0.1))
  plain = {B.INPUTS: x, B.LABEL: y}
  with pytest.raises(ValueError, match="needs 'teacher_inputs' and 'teacher_mask'"):
    dist.step(dist.init(jax.random.key(0), plain), plain)
  r = retokenize.Retokenizer(A.tokenizer(), pretrained.load_tokenizer(d), length=x.shape[1])
  on_policy = Distiller(
    student,
    pretrained.from_pretrained(d),
    method="uld",
    optimizer=optax.sgd(0.1),
    responses=ResponseConfig(student_fraction=1.0, stop_tokens=(A.EOS,)),
  )
  with pytest.raises(ValueError, match="cannot be retokenized"):
    rows = r(plain)
    on_policy.step(on_policy.init(jax.random.key(0), rows), rows)


@pytest.mark.slow
def test_cli_distils_across_tokenizers(bpe_teacher, tmp_path, tfds_dir):
  """``kdjax distill … --method.name uld`` with a BPE-tokenized Hugging Face teacher: the character-level
  student trains end to end (CE + ULD), its ULD falls, and the teacher-side figures that would need the
  teacher's tokens are left out."""
  from kdjax import cli

  d, _ = bpe_teacher
  w = tmp_path / "run"
  args = [
    "distill",
    "arithmetic_gkd",
    "supervised_kd",
    "--workdir",
    str(w),
    "--teacher.name",
    "hf",
    "--teacher.checkpoint",
    str(d),
    "--method.name",
    "uld",
    "--data.data_dir",
    tfds_dir,
    "--optim.steps",
    "8",
    "--data.batch_size",
    "32",
    "--data.eval_batch_size",
    "500",
    "--run.quiet",
    "--run.log_every",
    "1",
  ]
  assert cli.main(args) == 0
  res = json.loads((w / "results.json").read_text())
  assert res["teacher"] == "hf" and res["steps"] == 8 and 0 <= res["exact_match"] <= 1
  assert "teacher_exact_match" not in res and res.get("agreement") is None
  rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  uld = [r["loss/uld"] for r in rows if "loss/uld" in r]
  assert len(uld) == 8 and 0 < uld[-1] < uld[0] <= 2
