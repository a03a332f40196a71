"""Methods compared on the same seeds: mean ± 95 % confidence intervals, paired differences against a baseline
cell, curves with the teacher in its own panel, and a page whose hand-written text survives regeneration.

What ``kdjax report`` adds when the runs carry the exact metrics of a language whose distribution is known
(:data:`EXACT_METRICS`, written by :func:`kdjax.engine.evaluation.true_distribution`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kdjax.report.tables import RunRecord, cell_names

BEGIN = "<!-- kdjax report: begin (generated; text outside these markers is kept) -->"
END = "<!-- kdjax report: end -->"


class Metric(NamedTuple):
  key: str
  label: str
  lower_is_better: bool
  decimals: int = 3


EXACT_METRICS = (
  Metric("true_student_kl", "KL(true‖S)", True),
  Metric("teacher_student_kl", "KL(T‖S)", True),
  Metric("sample_reverse_kl", "KL(S‖true) samples", True),
  Metric("sample_true_nll", "−log p_true samples", True),
  Metric("greedy_true_nll", "−log p_true greedy", True),
  Metric("sample_entropy", "entropy samples", False),
  Metric("sample_distinct_4", "distinct-4 samples", False),
)
PAIRED = ("true_student_kl", "sample_reverse_kl", "greedy_true_nll")  # compared per seed with the baseline


def t_quantile(df: int, q: float = 0.975) -> float:
  """Student's t quantile (SciPy when installed, else the Cornish–Fisher expansion, within 1e-3 for df ≥ 2)."""
  try:
    from scipy import stats

    return float(stats.t.ppf(q, df))
  except ImportError:
    z = math.sqrt(2) * _erfinv(2 * q - 1)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def _erfinv(y: float) -> float:
  lo, hi = -6.0, 6.0
  for _ in range(80):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
  return (lo + hi) / 2


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
  """``(mean, half-width of the 95 % t interval, n)``; the half-width is NaN for n < 2."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  if v.size < 2:
    return float(v.mean()), float("nan"), 1
  return float(v.mean()), t_quantile(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size), int(v.size)


def paired_t(a: dict, b: dict) -> tuple[float, float, float, int]:
  """Paired comparison on the seeds both ``{seed: value}`` maps hold: ``(mean of a − b, 95 % CI half-width,
  two-sided p-value of the paired t-test, n)``."""
  seeds = sorted(set(a) & set(b))
  d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
  if d.size < 2:
    return (float(d.mean()) if d.size else float("nan")), float("nan"), float("nan"), int(d.size)
  sd = float(d.std(ddof=1))
  mean, half = float(d.mean()), t_quantile(d.size - 1) * sd / math.sqrt(d.size)
  if sd == 0.0:
    return mean, 0.0, (1.0 if mean == 0.0 else 0.0), int(d.size)
  t = mean / (sd / math.sqrt(d.size))
  try:
    from scipy import stats

    p = float(2 * stats.t.sf(abs(t), d.size - 1))
  except ImportError:  # bisection on the quantile function above
    lo, hi = 0.0, 1.0
    for _ in range(60):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if t_quantile(d.size - 1, 1 - mid / 2) > abs(t) else (lo, mid)
    p = (lo + hi) / 2
  return mean, half, p, int(d.size)


def cell_labels(records: Sequence[RunRecord]) -> list[str]:
  """Each run's cell: its experiment's name (``hmm_lm_fkl``), plus the settings that tell apart runs of one
  name (:func:`~kdjax.report.tables.cell_names`); runs that differ only in seed share a cell."""
  return cell_names(records, group=lambda r: str(r.get("experiment") or r.group))


def _by_cell(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
  cells: dict[str, list[RunRecord]] = {}
  for name, r in zip(cell_labels(records), records):
    cells.setdefault(name, []).append(r)
  return cells


def _fmt(mean: float, half: float, decimals: int) -> str:
  if not np.isfinite(mean):
    return "n/a"
  return f"{mean:.{decimals}f}" + ("" if not np.isfinite(half) else f" ± {half:.{decimals}f}")


def has_exact_metrics(records: Sequence[RunRecord]) -> bool:
  return any(r.get("true_student_kl") is not None for r in records)


def exact_table(records: Sequence[RunRecord], baseline: str | None = None) -> str:
  """Markdown: one row per cell (mean ± 95 % CI over seeds of :data:`EXACT_METRICS`), then the paired
  differences of every cell from ``baseline`` on :data:`PAIRED` (same seeds)."""
  cells = _by_cell(records)
  head = ["cell", "n", *(m.label for m in EXACT_METRICS)]
  lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
  for name, rs in cells.items():
    row = [name, str(len(rs))]
    for m in EXACT_METRICS:
      mean, half, _ = mean_ci([r.get(m.key) for r in rs])
      row.append(_fmt(mean, half, m.decimals))
    lines.append("| " + " | ".join(row) + " |")
  truth = mean_ci([r.get("true_entropy") for r in records])[0]
  floor = f" The language's entropy rate (−log p_true of the held-out responses) is {truth:.3f}." if truth > 0 else ""
  out = "\n".join(lines) + "\n\n" + EXACT_NOTE + floor + "\n"
  if baseline is not None:
    out += "\n" + paired_table(cells, baseline)
  return out


def paired_table(cells: dict[str, list[RunRecord]], baseline: str) -> str:
  """Markdown: for each cell but ``baseline`` (and teachers), cell − baseline per metric of :data:`PAIRED` on
  shared seeds: mean, 95 % CI and the paired t-test's p-value; ``*`` where the interval excludes 0."""
  if baseline not in cells:
    return f"(no cell {baseline!r} to compare with; cells: {', '.join(cells)})\n"
  base = {m: {r.seed: r.get(m) for r in cells[baseline] if r.get(m) is not None} for m in PAIRED}
  labels = {m.key: m.label for m in EXACT_METRICS}
  head = ["cell", *(f"Δ {labels[m]}" for m in PAIRED)]
  lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * len(PAIRED)]
  for name, rs in cells.items():
    if name == baseline or rs[0].get("method") == "teacher":
      continue
    row = [name]
    for m in PAIRED:
      mean, half, p, n = paired_t({r.seed: r.get(m) for r in rs if r.get(m) is not None}, base[m])
      star = "*" if np.isfinite(half) and abs(mean) > half else ""
      row.append(f"{_fmt(mean, half, 3)}{star} (p={p:.2g}, n={n})" if np.isfinite(p) else _fmt(mean, half, 3))
    lines.append("| " + " | ".join(row) + " |")
  note = (
    f"Paired differences from `{baseline}` on the same seeds (negative = lower than `{baseline}`): mean ± 95 % "
    "t interval, two-sided paired t-test p-value; * = the interval excludes 0. No correction for the "
    f"{len(lines) - 2} × {len(PAIRED)} comparisons.\n"
  )
  return "\n".join(lines) + "\n\n" + note


