"""A teacher outside the process: ``kdjax serve`` and the top-k cache filled from an OpenAI-compatible endpoint.

Quick tier: the request and response encoding, the back-off schedule, resume bookkeeping, retries, a
tokenizer mismatch and the API key, against a stub server in a thread whose log-probs NumPy computes
(position t of a row scores ``W[x_t] + t/4`` over V = 16 tokens). Slow tier: one ``kdjax serve`` subprocess
(a one-layer ``lm_1x32`` over the 15 tokens of the ``arithmetic`` tokenizer) shared by the module: the cache
it fills equals the one built in process, it is killed and restarted mid-build, and no key is logged.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from kdjax.data import cache as cache_lib
from kdjax.data import views
from kdjax.data.cache import remote
from kdjax.data.tfds import ArrayDataset
from kdjax.errors import ConfigError

V, L, K = 16, 6, 5
SECRET = "sk-test-7f3a9c1e5b2d4f6a8c0e"  # a fake API key: it must appear in no output and no file
VIEW = views.ViewConfig(kind="tokens")
W = np.random.default_rng(0).normal(size=(V, V)).astype(np.float32)


def _reference(rows: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
  """The stub teacher's top-k at every position of ``rows`` ``(n, L)``, by NumPy: float32 and int32 ``(n, L, k)``."""
  z = W[rows].astype(np.float64) + np.arange(rows.shape[1])[:, None] / 4
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  idx = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(logp, idx, -1).astype(np.float32), idx.astype(np.int32)


class _QuietServer(ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):  # a client that timed out closed the connection
    del request, client_address


