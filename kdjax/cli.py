"""The ``kdjax`` command line.

    kdjax train-teacher EXPERIMENT [CONFIG] [--field.path value …]
    kdjax distill       EXPERIMENT [CONFIG] [--field.path value …]
    kdjax sweep         EXPERIMENT [CONFIG] --grid method.name=kd,dkd --seeds 5 --workdir DIR [--parallel N] [--launcher slurm]
    kdjax report        DIR… --out results.md
    kdjax export        WORKDIR --out DIR
    kdjax cache         EXPERIMENT [CONFIG] --teacher.checkpoint DIR --cache.dir DIR [--cache.views K] …
    kdjax bench         [--quick] …

EXPERIMENT is a path (``experiments/mnist1d_kd.py``) or a short name
(``mnist1d_kd``); CONFIG picks one of its named configs. Every field of the
:class:`~kdjax.config.Experiment` tree is a flag (parsed by tyro); a misspelt
field, a bad value or any other bad input prints one line and exits 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import io
import itertools
import json
import os
import shlex
import subprocess
import sys
import types
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Sequence

from kdjax.config import Experiment

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class CliError(ValueError):
  """A user error: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------
# Experiments


def load_experiment(ref: str) -> types.ModuleType:
  """Import an experiment file by path or short name."""
  cands = [Path(ref), Path(ref + ".py"), EXPERIMENTS_DIR / ref, EXPERIMENTS_DIR / (ref + ".py"), Path("experiments") / (ref + ".py")]
  path = next((c for c in cands if c.is_file()), None)
  if path is None:
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py")) if EXPERIMENTS_DIR.exists() else []
    raise CliError(f"unknown experiment {ref!r}; known: {', '.join(known)} (or pass a path to a .py file)")
  spec = importlib.util.spec_from_file_location(f"kdjax_experiment_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def config_names(mod: types.ModuleType) -> list[str]:
  return list(getattr(mod, "CONFIGS", {}).keys())


def base_config(mod: types.ModuleType, name: str | None) -> Experiment:
  configs = getattr(mod, "CONFIGS", None)
  if name:
    if not configs or name not in configs:
      raise CliError(f"experiment {mod.__name__.removeprefix('kdjax_experiment_')!r} has no config {name!r}; "
                     f"available: {', '.join(config_names(mod)) or '(only the default)'}")
    c = configs[name]
    return c() if callable(c) else c
  if hasattr(mod, "get_config"):
    return mod.get_config()
  if configs:
    c = next(iter(configs.values()))
    return c() if callable(c) else c
  raise CliError(f"{mod.__file__} defines neither get_config() nor CONFIGS")


# ---------------------------------------------------------------------------
# Overrides: `--a.b value` on the frozen dataclass tree (tyro does the typing)


def _field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    t = hints[f.name]
    name = prefix + f.name
    if isinstance(f.default, object) and dataclasses.is_dataclass(f.default):
      out.update(_field_paths(type(f.default), name + "."))
    else:
      out[name] = t
  return out


def _check_flags(args: Sequence[str]) -> None:
  paths = _field_paths(Experiment)
  for a in args:
    if a.startswith("--"):
      key = a[2:].split("=", 1)[0].replace("-", "_")
      if key in ("help", "h"):
        continue
      if key not in paths:
        near = difflib.get_close_matches(key, list(paths), n=1)
        hint = f"; did you mean --{near[0]}?" if near else "; see --help for the fields"
        raise CliError(f"unknown flag --{key}{hint}")


def apply_overrides(cfg: Experiment, args: Sequence[str]) -> Experiment:
  """``cfg`` with ``--field.path value`` overrides applied (tyro parses)."""
  import tyro

  args = list(args)
  if not args:
    return cfg
  if "--help" in args or "-h" in args:
    return tyro.cli(Experiment, default=cfg, args=args)
  _check_flags(args)
  err = io.StringIO()
  try:
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
      return tyro.cli(Experiment, default=cfg, args=args)
  except SystemExit:
    text = " ".join(line.strip(" │╭╰─╮╯") for line in err.getvalue().splitlines() if line.strip(" │╭╰─╮╯"))
    raise CliError(f"bad arguments {' '.join(args)!r}: {text[:300] or 'see --help'}") from None
  except ValueError as e:  # __post_init__ validation
    raise CliError(str(e)) from None


# ---------------------------------------------------------------------------
# Commands


def _split_exp_args(argv: list[str]) -> tuple[str, str | None, list[str]]:
  if not argv or argv[0].startswith("-"):
    raise CliError("missing EXPERIMENT (a path like experiments/mnist1d_kd.py or a short name like mnist1d_kd)")
  exp = argv[0]
  name = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
  rest = argv[2:] if name else argv[1:]
  return exp, name, rest


def _pop_opt(args: list[str], flag: str, default=None, multi: bool = False, is_bool: bool = False):
  vals, out, i = [], [], 0
  while i < len(args):
    a = args[i]
    if a == flag:
      if is_bool:
        vals.append(True)
        i += 1
        continue
      if i + 1 >= len(args):
        raise CliError(f"{flag} needs a value")
      vals.append(args[i + 1])
      i += 2
    elif a.startswith(flag + "="):
      vals.append(a.split("=", 1)[1])
      i += 1
    else:
      out.append(a)
      i += 1
  args[:] = out
  if multi:
    return vals
  return vals[-1] if vals else default


def _workdir_alias(rest: list[str]) -> None:
  """``--workdir DIR`` is shorthand for ``--run.workdir DIR``."""
  for i, a in enumerate(rest):
    if a == "--workdir":
      rest[i] = "--run.workdir"
    elif a.startswith("--workdir="):
      rest[i] = "--run.workdir=" + a.split("=", 1)[1]


def build_config(argv: list[str], *, mode: str | None = None) -> Experiment:
  exp, name, rest = _split_exp_args(argv)
  _workdir_alias(rest)
  mod = load_experiment(exp)
  cfg = base_config(mod, name)
  if mode == "teacher":
    teacher_cfg = getattr(mod, "teacher_config", None)
    cfg = teacher_cfg(cfg) if teacher_cfg else cfg.replace(mode="teacher", student=cfg.teacher)
  return apply_overrides(cfg, rest)


def cmd_train(argv: list[str], mode: str | None) -> int:
  from kdjax import engine

  args = list(argv)
  distributed = _pop_opt(args, "--distributed", is_bool=True)
  if distributed:
    from kdjax.engine.distributed import initialize
    initialize()
  cfg = build_config(args, mode=mode)
  try:
    res = engine.fit(cfg)
  except engine.Preempted as e:
    print(f"kdjax: {e}", file=sys.stderr)
    return engine.PREEMPTED_EXIT
  except engine.NonFiniteLoss as e:
    print(f"kdjax: {e}", file=sys.stderr)
    return engine.NONFINITE_EXIT
  if not cfg.run.quiet:
    keys = ("test_accuracy", "best_test_accuracy", "teacher_test_accuracy", "agreement", "teacher_student_kl", "ece")
    print(json.dumps({k: res.get(k) for k in keys}))
  return 0


def sweep_cells(grid: list[str], seeds: int) -> list[dict[str, str]]:
  """The Cartesian product of ``--grid key=v1,v2`` specs × seeds."""
  axes: list[tuple[str, list[str]]] = []
  for g in grid:
    if "=" not in g:
      raise CliError(f"--grid expects key=v1,v2,…, got {g!r}")
    k, v = g.split("=", 1)
    k = {"method": "method.name", "teacher": "teacher.name", "student": "student.name"}.get(k, k)
    axes.append((k, [x for x in v.split(",") if x]))
  cells = []
  for combo in itertools.product(*[vals for _, vals in axes]):
    for s in range(seeds):
      cell = {k: v for (k, _), v in zip(axes, combo)}
      cell["run.seed"] = str(s)
      cells.append(cell)
  return cells


def cell_dir(root: str, cell: dict[str, str]) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in cell.items() if k != "run.seed"]
  return str(Path(root) / ("_".join(parts) or "base") / f"seed{cell['run.seed']}")


