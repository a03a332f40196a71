#!/usr/bin/env bash
# Hidden-state distillation with the layer map chosen by linear CKA (layer_map=auto) against TinyBERT's
# uniform map and the last layer only, on the arithmetic task (experiments/arithmetic_gkd.py, 4-digit
# addition) with a small data budget:
#   1. the 4-layer teacher (lm_4x64) trains on the data (CE, KDJAX_LMA_TEACHER_STEPS steps of batch 32);
#   2. a 2-layer half-width student (lm_2x32) trains KDJAX_LMA_STEPS steps of batch 64 with CE alone, or
#      CE + hidden_mse (a learned projection per layer pair) under each map, KDJAX_LMA_SEEDS seeds;
#   3. a table of exact match and test NLL, mean ± 95 % t interval over the seeds, goes to $OUT.
# Extra args go to every run (e.g. --data.data_dir DIR). Finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
W="${KDJAX_LMA_WORKDIR:-workdirs/layer_map_auto}"
OUT="${KDJAX_LMA_OUT:-$W/table.md}"
SEEDS="${KDJAX_LMA_SEEDS:-3}"
STEPS="${KDJAX_LMA_STEPS:-150}"
TEACHER_STEPS="${KDJAX_LMA_TEACHER_STEPS:-1500}"
source scripts/_experiment_env.sh
EXP=experiments/arithmetic_gkd.py
start=$(date +%s)
[ -f "$W/teacher/results.json" ] || "$PY" -m kdjax train-teacher "$EXP" --workdir "$W/teacher" \
  --optim.steps "$TEACHER_STEPS" --run.eval_every "$TEACHER_STEPS" --run.quiet "$@"
echo "[layer_map_auto] teacher after $(( $(date +%s) - start )) s" >&2
for seed in $(seq 0 $(( SEEDS - 1 ))); do
  for cell in ce auto uniform last; do
    dir="$W/$cell/seed$seed"
    [ -f "$dir/results.json" ] && continue
    if [ "$cell" = ce ]; then extra=(); else extra=(--method.terms hidden_mse=1 --method.layer_map "$cell"); fi
    t0=$(date +%s)
    "$PY" -m kdjax distill "$EXP" scratch --workdir "$dir" --teacher.checkpoint "$W/teacher" \
      --student.name lm_2x32 --optim.steps "$STEPS" --run.seed "$seed" --run.eval_every "$STEPS" --run.quiet \
      "${extra[@]}" "$@"
    echo "[layer_map_auto] $cell seed $seed: $(( $(date +%s) - t0 )) s" >&2
  done
done
"$PY" - "$W" "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np
from scipy import stats

root, out = Path(sys.argv[1]), Path(sys.argv[2])
teacher = json.loads((root / "teacher" / "results.json").read_text())
lines = [
  f"teacher lm_4x64: token accuracy {100 * teacher['test_accuracy']:.1f} %, exact match "
  f"{100 * teacher['exact_match']:.1f} %, test NLL {teacher['test_nll']:.3f}",
  "",
  "| student lm_2x32 | map (student=teacher) | test NLL | token accuracy (%) | exact match (%) | seeds |",
  "|---|---|---|---|---|---|",
]


def ci(v):
  v = np.asarray(v, np.float64)
  h = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
  return f"{v.mean():.3f} ± {h:.3f}"


for cell, label in [("ce", "CE"), ("auto", "CE + hidden_mse, auto"), ("uniform", "CE + hidden_mse, uniform"),
                    ("last", "CE + hidden_mse, last")]:
  runs = [json.loads(p.read_text()) for p in sorted((root / cell).glob("seed*/results.json"))]
  if not runs:
    continue
  maps = sorted({" ".join(r["layer_map"]["layer_map"]) for r in runs if "layer_map" in r}) or [
    {"ce": "—", "uniform": "0=1 1=3", "last": "1=3"}[cell]]
  nll, acc = ci([r["test_nll"] for r in runs]), ci([100 * r["test_accuracy"] for r in runs])
  em = ci([100 * r["exact_match"] for r in runs])
  lines.append(f"| {label} | {'; '.join(maps)} | {nll} | {acc} | {em} | {len(runs)} |")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "[layer_map_auto] wrote $OUT; wall time $(( $(date +%s) - start )) s"