class Stub:
  """An OpenAI-style completions server in a thread: ``fail`` requests answer 503 first, then ``slow`` ones
  sleep past the client's timeout; ``key`` (if set) is required; every prompt row is recorded."""

  def __init__(self, *, vocab_hash: str = "stubvocab", fail: int = 0, slow: int = 0, key: str | None = None):
    self.vocab_hash, self.fail, self.slow, self.key = vocab_hash, fail, slow, key
    self.rows: list[tuple[int, ...]] = []
    self.seen_auth: list[str] = []
    stub = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *a):
        del a

      def _reply(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def _auth(self):
        stub.seen_auth.append(self.headers.get("Authorization", ""))
        if stub.key and self.headers.get("Authorization") != f"Bearer {stub.key}":
          self._reply(401, {"error": {"message": "bad key"}})
          return False
        return True

      def do_GET(self):
        if self._auth():
          kd = {"vocab_hash": stub.vocab_hash, "vocab_size": V, "teacher_hash": "stubteacher", "max_length": 64}
          self._reply(200, {"data": [{"id": "stub", "kdjax": kd}]})

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._auth():
          return
        if stub.fail > 0:
          stub.fail -= 1
          return self._reply(503, {"error": {"message": "busy"}})
        if stub.slow > 0:
          stub.slow -= 1
          time.sleep(0.6)
        prompts = np.asarray(body["prompt"])
        stub.rows += [tuple(r[:-1]) for r in prompts.tolist()]
        lp, idx = _reference(prompts, body["prompt_logprobs"])
        choices = [
          {
            "index": i,
            "prompt_logprobs": [None] + [dict(zip(map(str, idx[i, t]), lp[i, t].tolist())) for t in range(L)],
          }
          for i in range(len(prompts))
        ]
        self._reply(200, {"choices": choices[::-1]})  # out of order on purpose: the client sorts by index

    self.server = _QuietServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def stub_factory():
  made = []

  def make(**kw):
    made.append(Stub(**kw))
    return made[-1]

  yield make
  for s in made:
    s.close()


def _dataset(n: int = 20, vocab: int = V, length: int = L, seed: int = 1) -> ArrayDataset:
  tokens = np.random.default_rng(seed).integers(0, vocab, (n, length + 1)).astype(np.int32)
  return ArrayDataset(tokens[:, :-1], tokens[:, 1:], np.arange(n) * 3 + 7, name="toy_lm", split="train")


def _rows(ds) -> tuple[np.ndarray, np.ndarray]:
  """A dataset's token rows ``(n, L)`` and ids ``(n,)``, in order."""
  x, _, ids = ds.take(np.arange(len(ds)))
  return np.asarray(x), np.asarray(ids)


def _spec(**kw) -> cache_lib.CacheSpec:
  return cache_lib.CacheSpec(dtype="float32", top_k=K, shard_size=8, batch_size=4, **kw)


def _rcfg(url: str, **kw) -> remote.RemoteConfig:
  return remote.RemoteConfig(url, **{"request_rows": 3, "concurrency": 2, "backoff": 0.01, **kw})


def _read_all(directory, n: int) -> dict[str, np.ndarray]:
  """Every stored row of a complete cache (checked by the reader), in shard order: ``ids`` ``(n,)`` and
  ``topk_logp`` / ``topk_idx`` ``(n, L, k)``."""
  cache_lib.TeacherCache.open(directory, view=VIEW, num_examples=n)
  shards = [cache_lib.read_shard(p) for p in sorted(Path(directory).glob("shard-*"))]
  return {name: np.concatenate([np.asarray(s[name]) for s in shards]) for name in ("ids", "topk_logp", "topk_idx")}


# ---------------------------------------------------------------- quick tier: pure parts and a stub server


def test_request_encoding_and_both_response_forms():
  cfg = remote.RemoteConfig("http://h:1/v1/")
  body = remote.completion_request(np.array([[3, 4], [5, 6]]), 2, cfg, "m")
  assert cfg.base == "http://h:1"
  assert body["prompt"] == [[3, 4, remote.SUFFIX_TOKEN], [5, 6, remote.SUFFIX_TOKEN]] and body["prompt_logprobs"] == 2
  assert body["echo"] is True and body["temperature"] == 0.0 and "logprobs" not in body
  legacy = remote.completion_request(np.array([[3, 4]]), 2, remote.RemoteConfig("http://h:1", protocol="logprobs"), "m")
  assert legacy["logprobs"] == 2 and legacy["return_tokens_as_token_ids"] is True
  # vLLM's form (the prompt token itself may come on top of the k best) and the echo/top_logprobs form
  plp = {
    "prompt_logprobs": [
      None,
      {"7": {"logprob": -0.5}, "2": {"logprob": -2.0}, "9": {"logprob": -0.5}},
      {"1": {"logprob": -0.1}, "4": {"logprob": -3.0}},
      {"0": -1.0, "3": -0.2},
    ]
  }
  lp, idx = remote.parse_choice(plp, 3, 2, "prompt_logprobs")
  np.testing.assert_array_equal(idx, [[7, 9], [1, 4], [3, 0]])  # a tie: the smaller id first
  np.testing.assert_array_equal(lp, np.float32([[-0.5, -0.5], [-0.1, -3.0], [-0.2, -1.0]]))
  echo = {
    "logprobs": {
      "top_logprobs": [None, {"token_id:5": -1.5, "token_id:6": -0.25}, {"token_id:1": -0.7, "token_id:2": -0.9}]
    }
  }
  lp2, idx2 = remote.parse_choice(echo, 2, 2, "logprobs")
  np.testing.assert_array_equal(idx2, [[6, 5], [1, 2]])
  np.testing.assert_array_equal(lp2, np.float32([[-0.25, -1.5], [-0.7, -0.9]]))
  with pytest.raises(ConfigError, match="returned 1 log-probs a position"):
    remote.parse_choice({"prompt_logprobs": [None, {"1": -0.1}]}, 1, 2, "prompt_logprobs")
  with pytest.raises(ConfigError, match="by token text"):
    remote.parse_choice({"logprobs": {"top_logprobs": [None, {"a": -0.1}]}}, 1, 1, "logprobs")
  with pytest.raises(ConfigError, match="expected http"):
    remote.RemoteConfig("ftp://user:pw@h/x")


def test_backoff_is_full_jitter_under_a_doubling_ceiling():
  rng, twin = random.Random(5), random.Random(5)
  delays = [remote.backoff_delay(a, 0.5, 4.0, rng) for a in range(8)]
  ceilings = [min(4.0, 0.5 * 2**a) for a in range(8)]
  assert ceilings[:4] == [0.5, 1.0, 2.0, 4.0] and ceilings[-1] == 4.0
  assert all(0.0 <= d <= c for d, c in zip(delays, ceilings))
  assert delays == [twin.uniform(0.0, c) for c in ceilings]  # uniform on [0, ceiling], no fixed part
  many = [remote.backoff_delay(3, 0.5, 4.0, rng) for _ in range(400)]
  assert 1.6 < np.mean(many) < 2.4 and min(many) < 0.3 and max(many) > 3.7


def test_stub_fills_cache_and_a_resumed_build_fetches_only_missing_rows(stub_factory, tmp_path):
  stub, ds = stub_factory(), _dataset()
  args = dict(spec=_spec(), vocab="stubvocab", num_classes=V, view=VIEW)
  first = remote.build_remote_cache(tmp_path, ds, _rcfg(stub.url), max_shards=1, **args)
  assert first["written"] == 1 and not first["complete"]
  x, ids = _rows(ds)
  shard0 = {tuple(r) for r in x[:8].tolist()}
  assert set(stub.rows) == shard0
  stub.rows.clear()
  second = remote.build_remote_cache(tmp_path, ds, _rcfg(stub.url), **args)
  assert second == {**second, "written": 2, "skipped": 1, "complete": True}
  assert not set(stub.rows) & shard0 and set(stub.rows) == {tuple(r) for r in x[8:].tolist()}
  got = _read_all(tmp_path, len(ds))
  np.testing.assert_array_equal(np.sort(got["ids"]), np.sort(ids))  # every row once
  order = np.argsort(got["ids"])
  lp, idx = _reference(x[np.searchsorted(ids, got["ids"][order])])
  np.testing.assert_array_equal(got["topk_idx"][order, 0], idx)
  np.testing.assert_allclose(got["topk_logp"][order, 0], lp, rtol=0, atol=1e-6)
  meta = json.loads((tmp_path / "cache.json").read_text())
  assert meta["teacher_hash"] == "stubteacher" and meta["teacher_endpoint"] == stub.url.removesuffix("/v1")
  # such a cache stands for its teacher in training (no local checkpoint); an in-process cache does not
  assert remote.served_teacher_hash(tmp_path) == "stubteacher" and remote.served_teacher_hash(None) is None
  (tmp_path / "cache.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "teacher_endpoint"}))
  assert remote.served_teacher_hash(tmp_path) is None


def test_failing_and_slow_server_is_retried_with_backoff(stub_factory, tmp_path):
  stub, ds, waits = stub_factory(fail=3, slow=2), _dataset(n=8), []
  teacher = remote.RemoteTeacher(_rcfg(stub.url, timeout=0.3, retries=6, concurrency=1), K, seed=0, sleep=waits.append)
  res = remote.build_remote_cache(
    tmp_path, ds, teacher.cfg, spec=_spec(), vocab="stubvocab", num_classes=V, view=VIEW, teacher=teacher
  )
  assert res["complete"] and res["retried"] == 5 and len(waits) == 5
  assert all(0 <= w <= min(30.0, 0.01 * 2**a) for a, w in enumerate(waits))
  got = _read_all(tmp_path, len(ds))
  np.testing.assert_array_equal(got["topk_idx"][np.argsort(got["ids"]), 0], _reference(_rows(ds)[0])[1])


def test_a_server_that_never_answers_is_one_line(stub_factory, tmp_path):
  stub, ds = stub_factory(fail=10**6), _dataset(n=8)
  teacher = remote.RemoteTeacher(_rcfg(stub.url, retries=2), K, sleep=lambda s: None)
  with pytest.raises(remote.EndpointError) as e:
    remote.build_remote_cache(
      tmp_path, ds, teacher.cfg, spec=_spec(), vocab="stubvocab", num_classes=V, view=VIEW, teacher=teacher
    )
  assert "\n" not in str(e.value) and "after 3 tries (last: HTTP 503)" in str(e.value) and "resume" in str(e.value)
  with pytest.raises(ConfigError, match=r"^teacher endpoint http://127.0.0.1:\d+/v1/models did not answer"):
    remote.RemoteTeacher(remote.RemoteConfig("http://127.0.0.1:9", retries=0, timeout=1), K).info()


def test_tokenizer_mismatch_is_one_line_before_any_row(stub_factory, tmp_path):
  stub, ds = stub_factory(vocab_hash="0123456789abcdef"), _dataset()
  with pytest.raises(ConfigError) as e:
    remote.build_remote_cache(tmp_path, ds, _rcfg(stub.url), spec=_spec(), vocab="fedcba9876543210", num_classes=V)
  msg = str(e.value)
  assert "\n" not in msg and "another tokenizer" in msg and "0123456789abcdef" in msg and "fedcba9876543210" in msg
  assert not stub.rows and not (tmp_path / "cache.json").exists()
  with pytest.raises(ConfigError, match="scores 16 tokens, the data has 15"):
    remote.build_remote_cache(tmp_path, ds, _rcfg(stub.url), spec=_spec(), vocab="0123456789abcdef", num_classes=15)
  with pytest.raises(ConfigError, match="top-k log-probs of token rows"):
    remote.build_remote_cache(tmp_path, ds, _rcfg(stub.url), spec=cache_lib.CacheSpec(), vocab="x", num_classes=V)


def test_api_key_is_sent_from_the_environment_and_never_written(stub_factory, tmp_path, monkeypatch, capsys):
  stub, ds = stub_factory(key=SECRET), _dataset(n=8)
  monkeypatch.delenv("KDJAX_TEST_KEY", raising=False)
  with pytest.raises(remote.EndpointError) as e:  # no key: the server's refusal, one line, no key in it
    remote.build_remote_cache(
      tmp_path / "a", ds, _rcfg(stub.url, api_key_env="KDJAX_TEST_KEY"), spec=_spec(), vocab="stubvocab", num_classes=V
    )
  assert "HTTP 401" in str(e.value)
  with pytest.raises(ConfigError) as bad_url:  # a key in the URL is refused without being repeated
    remote.RemoteConfig(f"http://user:{SECRET}@127.0.0.1:9")
  monkeypatch.setenv("KDJAX_TEST_KEY", SECRET)
  res = remote.build_remote_cache(
    tmp_path / "b", ds, _rcfg(stub.url, api_key_env="KDJAX_TEST_KEY"), spec=_spec(), vocab="stubvocab", num_classes=V
  )
  assert res["complete"] and stub.seen_auth[-1] == f"Bearer {SECRET}"
  written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
  out = capsys.readouterr()
  assert SECRET.encode() not in written and SECRET not in out.out + out.err + str(e.value) + str(bad_url.value)


@pytest.mark.slow
def test_cli_refusals_are_one_line(tmp_path, capsys):
  from kdjax.cli import main

  assert main(["serve"]) == 1 and main(["serve", str(tmp_path / "none")]) == 1
  # the default arithmetic_gkd config samples the student's own answers: a remote cache cannot serve them
  cmd = [
    "cache",
    "arithmetic_gkd",
    "--cache.endpoint",
    "http://127.0.0.1:9",
    "--cache.dir",
    str(tmp_path),
    "--cache.top-k",
    "4",
  ]
  assert main(cmd) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and err[0].startswith("kdjax: error: usage: kdjax serve TEACHER")
  assert "no such teacher" in err[1] and "generated responses" in err[2] and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- slow tier: one `kdjax serve` subprocess

N, SL, VA = 24, 8, 15  # rows, row length, the arithmetic tokenizer's vocabulary
KEY_ENV = "KDJAX_API_KEY"


class Server:
  """``kdjax serve`` of a one-layer LM in a subprocess (restartable on its port); its output goes to log files."""

  def __init__(self, export: Path, logs: Path):
    self.export, self.logs, self.port, self.proc, self.runs = export, logs, 0, None, 0

  def start(self) -> None:
    self.runs += 1
    log = self.logs / f"serve{self.runs}.log"
    cmd = [sys.executable, "-m", "kdjax", "serve", str(self.export), "--tokenizer", "arithmetic"]
    cmd += ["--port", str(self.port), "--max-rows", "8", "--api-key-env", KEY_ENV]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", KEY_ENV: SECRET}
    self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    self.log = log

  def wait(self) -> None:
    for _ in range(1200):
      m = re.search(r"on http://127\.0\.0\.1:(\d+)", self.log.read_text())
      if m:
        self.port = int(m.group(1))
        return
      assert self.proc.poll() is None, self.log.read_text()
      time.sleep(0.05)
    raise AssertionError("kdjax serve did not start")

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def stop(self) -> None:
    if self.proc and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
      self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A served ``lm_1x32`` export, its in-process top-k cache (k = K) and the data: one server for the module."""
  from flax import nnx

  from kdjax import checkpoint as ckpt
  from kdjax import models
  from kdjax.config import ModelConfig
  from kdjax.engine.experiment import load_model
  from kdjax.engine.state import split_model
  from kdjax.engine.teacher_cache import teacher_predict_fn

  root = tmp_path_factory.mktemp("remote")
  g, p, r = split_model(models.create("lm_1x32", num_classes=VA, rngs=nnx.Rngs(3)))
  ckpt.export_model(root / "export", model_name="lm_1x32", num_classes=VA, dtype="float32", params=p, model_state=r)
  server = Server(root / "export", root)
  server.start()  # starts while the in-process cache is built
  ds = _dataset(n=N, vocab=VA, length=SL, seed=2)
  model, teacher_hash = load_model(ModelConfig(name="lm_1x32", checkpoint=str(root / "export")), VA, role="teacher")
  predict = teacher_predict_fn(*split_model(model), top_k=K)
  spec = cache_lib.CacheSpec(dtype="float32", top_k=K, shard_size=8, batch_size=8)
  args = dict(teacher_hash=teacher_hash, num_classes=VA, view=VIEW, spec=spec, output_shape=(SL, VA))
  assert cache_lib.build_cache(root / "local", ds, predict, **args)["complete"]
  server.wait()
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(KEY_ENV, SECRET)
    yield {"server": server, "root": root, "ds": ds, "spec": spec, "local": _read_all(root / "local", N)}
  server.stop()


def _vocab() -> str:
  from kdjax.data.builders import arithmetic

  return remote.vocab_hash(arithmetic.tokenizer())


def _same_rows(got: dict, want: dict) -> None:
  np.testing.assert_array_equal(got["ids"], want["ids"])  # every row once, in the same shards
  np.testing.assert_array_equal(got["topk_idx"], want["topk_idx"])
  np.testing.assert_allclose(got["topk_logp"], want["topk_logp"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_served_teacher_fills_the_cache_built_in_process(served):
  s = served["server"]
  cfg = remote.RemoteConfig(s.url, request_rows=3, concurrency=2, timeout=60)
  res = remote.build_remote_cache(
    served["root"] / "remote", served["ds"], cfg, spec=served["spec"], vocab=_vocab(), num_classes=VA
  )
  assert res["complete"] and res["requests"] == 9 and res["retried"] == 0
  _same_rows(_read_all(served["root"] / "remote", N), served["local"])
  meta = {k: json.loads((served["root"] / d / "cache.json").read_text()) for k, d in (("r", "remote"), ("l", "local"))}
  assert {k: v for k, v in meta["r"].items() if not k.startswith("teacher_endpoint") and k != "teacher_model"} == meta[
    "l"
  ]
  # the legacy echo form answers the same numbers
  legacy = remote.RemoteTeacher(remote.RemoteConfig(s.url, protocol="logprobs", max_tokens=0), K)
  legacy.info()
  x = _rows(served["ds"])[0][:2]
  lp, idx = legacy(x)
  np.testing.assert_array_equal(idx, served["local"]["topk_idx"][:2, 0])
  np.testing.assert_allclose(lp, served["local"]["topk_logp"][:2, 0], rtol=0, atol=1e-5)
  legacy.close()


@pytest.mark.slow
def test_tokenizer_mismatch_and_missing_key_are_one_line(served, monkeypatch, tmp_path):
  s = served["server"]
  with pytest.raises(ConfigError) as e:
    remote.build_remote_cache(
      tmp_path, served["ds"], remote.RemoteConfig(s.url), spec=served["spec"], vocab="0" * 16, num_classes=VA
    )
  assert "\n" not in str(e.value) and "another tokenizer" in str(e.value) and not list(tmp_path.iterdir())
  monkeypatch.delenv(KEY_ENV)
  with pytest.raises(remote.EndpointError, match="HTTP 401: missing or wrong API key"):
    remote.RemoteTeacher(remote.RemoteConfig(s.url), K).info()


@pytest.mark.slow
def test_server_killed_and_restarted_mid_build(served):
  """After the first shard the server is killed (SIGKILL) and started again on its port; the client retries
  until it answers, and the cache holds every row once, equal to the in-process one."""
  s, restarted = served["server"], []

  def progress(done, total):
    if done == 1 and not restarted:
      s.stop()
      s.start()
      restarted.append(done)

  cfg = remote.RemoteConfig(s.url, request_rows=4, concurrency=2, timeout=30, retries=60, backoff=0.1, backoff_max=1.0)
  res = remote.build_remote_cache(
    served["root"] / "restarted",
    served["ds"],
    cfg,
    spec=served["spec"],
    vocab=_vocab(),
    num_classes=VA,
    progress=progress,
  )
  s.wait()
  assert restarted and res["complete"] and res["retried"] > 0 and res["written"] == 3
  _same_rows(_read_all(served["root"] / "restarted", N), served["local"])


@pytest.mark.slow
def test_no_key_in_any_output_or_file(served):
  files = [p for p in served["root"].rglob("*") if p.is_file()]
  assert len([p for p in files if p.name.startswith("serve")]) >= 1
  assert not [p for p in files if SECRET.encode() in p.read_bytes()]


def test_packed_cache_filled_from_the_stub_is_within_the_grid_bound(stub_factory, tmp_path):
  stub, ds = stub_factory(), _dataset(n=8)
  spec = cache_lib.CacheSpec(top_k=K, encoding="packed", shard_size=8, batch_size=8)
  assert remote.build_remote_cache(tmp_path, ds, _rcfg(stub.url), spec=spec, vocab="stubvocab", num_classes=V)[
    "complete"
  ]
  c = cache_lib.TeacherCache.open(tmp_path, view=VIEW, num_examples=8)
  assert c.meta["teacher_hash"] == "stubteacher" and c.meta["bytes_per_token"] > 0
  batch = cache_lib.CachedLoader(ds, c, batch_size=8, shuffle=False).batch(0, 0)
  lp, idx = _reference(np.asarray(batch["inputs"]))
  got_lp, got_idx = np.asarray(batch["teacher_topk_logp"]), np.asarray(batch["teacher_topk_idx"])
  by_id, ref_by_id = np.argsort(got_idx, -1), np.argsort(idx, -1)  # packed rows come back in id order
  np.testing.assert_array_equal(np.take_along_axis(got_idx, by_id, -1), np.take_along_axis(idx, ref_by_id, -1))
  err = np.take_along_axis(got_lp, by_id, -1) - np.take_along_axis(lp, ref_by_id, -1)
  assert np.abs(err).max() <= cache_lib.LOGP_BOUND


def test_served_requests_are_checked_in_one_line():
  from kdjax.cli import serve

  assert serve._request_k({"prompt_logprobs": 4, "max_tokens": 0}) == (4, 0, True, False)
  assert serve._request_k({"logprobs": 2, "echo": True, "max_tokens": 1, "temperature": 0}) == (2, 1, False, True)
  assert serve._prompts({"prompt": [1, 2, 3]}) == [[1, 2, 3]]
  bad = [
    ({"prompt": "a text"}, serve._prompts, "token ids"),
    ({"max_tokens": 0}, serve._request_k, "ask for prompt_logprobs"),
    ({"logprobs": 2, "max_tokens": 0}, serve._request_k, "echo: true"),
    ({"prompt_logprobs": 2, "max_tokens": 16}, serve._request_k, "max_tokens=16"),
    ({"prompt_logprobs": 2, "max_tokens": 1, "temperature": 0.7}, serve._request_k, "greedily"),
  ]
  for body, check, words in bad:
    with pytest.raises(serve.BadRequest, match=words):
      check(body)


class _NumpyScorer:
  """``kdjax serve``'s scorer interface over the stub's NumPy teacher (no model to compile)."""

  vocab_size, max_length = V, 64

  def score(self, rows, k):
    out = []
    for r in rows:
      lp, idx = _reference(np.asarray([r]), k)
      z = W[np.asarray(r)].astype(np.float64) + np.arange(len(r))[:, None] / 4
      full = z - np.log(np.exp(z).sum(-1, keepdims=True))
      out.append((lp[0], idx[0], full[np.arange(len(r) - 1), np.asarray(r[1:])]))
    return out


def test_serve_http_answers_both_forms_and_checks_the_key(tmp_path, monkeypatch):
  """``kdjax serve``'s HTTP layer (handler, auth, both log-prob forms, greedy token, errors) with the
  NumPy teacher behind it, read by the cache client."""
  from tokenizers import Tokenizer, models

  from kdjax.cli import serve

  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
  served = serve.Served(_NumpyScorer(), tok, "numpy", "numpyteacher", api_key=SECRET)
  server = _QuietServer(("127.0.0.1", 0), serve.make_handler(served))
  threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  try:
    monkeypatch.setenv(remote.API_KEY_ENV, SECRET)
    x = _rows(_dataset(n=5))[0]
    for protocol, max_tokens in (("prompt_logprobs", 0), ("logprobs", 1)):
      teacher = remote.RemoteTeacher(remote.RemoteConfig(url, protocol=protocol, max_tokens=max_tokens), K)
      info = teacher.info()
      assert info["kdjax"] == {
        "vocab_hash": remote.vocab_hash(tok),
        "vocab_size": V,
        "teacher_hash": "numpyteacher",
        "max_length": 64,
      }
      lp, idx = teacher(x)
      teacher.close()
      want_lp, want_idx = _reference(x)
      np.testing.assert_array_equal(idx, want_idx)
      np.testing.assert_allclose(lp, want_lp, rtol=0, atol=1e-6)
    with pytest.raises(remote.EndpointError, match=r"HTTP 400: a prompt of 0 tokens"):
      teacher = remote.RemoteTeacher(remote.RemoteConfig(url, retries=0), K)
      teacher.call("/v1/completions", {"prompt": [[]], "prompt_logprobs": 2, "max_tokens": 0})
    with pytest.raises(remote.EndpointError, match="HTTP 404"):
      teacher.call("/v1/chat/completions", {})
    monkeypatch.setenv(remote.API_KEY_ENV, "wrong")
    with pytest.raises(remote.EndpointError, match="HTTP 401"):
      remote.RemoteTeacher(remote.RemoteConfig(url, retries=0), K).info()
  finally:
    server.shutdown()
    server.server_close()
