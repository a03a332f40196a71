"""Hugging Face checkpoints: tiny random models made and saved by ``transformers`` itself (PyTorch, CPU),
loaded by ``kdjax.models.from_pretrained``, agree with transformers logit for logit and token for token."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.numpy import load_file, save_file

import _procs as P
from kdjax import generate as G
from kdjax.models import pretrained

VOCAB = 64


def _configs() -> dict:
  small = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
  )
  llama3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
  }
  return {
    "llama": T.LlamaConfig(**small, num_key_value_heads=2, rope_parameters=llama3),  # GQA: 2 heads per kv head
    # YaRN (factor 4 over an original 16-position context: the ramp falls inside the head's frequencies)
    "mistral": T.MistralConfig(
      **small,
      num_key_value_heads=2,
      rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
    "qwen2": T.Qwen2Config(**small, num_key_value_heads=4, tie_word_embeddings=True),  # q/k/v biases, tied head
    "qwen3": T.Qwen3Config(**small, num_key_value_heads=1, head_dim=16),  # per-head q/k RMSNorm, 4 heads per kv
    "gpt2": T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2),
    # Sliding layers with a 4-token window (shorter than the 12 tokens compared) alternate with global ones.
    "gemma2": T.Gemma2Config(
      **{**small, "num_hidden_layers": 3},
      num_key_value_heads=2,
      head_dim=8,
      query_pre_attn_scalar=16,
      sliding_window=4,
      attn_logit_softcapping=5.0,
      final_logit_softcapping=3.0,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "gemma3_text": T.Gemma3TextConfig(
      **{**small, "num_hidden_layers": 3},
      num_key_value_heads=1,
      head_dim=8,
      query_pre_attn_scalar=8,
      sliding_window=4,
      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
      rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
      },
    ),
  }


def _save(cfg, directory: Path, **kw) -> T.PreTrainedModel:
  torch.manual_seed(0)
  model = T.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # norms and biases away from their 1 / 0 initialisation, so a swapped one shows
    for name, p in model.named_parameters():
      if "norm" in name or "ln_" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, **kw)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for family, cfg in _configs().items():
    kw = {"max_shard_size": "20KB"} if family == "llama" else {}  # llama: several files + an index
    out[family] = (root / family, _save(cfg, root / family, **kw))
  return out


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2"])
def test_logits_equal_transformers(checkpoints, family):
  path, ref_model = checkpoints[family]
  if family == "llama":
    assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
  with torch.no_grad():
    ref = ref_model(torch.tensor(TOKENS)).logits.numpy()
  model = pretrained.from_pretrained(path)
  out = model(jnp.asarray(TOKENS, jnp.int32))
  np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)
  assert {"block0", "block1", "embed", "pooled"} <= set(out.features)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2"])
def test_greedy_generation_equals_transformers_generate(checkpoints, family):
  """Tokens equal transformers' greedy ``generate``; log-probabilities equal NumPy's log-softmax of its logits
  (tied heads, whose decode logits generation reads vocabulary-major, and untied ones)."""
  path, ref_model = checkpoints[family]
  prompts = np.random.default_rng(1).integers(3, VOCAB, (3, 5))
  with torch.no_grad():
    ref = ref_model.generate(
      torch.tensor(prompts), do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0, eos_token_id=None,
      output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
  tokens = ref.sequences.numpy()[:, 5:]
  logits = np.stack([z.numpy().astype(np.float64) for z in ref.logits], axis=1)  # (B, N, V)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  model = pretrained.from_pretrained(path)
  got = G.Generator(model, G.Sampling(max_new_tokens=10, temperature=0.0))(prompts, np.full(3, 5), jax.random.key(0))
  assert len(set(tokens.reshape(-1).tolist())) > 3  # not a degenerate repetition
  np.testing.assert_array_equal(np.asarray(got.tokens), tokens)
  np.testing.assert_allclose(
    np.asarray(got.logprobs), np.take_along_axis(logp, tokens[..., None], -1)[..., 0], atol=1e-4
  )


def _edit(src: Path, dst: Path, change) -> Path:
  shutil.copytree(src, dst)
  f = dst / "model.safetensors"
  tensors = load_file(f)
  change(tensors)
  save_file(tensors, f, metadata={"format": "pt"})
  return dst


@pytest.mark.parametrize(
  "case, change, words",
  [
    (
      "missing",
      lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
      "tensor 'layers.1.mlp.up_proj.weight' is missing",
    ),
    (
      "extra",
      lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}),
      "tensor 'model.layers.0.mlp.extra.weight' is not used",
    ),
    (
      "shape",
      lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}),
      "tensor 'layers.0.self_attn.k_proj.weight' has shape (8, 32)",
    ),
  ],
)
def test_damaged_checkpoint_is_one_line_naming_the_tensor(checkpoints, tmp_path, case, change, words):
  path = _edit(checkpoints["mistral"][0], tmp_path / case, change)
  with pytest.raises(ValueError) as e:
    pretrained.from_pretrained(path)
  assert words in str(e.value) and "\n" not in str(e.value)


def test_missing_directory_and_unknown_architecture_are_one_line(checkpoints, tmp_path):
  with pytest.raises(ValueError, match=r"no Hugging Face checkpoint at .*huggingface-cli download"):
    pretrained.from_pretrained(tmp_path / "nowhere")
  d = shutil.copytree(checkpoints["gpt2"][0], tmp_path / "bert")
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
    pretrained.from_pretrained(d)


def _make_sharded(d: Path) -> None:
  cfg = T.LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
  )
  model = _save(cfg, d / "ckpt", max_shard_size="200KB")
  with torch.no_grad():
    ref = model(torch.tensor(TOKENS)).logits.numpy()
  np.save(d / "ref.npy", ref)
  P.run_together(["_pretrained_devices.py", d / "ckpt", d / "out.pkl"])


@pytest.mark.procs
def test_sharded_load_on_eight_devices(made_once):
  d = made_once("pretrained_sharded", _make_sharded)
  with open(d / "out.pkl", "rb") as fh:
    out = pickle.load(fh)
  ref = np.load(d / "ref.npy")
  specs = out["specs"]
  assert specs["blocks.0.attn.q.kernel"] == (None, "model") and specs["blocks.0.attn.o.kernel"] == ("model", None)
  assert specs["blocks.0.down.kernel"] == ("model", None) and specs["embed.embedding"] == ("model", None)
  assert specs["norm.scale"] == ()
  assert out["max_per_device"] < 0.4 * out["total"]  # split 4 ways, small leaves whole
  np.testing.assert_allclose(out["logits"], ref, atol=1e-4, rtol=0)
  # As the CLI loads it for a split placement: only on the teacher's 4 devices, tensor-parallel 2 ways there.
  assert out["split_devices"] == out["teacher_devices"] and len(out["teacher_devices"]) == 4
  assert out["split_q_spec"] == (None, "model")
  np.testing.assert_allclose(out["split_logits"], ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_distils_a_hugging_face_teacher_into_a_zoo_student(tmp_path, tfds_dir):
  """``kdjax distill`` with ``--teacher.name hf``: a tiny Llama made by transformers with the arithmetic
  dataset's tokenizer, its vocabulary padded to 32, teaches the zoo's 1-layer student over the dataset's 15
  tokens; the run trains, evaluates and records the teacher."""
  from kdjax import cli

  hf = tmp_path / "teacher"
  _save(
    T.LlamaConfig(
      vocab_size=32,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
    ),
    hf,
  )
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
    str(hf),
    "--data.data_dir",
    tfds_dir,
    "--optim.steps",
    "6",
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
  assert res["teacher"] == "hf" and res["teacher_hash"] and res["steps"] == 6
  assert 0 <= res["exact_match"] <= 1 and "teacher_exact_match" in res and res["perplexity"] > 1
  rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  kd = [r["loss/forward_kl"] for r in rows if "loss/forward_kl" in r]
  assert len(kd) == 6 and kd[-1] < kd[0]  # the student moves toward the pretrained teacher
  missing = [a if a != str(hf) else str(tmp_path / "nowhere") for a in args]
  missing[missing.index(str(w))] = str(tmp_path / "run2")
  assert cli.main(missing) == 1  # a missing checkpoint directory: one line, exit 1


def test_tokenizer_loads_from_the_checkpoint_directory(checkpoints, tmp_path):
  """A BPE tokenizer trained here with ``tokenizers`` and saved in the checkpoint directory: kdjax's loader
  encodes as transformers' own fast tokenizer reading the same directory does."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  d = shutil.copytree(checkpoints["llama"][0], tmp_path / "llama")
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
    ["the teacher teaches the student", "students distil what teachers know"] * 20,
    trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]),
  )
  tok.save(str(d / "tokenizer.json"))
  text = "the student distils the teacher"
  ids = pretrained.load_tokenizer(d).encode(text).ids
  assert len(ids) > 3 and ids == T.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))(text)["input_ids"]
  with pytest.raises(ValueError, match="no tokenizer.json in"):
    pretrained.load_tokenizer(checkpoints["gpt2"][0])


