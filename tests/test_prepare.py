"""A user's own data as a dataset used by name: chat/prompt-response text tokenized as transformers does,
prompts unscored, packing, one-line errors with nothing left behind, and image arrays."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdjax import data as kd
from kdjax.data import prepare
from kdjax.data.prepare import rows as row_lib
from kdjax.errors import ConfigError

# A ChatML template whose assistant turns are marked for transformers' return_assistant_tokens_mask.
TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' }}"
  "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
  "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX = 96  # tokens per example (the models' context)
L = MAX - 1  # positions per row
CORPUS = ["hello world, how are you today?", "I am fine, thank you.", "what is two plus two?", "four", "a b c d"]
CHATS = [
  [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello world, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four"},
  ],
  [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four, I am fine"}],
  [{"role": "user", "content": "a b c d"}, {"role": "assistant", "content": "hello, how are you?"}],
  [{"role": "user", "content": "thank you"}, {"role": "assistant", "content": "a b"}],
]


def _tokenizer_dir(d: Path) -> Path:
  """A byte-level BPE tokenizer trained here, saved as a Hugging Face checkpoint's tokenizer files."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=320,
    show_progress=False,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS * 10, trainer)
  d.mkdir(parents=True, exist_ok=True)
  tok.save(str(d / "tokenizer.json"))
  config = {
    "chat_template": TEMPLATE,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "PreTrainedTokenizerFast",
  }
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return d


def _jsonl(path: Path, records) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """The tokenizer, the chat file, and the chats prepared unpacked (all train) and packed, in one data_dir."""
  root = tmp_path_factory.mktemp("prepare")
  tok = _tokenizer_dir(root / "tok")
  chats = _jsonl(root / "chat.jsonl", [{"messages": m} for m in CHATS * 3])
  data_dir = str(root / "data")
  plain = prepare.text(chats, tok, "my_chat", data_dir, max_length=MAX)
  packed = prepare.text(chats, tok, "my_chat_packed", data_dir, max_length=MAX, pack=True)
  return dict(root=root, tok=tok, chats=chats, data_dir=data_dir, plain=plain, packed=packed)


@pytest.fixture(scope="module")
def hf_chats(made):
  """transformers' ``apply_chat_template`` of every conversation: (token ids, assistant mask)."""
  from transformers import PreTrainedTokenizerFast

  hf = PreTrainedTokenizerFast.from_pretrained(str(made["tok"]))
  outs = [hf.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True) for m in CHATS]
  return hf, [(np.asarray(o["input_ids"]), np.asarray(o["assistant_masks"], bool)) for o in outs]


def _split(made, name, split="train"):
  return {k: np.asarray(v) for k, v in _records(made["data_dir"], name, split).items()}


def _records(data_dir, name, split):
  src = kd.get_builder(name, data_dir).as_data_source(split=split)
  recs = [src[i] for i in range(len(src))]
  return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


def test_chat_token_ids_and_scored_positions_equal_transformers(made, hf_chats):
  """Each row is ``apply_chat_template`` of its conversation (token for token); exactly the tokens transformers
  marks as assistant-generated are scored (targets −1 elsewhere, padding included)."""
  hf, refs = hf_chats
  rows = _split(made, "my_chat")
  assert len(rows["inputs"]) == len(CHATS) * 3 and rows["inputs"].shape[1] == L and "segment_ids" not in rows
  for k, (ids, assistant) in enumerate(refs * 3):
    n = len(ids)
    assert assistant.any() and not assistant.all()
    np.testing.assert_array_equal(rows["inputs"][k, : n - 1], ids[:-1])
    want = np.full(L, -1)
    want[: n - 1] = np.where(assistant[1:], ids[1:], -1)
    np.testing.assert_array_equal(rows["targets"][k], want)
    assert (rows["inputs"][k, n - 1 :] == hf.pad_token_id).all()
    assert rows["prompt_length"][k] == np.argmax(assistant)  # generation starts at the first assistant token


