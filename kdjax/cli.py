"""The ``kdjax`` command line.

    kdjax train-teacher EXPERIMENT [CONFIG] [--field.path value …]
    kdjax distill       EXPERIMENT [CONFIG] [--field.path value …]
    kdjax sweep         EXPERIMENT [CONFIG] --grid method=kd,dkd --grid optim.lr=0.05,0.01 --seeds 5 --workdir DIR
                        [--parallel N] [--launcher slurm [--nodes N] [--sbatch KEY=VALUE]] [--cell I] [--train-teacher]
                        (--grid config=PATTERN sweeps the experiment's named configs, e.g. 'wrn_40_2-wrn_16_2/*')
    kdjax report        DIR… --out results.md [--csv FILE] [--plots DIR]
    kdjax export        WORKDIR --out DIR
    kdjax cache         EXPERIMENT [CONFIG] --teacher.checkpoint DIR --cache.dir DIR [--cache.views K] …
    kdjax bench         [--quick] …
    kdjax prepare       NAME… [--data_dir DIR]   (store TFDS datasets as ArrayRecord, once; downloadable
                        ones need the network and `pip install 'kdjax[tfds]'`)

EXPERIMENT is a path (``experiments/mnist1d_kd.py``) or a short name
(``mnist1d_kd``); CONFIG picks one of its named configs. Every field of the
:class:`~kdjax.config.Experiment` tree is a flag (parsed by tyro); a misspelt
field, a bad value or any other bad input prints one line and exits 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import types
import typing
import signal
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from kdjax.config import Experiment, ModelConfig
from kdjax.errors import ConfigError

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class CliError(ConfigError):
  """A user error: printed as one line, exit status 1."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT: Ctrl-C outside the training loop (inside it: 75 with a checkpoint)
INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE: an unexpected exception (a bug), reported with its traceback


# ---------------------------------------------------------------------------
# Experiments


def load_experiment(ref: str) -> types.ModuleType:
  """Import an experiment file by path or short name."""
  cands = [
    Path(ref),
    Path(ref + ".py"),
    EXPERIMENTS_DIR / ref,
    EXPERIMENTS_DIR / (ref + ".py"),
    Path("experiments") / (ref + ".py"),
  ]
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
      raise CliError(
        f"experiment {mod.__name__.removeprefix('kdjax_experiment_')!r} has no config {name!r}; "
        f"available: {', '.join(config_names(mod)) or '(only the default)'}"
      )
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
      head, _, leaf = key.rpartition(".")
      negated = (f"{head}." if head else "") + leaf.removeprefix("no_")
      if leaf.startswith("no_") and paths.get(negated) is bool:  # tyro's --run.no-quiet form
        continue
      if key not in paths:
        near = difflib.get_close_matches(key, list(paths), n=1)
        hint = f"; did you mean --{near[0]}?" if near else "; see --help for the fields"
        raise CliError(f"unknown flag --{key}{hint}")


def _tyro_message(text: str) -> str:
  """The one-line gist of tyro's error box (unicode, ASCII or plain layout).

  The box is split into sections at its rules; the title ("Value error") is
  skipped and the first section that says something is returned, with tyro's
  "Error parsing optim: " prefix removed when the message names the field.
  """
  sections, cur = [], []
  for line in text.splitlines():
    s = line.strip(" │╭╰╮╯|+")
    if not s.strip("─-") or s.startswith(("─", "-")):  # a rule or the title bar: a new section
      sections.append(cur)
      cur = []
    else:
      cur.append(s)
  sections.append(cur)
  said = [" ".join(sec) for sec in sections if any(c in " ".join(sec) for c in ":'\".")]
  msg = said[0].removeprefix("Error parsing ") if said else ""
  m = re.match(r"^[A-Za-z_][\w.]*: ([a-z_][\w./]*: .*)$", msg)  # "optim: optim.lr: must be > 0" → the inner part
  return m.group(1) if m else msg


def _model_list(values: Sequence[str], flag: str) -> tuple[ModelConfig, ...]:
  """``NAME`` or ``NAME=CHECKPOINT`` items → ``ModelConfig``s (for ``--extra_teachers``)."""
  out = []
  for v in values:
    name, _, path = v.partition("=")
    if not name:
      raise CliError(f"{flag} expects NAME or NAME=CHECKPOINT items, got {v!r}")
    out.append(ModelConfig(name=name, checkpoint=path or None))
  return tuple(out)


