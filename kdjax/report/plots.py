"""PNG plots for reports: accuracy curves (mean ± std over seeds) and a bar chart per cell.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg
canvas directly: no pyplot, no display, and no change to the caller's global
matplotlib backend (matplotlib is imported only inside these functions).
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from kdjax.report.tables import Row, RunRecord, cell_names

__all__ = ["plot_curves", "plot_bars", "curve_stats"]


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), dpi=120)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str | os.PathLike) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", bbox_inches="tight")
  return path


def curve_stats(records: Sequence[RunRecord], key: str = "test_accuracy") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, mean, std)`` of an eval metric over runs, per step.

  Each step averages the runs that evaluated at it; std is the sample std
  (ddof = 1), 0 where only one run has the step.
  """
  by_step: dict[int, list[float]] = {}
  for r in records:
    for s, v in zip(*r.curve(key)):
      by_step.setdefault(int(s), []).append(float(v))
  steps = np.asarray(sorted(by_step), np.int64)
  vals = [np.asarray(by_step[s]) for s in steps]
  mean = np.asarray([v.mean() for v in vals], np.float64)
  std = np.asarray([v.std(ddof=1) if v.size > 1 else 0.0 for v in vals], np.float64)
  return steps, mean, std


def plot_curves(records: Sequence[RunRecord], path: str | os.PathLike, key: str = "test_accuracy") -> Path:
  """Test accuracy (%) vs step, one line per group: mean over seeds, shaded ± std band clipped to [0, 100] %;
  groups told apart by colour, line style and marker; teacher-training runs in a panel of their own (their
  step counts differ from the students')."""
  groups: dict[str, list[RunRecord]] = {}
  for name, r in zip(cell_names(records), records):
    groups.setdefault(name, []).append(r)
  teachers = {g: rs for g, rs in groups.items() if rs[0].get("method") == "teacher"}
  students = {g: rs for g, rs in groups.items() if g not in teachers}
  panels = [p for p in (teachers, students) if p] or [students]
  fig = _figure(7.0 + 3.5 * (len(panels) - 1), 4.5)
  axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": [1] * (len(panels) - 1) + [2]})[0]
  for ax, panel in zip(axes, panels):
    plotted = 0
    for i, (g, rs) in enumerate(panel.items()):
      steps, mean, std = curve_stats(rs, key)
      if steps.size == 0:
        continue
      style = ("-", "--", ":", "-.")[i % 4]
      (line,) = ax.plot(steps, 100 * mean, style, marker="os^Dv"[i % 5], markersize=3, label=f"{g} (n={len(rs)})")
      lo, hi = np.clip(100 * (mean - std), 0, 100), np.clip(100 * (mean + std), 0, 100)
      ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
      plotted += 1
    if plotted:
      ax.legend(fontsize="x-small", loc="best")
    else:
      ax.text(0.5, 0.5, "no eval rows in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.set_title("teacher" if panel is teachers else "mean over seeds, band = ± sample std (within 0–100 %)")
    ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_bars(rows: Sequence[Row], path: str | os.PathLike) -> Path:
  """Horizontal bars per cell: last-epoch and best-epoch mean accuracy (%) with
  ± std error bars; the published number, where known, as a black marker."""
  fig = _figure(7.5, 1.0 + 0.55 * max(len(rows), 1))
  ax = fig.add_subplot()
  y = np.arange(len(rows), dtype=np.float64)
  h = 0.38

  def vals(attr: str) -> tuple[np.ndarray, np.ndarray]:
    m = [getattr(r, attr).mean for r in rows]
    s = [getattr(r, attr).std for r in rows]
    return (
      np.asarray([np.nan if v is None else v for v in m], np.float64),
      np.asarray([0.0 if v is None else v for v in s], np.float64),
    )

  last_m, last_s = vals("last_acc")
  best_m, best_s = vals("best_acc")
  ax.barh(y - h / 2, np.nan_to_num(last_m), h, xerr=last_s, capsize=3, label="last epoch (final eval)")
  ax.barh(
    y + h / 2,
    np.nan_to_num(best_m),
    h,
    xerr=best_s,
    capsize=3,
    alpha=0.6,
    label="best epoch (max over evals, optimistic)",
  )
  pub = [(i, r.published) for i, r in enumerate(rows) if r.published is not None]
  if pub:
    ax.scatter([p for _, p in pub], [i for i, _ in pub], marker="D", color="black", zorder=3, label="published")
  ax.set_yticks(y)
  ax.set_yticklabels([f"{r.group} (n={r.n})" for r in rows], fontsize="small")
  ax.invert_yaxis()
  ax.set_xlabel("test accuracy (%) — mean ± sample std over seeds")
  ax.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False)
  ax.grid(axis="x", alpha=0.3)
  return _save(fig, path)
