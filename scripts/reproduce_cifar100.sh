#!/usr/bin/env bash
# Reproduce the CIFAR-100 CRD table (Tian et al. 2020) plus DKD and DIST with kdjax.
#
#   scripts/reproduce_cifar100.sh [--root DIR] [--seeds N] [--parallel N] [--pairs T-S,T-S…]
#                                 [--launcher slurm] [--smoke] [-- extra kdjax flags…]
#
# 1. trains the five teachers (`kdjax sweep cifar100_crd_table --grid 'config=teachers/*'`),
# 2. trains the six students alone (the table's "student" row) with N seeds,
# 3. runs every method on every teacher→student pair with N seeds (default 5),
#    one `kdjax sweep --grid 'config=<teacher>-<student>/*'` per pair, reading the
#    teacher trained in step 1,
# 4. writes DIR/results.md (+ .csv, PNG plots): mean ± std over seeds, seed counts,
#    last-epoch and best-epoch accuracy, next to each cell's published number.
# Re-running resumes: finished cells are skipped, interrupted ones resume from
# their checkpoints. The recipe is the reference one (240 epochs, SGD 0.9,
# lr 0.05, ×0.1 at 150/180/210, wd 5e-4, batch 64); see
# experiments/cifar100_crd_table.py. CIFAR-100 must be prepared in the TFDS
# data dir once (`pip install 'kdjax[tfds]'` then `kdjax prepare cifar100`,
# on a machine with network).
#
# --launcher slurm writes one sbatch array script per step (DIR/*/sweep.sbatch)
# and submits them with `sbatch --dependency=afterok:…` so the students start
# after their teachers; the report is then `kdjax report DIR/teachers DIR/table
# --out DIR/results.md` once the jobs are done.
#
# --smoke runs every cell for 2 optimizer steps (AB/FT/FSP: 1 init-stage step + 1
# step) on random CIFAR-100-shaped data from tfds.testing.mock_data, batch 8,
# 1 seed, in one process: it checks that every cell of the table builds, trains
# and reports, not what it reaches. All 111 cells + 11 baselines compile their
# own step; budget about an hour of CPU (much less on a GPU), or use --pairs.
#
# Sets up .venv first, as scripts/demo.sh does: creates it with $PYTHON (default python3) if it
# is missing and installs kdjax into it. KDJAX_PYTHON=/path/to/python runs an interpreter that
# already has kdjax instead (scripts/_venv.sh).
set -euo pipefail

ROOT=workdirs/cifar100_table
SEEDS=5
PARALLEL=1
LAUNCHER=local
SMOKE=0
PAIRS=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --root) ROOT="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --parallel) PARALLEL="$2"; shift 2 ;;
    --launcher) LAUNCHER="$2"; shift 2 ;;
    --pairs) PAIRS="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "reproduce_cifar100.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
source scripts/_venv.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"

# The table's structure, from the experiment file (one source of truth).
read -r -a ALL_PAIRS <<< "$("$PY" -c "
from kdjax.cli import load_experiment
m = load_experiment('cifar100_crd_table')
print(' '.join(f'{t}-{s}' for t, s in m.PAIRS))")"
if [[ -n "$PAIRS" ]]; then
  IFS=, read -r -a SEL <<< "$PAIRS"
  for p in "${SEL[@]}"; do
    [[ " ${ALL_PAIRS[*]} " == *" $p "* ]] || { echo "reproduce_cifar100.sh: unknown pair $p; pairs: ${ALL_PAIRS[*]}" >&2; exit 1; }
  done
else
  SEL=("${ALL_PAIRS[@]}")
fi
TEACHERS=$(printf '%s\n' "${SEL[@]}" | cut -d- -f1 | awk '!s[$0]++' | sed 's|^|teachers/|' | paste -sd, -)
STUDENTS=$(printf '%s\n' "${SEL[@]}" | cut -d- -f2 | awk '!s[$0]++' | sed 's|^|students/|' | paste -sd, -)

cells() {  # cells() PAIR one|two → comma-separated config names of that pair (one-stage / two-stage methods)
  "$PY" -c "
import sys
from kdjax.cli import load_experiment
m = load_experiment('cifar100_crd_table')
pair, kind = sys.argv[1], sys.argv[2]
names = [n for n in m.CONFIGS if n.startswith(pair + '/')]
two = [n for n in names if n.split('/')[1] in m.TWO_STAGE]
print(','.join(two if kind == 'two' else [n for n in names if n not in two]))" "$1" "$2"
}