def _pop_model_list(args: list[str], cfg: Experiment) -> Experiment:
  """Take ``--extra_teachers A=DIR B=DIR …`` (a tuple of models tyro cannot parse) out of ``args``."""
  for i, a in enumerate(args):
    key = a[2:].split("=", 1)[0].replace("-", "_") if a.startswith("--") else ""
    if key == "extra_teachers":
      j = i + 1
      vals = [a.split("=", 1)[1]] if "=" in a else []  # --extra_teachers=NAME[=DIR]
      while j < len(args) and not args[j].startswith("--"):
        vals.append(args[j])
        j += 1
      del args[i:j]
      try:
        return _pop_model_list(args, dataclasses.replace(cfg, extra_teachers=_model_list(vals, "--extra_teachers")))
      except ValueError as e:
        raise CliError(str(e)) from None
  return cfg


def apply_overrides(cfg: Experiment, args: Sequence[str]) -> Experiment:
  """``cfg`` with ``--field.path value`` overrides applied (tyro parses).

  ``--extra_teachers NAME[=CHECKPOINT] …`` (a tuple of models) is parsed here.
  """
  import tyro

  args = list(args)
  cfg = _pop_model_list(args, cfg)
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
    raise CliError(_tyro_message(err.getvalue()) or f"bad arguments {' '.join(args)!r}; see --help") from None
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
  cfg = apply_overrides(cfg, rest)
  from kdjax.methods import registry

  registry.check_names(cfg.method)
  return cfg


def cmd_train(argv: list[str], mode: str | None) -> int:
  from kdjax import engine
  from kdjax.checkpoint import DiskFull

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


GRID_ALIASES = {
  "method": "method.name",
  "teacher": "teacher.name",
  "student": "student.name",
  "seed": "run.seed",
  "lr": "optim.lr",
}


def _expand_configs(patterns: list[str], names: Sequence[str], exp: str) -> list[str]:
  """Named configs matching ``patterns`` (exact names or globs like ``wrn_40_2-wrn_16_2/*``), in file order."""
  out: list[str] = []
  for p in patterns:
    hits = [n for n in names if fnmatch.fnmatchcase(n, p)] if any(c in p for c in "*?[") else [p] if p in names else []
    if not hits:
      shown = ", ".join(list(names)[:12]) + (" …" if len(names) > 12 else "")
      raise CliError(f"--grid config={p}: experiment {exp!r} has no matching config; available: {shown or '(none)'}")
    out += [h for h in hits if h not in out]
  return out


def sweep_cells(
  grid: Sequence[str], seeds: int, config_names: Sequence[str] = (), exp: str = ""
) -> list[dict[str, str]]:
  """The Cartesian product of ``--grid key=v1,v2`` specs × seeds ``0 … seeds−1``.

  Keys are config field paths (``optim.lr``) or the aliases ``method``,
  ``teacher``, ``student``, ``seed``, ``lr``; the key ``config`` picks the
  experiment's named configs (globs allowed). A cell is ``{key: value}`` with
  ``run.seed`` last.
  """
  if seeds < 1:
    raise CliError(f"--seeds must be ≥ 1, got {seeds}")
  axes: list[tuple[str, list[str]]] = []
  for g in grid:
    if "=" not in g:
      raise CliError(f"--grid expects key=v1,v2,…, got {g!r}")
    k, v = g.split("=", 1)
    k = GRID_ALIASES.get(k, k)
    vals = [x for x in v.split(",") if x]
    if not vals:
      raise CliError(f"--grid {g!r} has no values")
    if k == "config":
      vals = _expand_configs(vals, config_names, exp)
    if k in (a for a, _ in axes):
      raise CliError(f"--grid names {k} twice; give one --grid {k}=v1,v2,…")
    axes.append((k, vals))
  seeded = any(k == "run.seed" for k, _ in axes)
  if seeded and seeds != 1:
    raise CliError("--grid seed=… and --seeds N both set the seeds; use one of them")
  cells = []
  for combo in itertools.product(*[vals for _, vals in axes]):
    for s in [None] if seeded else range(seeds):
      cell = {k: v for (k, _), v in zip(axes, combo)}
      if s is not None:
        cell["run.seed"] = str(s)
      cells.append(cell)
  return cells


def _safe(v: str) -> str:
  return v.replace("/", ".").replace(os.sep, ".")


