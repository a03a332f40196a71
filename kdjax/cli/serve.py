"""``kdjax serve TEACHER``: a teacher's top-k log-probabilities over HTTP, for a cache built on another machine.

    kdjax serve TEACHER [--host 127.0.0.1] [--port 8000] [--tokenizer DIR|FILE|DATASET] [--name NAME]
        [--max-rows 64] [--dtype float32|bfloat16] [--api-key-env NAME]

``TEACHER`` is a kdjax run's workdir or export (``model.msgpack``) or a Hugging Face checkpoint directory
(``config.json``, safetensors, ``tokenizer.json``). The server answers the subset of the OpenAI-compatible
API that ``kdjax cache … --cache.endpoint URL`` (:mod:`kdjax.data.cache.remote`) reads:

  ``GET /v1/models``        the model, with a ``kdjax`` entry: ``vocab_hash`` (of the tokenizer),
                            ``vocab_size``, ``teacher_hash`` (what an in-process cache records),
                            ``max_length``.
  ``POST /v1/completions``  ``prompt`` as token-id lists, ``echo: true``, ``max_tokens`` 0 or 1 (1: the
                            greedy next token), and ``prompt_logprobs: k`` (vLLM's form, keyed by token id)
                            and/or ``logprobs: k`` (``top_logprobs`` keyed by token text, or
                            ``token_id:N`` with ``return_tokens_as_token_ids``).

Rows are grouped by length and padded to power-of-two buckets (rows and positions, up to ``--max-rows`` and
the model's context), one jitted forward per bucket; the top-k is taken on the device. With
``--api-key-env NAME`` set in the environment, requests must carry ``Authorization: Bearer <its value>``.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from kdjax.cli.exits import CliError
from kdjax.cli.flags import pop_opt
from kdjax.errors import ConfigError

USAGE = (
  "usage: kdjax serve TEACHER [--host 127.0.0.1] [--port 8000] [--tokenizer DIR|FILE|DATASET] [--name NAME] "
  "[--max-rows 64] [--dtype float32|bfloat16] [--api-key-env NAME]"
)


class BadRequest(ValueError):
  """A request the server cannot answer: HTTP 400 with this message."""


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def check_rows(rows: list[list[int]], k: int, vocab_size: int, max_length: int) -> None:
  """Refuse (:class:`BadRequest`) prompts the teacher cannot score: empty, too long, ids outside the
  vocabulary, or a ``k`` outside ``[1, V]``."""
  if not isinstance(k, int) or not 1 <= k <= vocab_size:
    raise BadRequest(f"top log-probs k={k!r}: must be an integer in [1, {vocab_size}]")
  for r in rows:
    if not r or len(r) > max_length:
      raise BadRequest(f"a prompt of {len(r)} tokens: this teacher takes 1 to {max_length}")
    if min(r) < 0 or max(r) >= vocab_size:
      raise BadRequest(f"token ids must lie in [0, {vocab_size}), got {min(r)}…{max(r)}")


class Scorer:
  """A teacher's top-k log-probs of token rows, one jitted forward per padded ``(rows, length)`` bucket.

  ``score(rows, k)`` → per row ``(log-probs (L, k) float32, ids (L, k) int32, log-prob of each next
  prompt token (L − 1,))``: position ``t`` is the distribution after ``row[:t + 1]``,
  ``log_softmax(logits)`` at T = 1 (:func:`kdjax.losses.teacher_topk`).
  """

  def __init__(self, model, vocab_size: int, max_length: int, max_rows: int = 64):
    from kdjax.engine.state import split_model

    self.graphdef, self.params, self.rest = split_model(model)
    self.vocab_size, self.max_length, self.max_rows = int(vocab_size), int(max_length), int(max_rows)
    self._fns: dict[int, object] = {}
    self._lock = threading.Lock()

  def _fn(self, k: int):
    """The jitted forward returning the top-``k`` (compiled once per bucket shape)."""
    if k not in self._fns:
      import jax
      import jax.numpy as jnp

      from kdjax.engine.state import apply_model
      from kdjax.losses import teacher_topk
      from kdjax.parallel import xla_cpu

      def fwd(p, r, x):
        z = apply_model(self.graphdef, p, r, x, train=False)[0].logits
        lp, idx = teacher_topk(z, k)
        full = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
        return lp, idx, jnp.take_along_axis(full[:, :-1], x[:, 1:, None], -1)[..., 0]

      jitted = jax.jit(fwd, compiler_options=xla_cpu.compiler_options("eigen"))
      self._fns[k] = lambda x: jax.device_get(jitted(self.params, self.rest, x))
    return self._fns[k]

  def score(self, rows: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    check_rows(rows, k, self.vocab_size, self.max_length)
    out: list = [None] * len(rows)
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
      by_len.setdefault(min(_pow2(len(r)), self.max_length), []).append(i)
    for length, members in sorted(by_len.items()):
      for lo in range(0, len(members), self.max_rows):
        part = members[lo : lo + self.max_rows]
        x = np.zeros((min(_pow2(len(part)), self.max_rows), length), np.int32)
        for j, i in enumerate(part):
          x[j, : len(rows[i])] = rows[i]
        with self._lock:
          lp, idx, nxt = self._fn(k)(x)
        for j, i in enumerate(part):
          n = len(rows[i])
          out[i] = (np.asarray(lp[j, :n]), np.asarray(idx[j, :n]), np.asarray(nxt[j, : n - 1]))
    return out


class Served:
  """What the server answers with: the scorer, the tokenizer and the model's description."""

  def __init__(self, scorer: Scorer, tokenizer, name: str, teacher_hash: str, api_key: str | None):
    from kdjax.data.cache.remote import vocab_hash

    self.scorer, self.tokenizer, self.name, self.api_key = scorer, tokenizer, name, api_key
    self.vocab_hash, self.teacher_hash = vocab_hash(tokenizer), teacher_hash

  def text(self, i: int) -> str:
    t = self.tokenizer.id_to_token(int(i))
    return f"<{int(i)}>" if t is None else t

  def models(self) -> dict:
    kd = {
      "vocab_hash": self.vocab_hash,
      "vocab_size": self.scorer.vocab_size,
      "teacher_hash": self.teacher_hash,
      "max_length": self.scorer.max_length,
    }
    return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "kdjax", "kdjax": kd}]}


