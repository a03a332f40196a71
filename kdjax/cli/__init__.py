"""The ``kdjax`` command line.

    kdjax train-teacher EXPERIMENT [CONFIG] [--field.path value …]
    kdjax distill       EXPERIMENT [CONFIG] [--field.path value …]
    kdjax sweep         EXPERIMENT [CONFIG] --grid method=kd,dkd --grid optim.lr=0.05,0.01 --seeds 5 --workdir DIR
                        [--parallel N] [--launcher slurm [--nodes N] [--sbatch KEY=VALUE]] [--cell I] [--train-teacher]
                        (--grid config=PATTERN sweeps the experiment's named configs, e.g. 'wrn_40_2-wrn_16_2/*')
    kdjax report        DIR… --out results.md [--csv FILE] [--plots DIR]
    kdjax export        WORKDIR --out DIR [--format hf [--dtype bfloat16]]  (hf: a Hugging Face checkpoint)
    kdjax cache         EXPERIMENT [CONFIG] --teacher.checkpoint DIR --cache.dir DIR [--cache.views K] …
    kdjax cache         EXPERIMENT [CONFIG] --cache.endpoint URL --cache.dir DIR --cache.top-k K …  (a served teacher)
    kdjax serve         TEACHER [--port 8000] [--tokenizer DIR|DATASET] …  (a teacher's top-k log-probs over HTTP)
    kdjax bench         [--quick] …
    kdjax prepare       NAME… [--data_dir DIR]   (store TFDS datasets as ArrayRecord, once; downloadable
                        ones need the network and `pip install 'kdjax[tfds]'`)
    kdjax prepare text  FILE.jsonl --tokenizer DIR --name NAME [--max_length N] [--pack] …  (your own text)
    kdjax prepare images FILE.npz|DIR --name NAME …  (your own images)

EXPERIMENT is a path (``experiments/mnist1d_kd.py``) or a short name
(``mnist1d_kd``); CONFIG picks one of its named configs. Every field of the
:class:`~kdjax.config.Experiment` tree is a flag (parsed by tyro); a misspelt
field, a bad value or any other bad input prints one line and exits 1.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Sequence

from kdjax.cli.commands import cmd_bench, cmd_cache, cmd_export, cmd_prepare, cmd_report, cmd_train
from kdjax.cli.exits import INTERNAL_ERROR_EXIT, INTERRUPTED_EXIT, PREEMPTED_EXIT, CliError, one_line, stopped
from kdjax.cli.serve import cmd_serve
from kdjax.cli.experiments import EXPERIMENTS_DIR, base_config, build_config, config_names, load_experiment
from kdjax.cli.flags import apply_overrides, field_paths
from kdjax.cli.slurm import write_slurm_script
from kdjax.cli.sweep import cell_dir, cmd_sweep, follow_parent, sweep_cells
from kdjax.errors import ConfigError

__all__ = [
  "COMMANDS",
  "EXPERIMENTS_DIR",
  "INTERNAL_ERROR_EXIT",
  "INTERRUPTED_EXIT",
  "PREEMPTED_EXIT",
  "CliError",
  "apply_overrides",
  "base_config",
  "build_config",
  "cell_dir",
  "cmd_bench",
  "cmd_cache",
  "cmd_export",
  "cmd_prepare",
  "cmd_report",
  "cmd_sweep",
  "cmd_train",
  "config_names",
  "field_paths",
  "load_experiment",
  "main",
  "one_line",
  "run",
  "run_main",
  "sweep_cells",
  "write_slurm_script",
]

COMMANDS = {
  "train-teacher": lambda a: cmd_train(a, "teacher"),
  "distill": lambda a: cmd_train(a, None),
  "sweep": cmd_sweep,
  "report": cmd_report,
  "export": cmd_export,
  "bench": cmd_bench,
  "cache": cmd_cache,
  "prepare": cmd_prepare,
  "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
  """Run one ``kdjax`` command; bad input prints one line and returns 1."""
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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
  """Warnings as one line each (kdjax's own as ``kdjax: warning: …``)."""
  del lineno, line
  ours = category.__module__.startswith("kdjax") or f"{os.sep}kdjax{os.sep}" in str(filename)
  return f"kdjax: warning: {message}\n" if ours else f"{category.__name__}: {message}\n"


def run_main() -> None:
  """Console entry point: :func:`run`'s exit status."""
  sys.exit(run())


def run(argv: Sequence[str] | None = None) -> int:
  """The ``kdjax`` command as the terminal sees it: bad input → one line, exit 1; a bug → its traceback,
  exit 70; Ctrl-C or SIGTERM before training starts (or after it ended) → one line, exit 130 or 143."""
  warnings.formatwarning = _one_line_warning
  try:
    from kdjax import _interrupt

    _interrupt.record_sigint()  # (again, for callers of run_main that skipped kdjax.__main__)
    follow_parent()
    code = main(argv)
  except KeyboardInterrupt as e:
    code, line = stopped(e)
    print(line, file=sys.stderr)
  except Exception:  # noqa: BLE001 - report any bug with its traceback and a distinct status
    import traceback

    traceback.print_exc()
    print(
      f"kdjax: internal error (exit {INTERNAL_ERROR_EXIT}): the traceback above is a bug in kdjax or in "
      f"the experiment file, not a problem with the command's input",
      file=sys.stderr,
    )
    code = INTERNAL_ERROR_EXIT
  return code