def cell_dir(root: str, cell: dict[str, str]) -> str:
  """``root/<config>_<leaf>=<value>…/seed<k>`` (a leaf name shared by two keys keeps its full path)."""
  keys = [k for k in cell if k not in ("run.seed", "config")]
  leaves = [k.split(".")[-1] for k in keys]
  parts = [_safe(cell["config"])] if "config" in cell else []
  parts += [f"{k if leaves.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}={_safe(cell[k])}" for k in keys]
  return str(Path(root) / ("_".join(parts) or "base") / f"seed{cell.get('run.seed', 0)}")


def _cell_flags(cell: dict[str, str], root: str) -> list[str]:
  flags = []
  for k, v in cell.items():
    if k != "config":
      flags += [f"--{k}", v]
  return flags + ["--run.workdir", cell_dir(root, cell), "--run.quiet"]


def _cell_argv(exp: str, name: str | None, rest: list[str], cell: dict[str, str], root: str) -> list[str]:
  return [exp] + ([cell.get("config") or name] if (cell.get("config") or name) else []) + rest + _cell_flags(cell, root)


def _int_opt(args: list[str], flag: str, default: int, minimum: int = 0) -> int:
  v = _pop_opt(args, flag)
  if v is None:
    return default
  try:
    n = int(v)
  except ValueError:
    raise CliError(f"{flag} expects an integer, got {v!r}") from None
  if n < minimum:
    raise CliError(f"{flag} must be ≥ {minimum}, got {n}")
  return n


def _finished(cfg: Experiment) -> bool:
  """The cell's workdir already holds results of this very config."""
  from kdjax.config import config_hash

  res = Path(cfg.run.workdir) / "results.json"
  if not res.exists():
    return False
  try:
    return json.loads(res.read_text()).get("config_hash") == config_hash(cfg)
  except (OSError, ValueError):
    return False


def cmd_sweep(argv: list[str]) -> int:
  """``kdjax sweep EXPERIMENT [CONFIG] --grid k=v1,v2 … --seeds N --workdir DIR [options] [--field value …]``.

  Options: ``--parallel N`` (N local processes; default 1 runs the cells one
  after another in this process), ``--launcher slurm`` (write
  ``DIR/sweep.sbatch``, an array job with one cell per task, and
  ``DIR/cells.json``; ``--nodes N`` per cell and ``--sbatch KEY=VALUE`` extra
  ``#SBATCH`` lines), ``--cell I`` (run only cell I — what each array task
  does), ``--distributed`` (call ``jax.distributed.initialize()`` first),
  ``--train-teacher`` (cells train teachers). Every cell's config is built and
  validated before anything runs; a cell whose workdir already holds its
  ``results.json`` is skipped, so re-running a sweep finishes it. SIGTERM or
  SIGINT starts no further cell, lets the running ones save a checkpoint and
  exits 75.
  """
  args = list(argv)
  if not args or args[0] in ("-h", "--help"):
    print(cmd_sweep.__doc__)
    return 0
  grid = _pop_opt(args, "--grid", multi=True)
  seeds = _int_opt(args, "--seeds", 1, minimum=1)
  root = _pop_opt(args, "--workdir") or _pop_opt(args, "--run.workdir") or "workdirs/sweep"
  parallel = _int_opt(args, "--parallel", 1, minimum=1)
  launcher = _pop_opt(args, "--launcher", "local")
  cell_index = _pop_opt(args, "--cell")
  distributed = bool(_pop_opt(args, "--distributed", is_bool=True))
  teacher = bool(_pop_opt(args, "--train-teacher", is_bool=True))
  nodes = _int_opt(args, "--nodes", 1, minimum=1)
  sbatch = _pop_opt(args, "--sbatch", multi=True)
  if launcher not in ("local", "slurm"):
    raise CliError(f"--launcher must be local or slurm, got {launcher!r}")
  exp, name, rest = _split_exp_args(args)
  mod = load_experiment(exp)
  cells = sweep_cells(grid, seeds, config_names(mod), exp)
  if name and any("config" in c for c in cells):
    raise CliError(f"give the config either as CONFIG ({name!r}) or as --grid config=…, not both")
  mode = "teacher" if teacher else None
  argvs = [_cell_argv(exp, name, rest, c, root) for c in cells]
  cfgs = []
  for i, (c, a) in enumerate(zip(cells, argvs)):  # validate every cell before running anything
    try:
      cfgs.append(build_config(list(a), mode=mode))
    except ValueError as e:
      raise CliError(f"sweep cell {i} ({', '.join(f'{k}={v}' for k, v in c.items())}): {e}") from None
  if launcher == "slurm":
    extra = ["--train-teacher"] if teacher else []
    path = write_slurm_script(exp, name, rest + extra, grid, seeds, root, cells, nodes=nodes, sbatch=sbatch)
    print(
      f"wrote {path} ({len(cells)} array tasks, cells listed in {Path(root) / 'cells.json'}); "
      f"submit with: sbatch {path}"
    )
    return 0
  if cell_index is not None:
    try:
      i = int(cell_index)
    except ValueError:
      raise CliError(f"--cell expects an integer, got {cell_index!r}") from None
    if not 0 <= i < len(cells):
      raise CliError(f"--cell {i} is out of range: the sweep has {len(cells)} cells (0 … {len(cells) - 1})")
    return cmd_train((["--distributed"] if distributed else []) + argvs[i], mode)
  if distributed:
    raise CliError("--distributed runs one cell across hosts: combine it with --cell I (as the slurm script does)")

  todo = [i for i, c in enumerate(cfgs) if not _finished(c)]
  if len(todo) < len(cells):
    print(
      f"sweep: {len(cells) - len(todo)} of {len(cells)} cells already finished under {root}; "
      + ("running the rest" if todo else "nothing to run")
    )
  run_cells = _run_serial if parallel == 1 else _run_parallel
  failed, stopped = run_cells(todo, argvs, cfgs, mode, parallel)
  if stopped:
    print(
      f"sweep: stopped by a signal; the running cells saved a checkpoint. Re-run the same command to finish "
      f"the sweep under {root}",
      file=sys.stderr,
    )
    return PREEMPTED_EXIT
  print(
    f"sweep: {len(cells) - len(failed)}/{len(cells)} cells finished under {root}"
    + (f"; failed: {', '.join(map(str, sorted(failed)))}" if failed else "")
  )
  return 1 if failed else 0


