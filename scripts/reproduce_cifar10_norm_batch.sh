#!/usr/bin/env bash
# Rerun the fixed-total-batch CPU-scale study and publish it into results/reference/cifar10_norm_batch/:
#   the grid (experiment gn_norm_batch_small): BN at N = 32..2 × 3 seeds, and GN (G=8), LN, IN at N = 32 and 2
#   × 3 seeds, all at a total batch of 32 (W = 32/N); then the budget study (experiment gn_norm_batch_budget):
#   BN at N = 32 and 2 and GN at N = 32, one seed, at 2..32 epochs; then both reports.
#   NORMLAB_CIFAR10_JPEG=/path/to/cifar10-jpeg.zip bash scripts/reproduce_cifar10_norm_batch.sh
#   bash scripts/reproduce_cifar10_norm_batch.sh data=cifar10 data.download=true     # torchvision's CIFAR-10
#   PART=grid (or PART=budget) runs one part; FRESH=1 empties its sweep folders first.
# Extra arguments go to every sweep. An interrupted rerun resumes: finished jobs of the same config are skipped.
# Nothing is published unless every job of the part finished. The normlab next to this script runs (python -m),
# so a clean checkout of a commit (a git worktree) reproduces that commit, whatever else is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${PART:-all}
publish=results/reference/cifar10_norm_batch
grid=results/gn_norm_batch_small/reproduce
budget=results/gn_norm_batch_budget/reproduce

sweep() {  # sweep DIR LOG ARGS...: one multirun into DIR, its output appended to LOG
  local dir=$1 log=$2
  shift 2
  "${PYTHON:-python}" -m normlab.train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 "hydra.sweep.dir=$dir" "$@" \
    2>&1 | tee -a "$log"  # two one-thread jobs side by side
}

part_run() {  # part_run NAME DIR OUT SWEEP_ARGS -- SECOND_SWEEP_ARGS: two sweeps into DIR, then the report to OUT
  local name=$1 dir=$2 out=$3 first=$4 second=$5
  shift 5
  [ "${FRESH:-0}" = 1 ] && rm -rf "$dir"
  mkdir -p "$dir"
  local log="$dir/sweeps.log" start=$SECONDS finished=1  # a sweep exits 1 when some job of it did not finish
  : > "$log"
  # shellcheck disable=SC2086  # the sweep arguments are words on purpose
  sweep "$dir" "$log" $first "$@" || finished=0
  # shellcheck disable=SC2086
  sweep "$dir" "$log" $second "$@" || finished=0
  echo "$name wall time: $((SECONDS - start)) s" | tee -a "$log"
  [ "$finished" = 1 ] || { echo "$name not published: some jobs did not finish (see $log)" >&2; exit 1; }
  cp "$out/reading.yaml" "$dir/"  # the study's reading (metric and why) travels with its runs
  "${PYTHON:-python}" -m normlab.cli "$dir" --out "$out"
}

if [ "$part" = all ] || [ "$part" = grid ]; then
  part_run grid "$grid" "$publish" "experiment=gn_norm_batch_small" \
    "experiment=gn_norm_batch_small norm=gn8,ln,in batch.per_worker=32,2 eval.compare_bn_stats=false" "$@"
fi
if [ "$part" = all ] || [ "$part" = budget ]; then
  part_run budget "$budget" "$publish/budget" "experiment=gn_norm_batch_budget" \
    "experiment=gn_norm_batch_budget norm=gn8 batch.per_worker=32 eval.compare_bn_stats=false" "$@"
fi
