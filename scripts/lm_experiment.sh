#!/usr/bin/env bash
# The language-model distillation table (experiment `hmm_lm`, experiments/hmm_lm.py): a language whose true
# distribution is known (a random hidden-Markov language), a 4-layer teacher trained on its samples, and a
# 1-layer student trained from scratch and by 12 distillation objectives (forward, reverse, JSD(β), skew
# KLs, SeqKD, on-policy GKD), every cell with the same budget and seeds; scored exactly against the truth.
#   1. `kdjax sweep` trains the teacher (one seed);
#   2. `kdjax sweep` runs the 13 student cells × KDJAX_LM_SEEDS seeds (default 5), KDJAX_LM_PARALLEL
#      processes at a time (default 2), every cell distilling from that teacher;
#   3. `kdjax report` writes the table (mean ± 95 % CI, paired differences from supervised KD `hmm_lm_fkl` on the
#      same seeds) between the markers of results/hmm_lm.md (the reading around them is kept), its CSV and
#      the PNG curves.
# Extra args go to every cell (e.g. --optim.steps 100 for a quick look). Finished cells are skipped: re-running
# after an interruption finishes the table. Compiled programs are cached in $W/.jax_cache (the seeds of a cell
# compile once).
# Sets up .venv first, as scripts/demo.sh does (KDJAX_PYTHON=… runs an interpreter that has kdjax instead; see
# scripts/_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
W="${KDJAX_LM_WORKDIR:-workdirs/hmm_lm}"
OUT="${KDJAX_LM_OUT:-results/hmm_lm.md}"
SEEDS="${KDJAX_LM_SEEDS:-5}"
PARALLEL="${KDJAX_LM_PARALLEL:-2}"
CELLS=scratch,fkl,rkl,jsd_0.1,jsd_0.5,jsd_0.9,skew_kl,skew_rkl,seqkd,onpolicy_jsd_0.5,onpolicy_jsd_1,onpolicy_rkl_0.5,onpolicy_rkl_1
source scripts/_experiment_env.sh
start=$(date +%s)
"$PY" -m kdjax sweep hmm_lm --grid config=teacher --seeds 1 --workdir "$W" "$@"
echo "[lm_experiment] teacher trained after $(( $(date +%s) - start )) s" >&2
"$PY" -m kdjax sweep hmm_lm --grid "config=$CELLS" --seeds "$SEEDS" --parallel "$PARALLEL" --workdir "$W" \
  --teacher.checkpoint "$W/teacher/seed0" "$@"
"$PY" -m kdjax report "$W" --out "$OUT" --baseline hmm_lm_fkl > /dev/null
echo "[lm_experiment] wrote $OUT; wall time $(( $(date +%s) - start )) s"