@pytest.mark.slow
def test_bfloat16_checkpoint_loads_exactly(tmp_path):
  """Released checkpoints are stored in bfloat16: the weights arrive exactly (bf16 → float32 is exact), so the
  logits equal transformers' float32 model loaded from the same files."""
  cfg = T.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
  )
  torch.manual_seed(0)
  T.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
  ref = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert next(ref.parameters()).dtype == torch.float32
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  model = pretrained.from_pretrained(tmp_path)
  np.testing.assert_array_equal(
    np.asarray(model.embed.embedding.get_value()), ref.model.embed_tokens.weight.detach().numpy()
  )
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens)).logits), want, atol=1e-4, rtol=0)
  # A bfloat16 teacher holds its weights in bfloat16: half the bytes, the logits of bfloat16 compute over
  # float32-held weights, and within bfloat16 rounding of transformers' own bfloat16 model.
  half = pretrained.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  full = pretrained.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  leaves = jax.tree.leaves(nnx.state(half))
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert sum(x.nbytes for x in leaves) * 2 == sum(x.nbytes for x in jax.tree.leaves(nnx.state(full)))
  got = np.asarray(half(jnp.asarray(tokens)).logits, np.float32)
  np.testing.assert_array_equal(got, np.asarray(full(jnp.asarray(tokens)).logits, np.float32))
  with torch.no_grad():
    ref_bf16 = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    want_bf16 = ref_bf16(torch.as_tensor(tokens)).logits.float().numpy()
  np.testing.assert_allclose(got, want_bf16, atol=5e-2, rtol=0)


@pytest.mark.parametrize(
  "layout",
  [
    pretrained.Layout(),
    pretrained.Layout(transpose=True),
    pretrained.Layout(part=(1, 4)),
    pretrained.Layout(part=(2, 4), transpose=True),
  ],
)
def test_each_shard_reads_only_its_slice_of_the_stored_tensor(layout):
  """A shard of a parameter is the layout of its source slice: the same as slicing the whole parameter."""
  stored = np.arange(6 * 12, dtype=np.float32).reshape(6, 12)
  whole = layout(stored)
  for idx in [
    (slice(None), slice(None)),
    (slice(0, 2), slice(None)),
    (slice(None), slice(1, 3)),
    (slice(2, 4), slice(0, 1)),
  ]:
    np.testing.assert_array_equal(layout.orient(stored[layout.source(idx, whole.shape)]), whole[idx])