PREEMPTED_EXIT = 75  # as kdjax.engine.faults.PREEMPTED_EXIT (not imported: it pulls in JAX)


def _run_serial(
  todo: list[int], argvs: list[list[str]], cfgs: list[Experiment], mode: str | None, parallel: int
) -> tuple[list[int], bool]:
  """Run cells one after another in this process; returns (failed cells, stopped by a signal).

  SIGTERM/SIGINT during a cell's training stop it with a checkpoint (exit 75);
  outside training (building, compiling, exporting) they interrupt at once.
  Either way no further cell starts.
  """
  del parallel
  from kdjax.report.progress import progress

  failed: list[int] = []
  with _signals_interrupt():
    for i in progress(todo, total=len(todo), desc="sweep"):
      try:
        rc = cmd_train(list(argvs[i]), mode)
      except KeyboardInterrupt:
        return failed, True
      except Exception as e:  # noqa: BLE001 - one failed cell does not stop the sweep
        if not isinstance(e, ConfigError):
          import traceback

          traceback.print_exc()
        print(f"kdjax: sweep cell {i} ({cfgs[i].run.workdir}) failed: {one_line(e)}", file=sys.stderr)
        rc = 1
      if rc == PREEMPTED_EXIT:
        return failed, True
      if rc:
        failed.append(i)
  return failed, False


@contextlib.contextmanager
def _signals_interrupt():
  """SIGTERM behaves like SIGINT (``KeyboardInterrupt``) while in this block."""

  def interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt

  old = signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


def _run_parallel(
  todo: list[int], argvs: list[list[str]], cfgs: list[Experiment], mode: str | None, parallel: int
) -> tuple[list[int], bool]:
  """Run cells as up to ``parallel`` child processes; returns (failed cells, stopped by a signal).

  On SIGTERM/SIGINT no further cell starts, the signal is forwarded to the
  running cells (each finishes its step and saves a checkpoint), and this
  waits for all of them. Cells also get SIGTERM if this process dies.
  """
  del cfgs
  from kdjax.report.progress import progress

  cmd0 = [sys.executable, "-m", "kdjax", "train-teacher" if mode == "teacher" else "distill"]
  running: list[tuple[int, subprocess.Popen]] = []
  queue, failed, received, forwarded = list(todo), [], [], 0
  old = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
  bar = progress(None, total=len(todo), desc="sweep")  # updated by hand
  try:
    while running or (queue and not received):
      while queue and not received and len(running) < parallel:
        i = queue.pop(0)
        running.append((i, subprocess.Popen(cmd0 + argvs[i], env={**os.environ, PARENT_ENV: str(os.getpid())})))
      for sig in received[forwarded:]:
        for _, p in running:
          if p.poll() is None:
            p.send_signal(sig)
      forwarded = len(received)
      done = [(i, p) for i, p in running if p.poll() is not None]
      for i, p in done:
        if p.returncode not in (0, PREEMPTED_EXIT, INTERRUPTED_EXIT, -signal.SIGTERM, -signal.SIGINT):
          failed.append(i)
        running.remove((i, p))
        bar.update(1)
      if not done:
        time.sleep(0.2)
  finally:
    for p in [p for _, p in running if p.poll() is None]:
      p.terminate()
      p.wait()
    bar.close()
    for s, h in old.items():
      signal.signal(s, h)
  return failed, bool(received)


