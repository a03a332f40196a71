"""Many run workdirs → one table: mean ± std over seeds, last- and best-epoch accuracy.

A *run* is a directory holding ``results.json`` (written by the engine at the
end of training) and usually ``metrics.jsonl``. Runs are grouped into *cells*
by ``results["group"]`` (everything but the seed, e.g. "cnn1d→mlp kd"), and
each cell reports:

* last-epoch test accuracy — the final evaluation, what most papers (and the
  CRD/RepDistiller numbers) report;
* best-epoch test accuracy — the max over evaluations, optimistic (it selects
  on the test set), shown only for comparison with papers that report it;
* agreement with the teacher, KL(teacher ‖ student), ECE;

as mean ± sample std (ddof = 1) over seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from kdjax.errors import ConfigError
from kdjax.report.logging import read_jsonl

__all__ = ["RunRecord", "Stat", "Row", "collect", "cell_names", "summarize", "to_markdown", "to_csv", "FOOTNOTE"]

RESULTS = "results.json"
METRICS = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """One finished run: its ``results.json`` and its eval curve from ``metrics.jsonl``.

  ``eval_rows`` holds the ``split == "eval"`` rows sorted by step, one per step
  (a resumed run may log a step twice; the later row wins).
  """

  workdir: Path
  results: dict[str, Any]
  eval_rows: tuple[dict[str, Any], ...] = ()

  @property
  def group(self) -> str:
    g = self.results.get("group")
    return str(g) if g else self.workdir.name

  @property
  def seed(self) -> int | None:
    s = self.results.get("seed")
    return None if s is None else int(s)

  def get(self, key: str, default: Any = None) -> Any:
    return self.results.get(key, default)

  def curve(self, key: str = "test_accuracy") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one eval metric (rows lacking it are skipped)."""
    pts = [(r["step"], r[key]) for r in self.eval_rows if r.get(key) is not None]
    if not pts:
      return np.zeros(0, np.int64), np.zeros(0, np.float64)
    steps, vals = zip(*pts)
    return np.asarray(steps, np.int64), np.asarray(vals, np.float64)


def _find_run_dirs(path: Path) -> list[Path]:
  if path.is_file():
    if path.name != RESULTS:
      raise ConfigError(f"{str(path)!r} is a file but not a {RESULTS}; pass run directories (or their parents)")
    return [path.parent]
  if not path.is_dir():
    raise ConfigError(f"no such workdir: {str(path)!r}")
  return sorted(p.parent for p in path.rglob(RESULTS))