def _prompts(body: dict) -> list[list[int]]:
  """The request's prompts as token-id lists (one list, or a list of them)."""
  p = body.get("prompt")
  if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
    p = [p]
  if not (isinstance(p, list) and p and all(isinstance(r, list) and all(isinstance(t, int) for t in r) for r in p)):
    raise BadRequest("kdjax serve reads prompts as token ids: 'prompt' must be a list of integer lists")
  return p


def _request_k(body: dict) -> tuple[int, int, bool, bool]:
  """``(k, max_tokens, prompt_logprobs?, logprobs?)`` of a completions request, checked."""
  plp, lp = body.get("prompt_logprobs"), body.get("logprobs")
  max_tokens = body.get("max_tokens", 16)
  if plp is None and lp is None:
    raise BadRequest("ask for prompt_logprobs: k (or echo with logprobs: k): kdjax serve scores prompts")
  if lp is not None and not body.get("echo"):
    raise BadRequest("logprobs: k scores the prompt with echo: true")
  if not isinstance(max_tokens, int) or max_tokens not in (0, 1):
    raise BadRequest(f"max_tokens={max_tokens!r}: kdjax serve scores prompts (0) or adds the greedy next token (1)")
  if max_tokens and float(body.get("temperature", 1.0)) != 0.0:
    raise BadRequest("kdjax serve generates greedily only: set temperature 0 (or max_tokens 0)")
  ks = [int(v) for v in (plp, lp) if v is not None]
  if len(set(ks)) > 1:
    raise BadRequest(f"prompt_logprobs={plp} and logprobs={lp}: ask for one k")
  return ks[0], max_tokens, plp is not None, lp is not None


def _top(served: Served, lp: np.ndarray, idx: np.ndarray, by_id: bool) -> dict:
  key = (lambda i: f"token_id:{i}") if by_id else served.text
  return {key(int(i)): float(v) for v, i in zip(lp, idx)}