PARENT_ENV = "KDJAX_SWEEP_PID"


def _follow_parent() -> None:
  """In a sweep's cell process: get SIGTERM when the sweep process dies (Linux), so no cell is orphaned."""
  parent = os.environ.pop(PARENT_ENV, None)
  if parent is None or not sys.platform.startswith("linux"):
    return
  import ctypes

  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
  if os.getppid() != int(parent):  # the sweep died before this line
    os.kill(os.getpid(), signal.SIGTERM)


def write_slurm_script(
  exp: str,
  name: str | None,
  rest: list[str],
  grid: Sequence[str],
  seeds: int,
  root: str,
  cells: Sequence[dict[str, str]],
  nodes: int = 1,
  sbatch: Sequence[str] = (),
) -> Path:
  """Write ``root/sweep.sbatch`` (an array job, one sweep cell per task) and ``root/cells.json``.

  Each task runs ``python -m kdjax.cli sweep … --cell $SLURM_ARRAY_TASK_ID
  --distributed``; ``--distributed`` calls ``jax.distributed.initialize()``,
  which reads SLURM's environment, so a cell on ``nodes`` > 1 nodes (one
  process per node) runs as one multi-host JAX job.
  """
  root_path = Path(root)
  root_path.mkdir(parents=True, exist_ok=True)
  path = root_path / "sweep.sbatch"
  listing = [{"cell": i, "workdir": cell_dir(root, c), **c} for i, c in enumerate(cells)]
  (root_path / "cells.json").write_text(json.dumps(listing, indent=2))
  extra = []
  for s in sbatch:
    if "=" not in s:
      raise CliError(f"--sbatch expects KEY=VALUE (e.g. --sbatch gpus-per-node=8), got {s!r}")
    k, v = s.split("=", 1)
    extra.append(f"#SBATCH --{k.lstrip('-')}={v}")
  grid_flags = " ".join(f"--grid {shlex.quote(g)}" for g in grid)
  args = " ".join(shlex.quote(a) for a in [exp] + ([name] if name else []) + list(rest))
  q = shlex.quote
  lines = [
    "#!/bin/bash",
    f"#SBATCH --job-name=kdjax-{Path(exp).stem}",
    f"#SBATCH --array=0-{len(cells) - 1}",
    f"#SBATCH --nodes={nodes}",
    "#SBATCH --ntasks-per-node=1",
    f"#SBATCH --chdir={os.getcwd()}",
    f"#SBATCH --output={root_path / 'slurm-%A_%a.out'}",
    *extra,
    "set -euo pipefail",
    f"# {len(cells)} cells (listed in {root_path / 'cells.json'}); array task i runs cell i. srun starts one",
    "# process per node; each calls jax.distributed.initialize(), which reads SLURM's environment",
    "# (coordinator address, process count and id), so a multi-node cell is one multi-host JAX job.",
    f"srun {q(sys.executable)} -m kdjax.cli sweep {args} {grid_flags} --seeds {seeds} --workdir {q(root)} "
    f'--cell "$SLURM_ARRAY_TASK_ID" --distributed',
  ]
  path.write_text("\n".join(lines) + "\n")
  return path


def cmd_report(argv: list[str]) -> int:
  """``kdjax report DIR… [--out results.md] [--csv FILE] [--plots DIR]``: Markdown table (mean ± std over
  seeds, seed count, last- and best-epoch columns), CSV and PNG plots."""
  from kdjax import report

  args = list(argv)
  if args and args[0] in ("-h", "--help"):
    print(cmd_report.__doc__)
    return 0
  out = _pop_opt(args, "--out", "results.md")
  csv_path = _pop_opt(args, "--csv")
  plots = _pop_opt(args, "--plots")
  unknown = [a for a in args if a.startswith("--")]
  if unknown:
    raise CliError(f"kdjax report: unknown option {unknown[0]} (options: --out, --csv, --plots)")
  if not args:
    raise CliError("kdjax report needs at least one workdir")
  for a in args:
    if not Path(a).exists():
      raise CliError(f"no such workdir: {a}")
  md = report.make_report(args, out, csv_path=csv_path, plots_dir=plots)
  print(md)
  out_p = Path(out)
  print(
    f"wrote {out_p}, {Path(csv_path) if csv_path else out_p.with_suffix('.csv')} and "
    f"{Path(plots) if plots else out_p.parent}/{out_p.stem}_{{curves,bars}}.png",
    file=sys.stderr,
  )
  return 0