def _load_run(run_dir: Path) -> RunRecord:
  res_path = run_dir / RESULTS
  try:
    results = json.loads(res_path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{res_path} is not valid JSON ({e.msg}); re-run that run or delete the file") from None
  if not isinstance(results, dict):
    raise ConfigError(f"{res_path} holds a {type(results).__name__}, expected a JSON object")
  rows: dict[int, dict[str, Any]] = {}
  met_path = run_dir / METRICS
  if met_path.exists():
    for r in read_jsonl(met_path):
      if r.get("split") == "eval" and "step" in r:
        rows[int(r["step"])] = r
  return RunRecord(workdir=run_dir, results=results, eval_rows=tuple(rows[s] for s in sorted(rows)))


def collect(workdirs: Iterable[str | os.PathLike]) -> list[RunRecord]:
  """Every run under ``workdirs``: each path is a run dir, a parent searched
  recursively for ``results.json``, or a ``results.json`` itself. Runs found
  twice count once; order is sorted by path within each argument."""
  seen: set[Path] = set()
  records = []
  for w in workdirs:
    for d in _find_run_dirs(Path(w)):
      key = d.resolve()
      if key in seen:
        continue
      seen.add(key)
      records.append(_load_run(d))
  return records


class Stat(NamedTuple):
  """Mean and sample std (ddof = 1) over the ``n`` runs that have the value.

  ``mean`` is None when n = 0; ``std`` is None when n < 2.
  """

  mean: float | None
  std: float | None
  n: int

  @staticmethod
  def of(values: Iterable[Any], scale: float = 1.0) -> Stat:
    v = np.asarray([float(x) * scale for x in values if x is not None], np.float64)
    if v.size == 0:
      return Stat(None, None, 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None, int(v.size))

  def format(self, decimals: int = 2) -> str:
    if self.n == 0 or self.mean is None:
      return "n/a"
    std = "–" if self.std is None else f"{self.std:.{decimals}f}"
    return f"{self.mean:.{decimals}f} ± {std}"


@dataclasses.dataclass(frozen=True)
class Row:
  """One table cell (a group of seeds). Accuracies are in percent; agreement,
  ECE are fractions; KL is in nats."""

  group: str
  seeds: tuple[int | None, ...]
  last_acc: Stat
  best_acc: Stat
  teacher_acc: Stat
  agreement: Stat
  kl: Stat
  ece: Stat
  cka: Stat
  published: float | None = None
  perplexity: Stat = Stat(None, None, 0)  # language models: per-token perplexity of the student
  exact_match: Stat = Stat(None, None, 0)  # language models: greedy answers reproduced exactly (%)
  experiment: str | None = None
  method: str | None = None

  @property
  def n(self) -> int:
    """Number of runs (seeds) in the cell."""
    return len(self.seeds)


def _best(r: RunRecord) -> float | None:
  b = r.get("best_test_accuracy")
  if b is not None:
    return b
  _, vals = r.curve("test_accuracy")  # older results.json: recover from the curve
  return float(vals.max()) if vals.size else None


# Config leaves that never make two runs different cells: the seed, paths
# (each seed may have its own teacher workdir) and output/verbosity settings.
_NOT_A_SETTING = (
  "run.seed",
  "run.workdir",
  "run.quiet",
  "run.log_every",
  "run.xla_cpu_conv",
  "data.data_dir",
  "data.teacher_cache",
)


def _settings(r: RunRecord) -> dict[str, str]:
  """The run's config (``results["config"]``) as flat ``path -> JSON value``, minus seed and paths."""
  out: dict[str, str] = {}

  def walk(node: Any, prefix: str) -> None:
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}{k}.")
      return
    path = prefix[:-1]
    if path in _NOT_A_SETTING or path.endswith("checkpoint"):
      return
    out[path] = json.dumps(node, sort_keys=True)

  walk(r.results.get("config") or {}, "")
  return out


def cell_names(records: Sequence[RunRecord], group: Callable[[RunRecord], str] = lambda r: r.group) -> list[str]:
  """Each run's table cell: its ``group`` (or what ``group`` names it), plus the settings that tell apart
  runs sharing that group name (e.g. a sweep over ``optim.lr``):
  ``"cnn1d→mlp kd (optim.lr=0.01)"``. Runs that differ only in seed (or in
  paths) share a cell."""
  names = [group(r) for r in records]
  by_group: dict[str, list[int]] = {}
  for i, g in enumerate(names):
    by_group.setdefault(g, []).append(i)
  for g, idx in by_group.items():
    flats = [_settings(records[i]) for i in idx]
    keys = sorted({k for f in flats for k in f if len({f2.get(k) for f2 in flats}) > 1})
    if not keys:
      continue
    for i, f in zip(idx, flats):
      names[i] = f"{g} ({', '.join(f'{k}={json.loads(f[k]) if k in f else None}' for k in keys)})"
  return names


def summarize(records: Sequence[RunRecord]) -> list[Row]:
  """Group runs into cells (:func:`cell_names`, first-seen order) and compute
  mean ± std over seeds."""
  groups: dict[str, list[RunRecord]] = {}
  for name, r in zip(cell_names(records), records):
    groups.setdefault(name, []).append(r)
  rows = []
  for g, rs in groups.items():
    published = next((float(r.get("published")) for r in rs if r.get("published") is not None), None)
    rows.append(
      Row(
        group=g,
        seeds=tuple(r.seed for r in rs),
        last_acc=Stat.of((r.get("test_accuracy") for r in rs), 100.0),
        best_acc=Stat.of((_best(r) for r in rs), 100.0),
        teacher_acc=Stat.of((r.get("teacher_test_accuracy") for r in rs), 100.0),
        agreement=Stat.of(r.get("agreement") for r in rs),
        kl=Stat.of(r.get("teacher_student_kl") for r in rs),
        ece=Stat.of(r.get("ece") for r in rs),
        cka=Stat.of(r.get("cka") for r in rs),
        published=published,
        perplexity=Stat.of(r.get("perplexity") for r in rs),
        exact_match=Stat.of((r.get("exact_match") for r in rs), 100.0),
        experiment=rs[0].get("experiment"),
        method=rs[0].get("method"),
      )
    )
  return rows