def _choice(served: Served, i: int, row: list[int], scored, body: dict, asked: tuple) -> dict:
  """One completion choice: the echoed prompt (and greedy token) with its log-probs."""
  k, max_tokens, want_plp, want_lp = asked
  lp, idx, nxt = scored
  tokens = list(row) + ([int(idx[-1, 0])] if max_tokens else [])
  choice = {"index": i, "text": served.tokenizer.decode(tokens, skip_special_tokens=False), "finish_reason": "length"}
  if want_plp:
    choice["prompt_logprobs"] = [None] + [
      {
        str(int(j)): {"logprob": float(v), "rank": r + 1, "decoded_token": served.text(j)}
        for r, (v, j) in enumerate(zip(lp[t - 1], idx[t - 1]))
      }
      for t in range(1, len(row))
    ]
  if want_lp:
    by_id = bool(body.get("return_tokens_as_token_ids"))
    texts = [f"token_id:{t}" if by_id else served.text(t) for t in tokens]
    tops = [None] + [_top(served, lp[t - 1], idx[t - 1], by_id) for t in range(1, len(tokens))]
    token_lp = [None] + [float(v) for v in nxt] + ([float(lp[-1, 0])] if max_tokens else [])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in texts])[:-1]]).astype(int).tolist()
    choice["logprobs"] = {"tokens": texts, "token_logprobs": token_lp, "top_logprobs": tops, "text_offset": offsets}
  return choice


def completion(served: Served, body: dict) -> dict:
  """The ``/v1/completions`` answer to ``body`` (raises :class:`BadRequest`)."""
  rows, asked = _prompts(body), _request_k(body)
  check_rows(rows, asked[0], served.scorer.vocab_size, served.scorer.max_length)
  scored = served.scorer.score(rows, asked[0])
  choices = [_choice(served, i, r, s, body, asked) for i, (r, s) in enumerate(zip(rows, scored))]
  n = sum(len(r) for r in rows)
  usage = {"prompt_tokens": n, "completion_tokens": asked[1] * len(rows), "total_tokens": n + asked[1] * len(rows)}
  return {"object": "text_completion", "model": served.name, "choices": choices, "usage": usage}


