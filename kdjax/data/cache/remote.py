"""A teacher behind an OpenAI-compatible completions endpoint fills a top-k teacher cache.

The teacher runs wherever it fits — ``kdjax serve`` on another machine, vLLM, SGLang — and returns the
top-k log-probabilities of given token sequences (prompt log-probs). :func:`build_remote_cache` asks it for
every row of a token dataset and writes them through :func:`kdjax.data.cache.build_cache`, so the cache has
the same format, shards, digests and resume as one built in process, and training never waits on the network.

Protocol (the subset of ``POST /v1/completions`` both vLLM and ``kdjax serve`` answer): each row ``x`` of
length L is sent as the prompt ``x + [0]`` with ``echo``, ``max_tokens`` (default 1; ``kdjax serve`` also
takes 0), ``temperature 0`` and either vLLM's ``prompt_logprobs: k`` (default) or ``logprobs: k`` with
``return_tokens_as_token_ids``. Prompt position ``t ≥ 1`` carries the distribution after ``x[:t]``, so
positions ``1 … L`` are the L next-token distributions the cache stores, ``(L, k)`` per row, sorted by
decreasing probability. ``GET /v1/models`` names the model; ``kdjax serve`` adds a ``kdjax`` entry with
the vocabulary hash of its tokenizer (:func:`vocab_hash`), its vocabulary size and teacher hash, checked
before the first row is fetched.

Requests carry ``request_rows`` rows each, at most ``concurrency`` in flight (threads); a connection
failure, a timeout (``timeout`` seconds per request), HTTP 429 or 5xx is retried ``retries`` times after
"full jitter" exponential back-off (:func:`backoff_delay`); any other HTTP error is one line. The API key is
read from the environment variable ``api_key_env`` and sent as ``Authorization: Bearer …`` only: it is never
logged, recorded or written. Shards finished before an interruption are kept and not fetched again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdjax.data import views
from kdjax.data.cache.build import build_cache
from kdjax.data.cache.format import META_FILE, CacheSpec
from kdjax.errors import ConfigError

API_KEY_ENV = "KDJAX_API_KEY"
PROTOCOLS = ("prompt_logprobs", "logprobs")
SUFFIX_TOKEN = 0  # appended to each row: its prompt log-probs then cover the row's last position
RETRIED_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
  """Where the teacher is and how to ask it.

  Attributes:
    url: the server, ``http(s)://host:port`` (a trailing ``/v1`` is allowed).
    model: the model name sent with each request (default: the first one ``/v1/models`` lists).
    protocol: ``prompt_logprobs`` (vLLM, ``kdjax serve``) or ``logprobs`` (``echo`` + ``top_logprobs``).
    max_tokens: tokens the server generates after each prompt (ignored; vLLM needs ≥ 1, ``kdjax serve`` takes 0).
    request_rows: rows per request.
    concurrency: requests in flight at once (threads).
    timeout: seconds one request may take before it is retried.
    retries: tries after the first, with exponential back-off and full jitter.
    backoff / backoff_max: the first back-off ceiling and the largest, in seconds.
    api_key_env: environment variable holding the API key (unset: no key is sent).
    unchecked_vocab: accept a server that reports no vocabulary hash (not ``kdjax serve``).
  """

  url: str
  model: str = ""
  protocol: str = "prompt_logprobs"
  max_tokens: int = 1
  request_rows: int = 8
  concurrency: int = 4
  timeout: float = 60.0
  retries: int = 6
  backoff: float = 0.5
  backoff_max: float = 30.0
  api_key_env: str = API_KEY_ENV
  unchecked_vocab: bool = False

  def __post_init__(self):
    u = urllib.parse.urlsplit(self.url)
    if u.scheme not in ("http", "https") or not u.hostname:
      raise ConfigError(f"cache.endpoint={redacted(self.url)!r}: expected http(s)://host:port")
    if u.username or u.password:
      raise ConfigError(
        f"cache.endpoint={redacted(self.url)!r} carries credentials: put the key in the environment variable "
        f"{self.api_key_env} instead (it is sent as a bearer token and never written)"
      )
    if self.protocol not in PROTOCOLS:
      raise ConfigError(f"cache.protocol={self.protocol!r}: expected one of {PROTOCOLS}")
    for name in ("request_rows", "concurrency"):
      if getattr(self, name) < 1:
        raise ConfigError(f"cache.{name}={getattr(self, name)}: must be ≥ 1")
    if self.max_tokens < 0 or self.retries < 0:
      raise ConfigError(f"cache.max_tokens={self.max_tokens}, cache.retries={self.retries}: must be ≥ 0")
    if not (self.timeout > 0 and self.backoff >= 0 and self.backoff_max >= self.backoff):
      raise ConfigError(
        f"cache.timeout={self.timeout}, cache.backoff={self.backoff}, cache.backoff_max={self.backoff_max}: "
        f"need timeout > 0 and 0 ≤ backoff ≤ backoff_max"
      )

  @property
  def base(self) -> str:
    """The URL without a trailing ``/`` or ``/v1``."""
    base = self.url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def redacted(url: str) -> str:
  """``url`` without credentials, query or fragment (what messages and ``cache.json`` may show)."""
  u = urllib.parse.urlsplit(url)
  host = u.hostname or ""
  netloc = f"{host}:{u.port}" if u.port else host
  return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


def vocab_hash(tokenizer) -> str:
  """A tokenizer's vocabulary as 16 hex digits: SHA-256 of its ``(token, id)`` pairs in id order
  (``tokenizers.Tokenizer``: added tokens included). Equal hashes: the same ids mean the same tokens."""
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  pairs = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
  return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()[:16]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
  """Seconds to wait before try ``attempt + 1``: ``uniform(0, min(cap, base · 2^attempt))``
  ("full jitter", Brooker 2015: retries of many clients spread out instead of arriving together)."""
  return rng.uniform(0.0, min(cap, base * 2.0**attempt))


def completion_request(rows: np.ndarray, k: int, cfg: RemoteConfig, model: str) -> dict:
  """The ``/v1/completions`` body asking for the top-``k`` prompt log-probs of ``rows`` ``(n, L)``."""
  prompts = [[int(t) for t in r] + [SUFFIX_TOKEN] for r in np.asarray(rows)]
  body = {"model": model, "prompt": prompts, "max_tokens": cfg.max_tokens, "echo": True, "temperature": 0.0}
  if cfg.protocol == "prompt_logprobs":
    body["prompt_logprobs"] = k
  else:
    body.update(logprobs=k, return_tokens_as_token_ids=True)
  return body


def _token_id(key: str) -> int:
  """A top-log-probs key: ``"123"`` or ``"token_id:123"`` → 123."""
  s = str(key).removeprefix("token_id:")
  if not s.lstrip("-").isdigit():
    raise ConfigError(
      f"the endpoint keyed its log-probs by token text ({key!r}), not by id: use protocol prompt_logprobs, or "
      f"a server that honours return_tokens_as_token_ids"
    )
  return int(s)


def _position_tops(choice: dict, protocol: str) -> list:
  """One ``{id: log-prob}`` dict (or None) per prompt position of a completion choice."""
  if protocol == "prompt_logprobs":
    entries = choice.get("prompt_logprobs")
    if entries is None:
      raise ConfigError("the endpoint returned no prompt_logprobs: use --cache.protocol logprobs for this server")
    return [
      {_token_id(t): float(v["logprob"] if isinstance(v, dict) else v) for t, v in e.items()} if e else None
      for e in entries
    ]
  tops = (choice.get("logprobs") or {}).get("top_logprobs")
  if tops is None:
    raise ConfigError("the endpoint returned no logprobs.top_logprobs: use --cache.protocol prompt_logprobs")
  return [{_token_id(t): float(v) for t, v in e.items()} if e else None for e in tops]


def parse_choice(choice: dict, length: int, k: int, protocol: str) -> tuple[np.ndarray, np.ndarray]:
  """A choice's top-``k`` log-probs of positions ``1 … length`` → float32 and int32 ``(length, k)``, by
  decreasing probability (ties: the smaller id first, as ``jax.lax.top_k``)."""
  tops = _position_tops(choice, protocol)
  if len(tops) < length + 1:
    raise ConfigError(f"the endpoint returned log-probs of {len(tops)} prompt positions, expected {length + 1}")
  lp, idx = np.empty((length, k), np.float32), np.empty((length, k), np.int32)
  for t in range(length):
    items = sorted((tops[t + 1] or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    if len(items) < k:
      raise ConfigError(
        f"the endpoint returned {len(items)} log-probs a position, the cache stores top_k={k}: lower "
        f"--cache.top-k or raise the server's limit (vLLM: --max-logprobs)"
      )
    idx[t], lp[t] = [i for i, _ in items], [v for _, v in items]
  return lp, idx


class EndpointError(ConfigError):
  """The endpoint refused a request, or did not answer after every retry (one line; finished shards stay)."""


class RemoteTeacher:
  """The cache builder's ``predict``: token rows ``(B, L)`` → top-k ``(log-probs, ids)`` ``(B, L, k)``,
  fetched from the endpoint in parallel requests with retries.

  ``requests`` counts the requests answered and ``rows_sent`` the rows they carried (identical rows of a
  batch — a padded last batch — are sent once).
  """

  def __init__(self, cfg: RemoteConfig, top_k: int, *, seed: int | None = None, sleep: Callable = time.sleep):
    self.cfg, self.k, self.model = cfg, int(top_k), cfg.model
    self._key = os.environ.get(cfg.api_key_env) or None
    self._rng, self._sleep = random.Random(seed), sleep
    self._pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="kdjax-remote")
    self.requests = self.rows_sent = self.retried = 0

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  def _send(self, path: str, body: dict | None) -> dict:
    """One HTTP request; the response's JSON."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
      self.cfg.base + path, data=data, headers=headers, method="GET" if body is None else "POST"
    )
    with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
      return json.loads(resp.read())

  def call(self, path: str, body: dict | None = None) -> dict:
    """``_send`` with retries: connection failures, timeouts, 429 and 5xx wait :func:`backoff_delay` and
    try again; other HTTP errors and the last failure are one :class:`EndpointError` line."""
    where = f"{redacted(self.cfg.base)}{path}"
    for attempt in range(self.cfg.retries + 1):
      try:
        return self._send(path, body)
      except urllib.error.HTTPError as e:
        if e.code not in RETRIED_STATUS:
          raise EndpointError(f"teacher endpoint {where} answered HTTP {e.code}: {_server_message(e)}") from None
        last = f"HTTP {e.code}"
      except (urllib.error.URLError, http.client.HTTPException, OSError, json.JSONDecodeError) as e:
        last = type(getattr(e, "reason", e)).__name__
      if attempt < self.cfg.retries:
        self.retried += 1
        self._sleep(backoff_delay(attempt, self.cfg.backoff, self.cfg.backoff_max, self._rng))
    raise EndpointError(
      f"teacher endpoint {where} did not answer after {self.cfg.retries + 1} tries (last: {last}); run the "
      f"command again to resume (finished shards are kept)"
    )

  def info(self) -> dict:
    """The served model's ``/v1/models`` entry (the one named ``cfg.model``, else the first); sets ``model``."""
    entries = self.call("/v1/models").get("data") or []
    chosen = [e for e in entries if e.get("id") == self.cfg.model] if self.cfg.model else entries[:1]
    if not chosen:
      names = [e.get("id") for e in entries]
      raise EndpointError(f"teacher endpoint {redacted(self.cfg.base)} serves {names}, not {self.cfg.model!r}")
    self.model = chosen[0]["id"]
    return chosen[0]

  def _fetch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    resp = self.call("/v1/completions", completion_request(rows, self.k, self.cfg, self.model))
    choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != len(rows):
      raise EndpointError(f"the teacher endpoint answered {len(choices)} choices for {len(rows)} prompts")
    out = [parse_choice(c, rows.shape[1], self.k, self.cfg.protocol) for c in choices]
    self.requests += 1
    self.rows_sent += len(rows)
    return np.stack([a for a, _ in out]), np.stack([b for _, b in out])

  def __call__(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    keys = [r.tobytes() for r in x]
    first = {}
    for i, key in enumerate(keys):
      first.setdefault(key, i)
    unique = x[list(first.values())]
    n = self.cfg.request_rows
    parts = list(self._pool.map(self._fetch, [unique[lo : lo + n] for lo in range(0, len(unique), n)]))
    lp, idx = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    where = {key: j for j, key in enumerate(first)}
    take = np.array([where[key] for key in keys])
    return lp[take], idx[take]


def _server_message(e: urllib.error.HTTPError) -> str:
  """The error message of an OpenAI-style error body (one line), or the HTTP reason."""
  try:
    body = json.loads(e.read() or b"{}")
    msg = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
  except (ValueError, AttributeError, OSError):
    msg = None
  return " ".join(str(msg or e.reason).split())


def check_served(info: dict, *, vocab: str, num_classes: int, length: int, where: str, unchecked: bool) -> str:
  """The served model agrees with the data (vocabulary hash and size, row length): its teacher hash."""
  ours = info.get("kdjax") or {}
  if ours.get("vocab_hash") is None:
    if not unchecked:
      raise ConfigError(
        f"teacher endpoint {where} reports no vocabulary hash (not `kdjax serve`?): its token ids cannot be "
        f"checked against the data's tokenizer; pass --cache.unchecked-vocab true if they are the same"
      )
  elif ours["vocab_hash"] != vocab:
    raise ConfigError(
      f"teacher endpoint {where} has another tokenizer (vocabulary hash {ours['vocab_hash']}, the data's is "
      f"{vocab}): serve a teacher of the data's tokenizer"
    )
  if ours.get("vocab_size") not in (None, num_classes):
    raise ConfigError(f"teacher endpoint {where} scores {ours['vocab_size']} tokens, the data has {num_classes}")
  if ours.get("max_length") is not None and length + 1 > ours["max_length"]:
    raise ConfigError(f"teacher endpoint {where} takes {ours['max_length']} positions, rows need {length + 1}")
  return ours.get("teacher_hash") or "remote:" + hashlib.sha256(str(info.get("id")).encode()).hexdigest()[:16]


def served_teacher_hash(directory: str | Path | None) -> str | None:
  """The teacher hash of a cache a served teacher filled (``cache.json`` names its endpoint), else None:
  such a cache stands for its teacher in training without a local checkpoint."""
  meta = Path(directory) / META_FILE if directory else None
  if meta is None or not meta.is_file():
    return None
  recorded = json.loads(meta.read_text())
  return recorded.get("teacher_hash") if recorded.get("teacher_endpoint") else None


def build_remote_cache(
  directory: str | Path,
  ds,
  cfg: RemoteConfig,
  *,
  spec: CacheSpec,
  vocab: str,
  num_classes: int,
  view: views.ViewConfig | None = None,
  max_shards: int | None = None,
  progress: Callable[[int, int], None] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  teacher: RemoteTeacher | None = None,
) -> dict:
  """Fill a top-k cache of token dataset ``ds`` (rows ``(L,)``) from the teacher at ``cfg.url``.

  ``vocab`` is :func:`vocab_hash` of the data's tokenizer, checked against the server's before the first
  row; ``num_classes`` the vocabulary size V. The cache holds ``(L, V)`` outputs per example stored as
  ``spec.top_k`` log-probs (plain or packed), its teacher hash the server's. Returns what
  :func:`kdjax.data.cache.build_cache` returns, with ``requests`` and ``retried`` counts.
  """
  view = views.ViewConfig(kind="tokens") if view is None else view
  if not spec.top_k or spec.views != 1 or view.kind != "tokens":
    raise ConfigError(
      f"a remote teacher returns top-k log-probs of token rows: set --cache.top-k (e.g. 20), one view "
      f"(cache.views={spec.views}) and data.view tokens (got {view.kind!r})"
    )
  first = np.asarray(ds.take(np.arange(1))[0])
  length, where = int(first.shape[1]), redacted(cfg.base)
  teacher = RemoteTeacher(cfg, spec.top_k) if teacher is None else teacher
  try:
    info = teacher.info()
    teacher_hash = check_served(
      info, vocab=vocab, num_classes=num_classes, length=length, where=where, unchecked=cfg.unchecked_vocab
    )
    res = build_cache(
      directory,
      ds,
      teacher,
      teacher_hash=teacher_hash,
      num_classes=num_classes,
      view=view,
      spec=spec,
      output_shape=(length, num_classes),
      process_index=process_index,
      process_count=process_count,
      max_shards=max_shards,
      progress=progress,
      provenance={"teacher_endpoint": where, "teacher_model": teacher.model},
    )
  finally:
    teacher.close()
  return {**res, "requests": teacher.requests, "retried": teacher.retried}