EXACT_NOTE = (
  "Mean ± 95 % t interval over seeds (n). Exact metrics against the true distribution, in nats per response "
  "token: KL(true‖S) = teacher-forced KL(true ‖ student) on the held-out responses; KL(T‖S) = KL(teacher ‖ "
  "student) there; on the student's own continuations of the held-out prompts (temperature 1): KL(S‖true) = "
  "the sequence-level KL(student ‖ true) estimated from the samples, −log p_true = their negative "
  "log-likelihood under the truth, entropy = −log p_student (the student's entropy rate), distinct-4 = distinct "
  "4-grams over all samples; greedy = the same for greedy decoding."
)


def write_between_markers(path: str | os.PathLike, generated: str, title: str = "") -> str:
  """Write ``generated`` into ``path`` between :data:`BEGIN` and :data:`END`, keeping everything outside the
  markers; a new page, or one without markers (all of it generated before), becomes ``title`` and the
  marked block. Returns the page."""
  path = Path(path)
  block = f"{BEGIN}\n{generated.rstrip()}\n{END}"
  old = path.read_text(encoding="utf-8") if path.exists() else ""
  pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
  if pattern.search(old):
    page = pattern.sub(lambda _: block, old, count=1)
  else:
    page = (f"{title}\n\n" if title else "") + block + "\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(page, encoding="utf-8")
  return page


