"""``kdjax cache … --cache.endpoint URL``: a teacher behind an OpenAI-compatible endpoint fills the cache.

    kdjax cache EXPERIMENT [CONFIG] --cache.endpoint http://host:8000 --cache.dir DIR --cache.top-k 20
        [--cache.encoding packed] [--cache.shard-size N] [--cache.batch-size N] [--cache.max-shards N]
        [--cache.request-rows 8] [--cache.concurrency 4] [--cache.timeout 60] [--cache.retries 6]
        [--cache.backoff 0.5] [--cache.backoff-max 30] [--cache.api-key-env KDJAX_API_KEY]
        [--cache.model NAME] [--cache.protocol prompt_logprobs|logprobs] [--cache.max-tokens 1]
        [--cache.unchecked-vocab true]

The experiment's training set (token rows, ``data.view tokens``) is scored by the served teacher
(``kdjax serve`` on another machine, or vLLM) through :mod:`kdjax.data.cache.remote`; its vocabulary hash
must be the data tokenizer's. Re-running resumes: finished shards are not fetched again. Distil with
``--data.teacher_cache DIR`` (the cache records the served teacher's hash).
"""

from __future__ import annotations

from kdjax.cli.exits import CliError
from kdjax.cli.flags import pop_opt

REMOTE_OPTIONS = (
  ("endpoint", str),
  ("model", str),
  ("protocol", str),
  ("max-tokens", int),
  ("request-rows", int),
  ("concurrency", int),
  ("timeout", float),
  ("retries", int),
  ("backoff", float),
  ("backoff-max", float),
  ("api-key-env", str),
  ("unchecked-vocab", lambda v: {"true": True, "1": True, "false": False, "0": False}[v.lower()]),
)


def pop_remote_options(args: list[str]) -> dict:
  """Take ``--cache.NAME VALUE`` of :data:`REMOTE_OPTIONS` out of ``args``: RemoteConfig's fields."""
  opts = {}
  for name, conv in REMOTE_OPTIONS:
    v = None
    for flag in (f"--cache.{name}", f"--cache.{name.replace('-', '_')}"):
      v = pop_opt(args, flag, v)
    if v is not None:
      try:
        opts["url" if name == "endpoint" else name.replace("-", "_")] = conv(v)
      except (ValueError, KeyError):
        raise CliError(f"--cache.{name}: cannot read {v!r}") from None
  return opts


def cmd_cache_remote(argv: list[str]) -> int:
  """``kdjax cache … --cache.endpoint URL``: the served teacher's top-k over the experiment's training set."""
  import jax

  from kdjax.cli.commands import _pop_cache_options
  from kdjax.cli.experiments import build_config
  from kdjax.data import cache, tfds
  from kdjax.data.cache import remote

  args = list(argv)
  rcfg = remote.RemoteConfig(**pop_remote_options(args))
  opts = _pop_cache_options(args)
  cfg = build_config(args)
  if cfg.responses.active:
    raise CliError(
      "generated responses (on-policy, SeqKD) need a teacher that scores the student's own samples during "
      "training; a remote teacher fills a cache of the data's rows only: drop --responses.*"
    )
  directory = opts.pop("dir", None) or cfg.data.teacher_cache
  if not directory:
    raise CliError("kdjax cache needs --cache.dir DIR (or data.teacher_cache in the config)")
  max_shards = opts.pop("max-shards", None)
  spec = cache.CacheSpec(**{k.replace("-", "_"): v for k, v in opts.items()})
  res = remote.build_remote_cache(
    directory,
    cache.training_set(cfg),
    rcfg,
    spec=spec,
    vocab=remote.vocab_hash(tfds.tokenizer(cfg.data.name, cfg.data.data_dir)),
    num_classes=int(tfds.get_info(cfg.data.name, data_dir=cfg.data.data_dir).num_classes),
    view=cache.experiment_view(cfg),
    max_shards=max_shards,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  state = "complete" if res["complete"] else "incomplete (other processes' shards, or re-run to resume)"
  print(
    f"teacher cache {directory}: {res['written']} shards written, {res['skipped']} already there, "
    f"{res['num_shards']} in all, {state}; {res['requests']} requests, {res['retried']} retried; "
    f"distil with --data.teacher_cache {directory}"
  )
  return 0
