#!/usr/bin/env bash
# Rerun the published CPU-scale study from scratch and publish it: experiment gn_batch_size_small
# (BN and GN at N = 32..2 × W=8, 2 seeds), LN and IN at N=32, then the report into
# results/reference/cifar10_small/. About 40 minutes on 2 CPU cores.
#   NORMLAB_CIFAR10_JPEG=/path/to/cifar10-jpeg.zip bash scripts/reproduce_cifar10_small.sh
#   bash scripts/reproduce_cifar10_small.sh data=cifar10 data.download=true     # torchvision's CIFAR-10
#   RESUME=1 bash scripts/reproduce_cifar10_small.sh      # pick up an interrupted rerun: finished jobs are skipped
# Extra arguments go to both sweeps. Without RESUME=1 the sweep folder starts empty.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=results/gn_batch_size_small/reproduce
publish=results/reference/cifar10_small
[ "${RESUME:-0}" = 1 ] || rm -rf "$sweep"
start=$SECONDS
normlab-train -m experiment=gn_batch_size_small "hydra.sweep.dir=$sweep" "$@"
normlab-train -m experiment=gn_batch_size_small norm=ln,in batch.per_worker=32 "hydra.sweep.dir=$sweep" "$@"
echo "grid wall time: $((SECONDS - start)) s"
normlab-report "$sweep" --out "$publish"
