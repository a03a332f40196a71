#!/usr/bin/env bash
# Hidden-state distillation with the layer map chosen by linear CKA (layer_map=auto) against TinyBERT's uniform
# map, the last layer only and the logit term alone, on the hidden-Markov language (experiment
# experiments/hmm_layer_map.py, task and teacher of experiments/hmm_lm.py), scored exactly against the truth:
#   1. the hmm_lm teacher (lm_4x64) is KDJAX_LMH_TEACHER (default workdirs/hmm_lm/teacher/seed0); trained with
#      `kdjax sweep hmm_lm --grid config=teacher` first if it is missing;
#   2. `kdjax sweep` runs the 4 cells (fkl, auto, uniform, last) × KDJAX_LMH_SEEDS seeds (default 5, seed-major),
#      KDJAX_LMH_PARALLEL processes at a time (default 2), every cell distilling from that teacher;
#   3. `kdjax report` writes the exact-metric table (mean ± 95 % CI, paired differences from the logit term
#      alone `hmm_layer_map_fkl`) between the markers of KDJAX_LMH_OUT (default results/layer_map_hmm.md);
#      the paired differences between the maps and the map each seed chose go to $W/pairs.md, the CKA heat map
#      of seed 0 next to the page (<page>_cka.png).
# Extra args go to every cell. Finished cells are skipped. Sets up .venv first (scripts/_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
W="${KDJAX_LMH_WORKDIR:-workdirs/hmm_layer_map}"
OUT="${KDJAX_LMH_OUT:-results/layer_map_hmm.md}"
SEEDS="${KDJAX_LMH_SEEDS:-5}"
PARALLEL="${KDJAX_LMH_PARALLEL:-2}"
TEACHER="${KDJAX_LMH_TEACHER:-workdirs/hmm_lm/teacher/seed0}"
source scripts/_venv.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$W/.jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
start=$(date +%s)
if [ ! -f "$TEACHER/results.json" ]; then
  "$PY" -m kdjax sweep hmm_lm --grid config=teacher --seeds 1 --workdir "$(dirname "$(dirname "$TEACHER")")"
fi
# Seed-major (seed 0's four cells, then seed 1's …): a run cut short leaves whole seeds to compare on.
"$PY" -m kdjax sweep hmm_layer_map --grid "seed=$(seq -s, 0 $(( SEEDS - 1 )))" --grid config=fkl,auto,uniform,last \
  --parallel "$PARALLEL" --workdir "$W" --teacher.checkpoint "$TEACHER" "$@"
"$PY" -m kdjax report "$W" --out "$OUT" --baseline hmm_layer_map_fkl > /dev/null
"$PY" - "$W" "${OUT%.md}_cka.png" <<'EOF'
import json, shutil, sys
from pathlib import Path

from kdjax.report.compare import paired_t

root, png = Path(sys.argv[1]), Path(sys.argv[2])
runs = {c: {} for c in ("fkl", "auto", "uniform", "last")}
for c in runs:
  for p in sorted((root / c).glob("seed*/results.json")):
    r = json.loads(p.read_text())
    runs[c][r["seed"]] = r
metrics = (("true_student_kl", "KL(true‖S)"), ("sample_reverse_kl", "KL(S‖true) samples"))
lines = ["| a − b | " + " | ".join(f"Δ {label}" for _, label in metrics) + " |", "|:---|" + "---:|" * len(metrics)]
for a, b in (("auto", "uniform"), ("auto", "last"), ("uniform", "last"), ("auto", "fkl"), ("uniform", "fkl"),
             ("last", "fkl")):
  row = []
  for key, _ in metrics:
    m, h, p, n = paired_t(*({s: r[key] for s, r in runs[c].items()} for c in (a, b)))
    row.append(f"{m:+.4f} ± {h:.4f}{'*' if abs(m) > h else ''} (p = {p:.2g}, n = {n})")
  lines.append(f"| {a} − {b} | " + " | ".join(row) + " |")
lines += ["", "| seed | auto map (student=teacher) | CKA rows (student layer × teacher layers 0–3) |", "|---:|:---|:---|"]
for s, r in sorted(runs["auto"].items()):
  lm = r.get("layer_map") or {}
  cka = "; ".join(" ".join(f"{v:.3f}" for v in row) for row in lm.get("cka", []))
  lines.append(f"| {s} | {' '.join(lm.get('layer_map', []))} | {cka} |")
(root / "pairs.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
if (root / "auto" / "seed0" / "layer_map.png").exists():
  shutil.copyfile(root / "auto" / "seed0" / "layer_map.png", png)
EOF
echo "[layer_map_hmm] wrote $OUT and $W/pairs.md; wall time $(( $(date +%s) - start )) s"