def test_the_prepared_dataset_loads_by_name_through_the_loader(made):
  """Info, view kind and tokenizer come from the dataset; batches resume exactly after ``state``/``restore``."""
  from tokenizers import Tokenizer

  d = made["data_dir"]
  spec = kd.get_info("my_chat", d)
  vocab = Tokenizer.from_file(str(made["tok"] / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
  assert spec.num_classes == vocab > 256 and spec.image_shape == (L,) and spec.splits == ("train",)
  loader = kd.make_loader("my_chat", "train", 4, seed=3, data_dir=d, process_index=0, process_count=1, worker_count=0)
  assert loader.view.kind == "tokens"
  first = [next(loader) for _ in range(2)]
  state = loader.state()
  first += [next(loader) for _ in range(2)]
  rows = _split(made, "my_chat")
  for b in first:
    np.testing.assert_array_equal(b["inputs"], rows["inputs"][b["id"]])
    np.testing.assert_array_equal(b["label"], rows["targets"][b["id"]])
  again = kd.make_loader("my_chat", "train", 4, seed=3, data_dir=d, process_index=0, process_count=1, worker_count=0)
  again.restore(state)
  for b in first[2:]:
    np.testing.assert_array_equal(next(again)["inputs"], b["inputs"])
  assert "segment_ids" not in first[0]
  assert isinstance(kd.open_split("my_chat", "train", d), kd.ArrayDataset)
  prepare.text(made["chats"], made["tok"], "my_chat_streamed", d, max_length=MAX, streaming=True)
  streamed = kd.open_split("my_chat_streamed", "train", d)
  assert isinstance(streamed, kd.RecordSource)  # read record by record, each process its own rows
  one = dict(batch_size=4, seed=3, process_index=0, process_count=1, worker_count=0)
  np.testing.assert_array_equal(kd.Loader(streamed, **one).batch(1, 2)["inputs"], loader.batch(1, 2)["inputs"])
  packed = kd.make_loader("my_chat_packed", "train", 2, data_dir=d, process_index=0, process_count=1, worker_count=0)
  b, recs = next(packed), _split(made, "my_chat_packed")
  for k in ("inputs", "segment_ids", "positions"):
    np.testing.assert_array_equal(b[k], recs[k][b["id"]])
  text = kd.tfds.tokenizer("my_chat", d).decode(rows["inputs"][0].tolist(), skip_special_tokens=False)
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
  assert kd.default_data_dir(d) == made["plain"].data_dir and made["plain"].rows == {"train": 12}


def test_packing_keeps_every_example_and_restarts_positions(made, hf_chats):
  plain, packed = _split(made, "my_chat"), _split(made, "my_chat_packed")
  assert len(packed["inputs"]) < len(plain["inputs"])
  got = []
  for x, y, seg, pos in zip(packed["inputs"], packed["targets"], packed["segment_ids"], packed["positions"]):
    for s in range(1, seg.max() + 1):
      at = seg == s
      assert (np.flatnonzero(at) == np.flatnonzero(at)[0] + np.arange(at.sum())).all()  # contiguous
      np.testing.assert_array_equal(pos[at], np.arange(at.sum()))
      got.append((tuple(x[at]), tuple(y[at])))
    assert (y[seg == 0] == -1).all()
  n = [len(ids) - 1 for ids, _ in hf_chats[1]] * 3  # positions of each example
  want = [(tuple(x[:m]), tuple(y[:m])) for x, y, m in zip(plain["inputs"], plain["targets"], n)]
  assert sorted(got) == sorted(want) and len(got) == len(CHATS) * 3
  assert "12 examples packed" in made["packed"].summary


def test_first_fit_packing_fills_open_rows_in_order():
  assert row_lib.bins([5, 4, 3, 1, 2], 8, pack=True) == [[0, 2], [1, 3, 4]]
  assert row_lib.bins([5, 4], 8, pack=False) == [[0], [1]]


def test_prompt_response_pairs_with_named_fields(made, tmp_path):
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(str(made["tok"] / "tokenizer.json"))
  recs = [{"q": "what is two plus two?", "a": "four"}, {"q": "hello world", "a": "I am fine, thank you."}]
  src = _jsonl(tmp_path / "pairs.jsonl", recs)
  fields = prepare.Fields(prompt="q", response="a")
  done = prepare.text(src, made["tok"], "pairs", str(tmp_path / "d"), max_length=32, fields=fields, test_size=1)
  assert done.rows == {"train": 1, "test": 1}
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist(recs), tmp_path / "pairs.parquet")
  prepare.text(tmp_path / "pairs.parquet", made["tok"], "pairs_pq", str(tmp_path / "d"), max_length=32, fields=fields)
  from_parquet = _records(str(tmp_path / "d"), "pairs_pq", "train")
  both = prepare.text(src, made["tok"], "pairs_t", str(tmp_path / "d"), max_length=32, fields=fields, test=src)
  assert both.rows == {"train": 2, "test": 2}
  eos = tok.token_to_id("<|im_end|>")
  got = {}
  for split in ("train", "test"):
    r = _records(str(tmp_path / "d"), "pairs", split)
    got[split] = (r["inputs"][0], r["targets"][0])
  for rec in recs:
    p, a = tok.encode(rec["q"]).ids, tok.encode(rec["a"], add_special_tokens=False).ids + [eos]
    seq = np.asarray(p + a)
    want_y = np.full(31, -1)
    want_y[: len(seq) - 1] = np.where(np.arange(1, len(seq)) >= len(p), seq[1:], -1)
    assert any(np.array_equal(x[: len(seq) - 1], seq[:-1]) and np.array_equal(y, want_y) for x, y in got.values())
    k = recs.index(rec)
    np.testing.assert_array_equal(from_parquet["targets"][k], want_y)


def test_overflow_truncates_or_drops_and_counts(made, hf_chats, tmp_path):
  """Truncation keeps an example's first 30 tokens (29 positions) unless no scored target is left, then drops it."""
  chats = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS])
  cut = prepare.text(chats, made["tok"], "cut", str(tmp_path / "d"), max_length=30, overflow="truncate")
  drop = prepare.text(chats, made["tok"], "drop", str(tmp_path / "d"), max_length=30, overflow="drop")
  full = {k: v[: len(CHATS)] for k, v in _split(made, "my_chat").items()}
  long = np.array([len(ids) for ids, _ in hf_chats[1]]) > 30
  kept = ~long | (full["targets"][:, :29] >= 0).any(1)
  assert long.any() and not long.all() and not kept.all()
  assert f"{(long & kept).sum()} truncated, {(~kept).sum()} dropped" in cut.summary
  assert f"0 truncated, {long.sum()} dropped" in drop.summary and drop.rows == {"train": int((~long).sum())}
  r = _records(str(tmp_path / "d"), "cut", "train")
  np.testing.assert_array_equal(r["inputs"], full["inputs"][kept, :29])
  np.testing.assert_array_equal(r["targets"], full["targets"][kept, :29])


