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
#      of seed 0 next to the page (<page>_cka.png);
#   4. the CKA of every trained student against the teacher (mean matrix per cell, the maps it picks) goes to
#      $W/trained_cka.md.
# Extra args go to every cell. Finished cells are skipped. Sets up .venv first (scripts/_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
W="${KDJAX_LMH_WORKDIR:-workdirs/hmm_layer_map}"
OUT="${KDJAX_LMH_OUT:-results/layer_map_hmm.md}"
SEEDS="${KDJAX_LMH_SEEDS:-5}"
PARALLEL="${KDJAX_LMH_PARALLEL:-2}"
TEACHER="${KDJAX_LMH_TEACHER:-workdirs/hmm_lm/teacher/seed0}"
source scripts/_experiment_env.sh
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
# CKA of the trained students against the teacher (the 256 first held-out rows, response positions): which teacher
# layer each student layer resembles after training, and the map auto would choose then.
"$PY" - "$W" "$TEACHER" <<'EOF'
import collections, sys
from pathlib import Path

import numpy as np

import kdjax
from kdjax import checkpoint as ckpt
from kdjax.config import ModelConfig
from kdjax.data import load_arrays
from kdjax.engine.experiment import load_model

root, teacher_dir = Path(sys.argv[1]), sys.argv[2]
test, rows = load_arrays("hmm_lm", "test"), 64
batches = [{"inputs": test.images[i : i + rows], "mask": test.labels[i : i + rows] >= 0} for i in range(0, 4 * rows, rows)]
classes = int(ckpt.load_export(teacher_dir, what="teacher")[0]["num_classes"])
teacher, _ = load_model(ModelConfig(name="lm_4x64", checkpoint=teacher_dir), classes, role="teacher")
lines = ["| trained cell | mean CKA, student layer 0 × teacher 0–3 | student layer 1 × teacher 0–3 | map CKA picks (seeds) |",
         "|:---|:---|:---|:---|"]
for cell in ("fkl", "auto", "uniform", "last"):
  mats, maps = [], collections.Counter()
  for d in sorted((root / cell).glob("seed*/export"), key=lambda p: int(p.parent.name[4:])):
    student, _ = load_model(ModelConfig(name="lm_2x32", checkpoint=str(d)), classes, role="student")
    sim = kdjax.layer_similarity(student, teacher, batches, same_positions=True)
    mats.append(np.asarray(sim.cka))
    maps[" ".join(sim.layer_map)] += 1
  m = np.mean(mats, 0)
  row = [" ".join(f"{v:.3f}" for v in r) for r in m]
  lines.append(f"| {cell} | {row[0]} | {row[1]} | {', '.join(f'{k} ({n})' for k, n in maps.most_common())} |")
(root / "trained_cka.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "[layer_map_hmm] wrote $OUT, $W/pairs.md and $W/trained_cka.md; wall time $(( $(date +%s) - start )) s"
