"""The single-run commands: ``train-teacher``, ``distill``, ``report``, ``export``, ``bench``, ``cache``, ``prepare``.

Each takes its argument list and returns the exit status; bad input raises
:class:`~kdjax.cli.exits.CliError`. JAX and the data stack are imported inside
the commands, so ``kdjax --help`` and a misspelt command answer at once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from kdjax.cli.exits import CliError
from kdjax.cli.experiments import build_config
from kdjax.cli.flags import pop_opt


def cmd_train(argv: list[str], mode: str | None) -> int:
  """``kdjax distill`` (``mode=None``) and ``kdjax train-teacher`` (``mode="teacher"``): one run."""
  from kdjax import engine
  from kdjax.checkpoint import DiskFull
  from kdjax.engine.distributed import PeerWatch

  args = list(argv)
  distributed = pop_opt(args, "--distributed", is_bool=True)
  if distributed:
    from kdjax.engine.distributed import initialize

    initialize()
  cfg = build_config(args, mode=mode)
  try:
    with PeerWatch():  # several processes: a lost one ends this one with one line, exit 75
      res = engine.fit(cfg)
  except engine.Preempted as e:
    print(f"kdjax: {e}", file=sys.stderr)
    return engine.PREEMPTED_EXIT
  except engine.NonFiniteLoss as e:
    print(f"kdjax: {e}", file=sys.stderr)
    return engine.NONFINITE_EXIT
  except DiskFull as e:
    print(f"kdjax: error: {e}", file=sys.stderr)
    # The failed save's abandoned write tasks are logged by asyncio when collected at exit; the
    # details are already in the run's kdjax.log.
    logging.getLogger("asyncio").disabled = True
    return 1
  if not cfg.run.quiet:
    keys = ("test_accuracy", "best_test_accuracy", "teacher_test_accuracy", "agreement", "teacher_student_kl", "ece")
    print(json.dumps({k: res.get(k) for k in keys}))
  return 0


def cmd_report(argv: list[str]) -> int:
  """``kdjax report DIR… [--out results.md] [--csv FILE] [--plots DIR] [--baseline CELL]``: Markdown table
  (mean ± std over seeds, seed count, last- and best-epoch columns), CSV and PNG plots; runs with exact
  metrics (``hmm_lm``) add mean ± 95 % CI and paired differences from the ``--baseline`` cell. The table is
  written between markers in ``--out``: text around them is kept."""
  from kdjax import report

  args = list(argv)
  if args and args[0] in ("-h", "--help"):
    print(cmd_report.__doc__)
    return 0
  out = pop_opt(args, "--out", "results.md")
  csv_path = pop_opt(args, "--csv")
  plots = pop_opt(args, "--plots")
  baseline = pop_opt(args, "--baseline")
  unknown = [a for a in args if a.startswith("--")]
  if unknown:
    raise CliError(f"kdjax report: unknown option {unknown[0]} (options: --out, --csv, --plots, --baseline)")
  if not args:
    raise CliError("kdjax report needs at least one workdir")
  for a in args:
    if not Path(a).exists():
      raise CliError(f"no such workdir: {a}")
  md = report.make_report(args, out, csv_path=csv_path, plots_dir=plots, baseline=baseline)
  print(md)
  out_p = Path(out)
  print(
    f"wrote {out_p}, {Path(csv_path) if csv_path else out_p.with_suffix('.csv')} and "
    f"{Path(plots) if plots else out_p.parent}/{out_p.stem}_{{curves,bars}}.png",
    file=sys.stderr,
  )
  return 0


def cmd_export(argv: list[str]) -> int:
  """``kdjax export WORKDIR [--out DIR] [--format kdjax|hf] [--dtype float32|bfloat16]``: the run's exported
  parameters (copied to ``DIR``), or with ``--format hf`` its decoder student as a Hugging Face checkpoint
  in ``DIR`` (config.json, safetensors, tokenizer files) that transformers loads."""
  from kdjax import checkpoint as ckpt

  args = list(argv)
  out = pop_opt(args, "--out")
  fmt = pop_opt(args, "--format", "kdjax")
  dtype = pop_opt(args, "--dtype", "float32")
  if len(args) != 1 or fmt not in ("kdjax", "hf") or (fmt == "hf" and not out):
    raise CliError("usage: kdjax export WORKDIR [--out DIR] | kdjax export WORKDIR --format hf --out DIR [--dtype D]")
  if fmt == "hf":
    from kdjax import export

    print(f"{export.to_hf(args[0], out, dtype=dtype)}  (load with: AutoModelForCausalLM.from_pretrained({out!r}))")
    return 0
  src = ckpt.resolve_export(args[0], what="run to export")
  if out:
    import shutil

    Path(out).mkdir(parents=True, exist_ok=True)
    shutil.copy(src, Path(out) / ckpt.EXPORT_PARAMS)
    meta = src.parent / ckpt.EXPORT_META
    if meta.exists():
      shutil.copy(meta, Path(out) / ckpt.EXPORT_META)
    src = Path(out) / ckpt.EXPORT_PARAMS
  print(f"{src}  (load with: kdjax.export.load({str(src.parent)!r}); predict(params, images))")
  return 0


def cmd_bench(argv: list[str]) -> int:
  """``kdjax bench …``: :mod:`kdjax.bench` in a fresh process.

  Its ``--xla-cpu`` options are read by XLA when the backend starts, so the
  benchmark gets a process of its own rather than this one.
  """
  return subprocess.run([sys.executable, "-m", "kdjax.bench", *argv]).returncode


CACHE_OPTIONS = (
  ("dir", str),
  ("views", int),
  ("view-seed", int),
  ("dtype", str),
  ("top-k", int),
  ("encoding", str),
  ("shard-size", int),
  ("batch-size", int),
  ("max-shards", int),
)


def _pop_cache_options(args: list[str]) -> dict:
  """Take ``--cache.NAME VALUE`` (dashes or underscores) out of ``args``, converted."""
  opts = {}
  for name, conv in CACHE_OPTIONS:
    v = None
    for flag in (f"--cache.{name}", f"--cache.{name.replace('-', '_')}"):
      v = pop_opt(args, flag, v)
    if v is not None:
      try:
        opts[name] = conv(v)
      except ValueError:
        raise CliError(f"--cache.{name} expects {conv.__name__}, got {v!r}") from None
  return opts


def cmd_cache(argv: list[str]) -> int:
  """Precompute the teacher's logits for K views of every training example.

  ``--cache.dir`` (default: the config's ``data.teacher_cache``),
  ``--cache.views K`` (1), ``--cache.view-seed`` (0), ``--cache.dtype``
  (float16|float32), ``--cache.top-k`` (0 = full logits), ``--cache.encoding``
  (plain|packed: top-k rows with exact ids and log-probs within 0.032 nat, ~1.6 B an entry),
  ``--cache.shard-size`` (4096), ``--cache.batch-size`` (256),
  ``--cache.max-shards`` (stop early; re-run to resume). Distil with
  ``--data.teacher_cache DIR``. With ``--cache.endpoint URL`` a served teacher fills it
  (:mod:`kdjax.cli.remote`).
  """
  from kdjax import engine
  from kdjax.data import cache

  if any(a.split("=", 1)[0] in ("--cache.endpoint",) for a in argv):
    from kdjax.cli.remote import cmd_cache_remote

    return cmd_cache_remote(argv)
  args = list(argv)
  opts = _pop_cache_options(args)
  cfg = build_config(args)
  directory = opts.pop("dir", None) or cfg.data.teacher_cache
  if not directory:
    raise CliError("kdjax cache needs --cache.dir DIR (or data.teacher_cache in the config)")
  max_shards = opts.pop("max-shards", None)
  spec = cache.CacheSpec(**{k.replace("-", "_"): v for k, v in opts.items()})
  res = engine.build_teacher_cache(cfg, directory, spec, max_shards=max_shards)
  state = "complete" if res["complete"] else "incomplete (other processes' shards, or re-run to resume)"
  print(
    f"teacher cache {directory}: {res['written']} shards written, {res['skipped']} already there, "
    f"{res['num_shards']} in all, {state}; distil with --data.teacher_cache {directory}"
  )
  return 0


def cmd_prepare(argv: list[str]) -> int:
  """Download and store TFDS datasets as ArrayRecord in ``--data_dir`` (training then reads them without
  TensorFlow); ``kdjax prepare text|images …`` stores the user's own data (:mod:`kdjax.cli.prepare`)."""
  from kdjax import data
  from kdjax.cli.prepare import KINDS, cmd_prepare_own

  if argv and argv[0] in KINDS:
    return cmd_prepare_own(argv)
  args = list(argv)
  data_dir = pop_opt(args, "--data_dir") or pop_opt(args, "--data.data_dir")
  if not args or any(a.startswith("-") for a in args):
    raise CliError("usage: kdjax prepare NAME… [--data_dir DIR]  (e.g. kdjax prepare cifar100)")
  for name in args:
    print(f"{name}: prepared in {data.prepare.tfds(name, data_dir)}")
  return 0
