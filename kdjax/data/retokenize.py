"""One text in two tokenizations: a student's token rows rewritten in a teacher's tokenizer.

Cross-tokenizer distillation (ULD, :func:`kdjax.losses.uld`) runs the
teacher on the same prompt and response as the student, tokenized its own
way. A student row (``inputs``, ``targets`` with −1 on prompt positions, as
:mod:`kdjax.data.builders.arithmetic` writes them) is decoded to its prompt
and response text, each encoded with the teacher's tokenizer, and written as
a teacher row of a fixed length ``L_t``:

    teacher sequence  [bos] prompt_T  response_T [eos]
    teacher_inputs    the sequence without its last token, padded to L_t
    teacher_mask      the positions whose next token is a response token

Prompt and response are encoded apart (as chat templates do), so no BPE merge
crosses their boundary. ``eos`` is appended when the student's response ends
with one of its special tokens. A sequence longer than ``L_t + 1`` is cut at
the end (its response is shortened; ULD pairs only the first response tokens
anyway).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from collections.abc import Mapping

import numpy as np

from kdjax import batch as batch_keys
from kdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Retokenizer:
  """Adds ``teacher_inputs`` / ``teacher_mask`` ``(B, L_t)`` to token batches.

  Attributes:
    student / teacher: ``tokenizers.Tokenizer``s (the student's decodes its
      ids, skipping special tokens; the teacher's encodes text).
    length: ``L_t``, the teacher row length.
    teacher_bos / teacher_eos: the teacher's begin / end-of-sequence ids
      (None: none), e.g. ``bos_token_id`` / ``eos_token_id`` of its
      ``config.json``.
    pad: the teacher's padding id (any valid id: padded positions are masked).
  """

  student: Any
  teacher: Any
  length: int
  teacher_bos: int | None = None
  teacher_eos: int | None = None
  pad: int = 0

  def __post_init__(self):
    if self.length < 2:
      raise ConfigError(f"retokenize: the teacher row length must be ≥ 2, got {self.length}")

  @functools.cached_property
  def _student_specials(self) -> frozenset[int]:
    return frozenset(i for i, t in self.student.get_added_tokens_decoder().items() if t.special)

  def _text(self, ids: np.ndarray) -> str:
    return self.student.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode(self, text: str) -> list[int]:
    return self.teacher.encode(text, add_special_tokens=False).ids if text else []

  def row(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One student row ``(L,)`` → ``(teacher_inputs (L_t,) int32, teacher_mask (L_t,) bool)``."""
    scored = np.flatnonzero(np.asarray(targets) >= 0)
    first = int(scored[0]) if scored.size else len(inputs)
    prompt = np.asarray(inputs)[: first + 1]
    response = np.asarray(targets)[first : int(scored[-1]) + 1] if scored.size else np.zeros(0, np.int64)
    head = ([self.teacher_bos] if self.teacher_bos is not None else []) + self._encode(self._text(prompt))
    tail = self._encode(self._text(response))
    if self.teacher_eos is not None and response.size and int(response[-1]) in self._student_specials:
      tail.append(self.teacher_eos)
    seq = (head + tail)[: self.length + 1]
    ids = np.full(self.length, self.pad, np.int32)
    ids[: len(seq) - 1] = seq[:-1]
    mask = np.zeros(self.length, bool)
    mask[max(len(head) - 1, 0) : len(seq) - 1] = True  # position i predicts token i + 1
    return ids, mask

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with ``teacher_inputs`` and ``teacher_mask`` added (host side, NumPy)."""
    rows = [self.row(x, y) for x, y in zip(batch[batch_keys.INPUTS], batch[batch_keys.LABEL])]
    return dict(
      batch,
      **{
        batch_keys.TEACHER_INPUTS: np.stack([r[0] for r in rows]),
        batch_keys.TEACHER_MASK: np.stack([r[1] for r in rows]),
      },
    )
