"""Examples → fixed-length next-token rows, one example per row or several packed into one.

An example of ``n`` tokens ``s`` fills ``n − 1`` positions: ``inputs = s[:-1]``
and ``targets = s[1:]``, with ``-1`` where the target is not scored (a prompt
token), as kdjax's token datasets and losses expect. ``max_length`` counts an
example's tokens (as a model's context does: evaluation generates the whole
example), so a row holds ``max_length − 1`` positions; a longer example is
refused, truncated (its first ``max_length`` tokens; dropped instead when no
scored target remains) or dropped, by ``overflow``.

Packing (Krell et al., 2021, "Efficient Sequence Packing without
Cross-contamination") puts several examples in one row, first fit in file
order over the last :data:`WINDOW` rows still open. ``segment_ids`` number the
examples of a row from 1 (0 on padding) and ``positions`` restart at 0 in each,
so a model that masks attention to its own segment (``segment_ids`` equal,
causal) and embeds ``positions`` sees every packed example exactly as it would
see it alone. Padding: ``inputs`` = ``pad_id``, ``targets`` = −1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from kdjax.data.prepare.examples import Example
from kdjax.errors import ConfigError

OVERFLOW = ("error", "truncate", "drop")
WINDOW = 64  # open rows first fit looks back over when packing


@dataclasses.dataclass
class Counts:
  """What happened to a file's examples (reported in the summary line)."""

  examples: int = 0
  train_examples: int = 0  # kept in the training split (packed into its rows when packing)
  train_tokens: int = 0  # positions they fill
  truncated: int = 0
  dropped: int = 0
  tokens: int = 0  # positions filled (n − 1 per kept example)
  scored: int = 0  # of which scored


def fit(examples: Iterable[Example], max_length: int, overflow: str, source: str, counts: Counts):
  """Each example cut to at most ``max_length`` tokens as ``overflow`` says, as ``(inputs, targets, line)``
  (int32 ``(m,)`` each, ``m < max_length``)."""
  if overflow not in OVERFLOW:
    raise ConfigError(f"overflow={overflow!r}; expected one of {', '.join(OVERFLOW)}")
  for ex in examples:
    counts.examples += 1
    n = len(ex.tokens)
    if not ex.scored[1:].any():
      raise ConfigError(f"{source}:{ex.line}: empty example (no token after the first is scored)")
    tokens, scored = ex.tokens, ex.scored
    if n > max_length:
      if overflow == "error":
        raise ConfigError(
          f"{source}:{ex.line}: example of {n} tokens is over max_length {max_length}; raise max_length or "
          f"set overflow to truncate or drop"
        )
      tokens, scored = tokens[:max_length], scored[:max_length]
      if overflow == "drop" or not scored[1:].any():
        counts.dropped += 1
        continue
      counts.truncated += 1
    targets = np.where(scored[1:], tokens[1:], -1).astype(np.int32)
    counts.tokens += len(targets)
    counts.scored += int((targets >= 0).sum())
    yield tokens[:-1].astype(np.int32), targets, ex.line


def bins(lengths: list[int], width: int, pack: bool) -> list[list[int]]:
  """Which examples go in each row: one each, or packed first fit (in order) over the last :data:`WINDOW`
  open rows."""
  if not pack:
    return [[i] for i in range(len(lengths))]
  rows, room = [], []
  for i, m in enumerate(lengths):
    lo = max(0, len(rows) - WINDOW)
    at = next((r for r in range(lo, len(rows)) if room[r] >= m), None)
    if at is None:
      rows.append([])
      room.append(width)
      at = len(rows) - 1
    rows[at].append(i)
    room[at] -= m
  return rows


class Rows(Sequence):
  """A split's rows, each made when it is read (the examples' tokens are held, never ``R × width`` arrays).

  Row ``k`` is a dict of int32 arrays: ``inputs``, ``targets`` ``(width,)``, ``prompt_length`` (positions
  before the first scored target, plus one: the prompt a generation starts from, for a row of one
  example) and, when ``packed``, ``segment_ids`` and ``positions`` ``(width,)``.
  """

  def __init__(
    self, pieces: list[tuple[np.ndarray, np.ndarray]], members: list[list[int]], width: int, pad_id: int, packed: bool
  ):
    self.pieces, self.members, self.width, self.pad_id, self.packed = pieces, members, width, pad_id, packed

  def __len__(self) -> int:
    return len(self.members)

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    w = self.width
    row = {"inputs": np.full(w, self.pad_id, np.int32), "targets": np.full(w, -1, np.int32)}
    seg, pos = np.zeros(w, np.int32), np.zeros(w, np.int32)
    at = 0
    for s, i in enumerate(self.members[k], 1):
      x, y = self.pieces[i]
      row["inputs"][at : at + len(x)], row["targets"][at : at + len(x)] = x, y
      seg[at : at + len(x)], pos[at : at + len(x)] = s, np.arange(len(x))
      at += len(x)
    row["prompt_length"] = np.int32(np.argmax(row["targets"] >= 0) + 1)
    return {**row, "segment_ids": seg, "positions": pos} if self.packed else row
