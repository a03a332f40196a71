"""Hugging Face students: cut from a teacher checkpoint (some of its layers, narrower MLPs, fewer heads) and
written back as Hugging Face checkpoints. Tiny models made by ``transformers`` itself are the reference: a
cut student equals the same layers run in transformers, and transformers loads the export and computes the
same logits and greedy tokens as kdjax."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.numpy import load_file

import kdjax
from kdjax import generate as G
from kdjax.errors import ConfigError
from kdjax.models import hf_export, pretrained, prune

VOCAB = 96
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments" / "hf_distill.py"
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))


def _configs() -> dict:
  small = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
  )
  return {
    # GQA (2 query heads per key/value head), q/k/v biases, tied head
    "qwen2": T.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2),
    "gpt2": T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, initializer_range=0.2),
  }


def _tokenizer(d: Path) -> None:
  """A word-level tokenizer (``tokenizers``) with a config, as a checkpoint directory carries them."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """family → (checkpoint directory, transformers model): norms and biases moved off 1 / 0 so a swap shows."""
  root = tmp_path_factory.mktemp("hf_teachers")
  out = {}
  for family, cfg in _configs().items():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "norm" in name or "ln_" in name or name.endswith("bias"):
          p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / family)
    _tokenizer(root / family)
    out[family] = (root / family, model)
  return out


def _reference(path: Path, keep: list[int]) -> T.PreTrainedModel:
  """The teacher with every layer outside ``keep`` deleted, in transformers."""
  model = T.AutoModelForCausalLM.from_pretrained(path).eval()
  layers = model.transformer.h if model.config.model_type == "gpt2" else model.model.layers
  for i in sorted(set(range(len(layers))) - set(keep), reverse=True):
    del layers[i]
  return model


def _logits(model, tokens=TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens), use_cache=False).logits.numpy()


def _greedy_hf(model, prompts, n: int) -> np.ndarray:
  with torch.no_grad():
    out = model.generate(
      torch.tensor(prompts), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None
    )
  return out.numpy()[:, prompts.shape[1] :]


def _forward(model, tokens=TOKENS) -> np.ndarray:
  """kdjax's logits, jitted (one compilation instead of one per operation)."""
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)(state, jnp.asarray(tokens)))


@pytest.mark.slow
def test_cut_gpt2_student_equals_its_layers_and_its_export_loads_in_transformers(teachers, tmp_path):
  """A GPT-2 student cut from every 2nd teacher layer (0 and 2) computes the logits of those layers run in
  transformers. Moved off the teacher's weights (as training does) and written by ``kdjax.export_hf``
  (q/k/v packed into c_attn again), transformers loads it as it is: its logits equal kdjax's and its greedy
  generation equals kdjax's (KV cache) token for token; the tied head writes no lm_head; the tokenizer files
  come along; a bfloat16 export holds kdjax's weights rounded. (Qwen 2: the loop test below.)"""
  family = "gpt2"
  path, _ = teachers[family]
  keep = prune.choose_layers(3, stride=2)
  assert keep == (0, 2)
  student = pretrained.from_pretrained(path, layers=keep)
  np.testing.assert_allclose(_forward(student), _logits(_reference(path, [0, 2])), atol=1e-5, rtol=0)
  graphdef, state = nnx.split(student)
  student = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.05 + 0.01, state))
  out = kdjax.export_hf(student, tmp_path / "hf")
  assert (out / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
  assert "lm_head.weight" not in load_file(out / "model.safetensors")
  ref = T.AutoModelForCausalLM.from_pretrained(out).eval()
  assert ref.config.model_type == family and ref.config.num_hidden_layers == 2
  np.testing.assert_allclose(_logits(ref), _forward(student), atol=1e-4, rtol=0)
  prompts = np.random.default_rng(1).integers(3, VOCAB, (3, 5))
  want = _greedy_hf(ref, prompts, 10)
  got = G.Generator(student, G.Sampling(max_new_tokens=10, temperature=0.0))(prompts, np.full(3, 5), jax.random.key(0))
  assert len(set(want.reshape(-1).tolist())) > 3  # not a degenerate repetition
  np.testing.assert_array_equal(np.asarray(got.tokens), want)
  # bfloat16: the stored tensors are kdjax's rounded to bfloat16, and transformers loads them as such
  half = kdjax.export_hf(student, tmp_path / "bf16", dtype="bfloat16")
  stored = load_file(half / "model.safetensors")
  emb = stored["transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"]
  assert emb.dtype == ml_dtypes.bfloat16 or str(emb.dtype) == "bfloat16"
  np.testing.assert_array_equal(
    np.asarray(emb, np.float32), np.asarray(student.embed.embedding[...]).astype(ml_dtypes.bfloat16).astype(np.float32)
  )
  assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
  assert T.AutoModelForCausalLM.from_pretrained(half, dtype="auto").dtype == torch.bfloat16


def _hooked_importance(model, tokens) -> dict[str, np.ndarray]:
  """Minitron's importance computed independently in PyTorch: forward pre-hooks on transformers' down_proj and
  o_proj record their inputs; neuron = mean over positions of |a|, head = mean over positions of the head
  output's L2 norm; L2 over examples."""
  seen: dict[str, list] = {"mlp": [], "heads": []}
  hooks = []
  for layer in model.model.layers:
    hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].numpy())))
    hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["heads"].append(a[0].numpy())))
  _logits(model, tokens)
  for h in hooks:
    h.remove()
  b, t = tokens.shape
  mlp = np.stack([np.abs(a).mean(1) for a in seen["mlp"]], 1)  # (B, layers, M)
  heads = np.stack([np.linalg.norm(a.reshape(b, t, 4, -1), axis=-1).mean(1) for a in seen["heads"]], 1)
  return {
    "mlp": np.sqrt((mlp.astype(np.float64) ** 2).sum(0)),
    "heads": np.sqrt((heads.astype(np.float64) ** 2).sum(0)),
  }