def cmd_sweep(argv: list[str]) -> int:
  args = list(argv)
  grid = _pop_opt(args, "--grid", multi=True)
  seeds = int(_pop_opt(args, "--seeds", "1"))
  root = _pop_opt(args, "--workdir") or _pop_opt(args, "--run.workdir") or "workdirs/sweep"
  parallel = int(_pop_opt(args, "--parallel", "1"))
  launcher = _pop_opt(args, "--launcher", "local")
  cell_index = _pop_opt(args, "--cell")
  exp, name, rest = _split_exp_args(args)
  cells = sweep_cells(grid, seeds)
  # Validate every cell's config before running anything.
  for c in cells:
    build_config([exp] + ([name] if name else []) + rest + _cell_flags(c, root))
  if launcher == "slurm":
    path = write_slurm_script(exp, name, rest, grid, seeds, root, len(cells))
    print(f"wrote {path} ({len(cells)} array tasks); submit with: sbatch {path}")
    return 0
  if launcher != "local":
    raise CliError(f"--launcher must be local or slurm, got {launcher!r}")
  if cell_index is not None:
    i = int(cell_index)
    if not 0 <= i < len(cells):
      raise CliError(f"--cell {i} is out of range: the sweep has {len(cells)} cells")
    return cmd_train([exp] + ([name] if name else []) + rest + _cell_flags(cells[i], root), None)
  cmds = [[sys.executable, "-m", "kdjax.cli", "distill", exp] + ([name] if name else []) + rest + _cell_flags(c, root)
          for c in cells]
  from kdjax.report.progress import progress
  failed = 0
  if parallel <= 1:
    for cmd in progress(cmds, total=len(cmds), desc="sweep"):
      failed += subprocess.run(cmd).returncode != 0
  else:
    running: list[subprocess.Popen] = []
    queue = list(cmds)
    while queue or running:
      while queue and len(running) < parallel:
        running.append(subprocess.Popen(queue.pop(0)))
      done = [p for p in running if p.poll() is not None]
      for p in done:
        failed += p.returncode != 0
        running.remove(p)
      if not done:
        import time
        time.sleep(0.2)
  print(f"sweep: {len(cmds) - failed}/{len(cmds)} cells finished under {root}")
  return 1 if failed else 0


