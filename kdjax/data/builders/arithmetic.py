"""Multi-digit addition with worked carries: a verifiable generation task as a TFDS token dataset.

Characters are tokens (:data:`VOCAB`, 15 of them). Digits are written least
significant first, the order in which carries propagate, so every answer
token depends on a fixed, small set of earlier tokens:

    prompt   <bos> a_0 … a_{n-1} + b_0 … b_{n-1} =
    answer   s_0 c_0 s_1 c_1 … s_{n-1} c_{n-1} s_n <eos>

``s_i`` is digit ``i`` of ``a + b``, ``c_i`` the carry out of position ``i``
(the worked carries) and ``s_n`` the last carry. With ``n = 4`` (config
``add4``, the default) the prompt is 11 tokens and the answer ``2n + 2 = 10``
(≥ 8 generated tokens; exposure bias can compound over the carry chain).

Each record is one next-token-prediction row of fixed length
``L = (2n + 3) + (2n + 2) − 1 = 4n + 4`` (prompt + answer − 1):

  * ``inputs`` int32 ``(L,)``: the sequence without its last token;
  * ``targets`` int32 ``(L,)``: the sequence shifted by one, ``-1`` where the
    target is a prompt token (only answers are learned and scored);
  * ``prompt_length`` int32: prompt tokens (generation starts after them).

Pairs ``(a, b)`` are drawn uniformly without replacement from a seeded
``np.random.default_rng``; train and test share no pair. Generated locally.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from kdjax.data.builders._base import LocalBuilder
from kdjax.errors import ConfigError

VOCAB = ("<pad>", "<bos>", "<eos>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "+", "=")
PAD, BOS, EOS = 0, 1, 2
_DIGIT0 = 3
_CHAR = {c: i for i, c in enumerate(VOCAB) if len(c) == 1}


def encode(text: str) -> list[int]:
  """Characters → token ids (digits, ``+``, ``=``)."""
  try:
    return [_CHAR[c] for c in text]
  except KeyError as e:
    raise ConfigError(f"arithmetic tokenizer: no token for {e.args[0]!r} (vocabulary: {''.join(_CHAR)})") from None


def decode(ids) -> str:
  """Token ids → text; special tokens as ``<bos>``/``<eos>``, padding dropped."""
  return "".join(VOCAB[int(i)] for i in ids if int(i) != PAD)


def tokenizer():
  """:data:`VOCAB` as a ``tokenizers.Tokenizer`` (one token per character; ``<pad>``, ``<bos>``, ``<eos>``
  special): encodes like :func:`encode`, and decodes ids to text for a teacher of another tokenizer."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(VOCAB[:3]))
  return tok


def digits(x: int, n: int) -> list[int]:
  """The ``n`` decimal digits of ``x``, least significant first."""
  return [(x // 10**i) % 10 for i in range(n)]


def example_tokens(a: int, b: int, n: int) -> tuple[list[int], list[int]]:
  """(prompt, answer) token ids of ``a + b`` with ``n``-digit operands (see the module docstring)."""
  prompt = [BOS] + [_DIGIT0 + d for d in digits(a, n)] + [_CHAR["+"]] + [_DIGIT0 + d for d in digits(b, n)]
  prompt.append(_CHAR["="])
  answer, carry = [], 0
  for da, db in zip(digits(a, n), digits(b, n)):
    s = da + db + carry
    carry = s // 10
    answer += [_DIGIT0 + s % 10, _DIGIT0 + carry]
  return prompt, answer + [_DIGIT0 + carry, EOS]


def answer_value(answer_ids) -> int | None:
  """The sum an answer spells (its ``s_i`` tokens), or ``None`` when it is malformed."""
  ids = [int(i) for i in answer_ids]
  if EOS in ids:
    ids = ids[: ids.index(EOS)]
  if len(ids) % 2 != 1 or not all(_DIGIT0 <= i < _DIGIT0 + 10 for i in ids):
    return None
  sums = [i - _DIGIT0 for i in ids[0::2]]
  return sum(d * 10**k for k, d in enumerate(sums))


def sequence_length(n: int) -> int:
  """Tokens per record (``inputs`` and ``targets``): prompt ``2n + 3`` plus answer ``2n + 2``, minus one."""
  return (2 * n + 3) + (2 * n + 2) - 1


@dataclasses.dataclass
class ArithmeticConfig(tfds.core.BuilderConfig):
  """Operand digits, split sizes and the sampling seed."""

  num_digits: int = 4
  train_size: int = 30_000
  test_size: int = 1_000
  seed: int = 0


def sample_pairs(c: ArithmeticConfig) -> dict[str, np.ndarray]:
  """Disjoint train/test ``(a, b)`` pairs, ``(N, 2)`` int64, uniform without replacement."""
  space = 10 ** (2 * c.num_digits)
  total = c.train_size + c.test_size
  if total > space:
    raise ConfigError(f"arithmetic: {total} examples asked for but only {space} distinct {c.num_digits}-digit pairs")
  flat = np.random.default_rng(c.seed).choice(space, size=total, replace=False)
  pairs = np.stack([flat // 10**c.num_digits, flat % 10**c.num_digits], axis=1)
  return {"train": pairs[: c.train_size], "test": pairs[c.train_size :]}


class Arithmetic(LocalBuilder):
  """``a + b`` with worked carries, characters as tokens (15-token vocabulary)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated locally, stored as ArrayRecord."}
  BUILDER_CONFIGS = [
    ArithmeticConfig(name="add4", description="4-digit + 4-digit: 30,000 train / 1,000 test pairs."),
    ArithmeticConfig(name="add6", description="6-digit + 6-digit: 30,000 train / 1,000 test pairs.", num_digits=6),
  ]
  DEFAULT_CONFIG_NAME = "add4"

  def _info(self) -> tfds.core.DatasetInfo:
    length = sequence_length(self.builder_config.num_digits)
    return self.token_info(length, len(VOCAB))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {name: self._generate_examples(p) for name, p in sample_pairs(self.builder_config).items()}

  def _generate_examples(self, pairs):
    n = self.builder_config.num_digits
    for i, (a, b) in enumerate(pairs):
      prompt, answer = example_tokens(int(a), int(b), n)
      seq = np.asarray(prompt + answer, np.int32)
      targets = seq[1:].copy()
      targets[: len(prompt) - 1] = -1  # the model is not asked to predict the prompt
      yield i, {"inputs": seq[:-1], "targets": targets, "prompt_length": len(prompt)}