@pytest.mark.slow
def test_width_pruning_keeps_the_most_important_and_reports_exact_counts(teachers, tmp_path, capsys):
  """Importance equals an independent PyTorch computation; the pruned student keeps the top neurons and the
  top group of heads, still runs (transformers loads its export with equal logits), and the reported
  parameter counts equal a NumPy count of the exported arrays."""
  path, _ = teachers["qwen2"]
  calib = np.random.default_rng(2).integers(0, VOCAB, (6, 10))
  student = pretrained.from_pretrained(path, layers=(0, 2))
  scores = prune.importance(student, calib, batch_size=4)
  ref = _hooked_importance(_reference(path, [0, 2]), calib)
  np.testing.assert_allclose(scores["mlp"], ref["mlp"], rtol=1e-4)
  np.testing.assert_allclose(scores["heads"], ref["heads"], rtol=1e-4)
  # Padding left out: scores over the first 7 positions of each row are those of the rows cut to 7 (causal).
  masked = prune.importance(student, calib, np.arange(10) < np.full((6, 1), 7))
  for k, v in prune.importance(student, calib[:, :7]).items():
    np.testing.assert_allclose(masked[k], v, rtol=1e-5)
  pruned = prune.prune_width(student, calib, mlp_size=20, heads=2, kv_heads=1)
  assert (pruned.cfg.intermediate_size, pruned.cfg.num_heads, pruned.cfg.num_kv_heads) == (20, 2, 1)
  up = np.asarray(student.blocks[1].up.kernel[...])
  top = np.sort(np.argsort(-ref["mlp"][1])[:20])
  np.testing.assert_array_equal(np.asarray(pruned.blocks[1].up.kernel[...]), up[:, top])
  group = int(np.argmax(ref["heads"][0].reshape(2, 2).sum(1)))  # the group of the larger summed score stays
  k = np.asarray(student.blocks[0].attn.k.kernel[...])[:, group * 8 : (group + 1) * 8]
  np.testing.assert_array_equal(np.asarray(pruned.blocks[0].attn.k.kernel[...]), k)
  out = kdjax.export_hf(pruned, tmp_path / "pruned")
  hf = T.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_logits(hf), _forward(pruned), atol=1e-4, rtol=0)
  arrays = load_file(out / "model.safetensors")
  counts = prune.param_counts(pruned)
  assert counts["total"] == sum(int(np.prod(a.shape)) for a in arrays.values())
  assert counts["mlp"] == sum(a.size for n, a in arrays.items() if ".mlp." in n) == 2 * 3 * 32 * 20
  table = prune.param_table(pruned, student)
  assert f"| total | {counts['total']:,} | {prune.param_counts(student)['total']:,} |" in table
  # As a run builds it: --student.name hf cut from the hf teacher, pruned on the first training rows.
  from kdjax.config import Experiment, ModelConfig
  from kdjax.engine import experiment

  cut = ModelConfig(name="hf", layers=(0, 2), mlp_size=20, heads=2, kv_heads=1, prune_examples=6)
  cfg = Experiment(teacher=ModelConfig(name="hf", checkpoint=str(path)), student=cut)
  built = experiment._hf_student(cfg, VOCAB, _Rows(np.concatenate([calib, calib])))
  for a, b in zip(jax.tree.leaves(nnx.state(built)), jax.tree.leaves(nnx.state(pruned))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  printed = capsys.readouterr().out
  # --student.checkpoint DIR, computing in bfloat16: the student trains float32 master weights of it.
  own = ModelConfig(name="hf", checkpoint=str(path), dtype="bfloat16")
  whole = experiment._hf_student(Experiment(student=own), VOCAB, None)
  assert whole.cfg.num_layers == 3 and whole.compute_dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(whole.blocks[2].up.kernel[...]),
    load_file(path / "model.safetensors")["model.layers.2.mlp.up_proj.weight"].T,
  )
  assert {x.dtype for x in jax.tree.leaves(nnx.state(whole))} == {jnp.dtype(jnp.float32)}
  full = prune.param_counts(
    nnx.eval_shape(lambda: kdjax.models.Decoder(pretrained.read_config(path), rngs=nnx.Rngs(0)))
  )
  assert f"| total | {counts['total']:,} | {full['total']:,} |" in printed