CURVE_METRICS = (
  ("true_student_kl", "KL(true ‖ model), teacher forced"),
  ("sample_reverse_kl", "KL(model ‖ true), samples"),
)
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _band(rs: Sequence[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, mean, low, high)``: the 95 % t interval over the runs at each step, clipped to [0, ∞) (a KL)."""
  by_step: dict[int, list[float]] = {}
  for r in rs:
    for st, v in zip(*r.curve(key)):
      by_step.setdefault(int(st), []).append(float(v))
  steps = np.asarray(sorted(by_step), np.int64)
  stats = [mean_ci(by_step[int(st)]) for st in steps]
  mean = np.asarray([m for m, _, _ in stats])
  half = np.nan_to_num(np.asarray([h for _, h, _ in stats]))
  return steps, mean, np.maximum(mean - half, 0.0), mean + half


def plot_exact_curves(records: Sequence[RunRecord], path: str | os.PathLike) -> Path:
  """PNG: the teacher's exact KLs vs its steps in their own panel, then one panel per metric of
  :data:`CURVE_METRICS` with every student cell (mean over seeds, 95 % interval band clipped to the
  metric's range [0, ∞); cells told apart by colour, line style and marker; a log axis when the cells
  differ by more than 20×)."""
  from kdjax.report.plots import _figure, _save

  cells = _by_cell(records)
  teachers = {k: v for k, v in cells.items() if v[0].get("method") == "teacher"}
  students = {k: v for k, v in cells.items() if k not in teachers}
  fig = _figure(16.0, 5.0)
  axes = fig.subplots(1, 1 + len(CURVE_METRICS), gridspec_kw={"width_ratios": [1] + [2] * len(CURVE_METRICS)})
  for j, (key, label) in enumerate(CURVE_METRICS):
    for name, rs in teachers.items():
      steps, mean, lo, hi = _band(rs, key)
      (line,) = axes[0].plot(steps, mean, STYLES[j], marker=MARKERS[j], label=f"{name}: {label} (n={len(rs)})")
      axes[0].fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax, means = axes[1 + j], []
    for i, (name, rs) in enumerate(students.items()):
      steps, mean, lo, hi = _band(rs, key)
      if steps.size == 0:
        continue
      color = _color(i, len(students))
      style, marker = STYLES[i % len(STYLES)], MARKERS[i % len(MARKERS)]
      ax.plot(steps, mean, style, color=color, marker=marker, markersize=4, label=f"{name} (n={len(rs)})")
      ax.fill_between(steps, np.maximum(lo, LOG_FLOOR), hi, color=color, alpha=0.12, linewidth=0)
      means.append(mean)
    _scale(ax, np.concatenate(means) if means else np.zeros(0))
    ax.set_title(f"students: {label}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per response token")
    ax.grid(alpha=0.3, which="both")
  axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  axes[0].set_title("teacher")
  axes[0].set_xlabel("step")
  axes[0].set_ylim(bottom=0.0)
  axes[0].grid(alpha=0.3)
  if teachers:
    axes[0].legend(fontsize="x-small", loc="best")
  fig.suptitle("mean over seeds; band = 95 % t interval (clipped at 0)", fontsize="small")
  return _save(fig, path)


LOG_FLOOR = 1e-3  # a log-scaled panel's lowest band edge (a KL's band clipped at 0 has no logarithm)


def _scale(ax, values: np.ndarray) -> None:
  """A linear axis from 0, or a logarithmic one when the cells' values span more than a factor of 20 (a
  collapsed cell would otherwise flatten every other line)."""
  v = values[np.isfinite(values) & (values > 0)]
  if v.size and v.max() > 20 * v.min():
    ax.set_yscale("log")
  else:
    ax.set_ylim(bottom=0.0)


def _color(i: int, n: int):
  from matplotlib import colormaps

  return colormaps["tab20"](i % 20) if n > 10 else colormaps["tab10"](i % 10)
