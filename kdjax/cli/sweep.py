"""``kdjax sweep``: a grid of runs, expanded into cells, each in a workdir of its own.

Cells run one after another in this process, as parallel child processes, one
at a time as SLURM array tasks (``--cell I``), or are written out as a SLURM
array job. Every cell's config is built before anything runs, a finished cell
is skipped, and SIGTERM/SIGINT let the running cells save a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kdjax.cli.commands import cmd_train
from kdjax.cli.exits import INTERRUPTED_EXIT, PREEMPTED_EXIT, TERMINATED_EXIT, CliError, one_line
from kdjax.cli.experiments import build_config, config_names, load_experiment, split_exp_args
from kdjax.cli.flags import int_opt, pop_opt
from kdjax.cli.slurm import write_slurm_script
from kdjax.config import Experiment
from kdjax.errors import ConfigError

GRID_ALIASES = {
  "method": "method.name",
  "teacher": "teacher.name",
  "student": "student.name",
  "seed": "run.seed",
  "lr": "optim.lr",
}
PARENT_ENV = "KDJAX_SWEEP_PID"  # set in a parallel cell's environment: the sweep process it follows


# ---------------------------------------------------------------------------
# The grid: cells and their workdirs


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


def _grid_axes(grid: Sequence[str], names: Sequence[str], exp: str) -> list[tuple[str, list[str]]]:
  """``--grid key=v1,v2`` specs → (field path, values) axes, in the order given."""
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
      vals = _expand_configs(vals, names, exp)
    if k in (a for a, _ in axes):
      raise CliError(f"--grid names {k} twice; give one --grid {k}=v1,v2,…")
    axes.append((k, vals))
  return axes


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
  axes = _grid_axes(grid, config_names, exp)
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


def _cell_argv(exp: str, name: str | None, rest: list[str], cell: dict[str, str], root: str) -> list[str]:
  """The ``distill``/``train-teacher`` arguments of one cell."""
  config = cell.get("config") or name
  flags = [x for k, v in cell.items() if k != "config" for x in (f"--{k}", v)]
  return [exp] + ([config] if config else []) + rest + flags + ["--run.workdir", cell_dir(root, cell), "--run.quiet"]


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


# ---------------------------------------------------------------------------
# The command


@dataclasses.dataclass(frozen=True)
class _Options:
  """``kdjax sweep``'s own options (the rest of the command line is the cells' config)."""

  grid: list[str]
  seeds: int
  root: str
  parallel: int
  launcher: str
  cell: str | None
  distributed: bool
  teacher: bool
  nodes: int
  sbatch: list[str]

  @property
  def mode(self) -> str | None:
    """``build_config``'s and ``cmd_train``'s mode of the cells."""
    return "teacher" if self.teacher else None

  @property
  def command(self) -> str:
    """The ``kdjax`` command that runs one cell."""
    return "train-teacher" if self.teacher else "distill"


def _pop_options(args: list[str]) -> _Options:
  opts = _Options(
    grid=pop_opt(args, "--grid", multi=True),
    seeds=int_opt(args, "--seeds", 1, minimum=1),
    root=pop_opt(args, "--workdir") or pop_opt(args, "--run.workdir") or "workdirs/sweep",
    parallel=int_opt(args, "--parallel", 1, minimum=1),
    launcher=pop_opt(args, "--launcher", "local"),
    cell=pop_opt(args, "--cell"),
    distributed=bool(pop_opt(args, "--distributed", is_bool=True)),
    teacher=bool(pop_opt(args, "--train-teacher", is_bool=True)),
    nodes=int_opt(args, "--nodes", 1, minimum=1),
    sbatch=pop_opt(args, "--sbatch", multi=True),
  )
  if opts.launcher not in ("local", "slurm"):
    raise CliError(f"--launcher must be local or slurm, got {opts.launcher!r}")
  return opts


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The sweep's cells, each with its command line and its validated config."""

  exp: str
  name: str | None
  rest: list[str]
  cells: list[dict[str, str]]
  argvs: list[list[str]]
  cfgs: list[Experiment]


def _plan(args: list[str], opts: _Options) -> _Plan:
  """Expand the grid and build every cell's config, so a bad cell stops the sweep before anything runs."""
  exp, name, rest = split_exp_args(args)
  cells = sweep_cells(opts.grid, opts.seeds, config_names(load_experiment(exp)), exp)
  if name and any("config" in c for c in cells):
    raise CliError(f"give the config either as CONFIG ({name!r}) or as --grid config=…, not both")
  argvs = [_cell_argv(exp, name, rest, c, opts.root) for c in cells]
  cfgs = []
  for i, (c, a) in enumerate(zip(cells, argvs)):
    try:
      cfgs.append(build_config(list(a), mode=opts.mode))
    except ConfigError as e:
      raise CliError(f"sweep cell {i} ({', '.join(f'{k}={v}' for k, v in c.items())}): {e}") from None
  return _Plan(exp, name, rest, cells, argvs, cfgs)


