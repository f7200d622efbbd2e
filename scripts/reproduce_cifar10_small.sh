#!/usr/bin/env bash
# Rerun the published CPU-scale study and publish it: experiment gn_batch_size_small (BN and GN at
# N = 32..2 × W=8, 2 seeds), LN and IN at N=32, then the report into results/reference/cifar10_small/.
# About 40 minutes on 2 CPU cores.
#   NORMLAB_CIFAR10_JPEG=/path/to/cifar10-jpeg.zip bash scripts/reproduce_cifar10_small.sh
#   bash scripts/reproduce_cifar10_small.sh data=cifar10 data.download=true     # torchvision's CIFAR-10
#   FRESH=1 bash scripts/reproduce_cifar10_small.sh ...     # from scratch: empties the sweep folder first
# Extra arguments go to both sweeps. An interrupted rerun resumes: finished jobs of the same config are
# skipped, and a job whose folder holds another config's run is refused (FRESH=1 starts over). Nothing is
# published unless every job finished (done, or diverged: a result too).
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=results/gn_batch_size_small/reproduce
publish=results/reference/cifar10_small
[ "${FRESH:-0}" = 1 ] && rm -rf "$sweep"
mkdir -p "$sweep"
log="$sweep/sweeps.log"
launcher=(hydra/launcher=joblib hydra.launcher.n_jobs=2)  # two one-thread jobs side by side
start=$SECONDS
finished=1  # a sweep exits 1 when some job of it did not finish
normlab-train -m experiment=gn_batch_size_small "${launcher[@]}" "hydra.sweep.dir=$sweep" "$@" 2>&1 | tee "$log" \
  || finished=0
normlab-train -m experiment=gn_batch_size_small norm=ln,in batch.per_worker=32 "${launcher[@]}" "hydra.sweep.dir=$sweep" "$@" \
  2>&1 | tee -a "$log" || finished=0
echo "grid wall time: $((SECONDS - start)) s"
if [ "$finished" = 0 ]; then
  echo "not published: some jobs did not finish (see $log); fix them and rerun, or FRESH=1" >&2
  exit 1
fi
cp "$publish/reading.yaml" "$sweep/"  # the study's reading (metric and why) travels with its runs
normlab-report "$sweep" --out "$publish"
