"""``text``: a JSONL or Parquet file of prompt/response pairs or chat messages → a token dataset by name.

The dataset has the features of kdjax's token datasets — ``inputs`` and
``targets`` int32 ``(L,)`` (``-1`` = not scored: prompts, padding) and
``prompt_length`` — and, when packed, ``segment_ids`` and ``positions`` ``(L,)``
(see :mod:`kdjax.data.prepare.rows`; the loader puts them in every batch),
``L = max_length − 1`` (an example of ``max_length`` tokens fills a row). Only
the training split is packed. Its metadata
records the vocabulary size (the logits width), pad/BOS/EOS ids and whether
the training split is packed; the tokenizer files are stored with it
(:func:`kdjax.data.tfds.tokenizer` reads them back). Train with
``--data.name NAME --data.view tokens``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from kdjax.data.prepare import examples as ex_lib
from kdjax.data.prepare import rows as row_lib
from kdjax.data.prepare import tokenizer as tok_lib
from kdjax.data.prepare import writer
from kdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared dataset: its ``name`` (for ``--data.name``), ``data_dir``, version ``directory``, rows per
  split, and the one-line ``summary`` the command prints."""

  name: str
  data_dir: str
  directory: str
  rows: dict
  summary: str


def _split(items: list, test_size: int, seed: int, source: str) -> tuple[list, list]:
  """``test_size`` items held out (a seeded random choice), both parts in file order."""
  if test_size < 0 or (test_size and test_size >= len(items)):
    raise ConfigError(f"test_size={test_size}: must be in [0, {len(items)}) for the {len(items)} examples of {source}")
  held = np.zeros(len(items), bool)
  held[np.random.default_rng(seed).permutation(len(items))[:test_size]] = True
  return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


def _rows(pieces: list, max_length: int, pack: bool, pad_id: int, split: str, source: str) -> row_lib.Rows:
  if not pieces:
    raise ConfigError(f"{source}: no example of split {split!r} is left after overflow (all over max_length)")
  members = row_lib.bins([len(x) for x, _, _ in pieces], max_length - 1, pack and split == "train")
  return row_lib.Rows([(x, y) for x, y, _ in pieces], members, max_length - 1, pad_id, packed=pack)


def _summary(name, source, counts, split_rows, max_length, pack, directory) -> str:
  c = counts
  fill = c.train_tokens / (len(split_rows["train"]) * (max_length - 1))
  parts = [f"{s} {len(a)} rows" for s, a in split_rows.items()]
  packed = f" (train: {c.train_examples} examples packed, {fill:.0%} of positions filled)" if pack else ""
  return (
    f"{name}: {c.examples} examples from {source} → {', '.join(parts)}{packed}; {c.truncated} truncated, "
    f"{c.dropped} dropped (over max_length {max_length}); {c.tokens} positions, {c.scored} scored; in {directory}"
  )


STREAM_BYTES = 1 << 30  # a dataset of more row bytes than this is read record by record, not held in memory


def _metadata(bundle: tok_lib.TokenizerBundle, max_length: int, pack: bool, pad_id: int, source: str) -> dict:
  """What the dataset records about itself: ``kind`` (``tokens``), the logits width, row length, packing, ids."""
  return {
    "kind": "tokens",
    "vocab_size": bundle.vocab_size,
    "max_length": max_length,
    "packed_splits": ["train"] if pack else [],
    "pad_id": pad_id,
    "bos_id": bundle.token_id("bos_token"),
    "eos_id": bundle.token_id("eos_token"),
    "source": source,
  }


def _examples(path, bundle, fields: ex_lib.Fields) -> list[ex_lib.Example]:
  return list(ex_lib.encode(bundle, ex_lib.read_records(path), fields, Path(path).name))


def text(
  path: str | Path,
  tokenizer: str | Path,
  name: str,
  data_dir: str | None = None,
  *,
  max_length: int = 512,
  overflow: str = "error",
  pack: bool = False,
  fields: ex_lib.Fields | None = None,
  test: str | Path | None = None,
  test_size: int = 0,
  seed: int = 0,
  overwrite: bool = False,
  streaming: bool | None = None,
) -> Prepared:
  """Tokenize ``path`` with the Hugging Face tokenizer ``tokenizer`` (a checkpoint directory or its
  ``tokenizer.json``) into TFDS dataset ``name`` in ``data_dir``; see the module docstring.

  ``max_length``: tokens per example (the model's context; rows hold ``max_length − 1`` positions); ``overflow``: ``error`` | ``truncate`` | ``drop`` for longer
  examples; ``pack``: several examples per training row; ``test``: a file for the test split, or
  ``test_size`` examples held out of ``path`` (seeded by ``seed``); ``streaming``: training reads it
  record by record, each process only its own rows (default: when its rows exceed :data:`STREAM_BYTES`),
  rather than holding it in memory. Every record is checked before anything is written, and the
  dataset appears only whole.
  """
  from kdjax.data.tfds import default_data_dir

  data_dir = default_data_dir(data_dir)
  writer.check_name(name, data_dir, overwrite)
  if max_length < 2:
    raise ConfigError(f"max_length={max_length}: an example needs at least 2 tokens (a prompt and a target)")
  bundle = tok_lib.load(tokenizer)
  source = Path(path).name
  fields = fields or ex_lib.Fields()
  train = _examples(path, bundle, fields)
  held = _examples(test, bundle, fields) if test is not None else None
  if held is None and test_size:
    train, held = _split(train, test_size, seed, source)
  splits = {"train": train, **({"test": held} if held is not None else {})}
  counts = row_lib.Counts()
  pad_id = next((i for i in (bundle.token_id("pad_token"), bundle.token_id("eos_token")) if i is not None), 0)
  split_rows = {}
  for split, items in splits.items():
    pieces = list(row_lib.fit(items, max_length, overflow, source if split == "train" else str(test or path), counts))
    if split == "train":
      counts.train_examples, counts.train_tokens = len(pieces), sum(len(x) for x, _, _ in pieces)
    split_rows[split] = _rows(pieces, max_length, pack, pad_id, split, source)
  meta = _metadata(bundle, max_length, pack, pad_id, source)
  row_bytes = sum(len(r) for r in split_rows.values()) * (max_length - 1) * 4 * (4 if pack else 2)
  meta["streaming"] = bool(row_bytes > STREAM_BYTES if streaming is None else streaming)
  directory = writer.write(
    name, data_dir, split_rows, supervised=("inputs", "targets"), metadata=meta, files=bundle.files, overwrite=overwrite
  )
  summary = _summary(name, source, counts, split_rows, max_length, pack, directory)
  rows = {s: len(a) for s, a in split_rows.items()}
  return Prepared(name, data_dir, str(directory), rows, summary)
