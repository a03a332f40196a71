"""Records of a JSONL or Parquet file → token ids with the positions a model is trained to predict.

Two record shapes (field names configurable):

  * prompt/response pairs ``{"prompt": "…", "response": "…"}``: the prompt
    encoded with the tokenizer's own special tokens (its post-processor, e.g.
    a BOS), then the response without them and the tokenizer's EOS; the
    response tokens (and that EOS) are scored;
  * chat ``{"messages": [{"role": "user", "content": "…"}, …]}``: the
    conversation rendered with the tokenizer's chat template and encoded as
    ``apply_chat_template`` encodes it; the text of each assistant turn is
    scored. A turn's text is found by rendering: turn ``i`` spans from the end
    of ``messages[:i]`` rendered with the generation prompt to the end of
    ``messages[:i+1]`` rendered (so its closing tokens, e.g. ``<|im_end|>``,
    are learned too), and a token is scored when it starts inside a span.

Every problem with a record is a :class:`~kdjax.errors.ConfigError` naming
the file and line (for Parquet, the row, counted from 1).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdjax.data.prepare.tokenizer import ChatTemplate, TokenizerBundle
from kdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Fields:
  """Where a record keeps its text; ``chat`` renders prompt/response pairs as a user/assistant exchange."""

  prompt: str = "prompt"
  response: str = "response"
  messages: str = "messages"
  chat: bool = False


@dataclasses.dataclass(frozen=True)
class Example:
  """One example: ``tokens`` int32 ``(n,)``, ``scored`` bool ``(n,)`` (tokens the model learns to predict),
  ``line`` where it came from."""

  tokens: np.ndarray
  scored: np.ndarray
  line: int


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
  """``(line, record)`` of a JSONL file (``.jsonl``/``.json``, one object per line, blank lines skipped) or a
  Parquet file (``.parquet``, rows counted from 1)."""
  p = Path(path).expanduser()
  if not p.is_file():
    raise ConfigError(f"no such data file: {str(path)!r}")
  if p.suffix == ".parquet":
    yield from _parquet(p)
    return
  if p.suffix not in (".jsonl", ".json"):
    raise ConfigError(f"{p.name}: expected a .jsonl or .parquet file of prompt/response pairs or chat messages")
  with p.open(encoding="utf-8") as fh:
    for i, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError as e:
        raise ConfigError(f"{p.name}:{i}: malformed JSON line ({str(e).splitlines()[0]})") from None
      if not isinstance(rec, dict):
        raise ConfigError(f"{p.name}:{i}: expected a JSON object, got {type(rec).__name__}")
      yield i, rec


def _parquet(p: Path) -> Iterator[tuple[int, dict]]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ConfigError(f"{p.name}: reading Parquet needs pyarrow (`pip install 'kdjax[data]'`)") from None
  try:
    table = pq.read_table(p)
  except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file vary by version
    raise ConfigError(f"{p.name}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
  yield from enumerate(table.to_pylist(), 1)


def _text(rec: dict, field: str, where: str) -> str:
  if field not in rec:
    raise ConfigError(f"{where}: missing field {field!r} (fields: {', '.join(sorted(rec)) or 'none'})")
  v = rec[field]
  if not isinstance(v, str):
    raise ConfigError(f"{where}: field {field!r} is {type(v).__name__}, expected a string")
  return v


def _check_messages(messages, field: str, where: str) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise ConfigError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} messages")
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ConfigError(f"{where}: message {k} of {field!r} needs 'role' and 'content'")
  if not any(m["role"] == "assistant" and m["content"] for m in messages):
    raise ConfigError(f"{where}: empty example (no assistant message with text to learn)")
  return messages


def assistant_spans(template: ChatTemplate, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
  """The rendered conversation and the character spans ``[start, end)`` of its assistant turns (those whose
  rendering extends the conversation before them; see the module docstring)."""
  full = template.render(messages)
  spans = []
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    try:
      before = template.render(messages[:i], add_generation_prompt=True)
      upto = full if i == len(messages) - 1 else template.render(messages[: i + 1])
    except ConfigError:  # a template may refuse a partial conversation: that turn stays unscored
      continue
    if full.startswith(upto) and upto.startswith(before) and len(upto) > len(before):
      spans.append((len(before), len(upto)))
  return full, spans


CHUNK = 1024  # records rendered, then encoded together (the tokenizer encodes a batch on all cores)


@dataclasses.dataclass(frozen=True)
class _Rendered:
  """A record as text, before encoding: a chat (``text`` and its assistant ``spans``) or a pair (``text`` the
  prompt, ``response``)."""

  line: int
  where: str
  text: str
  response: str | None = None
  spans: tuple[tuple[int, int], ...] = ()


def _render(rec: dict, fields: Fields, line: int, where: str, template) -> _Rendered:
  if fields.messages in rec:
    messages = _check_messages(rec[fields.messages], fields.messages, where)
  else:
    prompt, response = _text(rec, fields.prompt, where), _text(rec, fields.response, where)
    if not response.strip():
      raise ConfigError(f"{where}: empty example (the response has no text)")
    if not fields.chat:
      return _Rendered(line, where, prompt, response)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
  try:
    text, spans = assistant_spans(template(), messages)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  return _Rendered(line, where, text, None, tuple(spans))


def _scored(offsets, spans) -> np.ndarray:
  """Tokens whose first character lies in an assistant span."""
  starts = np.array([o[0] for o in offsets], np.int64)
  scored = np.zeros(len(starts), bool)
  for a, b in spans:
    scored |= (starts >= a) & (starts < b)
  return scored


def _encoded(bundle: TokenizerBundle, items: list[_Rendered]) -> Iterator[Example]:
  """Encode rendered records together: a chat without the tokenizer's special tokens (the template wrote
  them); a pair's prompt with them, its response without, then the EOS."""
  tok, eos = bundle.tokenizer, bundle.token_id("eos_token")
  chats = iter(tok.encode_batch([r.text for r in items if r.response is None], add_special_tokens=False))
  pairs = [r for r in items if r.response is not None]
  prompts = iter(tok.encode_batch([r.text for r in pairs]))
  responses = iter(tok.encode_batch([r.response for r in pairs], add_special_tokens=False))
  for r in items:
    if r.response is None:
      enc = next(chats)
      ids, scored = enc.ids, _scored(enc.offsets, r.spans)
    else:
      p, a = next(prompts).ids, next(responses).ids + ([eos] if eos is not None else [])
      ids, scored = p + a, np.arange(len(p) + len(a)) >= len(p)
    if not scored[1:].any():
      raise ConfigError(f"{r.where}: empty example (no response or assistant token to learn)")
    yield Example(np.asarray(ids, np.int32), np.asarray(scored, bool), r.line)


def encode(bundle: TokenizerBundle, records, fields: Fields, source: str) -> Iterator[Example]:
  """:class:`Example` per record: chat when the record has ``fields.messages``, else a prompt/response pair."""

  @functools.cache
  def template() -> ChatTemplate:  # made at the first chat (prompt/response pairs need none)
    return ChatTemplate(bundle)

  chunk = []
  for line, rec in records:
    chunk.append(_render(rec, fields, line, f"{source}:{line}", template))
    if len(chunk) == CHUNK:
      yield from _encoded(bundle, chunk)
      chunk = []
  yield from _encoded(bundle, chunk)
