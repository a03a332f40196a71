"""A sweep as a SLURM array job: ``kdjax sweep … --launcher slurm`` writes the script, ``sbatch`` runs it."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from kdjax.cli.exits import CliError


def _sbatch_lines(sbatch: Sequence[str]) -> list[str]:
  """``--sbatch KEY=VALUE`` items → ``#SBATCH --KEY=VALUE`` lines."""
  lines = []
  for s in sbatch:
    if "=" not in s:
      raise CliError(f"--sbatch expects KEY=VALUE (e.g. --sbatch gpus-per-node=8), got {s!r}")
    k, v = s.split("=", 1)
    lines.append(f"#SBATCH --{k.lstrip('-')}={v}")
  return lines


def write_slurm_script(
  exp: str,
  name: str | None,
  rest: list[str],
  grid: Sequence[str],
  seeds: int,
  root: str,
  cells: Sequence[dict[str, str]],
  workdirs: Sequence[str],
  nodes: int = 1,
  sbatch: Sequence[str] = (),
) -> Path:
  """Write ``root/sweep.sbatch`` (an array job, one sweep cell per task) and ``root/cells.json``.

  Each task runs ``python -m kdjax.cli sweep … --cell $SLURM_ARRAY_TASK_ID
  --distributed``; ``--distributed`` calls ``jax.distributed.initialize()``,
  which reads SLURM's environment, so a cell on ``nodes`` > 1 nodes (one
  process per node) runs as one multi-host JAX job. ``workdirs[i]`` is cell
  ``i``'s run directory, listed in ``cells.json``.
  """
  extra = _sbatch_lines(sbatch)
  root_path = Path(root)
  root_path.mkdir(parents=True, exist_ok=True)
  listing = [{"cell": i, "workdir": w, **c} for i, (c, w) in enumerate(zip(cells, workdirs))]
  (root_path / "cells.json").write_text(json.dumps(listing, indent=2))
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
  path = root_path / "sweep.sbatch"
  path.write_text("\n".join(lines) + "\n")
  return path