def _write_slurm(plan: _Plan, opts: _Options) -> int:
  extra = ["--train-teacher"] if opts.teacher else []
  workdirs = [cell_dir(opts.root, c) for c in plan.cells]
  path = write_slurm_script(
    plan.exp,
    plan.name,
    plan.rest + extra,
    opts.grid,
    opts.seeds,
    opts.root,
    plan.cells,
    workdirs,
    opts.nodes,
    opts.sbatch,
  )
  print(
    f"wrote {path} ({len(plan.cells)} array tasks, cells listed in {Path(opts.root) / 'cells.json'}); "
    f"submit with: sbatch {path}"
  )
  return 0


def _run_one_cell(plan: _Plan, opts: _Options) -> int:
  """``--cell I``: run cell I only (what each SLURM array task does)."""
  try:
    i = int(opts.cell)
  except ValueError:
    raise CliError(f"--cell expects an integer, got {opts.cell!r}") from None
  n = len(plan.cells)
  if not 0 <= i < n:
    raise CliError(f"--cell {i} is out of range: the sweep has {n} cells (0 … {n - 1})")
  return cmd_train((["--distributed"] if opts.distributed else []) + plan.argvs[i], opts.mode)


def _run_local(plan: _Plan, opts: _Options) -> int:
  """Run the cells not yet finished, serially or ``--parallel N`` at a time, and summarise."""
  n, root = len(plan.cells), opts.root
  todo = [i for i, c in enumerate(plan.cfgs) if not _finished(c)]
  if len(todo) < n:
    rest = "running the rest" if todo else "nothing to run"
    print(f"sweep: {n - len(todo)} of {n} cells already finished under {root}; {rest}")
  if opts.parallel == 1:
    failed, stopped = _run_serial(todo, plan, opts.mode)
  else:
    failed, stopped = _run_parallel(todo, plan.argvs, opts.command, opts.parallel)
  if stopped:
    print(
      f"sweep: stopped by a signal; the running cells saved a checkpoint. Re-run the same command to finish "
      f"the sweep under {root}",
      file=sys.stderr,
    )
    return PREEMPTED_EXIT
  listed = f"; failed: {', '.join(map(str, sorted(failed)))}" if failed else ""
  print(f"sweep: {n - len(failed)}/{n} cells finished under {root}{listed}")
  return 1 if failed else 0


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
  opts = _pop_options(args)
  plan = _plan(args, opts)
  if opts.launcher == "slurm":
    return _write_slurm(plan, opts)
  if opts.cell is not None:
    return _run_one_cell(plan, opts)
  if opts.distributed:
    raise CliError("--distributed runs one cell across hosts: combine it with --cell I (as the slurm script does)")
  return _run_local(plan, opts)


# ---------------------------------------------------------------------------
# Running the cells


def _run_serial(todo: list[int], plan: _Plan, mode: str | None) -> tuple[list[int], bool]:
  """Run cells one after another in this process; returns (failed cells, stopped by a signal).

  SIGTERM/SIGINT during a cell's training stop it with a checkpoint (exit 75);
  outside training (building, compiling, exporting) they interrupt at once.
  Either way no further cell starts.
  """
  from kdjax.report.progress import progress

  failed: list[int] = []
  with _signals_interrupt():
    for i in progress(todo, total=len(todo), desc="sweep"):
      try:
        rc = cmd_train(list(plan.argvs[i]), mode)
      except KeyboardInterrupt:
        return failed, True
      except Exception as e:  # noqa: BLE001 - one failed cell does not stop the sweep
        if not isinstance(e, ConfigError):
          import traceback

          traceback.print_exc()
        print(f"kdjax: sweep cell {i} ({plan.cfgs[i].run.workdir}) failed: {one_line(e)}", file=sys.stderr)
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


def _run_parallel(todo: list[int], argvs: list[list[str]], command: str, parallel: int) -> tuple[list[int], bool]:
  """Run cells as up to ``parallel`` child processes; returns (failed cells, stopped by a signal).

  On SIGTERM/SIGINT no further cell starts, the signal is forwarded to the
  running cells (each finishes its step and saves a checkpoint), and this
  waits for all of them. Cells also get SIGTERM if this process dies.
  """
  from kdjax.report.progress import progress

  cmd0 = [sys.executable, "-m", "kdjax", command]
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
        stopped = (PREEMPTED_EXIT, INTERRUPTED_EXIT, TERMINATED_EXIT, -signal.SIGTERM, -signal.SIGINT)
        if p.returncode not in (0, *stopped):
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


def follow_parent() -> None:
  """In a sweep's cell process: get SIGTERM when the sweep process dies (Linux), so no cell is orphaned."""
  parent = os.environ.pop(PARENT_ENV, None)
  if parent is None or not sys.platform.startswith("linux"):
    return
  import ctypes

  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
  if os.getppid() != int(parent):  # the sweep died before this line
    os.kill(os.getpid(), signal.SIGTERM)