if [[ "$SMOKE" == 1 ]]; then
  # One Python process with TFDS mocked: kdjax's CLI unchanged, the data random.
  KDJAX=("$PY" -c "
import sys
import tensorflow_datasets as tfds
from kdjax import cli
with tfds.testing.mock_data(num_examples=16):
  sys.exit(cli.main(sys.argv[1:]))")
  ROOT="${ROOT%/}_smoke"
  SEEDS=1
  PARALLEL=1
  LAUNCHER=local
  SHORT=(--optim.steps 2 --optim.epochs 0 --data.batch_size 8 --data.eval_batch_size 8
         --data.data_dir "$ROOT/mock_tfds" --data.download)
  TWO_STAGE_FLAGS=(--method.init_epochs 0.5 --optim.steps 1)  # 16 examples / 8 = 2 steps per epoch
  # Known: 2-step teachers of 110 layers have uncalibrated BatchNorm statistics, so their eval-mode features
  # are huge; the unbounded CC and VID losses overflow on them (resnet110 pairs) and those cells stop with
  # kdjax's non-finite-loss error. With trained teachers this does not arise.
  PAIR_FLAGS=()
else
  KDJAX=("$PY" -m kdjax.cli)
  SHORT=()
  TWO_STAGE_FLAGS=()
  PAIR_FLAGS=()
fi

DEP=""
FAILED=0
sweep() {  # sweep WORKDIR GRID [flags…]: one `kdjax sweep` (local) or one sbatch array (slurm)
  local workdir="$1" grid="$2"; shift 2
  local args=(sweep cifar100_crd_table --grid "config=$grid" --workdir "$workdir" "$@" "${SHORT[@]}" "${EXTRA[@]}")
  if [[ "$LAUNCHER" == slurm ]]; then
    "${KDJAX[@]}" "${args[@]}" --launcher slurm
    local jid
    jid=$(sbatch --parsable ${DEP:+--dependency=afterok:$DEP} "$workdir/sweep.sbatch")
    echo "submitted $workdir/sweep.sbatch as job $jid"
    LAST_JOB="$jid"
  else
    "${KDJAX[@]}" "${args[@]}" --parallel "$PARALLEL" || FAILED=1  # go on; the failed cells are listed above
  fi
}

echo "== teachers: $TEACHERS"
sweep "$ROOT/teachers" "$TEACHERS" --seeds 1
TEACHER_JOB="${LAST_JOB:-}"
echo "== students alone: $STUDENTS ($SEEDS seeds)"
sweep "$ROOT/table" "$STUDENTS" --seeds "$SEEDS"

DEP="$TEACHER_JOB"
for pair in "${SEL[@]}"; do
  t="${pair%%-*}"
  tdir="$ROOT/teachers/teachers.$t/seed0"
  echo "== $pair: every method ($SEEDS seeds), teacher $tdir"
  if [[ "$SMOKE" == 1 ]]; then  # the two-stage methods get a 1-step init stage
    sweep "$ROOT/table/$pair" "$(cells "$pair" one)" --seeds "$SEEDS" --teacher.checkpoint "$tdir" "${PAIR_FLAGS[@]}"
    sweep "$ROOT/table/$pair" "$(cells "$pair" two)" --seeds "$SEEDS" --teacher.checkpoint "$tdir" \
      "${PAIR_FLAGS[@]}" "${TWO_STAGE_FLAGS[@]}"
  else
    sweep "$ROOT/table/$pair" "$pair/*" --seeds "$SEEDS" --teacher.checkpoint "$tdir"
  fi
done

if [[ "$LAUNCHER" == slurm ]]; then
  echo "when the jobs are done: $PY -m kdjax.cli report $ROOT/teachers $ROOT/table --out $ROOT/results.md"
  exit 0
fi
echo "== report"
"$PY" -m kdjax.cli report "$ROOT/teachers" "$ROOT/table" --out "$ROOT/results.md" > /dev/null
echo "wrote $ROOT/results.md ($ROOT/results.csv, $ROOT/results_curves.png, $ROOT/results_bars.png)"
if [[ "$FAILED" != 0 ]]; then
  echo "some cells failed (see above); re-run the same command to retry them (finished cells are skipped)" >&2
  exit 1
fi