def test_calibration_positions_end_at_each_rows_last_scored_target():
  from kdjax.engine.experiment import _text_positions

  targets = np.array([[-1, -1, 5, 6, -1, -1], [-1, 3, -1, 4, 4, -1], [-1] * 6])
  want = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1] * 6], bool)
  np.testing.assert_array_equal(_text_positions(np.zeros((3, 6), int), targets), want)
  assert _text_positions(np.zeros((3, 6), int), np.zeros(3)) is None  # one label per row: no positions to mask


class _Rows:
  """A training set's ``take`` and ``len``: token rows."""

  def __init__(self, rows):
    self.rows = rows

  def __len__(self):
    return len(self.rows)

  def take(self, idx):
    return self.rows[idx], None, idx


def _config_dir(d: Path, **change) -> Path:
  d.mkdir()
  cfg = dict(
    model_type="qwen2",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
  )
  (d / "config.json").write_text(json.dumps({**cfg, **change}))
  return d


def _one_line(call, words: str) -> None:
  with pytest.raises(ConfigError) as e:
    call()
  assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_checkpoints_and_layer_choices_are_one_line(tmp_path):
  _one_line(lambda: pretrained.from_pretrained(tmp_path / "nowhere", layers=(0,)), "no Hugging Face checkpoint at")
  bert = _config_dir(tmp_path / "bert", model_type="bert")
  _one_line(lambda: pretrained.from_pretrained(bert, layers=(0,)), "model_type 'bert' is not supported")
  ok = _config_dir(tmp_path / "qwen")
  _one_line(
    lambda: pretrained.from_pretrained(ok, layers=(0, 3)),
    "layer index 3 is out of range (the checkpoint has layers 0..2)",
  )
  _one_line(lambda: pretrained.from_pretrained(ok, layers=(1, 1)), "name a layer twice")
  _one_line(lambda: prune.choose_layers(3, (0,), 2), "give one of them")


def test_bad_student_configs_are_one_line():
  from kdjax.config import Experiment, ModelConfig
  from kdjax.engine.experiment import check_cuts

  hf = ModelConfig(name="hf")
  _one_line(
    lambda: Experiment(student=ModelConfig(name="hf", layers=(2, 0))), "student.layers: must be distinct and increasing"
  )
  _one_line(
    lambda: Experiment(student=ModelConfig(name="hf", layers=(0,), layer_stride=2)), "student.layers: give layers or"
  )
  _one_line(lambda: Experiment(student=ModelConfig(name="hf", mlp_size=-1)), "student.mlp_size: must be ≥ 0")
  _one_line(lambda: Experiment(mode="dml", student=hf), "student.name: an hf student")
  _one_line(
    lambda: check_cuts(Experiment(student=ModelConfig(name="mlp", layers=(0, 1)))), "student.name: layers and width"
  )
  _one_line(
    lambda: check_cuts(Experiment(teacher=ModelConfig(name="hf", layers=(0,)))),
    "teacher.layers: cutting and pruning apply to the student only",
  )
  check_cuts(Experiment(teacher=hf, student=ModelConfig(name="hf", layers=(0, 2), heads=2)))