def cmd_export(argv: list[str]) -> int:
  from kdjax import checkpoint as ckpt

  args = list(argv)
  out = _pop_opt(args, "--out")
  if len(args) != 1:
    raise CliError("usage: kdjax export WORKDIR [--out DIR]")
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
  from kdjax import engine
  from kdjax.data import cache

  args = list(argv)
  opts = {}
  for name, conv in (
    ("dir", str),
    ("views", int),
    ("view-seed", int),
    ("dtype", str),
    ("top-k", int),
    ("shard-size", int),
    ("batch-size", int),
    ("max-shards", int),
  ):
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
  res = engine.build_teacher_cache(cfg, directory, spec, max_shards=max_shards)
  state = "complete" if res["complete"] else "incomplete (other processes' shards, or re-run to resume)"
  print(
    f"teacher cache {directory}: {res['written']} shards written, {res['skipped']} already there, "
    f"{res['num_shards']} in all, {state}; distil with --data.teacher_cache {directory}"
  )
  return 0


def cmd_prepare(argv: list[str]) -> int:
  """Download and store TFDS datasets as ArrayRecord in ``--data_dir`` (training then reads them without TensorFlow)."""
  from kdjax import data

  args = list(argv)
  data_dir = _pop_opt(args, "--data_dir") or _pop_opt(args, "--data.data_dir")
  if not args or any(a.startswith("-") for a in args):
    raise CliError("usage: kdjax prepare NAME… [--data_dir DIR]  (e.g. kdjax prepare cifar100)")
  for name in args:
    print(f"{name}: prepared in {data.prepare(name, data_dir)}")
  return 0


COMMANDS = {
  "train-teacher": lambda a: cmd_train(a, "teacher"),
  "distill": lambda a: cmd_train(a, None),
  "sweep": cmd_sweep,
  "report": cmd_report,
  "export": cmd_export,
  "bench": cmd_bench,
  "cache": cmd_cache,
  "prepare": cmd_prepare,
}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  cmd, rest = argv[0], argv[1:]
  if cmd not in COMMANDS:
    near = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
    print(
      f"kdjax: unknown command {cmd!r}"
      + (f"; did you mean {near[0]!r}?" if near else "")
      + f" (commands: {', '.join(COMMANDS)})",
      file=sys.stderr,
    )
    return 1
  try:
    return COMMANDS[cmd](rest)
  except ConfigError as e:
    print(f"kdjax: error: {one_line(e)}", file=sys.stderr)
    return 1


def one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
  """Warnings as one line each (kdjax's own as ``kdjax: warning: …``)."""
  del lineno, line
  ours = category.__module__.startswith("kdjax") or f"{os.sep}kdjax{os.sep}" in str(filename)
  return f"kdjax: warning: {message}\n" if ours else f"{category.__name__}: {message}\n"


def run_main() -> None:
  """Console entry point: bad input → one line, exit 1; a bug → its traceback, exit 70;
  Ctrl-C before training starts (or after it ended) → one line, exit 130."""
  warnings.formatwarning = _one_line_warning
  try:
    from kdjax import _interrupt

    _interrupt.record_sigint()  # (again, for callers of run_main that skipped kdjax.__main__)
    _follow_parent()
    code = main()
  except KeyboardInterrupt:
    print(
      "kdjax: interrupted (nothing after the last checkpoint was saved); re-run the same command to resume",
      file=sys.stderr,
    )
    code = INTERRUPTED_EXIT
  except Exception:  # noqa: BLE001 - report any bug with its traceback and a distinct status
    import traceback

    traceback.print_exc()
    print(
      f"kdjax: internal error (exit {INTERNAL_ERROR_EXIT}): the traceback above is a bug in kdjax or in "
      f"the experiment file, not a problem with the command's input",
      file=sys.stderr,
    )
    code = INTERNAL_ERROR_EXIT
  sys.exit(code)


if __name__ == "__main__":
  run_main()