def make_handler(served: Served) -> type[BaseHTTPRequestHandler]:
  """The request handler answering ``GET /v1/models`` and ``POST /v1/completions`` for ``served``."""

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet: one line at start, errors only
      del format, args

    def _reply(self, code: int, obj: dict) -> None:
      data = json.dumps(obj).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
      self._reply(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def _authorized(self) -> bool:
      if not served.api_key:
        return True
      given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
      if hmac.compare_digest(given.encode(), served.api_key.encode()):
        return True
      self._error(401, "missing or wrong API key (Authorization: Bearer …)")
      return False

    def do_GET(self):  # noqa: N802 - http.server's name
      if self.path.rstrip("/") in ("/health", "/v1/health"):
        return self._reply(200, {"status": "ok"})
      if not self._authorized():
        return None
      if self.path.rstrip("/") in ("/v1/models", "/models"):
        return self._reply(200, served.models())
      return self._error(404, f"no such endpoint {self.path} (GET /v1/models, POST /v1/completions)")

    def do_POST(self):  # noqa: N802
      body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
      if not self._authorized():
        return None
      if self.path.rstrip("/") not in ("/v1/completions", "/completions"):
        return self._error(404, f"no such endpoint {self.path} (POST /v1/completions)")
      try:
        return self._reply(200, completion(served, json.loads(body or b"{}")))
      except (BadRequest, ValueError, TypeError) as e:
        return self._error(400, " ".join(str(e).split()) or type(e).__name__)
      except Exception as e:  # noqa: BLE001 - a bug: its traceback in the server's log, a 500 to the client
        import traceback

        traceback.print_exc()
        return self._error(500, f"internal error in kdjax serve ({type(e).__name__})")

  return Handler


def _is_hf(path: Path) -> bool:
  return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_tokenizer(spec: str | None, teacher: Path, hf: bool, data_dir: str | None = None):
  """The served tokenizer: ``--tokenizer`` (a directory with ``tokenizer.json``, the file, or a dataset
  name), else the Hugging Face checkpoint's, else the one of the dataset the kdjax run trained on."""
  from tokenizers import Tokenizer

  from kdjax.data import tfds

  if spec:
    p = Path(spec)
    if p.is_file():
      return Tokenizer.from_file(str(p))
    if (p / "tokenizer.json").is_file():
      return Tokenizer.from_file(str(p / "tokenizer.json"))
    return tfds.tokenizer(spec, data_dir)
  if hf:
    from kdjax.models import pretrained

    return pretrained.load_tokenizer(teacher)
  from kdjax import checkpoint as ckpt

  msgpack = ckpt.resolve_export(teacher, "served teacher")
  for run_dir in (msgpack.parent, msgpack.parent.parent):
    if (run_dir / "config.json").is_file():
      data = json.loads((run_dir / "config.json").read_text()).get("config", {}).get("data", {})
      if data.get("name"):
        return tfds.tokenizer(data["name"], data_dir or data.get("data_dir"))
  raise CliError(f"kdjax serve: no tokenizer known for {str(teacher)!r}: pass --tokenizer DIR|tokenizer.json|DATASET")


def load_served(teacher: str, *, tokenizer: str | None, name: str | None, dtype: str, max_rows: int, api_key):
  """The teacher at ``teacher`` (kdjax export or workdir, or Hugging Face checkpoint) ready to serve."""
  from kdjax import checkpoint as ckpt
  from kdjax.config import ModelConfig
  from kdjax.engine.experiment import load_model

  path = Path(teacher)
  if not path.exists():
    raise CliError(f"kdjax serve: no such teacher {teacher!r} (a kdjax workdir or export, or a Hugging Face directory)")
  hf = _is_hf(path)
  if hf:
    from kdjax.models import pretrained

    vocab, model_name = pretrained.read_config(path).vocab_size, "hf"
  else:
    meta = ckpt.load_export(path, what="served teacher")[0]
    if "model" not in meta or "num_classes" not in meta:
      raise CliError(f"kdjax serve: {teacher!r} has no model.json naming its model; re-export it with kdjax export")
    vocab, model_name, dtype = int(meta["num_classes"]), meta["model"], meta.get("dtype", dtype)
  model, teacher_hash = load_model(
    ModelConfig(name=model_name, checkpoint=str(path), dtype=dtype), vocab, role="teacher"
  )
  max_length = getattr(model, "max_len", None)
  if max_length is None:
    raise CliError(f"kdjax serve: {teacher!r} is a {model_name!r}, not a language model (token rows in, (L, V) out)")
  tok = load_tokenizer(tokenizer, path, hf)
  label = name or (path.resolve().name if hf else model_name)
  return Served(Scorer(model, vocab, max_length, max_rows), tok, label, teacher_hash, api_key)


def cmd_serve(argv: list[str]) -> int:
  """``kdjax serve TEACHER …``: serve until interrupted (one line names the address)."""
  args = list(argv)
  host = pop_opt(args, "--host", "127.0.0.1")
  port = pop_opt(args, "--port", "8000")
  opts = {k: pop_opt(args, f"--{k}") or pop_opt(args, f"--{k.replace('-', '_')}") for k in ("tokenizer", "name")}
  max_rows = pop_opt(args, "--max-rows") or pop_opt(args, "--max_rows") or "64"
  dtype = pop_opt(args, "--dtype", "float32")
  key_env = pop_opt(args, "--api-key-env") or pop_opt(args, "--api_key_env")
  if len(args) != 1 or args[0].startswith("-"):
    raise CliError(USAGE)
  try:
    port_n, rows_n = int(port), int(max_rows)
  except ValueError:
    raise CliError(f"kdjax serve: --port and --max-rows take integers, got {port!r}, {max_rows!r}") from None
  if key_env and not os.environ.get(key_env):
    raise CliError(f"kdjax serve: --api-key-env {key_env}: that environment variable is not set")
  served = load_served(
    args[0], **opts, dtype=dtype, max_rows=_pow2(max(1, rows_n)), api_key=os.environ.get(key_env) if key_env else None
  )
  try:
    server = ThreadingHTTPServer((host, port_n), make_handler(served))
  except OSError as e:
    raise ConfigError(f"kdjax serve: cannot listen on {host}:{port_n} ({e.strerror or e})") from None
  server.daemon_threads = True
  print(
    f"kdjax serve: {served.name} on http://{host}:{server.server_address[1]} (vocabulary {served.vocab_hash}, "
    f"{served.scorer.vocab_size} tokens, teacher {served.teacher_hash})",
    flush=True,
  )
  try:
    server.serve_forever()
  finally:
    server.server_close()
    sys.stdout.flush()
  return 0
