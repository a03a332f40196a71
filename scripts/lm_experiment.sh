#!/usr/bin/env bash
# The language-model distillation table (experiment `arithmetic_gkd`): a 4-layer
# teacher and a 1-layer student on 4-digit addition; the student from scratch and by
# supervised KD, SeqKD and on-policy GKD (reverse KL, JSD 0.5), 3 seeds each.
#   1. `kdjax sweep` trains the teacher with 3 seeds;
#   2. the students distil from the teacher seed with the best exact match (as one
#      would in practice: its digit lookups are learned in abrupt, seed-dependent jumps);
#   3. `kdjax sweep` runs the 5 student configs × 3 seeds, `kdjax report` writes
#      results/arithmetic_gkd.md, .csv and the PNG curves.
# Extra args go to every cell (e.g. --optim.steps 200 for a quick look).
# Sets up .venv first, as scripts/demo.sh does (KDJAX_PYTHON=… runs an interpreter that has
# kdjax instead; see scripts/_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
W="${KDJAX_LM_WORKDIR:-workdirs/arithmetic}"
OUT="${KDJAX_LM_OUT:-results/arithmetic_gkd.md}"
source scripts/_venv.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$(date +%s)
"$PY" -m kdjax sweep arithmetic_gkd --grid config=teacher --seeds 3 --workdir "$W" "$@"
best=$("$PY" - "$W" <<'PYEOF'
import json, pathlib, sys
runs = sorted(pathlib.Path(sys.argv[1], "teacher").glob("seed*/results.json"))
scores = {r.parent: json.loads(r.read_text()).get("exact_match") or 0.0 for r in runs}
best = max(scores, key=lambda d: (scores[d], -int(d.name[4:])))
print(best)
print(f"[lm_experiment] teacher exact match by seed: "
      f"{ {d.name: round(100 * s, 1) for d, s in scores.items()} }; students distil from {best.name}", file=sys.stderr)
PYEOF
)
"$PY" -m kdjax sweep arithmetic_gkd \
  --grid config=scratch,supervised_kd,seqkd,gkd_rkl,gkd_jsd --seeds 3 --workdir "$W" --teacher.checkpoint "$best" "$@"
"$PY" -m kdjax report "$W" --out "$OUT"
echo "[lm_experiment] wall time $(( $(date +%s) - start )) s"
