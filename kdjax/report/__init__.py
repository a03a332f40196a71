"""kdjax.report: metrics logging, eval diagnostics, mean ± std tables and plots.

* ``diagnostics`` — pure jnp: accuracy, agreement, KL(teacher ‖ student), ECE
  (additive bin sums), linear CKA; ``eval_batch_stats`` / ``finalize_eval_stats``.
* ``logging`` — ``MetricWriter`` (metrics.jsonl + TensorBoard), ``write_json``, ``read_jsonl``.
* ``tables`` — ``collect`` run dirs, ``summarize`` over seeds, ``to_markdown``, ``to_csv``.
* ``plots`` — ``plot_curves``, ``plot_bars`` (PNG, Agg).
* ``progress`` — tqdm bars that vanish outside a terminal.

``make_report`` ties the last three together (what ``kdjax report`` runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence

from kdjax.errors import ConfigError
from kdjax.report import compare
from kdjax.report.diagnostics import (
  accuracy,
  agreement,
  calibration_bins,
  cka_from_stats,
  cka_stats,
  ece_from_bins,
  eval_batch_stats,
  expected_calibration_error,
  finalize_eval_stats,
  kl_teacher_student,
  linear_cka,
)
from kdjax.report.logging import MetricWriter, read_jsonl, write_json
from kdjax.report.plots import plot_bars, plot_curves
from kdjax.report.progress import log, progress
from kdjax.report.tables import Row, RunRecord, Stat, collect, summarize, to_csv, to_markdown

__all__ = [
  "accuracy",
  "agreement",
  "kl_teacher_student",
  "calibration_bins",
  "ece_from_bins",
  "expected_calibration_error",
  "linear_cka",
  "cka_stats",
  "cka_from_stats",
  "eval_batch_stats",
  "finalize_eval_stats",
  "MetricWriter",
  "write_json",
  "read_jsonl",
  "RunRecord",
  "Row",
  "Stat",
  "collect",
  "summarize",
  "to_markdown",
  "to_csv",
  "plot_curves",
  "plot_bars",
  "progress",
  "log",
  "make_report",
]


def make_report(
  paths: Sequence[str | os.PathLike],
  out_md: str | os.PathLike,
  csv_path: str | os.PathLike | None = None,
  plots_dir: str | os.PathLike | None = None,
  baseline: str | None = None,
) -> str:
  """Collect runs under ``paths``, write the Markdown table, CSV and PNG plots; return the Markdown.

  Files: ``out_md``; ``csv_path`` (default ``out_md`` with suffix ``.csv``);
  ``<plots_dir>/<out stem>_curves.png`` and ``_bars.png`` (default
  ``plots_dir`` = the directory of ``out_md``). The Markdown links the plots by
  relative path. Runs that carry the exact metrics of a language whose distribution is known add the
  table of :func:`kdjax.report.compare.exact_table` (mean ± 95 % CI, and paired differences from the
  ``baseline`` cell) and ``<out stem>_exact.png``. The page is written between
  :data:`~kdjax.report.compare.BEGIN` / ``END`` markers: text outside them (a reading) is kept. Prints nothing.

  Raises:
    ValueError: a path does not exist, no ``results.json`` under any path, or a malformed one.
  """
  paths = list(paths)
  records = collect(paths)
  if not records:
    raise ConfigError(
      f"no results.json found under {', '.join(map(str, paths))}; "
      "pass the workdirs of finished runs (training writes results.json at the end)"
    )
  rows = summarize(records)
  out_md = Path(out_md)
  out_md.parent.mkdir(parents=True, exist_ok=True)
  csv_path = Path(csv_path) if csv_path is not None else out_md.with_suffix(".csv")
  plots_dir = Path(plots_dir) if plots_dir is not None else out_md.parent
  curves = plot_curves(records, plots_dir / f"{out_md.stem}_curves.png")
  bars = plot_bars(rows, plots_dir / f"{out_md.stem}_bars.png")
  to_csv(rows, csv_path)

  def rel(p: Path) -> str:
    return Path(os.path.relpath(p.resolve(), out_md.parent.resolve())).as_posix()

  md = (
    to_markdown(rows) + f"\n![test accuracy vs step]({rel(curves)})\n\n"
    f"![last- and best-epoch accuracy per cell]({rel(bars)})\n"
  )
  if compare.has_exact_metrics(records):
    exact = compare.plot_exact_curves(records, plots_dir / f"{out_md.stem}_exact.png")
    md = (
      "### Exact metrics against the true distribution\n\n"
      + compare.exact_table(records, baseline)
      + f"\n![exact KLs vs step]({rel(exact)})\n\n### Every diagnostic (teacher forced)\n\n"
      + md
    )
  compare.write_between_markers(out_md, md)
  return md