FOOTNOTE = (
  "last = final evaluation; best = max over evaluations (optimistic: it selects on the test set; reported for "
  "comparison with papers that use it). Values are mean ± std over seeds, where std is the sample std "
  '(ddof = 1); "–" = a single seed; n/a = not measured; (n=k) = only k of the seeds have the value. '
  "agreement = top-1 agreement with the teacher (fraction); KL(T‖S) = mean KL(teacher ‖ student) at T = 1, "
  "in nats; ECE = expected calibration error with 15 equal-width bins (fraction); published = the paper's "
  "number (%)."
)

COLUMNS = ("cell", "seeds", "last-epoch acc. (%)", "best-epoch acc. (%)", "agreement", "KL(T‖S)", "ECE", "published")


def _cell(stat: Stat, n_runs: int, decimals: int) -> str:
  s = stat.format(decimals)
  if 0 < stat.n < n_runs:
    s += f" (n={stat.n})"
  return s


def _md_escape(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Sequence[Row]) -> str:
  """A Markdown table (one line per cell) followed by the footnote; language-model runs add a
  perplexity column (and their accuracies are per answer token)."""
  lm = any(r.perplexity.n for r in rows)
  columns = COLUMNS[:-2] + ("exact match (%)", "perplexity") + COLUMNS[-2:] if lm else COLUMNS
  lines = ["| " + " | ".join(columns) + " |", "|:---|" + "---:|" * (len(columns) - 1)]
  for r in rows:
    cells = [
      _md_escape(r.group),
      str(r.n),
      _cell(r.last_acc, r.n, 2),
      _cell(r.best_acc, r.n, 2),
      _cell(r.agreement, r.n, 3),
      _cell(r.kl, r.n, 3),
      *([_cell(r.exact_match, r.n, 2), _cell(r.perplexity, r.n, 3)] if lm else []),
      _cell(r.ece, r.n, 3),
      "–" if r.published is None else f"{r.published:.2f}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  note = (
    (
      " For language models accuracy, agreement, KL and ECE are per scored token (teacher-forced), "
      "perplexity = exp(mean token NLL), and exact match counts greedy-generated answers reproduced token "
      "for token."
    )
    if lm
    else ""
  )
  return "\n".join(lines) + "\n\n" + FOOTNOTE + note + "\n"


_CSV_STATS = (
  ("last_acc_pct", "last_acc"),
  ("best_acc_pct", "best_acc"),
  ("teacher_acc_pct", "teacher_acc"),
  ("agreement", "agreement"),
  ("teacher_student_kl", "kl"),
  ("ece", "ece"),
  ("cka", "cka"),
  ("perplexity", "perplexity"),
  ("exact_match_pct", "exact_match"),
)


def _num(x: float | None) -> str:
  return "" if x is None else repr(float(x))


def to_csv(rows: Sequence[Row], path: str | os.PathLike) -> None:
  """One line per cell; full-precision numbers, empty where undefined (std of one seed)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  header = ["group", "experiment", "method", "seeds", "seed_list"]
  for name, _ in _CSV_STATS:
    header += [f"{name}_mean", f"{name}_std", f"{name}_n"]
  header.append("published_pct")
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in rows:
      line = [r.group, r.experiment or "", r.method or "", r.n, ";".join("" if s is None else str(s) for s in r.seeds)]
      for _, attr in _CSV_STATS:
        st: Stat = getattr(r, attr)
        line += [_num(st.mean), _num(st.std), st.n]
      line.append(_num(r.published))
      w.writerow(line)