def test_bad_export_requests_are_one_line(tmp_path, capsys):
  linear = nnx.eval_shape(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  _one_line(lambda: kdjax.export_hf(linear, tmp_path / "x"), "not a Linear")
  cfg = pretrained.read_config(_config_dir(tmp_path / "q"))
  tiny = nnx.eval_shape(lambda: kdjax.models.Decoder(cfg, rngs=nnx.Rngs(0)))
  _one_line(lambda: hf_export.to_pretrained(tiny, tmp_path / "y", dtype="float16"), "dtype='float16'")
  _one_line(lambda: hf_export.to_pretrained(tiny, tmp_path / "y", source=tmp_path / "nowhere"), "holds no config.json")
  _one_line(
    lambda: hf_export.to_pretrained(tiny, tmp_path / "q", source=tmp_path / "q"), "is the checkpoint the model came"
  )
  from kdjax import checkpoint, cli

  w = tmp_path / "mlp_run"
  params = {"w": np.zeros((2, 2), np.float32)}
  checkpoint.export_model(w / "export", model_name="mlp", num_classes=2, dtype="float32", params=params, model_state={})
  assert cli.main(["export", str(w), "--format", "hf", "--out", str(tmp_path / "z")]) == 1
  assert cli.main(["export", str(w), "--format", "hf"]) == 1  # no --out
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "(mlp) is not a decoder language model" in err[0] and "usage: kdjax export" in err[1]


def test_fresh_config_is_what_transformers_reads(tmp_path):
  """A decoder with no source checkpoint gets a config.json from its DecoderConfig that transformers parses
  back to the same architecture (what from_pretrained would read again)."""
  src = _config_dir(tmp_path / "q", rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rms_norm_eps=1e-5)
  cfg = pretrained.read_config(src)
  d = tmp_path / "fresh"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(hf_export.config(cfg)))
  back = T.AutoConfig.from_pretrained(d)
  assert type(back).__name__ == "Qwen2Config" and back.rope_parameters["rope_theta"] == 5e5
  assert pretrained.read_config(d) == cfg


def _readme_commands(heading: str) -> list[list[str]]:
  """The ``kdjax …`` command lines of the first bash block under ``heading`` in the README, split."""
  import re
  import shlex

  text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = text[text.index(heading) :]
  block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
  return [shlex.split(line) for line in block.splitlines() if line.startswith("kdjax ")]


@pytest.mark.slow
def test_the_readme_loop_own_data_in_a_student_cut_from_the_teacher_out_to_transformers(tmp_path):
  """The README's "own model on own data" commands as written (paths swapped for the test's, a short run): a
  transformers-made Qwen2 teacher with its tokenizer and chat template → ``kdjax prepare text`` on a JSONL of
  chats → ``kdjax distill experiments/hf_distill.py`` (a student cut from the teacher's layers 0 and 2) →
  ``kdjax export --format hf`` → transformers loads it: its logits equal kdjax's and its greedy generation
  equals kdjax's token for token. Before training, the cut student's logits are those layers' in
  transformers; after, they are not."""
  from test_prepare import CHATS, _jsonl, _tokenizer_dir

  from kdjax import cli

  teacher = _tokenizer_dir(tmp_path / "teacher")
  torch.manual_seed(0)
  small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
  vocab = pretrained.load_tokenizer(teacher).get_vocab_size()
  hf_cfg = T.Qwen2Config(**small, vocab_size=vocab, max_position_embeddings=128, initializer_range=0.2)
  T.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(teacher)
  tokens = np.random.default_rng(1).integers(0, vocab, (3, 10))
  cut = pretrained.from_pretrained(teacher, layers=(0, 2))
  want = _logits(_reference(teacher, [0, 2]), tokens)
  np.testing.assert_allclose(_forward(cut, tokens), want[..., : cut.num_classes], atol=1e-5, rtol=0)

  data_dir, run, out = str(tmp_path / "data"), tmp_path / "run", tmp_path / "hf"
  paths = {"chats.jsonl": str(tmp_path / "chats.jsonl"), "./teacher": str(teacher)}
  paths |= {"runs/student": str(run), "./student": str(out), "experiments/hf_distill.py": str(EXPERIMENTS)}
  _jsonl(Path(paths["chats.jsonl"]), [{"messages": m} for m in CHATS * 6])
  short = {  # the test's sizes: a context the tiny teacher holds, a test split of its 24 chats, 3 steps
    "prepare": ["--data_dir", data_dir, "--max_length", "96", "--test_size", "4"],
    "distill": ["--data.data_dir", data_dir, "--optim.steps", "3", "--optim.lr", "1e-2", "--data.batch_size", "4"],
    "export": [],
  }
  commands = _readme_commands("### Distil your own model on your own data")
  assert [c[1] for c in commands] == ["prepare", "distill", "export"]
  for command in commands:
    argv = [paths.get(a, a) for a in command[1:]] + short[command[1]] + (["--run.quiet"] * (command[1] == "distill"))
    assert cli.main(argv) == 0, command

  assert (out / "tokenizer_config.json").is_file()
  ref = T.AutoModelForCausalLM.from_pretrained(out).eval()
  student = pretrained.from_pretrained(out)
  assert len(student.blocks) == 2
  got = _forward(student, tokens)
  assert np.abs(got - want[..., : student.num_classes]).max() > 1e-3  # trained: no longer the teacher's layers
  np.testing.assert_allclose(_logits(ref, tokens)[..., : student.num_classes], got, atol=1e-4, rtol=0)
  prompts = tokens[:3, :6]
  gen = G.Generator(student, G.Sampling(max_new_tokens=8, temperature=0.0))(prompts, np.full(3, 6), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(gen.tokens), _greedy_hf(ref, prompts, 8))