def _cell_flags(cell: dict[str, str], root: str) -> list[str]:
  flags = []
  for k, v in cell.items():
    flags += [f"--{k}", v]
  return flags + ["--run.workdir", cell_dir(root, cell), "--run.quiet"]


def write_slurm_script(exp: str, name: str | None, rest: list[str], grid: list[str], seeds: int, root: str,
                       n_cells: int, nodes: int = 1) -> Path:
  """An sbatch array script: one sweep cell per array task.

  Each task runs ``kdjax sweep … --cell $SLURM_ARRAY_TASK_ID --distributed``;
  ``--distributed`` calls ``jax.distributed.initialize()``, which reads
  SLURM's environment, so a multi-node cell (``#SBATCH --nodes``) becomes one
  multi-host JAX job.
  """
  Path(root).mkdir(parents=True, exist_ok=True)
  path = Path(root) / "sweep.sbatch"
  grid_flags = " ".join(f"--grid {shlex.quote(g)}" for g in grid)
  args = " ".join(shlex.quote(a) for a in [exp] + ([name] if name else []) + rest)
  script = f"""#!/bin/bash
#SBATCH --job-name=kdjax-sweep
#SBATCH --array=0-{n_cells - 1}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --output={root}/slurm-%A_%a.out
set -euo pipefail
# One array task = one sweep cell. srun starts one process per node; each calls
# jax.distributed.initialize(), which reads SLURM's environment.
srun kdjax sweep {args} {grid_flags} --seeds {seeds} --workdir {shlex.quote(root)} --cell "$SLURM_ARRAY_TASK_ID" --distributed
"""
  path.write_text(script)
  return path


def cmd_report(argv: list[str]) -> int:
  from kdjax import report

  args = list(argv)
  out = _pop_opt(args, "--out", "results.md")
  if not args:
    raise CliError("kdjax report needs at least one workdir")
  for a in args:
    if not Path(a).exists():
      raise CliError(f"no such workdir: {a}")
  md = report.make_report(args, out)
  print(md)
  return 0


def cmd_export(argv: list[str]) -> int:
  from kdjax import checkpoint as ckpt

  args = list(argv)
  out = _pop_opt(args, "--out")
  if len(args) != 1:
    raise CliError("usage: kdjax export WORKDIR [--out DIR]")
  src = ckpt.resolve_export(args[0])
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
  script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
  return subprocess.run([sys.executable, str(script), *argv]).returncode


def cmd_cache(argv: list[str]) -> int:
  """Precompute the teacher's logits for K views of every training example.

  ``--cache.dir`` (default: the config's ``data.teacher_cache``),
  ``--cache.views K`` (1), ``--cache.view-seed`` (0), ``--cache.dtype``
  (float16|float32), ``--cache.top-k`` (0 = full logits),
  ``--cache.shard-size`` (4096), ``--cache.batch-size`` (256),
  ``--cache.max-shards`` (stop early; re-run to resume). Distil with
  ``--data.teacher_cache DIR``.
  """
  from kdjax.data import cache

  args = list(argv)
  opts = {}
  for name, conv in (("dir", str), ("views", int), ("view-seed", int), ("dtype", str), ("top-k", int),
                     ("shard-size", int), ("batch-size", int), ("max-shards", int)):
    v = None
    for flag in (f"--cache.{name}", f"--cache.{name.replace('-', '_')}"):
      v = _pop_opt(args, flag, v)
    if v is not None:
      try:
        opts[name] = conv(v)
      except ValueError:
        raise CliError(f"--cache.{name} expects {conv.__name__}, got {v!r}") from None
  cfg = build_config(args)
  directory = opts.pop("dir", None) or cfg.data.teacher_cache
  if not directory:
    raise CliError("kdjax cache needs --cache.dir DIR (or data.teacher_cache in the config)")
  max_shards = opts.pop("max-shards", None)
  spec = cache.CacheSpec(**{k.replace("-", "_"): v for k, v in opts.items()})
  res = cache.build_for_experiment(cfg, directory, spec, max_shards=max_shards)
  state = "complete" if res["complete"] else "incomplete (other processes' shards, or re-run to resume)"
  print(f"teacher cache {directory}: {res['written']} shards written, {res['skipped']} already there, "
        f"{res['num_shards']} in all, {state}; distil with --data.teacher_cache {directory}")
  return 0


COMMANDS = {"train-teacher": lambda a: cmd_train(a, "teacher"), "distill": lambda a: cmd_train(a, None),
            "sweep": cmd_sweep, "report": cmd_report, "export": cmd_export, "bench": cmd_bench,
            "cache": cmd_cache}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  cmd, rest = argv[0], argv[1:]
  if cmd not in COMMANDS:
    near = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
    print(f"kdjax: unknown command {cmd!r}" + (f"; did you mean {near[0]!r}?" if near else "") +
          f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
    return 1
  try:
    return COMMANDS[cmd](rest)
  except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"kdjax: error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