BAD = {
  "missing field": ([{"prompt": "hello"}], "bad.jsonl:1: missing field 'response'"),
  "malformed line": ([{"prompt": "a", "response": "b"}, "{not json"], "bad.jsonl:2: malformed JSON line"),
  "empty example": ([{"prompt": "a", "response": "b"}, {"prompt": "hello", "response": " "}], "bad.jsonl:2: empty"),
  "empty chat": ([{"messages": [{"role": "user", "content": "hi"}]}], "bad.jsonl:1: empty example"),
  "over-long": ([{"prompt": "hello world " * 20, "response": "four"}], "bad.jsonl:1: example of"),
  "bad message": ([{"messages": [{"role": "user"}]}], "bad.jsonl:1: message 0 of 'messages' needs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_one_line_and_leaves_no_dataset(made, tmp_path, case):
  records, msg = BAD[case]
  src = _jsonl(tmp_path / "bad.jsonl", records)
  with pytest.raises(ConfigError) as e:
    prepare.text(src, made["tok"], "bad", str(tmp_path / "d"), max_length=16)
  assert str(e.value).startswith(msg) and "\n" not in str(e.value)
  assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_an_unknown_tokenizer_or_a_failed_write_leaves_nothing(made, tmp_path, monkeypatch):
  src = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "hello", "response": "four"}])
  d = tmp_path / "d"
  with pytest.raises(ConfigError, match=r"^tokenizer: no tokenizer.json at"):
    prepare.text(src, tmp_path / "nowhere", "ok", str(d))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "tokenizer.json").write_text("{not a tokenizer")
  with pytest.raises(ConfigError, match=r"is not a tokenizers file"):
    prepare.text(src, tmp_path / "junk", "ok", str(d))

  def full_disk(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(shutil, "copy", full_disk)  # fails after the records are written, before the rename
  with pytest.raises(OSError):
    prepare.text(src, made["tok"], "ok", str(d))
  assert not list(d.iterdir())  # neither the dataset nor its temporary directory
  monkeypatch.undo()
  with pytest.raises(ConfigError, match="already exists"):
    prepare.text(src, made["tok"], "my_chat", made["data_dir"])
  with pytest.raises(ConfigError, match="is a TFDS dataset already"):
    prepare.text(src, made["tok"], "mnist", str(d))


def test_the_command_prints_one_summary_line_or_one_error_line(made, tmp_path, capsys):
  from kdjax.cli import main

  d = str(tmp_path / "d")
  base = ["prepare", "text", str(made["chats"]), "--tokenizer", str(made["tok"]), "--data_dir", d]
  assert main([*base, "--name", "cli_chat", "--max-length", str(MAX), "--pack", "--test_size", "2"]) == 0
  out = capsys.readouterr().out.strip()
  assert "\n" not in out and out.startswith("cli_chat: 12 examples from chat.jsonl → train ") and "test 2 rows" in out
  assert kd.get_info("cli_chat", d).splits == ("train", "test")
  assert main([*base, "--name", "cli_short", "--max_length", "8"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("kdjax: error: chat.jsonl:1: example of") and "\n" not in err
  assert main([*base, "--name", "x", "--bogus", "1"]) == 1 and "unknown option --bogus" in capsys.readouterr().err
  np.savez(tmp_path / "a.npz", x_train=np.zeros((4, 3, 3, 1), np.uint8), y_train=np.arange(4) % 2)
  assert main(["prepare", "images", str(tmp_path / "a.npz"), "--name", "cli_images", "--data-dir", d]) == 0
  assert capsys.readouterr().out.startswith("cli_images: train 4 images of (3, 3, 1) in 2 classes from a.npz")
  assert sorted(p.name for p in Path(d).iterdir()) == ["cli_chat", "cli_images"]


def test_arrays_and_image_folders_become_image_datasets(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8), rng.integers(0, 4, 10)
  y[0] = 3
  np.savez(tmp_path / "a.npz", x=x, y=y)
  d = str(tmp_path / "d")
  done = prepare.images(tmp_path / "a.npz", "my_arrays", d, test_size=3)
  assert done.rows == {"train": 7, "test": 3}
  tr, te = kd.load_arrays("my_arrays", "train", d), kd.load_arrays("my_arrays", "test", d)
  got = np.concatenate([tr.images, te.images])
  order = np.lexsort(got.reshape(10, -1).T)
  np.testing.assert_array_equal(got[order], x[np.lexsort(x.reshape(10, -1).T)])
  assert kd.get_info("my_arrays", d).num_classes == 4 and kd.get_info("my_arrays", d).image_shape == (6, 5, 3)
  for k, c in enumerate(["cat", "dog"]):
    (tmp_path / "img" / c).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(x[2 * k + i]).save(tmp_path / "img" / c / f"{i}.png")
  prepare.images(tmp_path / "img", "my_folder", d)
  f = kd.load_arrays("my_folder", "train", d)
  np.testing.assert_array_equal(f.images, x[:4])
  np.testing.assert_array_equal(f.labels, [0, 0, 1, 1])
  for split, at in (("train", 4), ("test", 6)):
    (tmp_path / "split" / split / "cat").mkdir(parents=True)
    Image.fromarray(x[at]).save(tmp_path / "split" / split / "cat" / "0.png")
  prepare.images(tmp_path / "split", "my_split_folder", d)
  np.testing.assert_array_equal(kd.load_arrays("my_split_folder", "test", d).images, x[6:7])
  np.savez(tmp_path / "b.npz", images=x, y=np.full(10, -1))
  with pytest.raises(ConfigError, match=r"labels must be integers in \[0, "):
    prepare.images(tmp_path / "b.npz", "bad_labels", d)
  (tmp_path / "img" / "dog" / "odd.png").parent.mkdir(exist_ok=True)
  Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "img" / "dog" / "odd.png")
  with pytest.raises(ConfigError, match="images differ in size"):
    prepare.images(tmp_path / "img", "bad_sizes", d)
  assert sorted(p.name for p in Path(d).iterdir()) == ["my_arrays", "my_folder", "my_split_folder"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["transformer_lm", "qwen2"])
def test_a_model_loss_on_packed_rows_equals_the_unpacked_loss(made, family):
  """A tiny language model's mean next-token loss over scored targets is the same on packed rows (segment ids
  and positions) as on one example per row; without the segment mask it differs. kdjax's own transformer and
  the Hugging Face decoder (a Qwen2-shaped one: RoPE positions, grouped-query attention)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from kdjax import models
  from kdjax.models.decoder import Decoder, DecoderConfig

  if family == "transformer_lm":
    model = models.create(family, num_classes=320, num_layers=1, dim=16, num_heads=2, max_len=MAX, rngs=nnx.Rngs(0))
  else:
    shape = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32)
    model = Decoder(DecoderConfig("qwen2", 320, **shape, max_positions=MAX, qkv_bias=True), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss(state, x, y, seg=None, pos=None):
    z = nnx.merge(graphdef, state)(x, segment_ids=seg, positions=pos).logits
    per = optax.softmax_cross_entropy_with_integer_labels(z, jnp.maximum(y, 0))
    return jnp.sum(jnp.where(y >= 0, per, 0.0)) / jnp.sum(y >= 0)

  plain, packed = _split(made, "my_chat"), _split(made, "my_chat_packed")
  pad = len(plain["inputs"]) - len(packed["inputs"])  # same row count: one compilation for both
  keys = ("inputs", "targets", "segment_ids", "positions")
  packed = {k: np.concatenate([packed[k], np.full((pad, L), -(k == "targets"), np.int32)]) for k in keys}
  unpacked = float(loss(state, plain["inputs"], plain["targets"]))
  masked = float(loss(state, *(packed[k] for k in keys)))
  np.testing.assert_allclose(masked, unpacked, rtol=1e-6)
  ones, ramp = np.ones_like(packed["inputs"]), np.broadcast_to(np.arange(L), packed["inputs"].shape)
  assert abs(float(loss(state, packed["inputs"], packed["targets"], ones, ramp)) - unpacked) > 1e-4


@pytest.mark.slow
def test_a_distillation_step_on_packed_rows_equals_the_step_on_unpacked_rows(made):
  """Through the Distiller (student and frozen teacher both given the segment ids): the same loss and, after one
  SGD step, the same student weights, whether the examples come one per row or packed."""
  import jax
  import optax
  from flax import nnx

  import kdjax
  from kdjax import models

  plain, packed = _split(made, "my_chat"), _split(made, "my_chat_packed")
  pad = len(plain["inputs"]) - len(packed["inputs"])
  keys = ("inputs", "targets", "segment_ids", "positions")
  packed = {k: np.concatenate([packed[k], np.full((pad, L), -(k == "targets"), np.int32)]) for k in keys}

  def step(rows, *extra):
    net = dict(num_classes=320, num_layers=1, dim=8, num_heads=2, max_len=MAX, mlp_ratio=2)
    student = models.create("transformer_lm", rngs=nnx.Rngs(0), **net)
    teacher = models.create("transformer_lm", rngs=nnx.Rngs(1), **net)
    d = kdjax.Distiller(student, teacher, method="forward_kl", optimizer=optax.sgd(0.5))
    batch = {"inputs": rows["inputs"], "label": rows["targets"], **{k: rows[k] for k in extra}}
    state, metrics = d.step(d.init(jax.random.key(0), batch), batch)
    return float(metrics["loss/total"]), jax.tree.leaves(state.params[0])

  loss, params = step(plain)
  loss_packed, params_packed = step(packed, "segment_ids", "positions")
  np.testing.assert_allclose(loss_packed, loss, rtol=1e-5)
  for a, b in zip(params_packed, params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_a_packed_split_is_refused_where_rows_must_hold_one_example(made, tmp_path):
  """Exact match generates from one prompt per row, so training evaluates on an unpacked split; on-policy
  responses, a teacher cache, a split placement or a teacher of another tokenizer are refused likewise."""
  from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, RunConfig
  from kdjax.engine.experiment import _check_packed

  data = DataConfig(name="my_chat_packed", data_dir=made["data_dir"], view="tokens", eval_split="train", batch_size=2)
  cfg = Experiment(
    name="packed",
    mode="teacher",
    student=ModelConfig(name="transformer_lm"),
    method=MethodConfig(name="ce"),
    data=data,
    run=RunConfig(workdir=str(tmp_path / "w"), quiet=True),
  )
  with pytest.raises(ConfigError, match=r"^dataset 'my_chat_packed' is packed and cannot be used with a packed eval"):
    _check_packed(cfg, cross_tokenizer=False)
  cfg = cfg.replace(data=dataclasses.replace(data, eval_split="test"))
  with pytest.raises(ConfigError, match=r"cannot be used with a teacher of another tokenizer: prepare it without"):
    _check_packed(cfg, cross_tokenizer=True)
  _check_packed(cfg, cross_tokenizer=False)  # teacher-forced training on the packed split evaluates on "test"
  _check_packed(cfg.replace(data=dataclasses.replace(data, name="my_chat")), cross_tokenizer=True)


LLAMA3 = (
  "{{ bos_token }}{% for message in messages %}"
  "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role: ' + message['role']) }}"
  "{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
  "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
  "{% endif %}"
)


def test_a_llama_style_template_with_bos_and_raise_exception(made, tmp_path):
  """A template that writes ``bos_token``, trims content and raises on an unknown role: ids equal transformers';
  the scored tokens spell each assistant reply and its ``<|eot_id|>``; the template's exception is one line."""
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer.from_file(str(made["tok"] / "tokenizer.json"))
  tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
  d = tmp_path / "llama"
  d.mkdir()
  tok.save(str(d / "tokenizer.json"))
  config = {"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
  (d / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
  chats = [[*m[:-1], {**m[-1], "content": " " + m[-1]["content"] + "  "}] for m in CHATS]
  src = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats])
  prepare.text(src, d, "llama_chat", str(tmp_path / "data"), max_length=MAX)
  rows = _records(str(tmp_path / "data"), "llama_chat", "train")
  hf = PreTrainedTokenizerFast.from_pretrained(str(d))
  for k, messages in enumerate(chats):
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == hf.bos_token_id
    np.testing.assert_array_equal(rows["inputs"][k, : len(ids) - 1], ids[:-1])
    y = rows["targets"][k]
    replies = "".join(m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant")
    assert hf.decode(y[y >= 0].tolist()) == replies
  bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "tool", "content": "x"}, *CHATS[1]]}])
  with pytest.raises(ConfigError, match=r"^bad.jsonl:1: chat template: Unknown role: tool$"):
    prepare.text(bad, d, "bad_chat", str(tmp_path / "data"), max_length=MAX)
