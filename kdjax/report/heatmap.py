"""A PNG heat map of a layer-similarity matrix (student layers × teacher layers), the chosen pairs marked.

Rendered with ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot, no change to the caller's backend).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdjax.report.plots import _figure, _save

__all__ = ["plot_heatmap"]


def plot_heatmap(
  matrix,
  rows: Sequence[str],
  cols: Sequence[str],
  path: str | os.PathLike,
  *,
  marks: Sequence[tuple[int, int]] = (),
  title: str = "linear CKA",
) -> Path:
  """``matrix`` ``(len(rows), len(cols))`` in [0, 1] as a heat map with its values written in the cells;
  each ``(row, col)`` of ``marks`` framed."""
  from matplotlib.patches import Rectangle

  m = np.asarray(matrix, np.float64)
  fig = _figure(1.2 + 0.55 * max(len(cols), 3), 1.0 + 0.45 * max(len(rows), 2))
  ax = fig.add_subplot()
  im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  fig.colorbar(im, ax=ax, fraction=0.05)
  ax.set_xticks(range(len(cols)), list(cols), rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
  ax.set_xlabel("teacher layer")
  ax.set_ylabel("student layer")
  ax.set_title(title, fontsize=9)
  if m.size <= 400:
    for (i, j), v in np.ndenumerate(m):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
  for i, j in marks:
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
  return _save(fig, path)
