#!/usr/bin/env bash
# The prepared GPU check, < 8 minutes on one GPU, offline. PyTorch with CUDA must be installed; hydra-core,
# omegaconf (and their needs) may come as wheels in .whl/, and wandb may be missing (logger=none).
#   bash scripts/gpu_check.sh /path/to/cifar10-jpeg.zip OUTDIR
# It runs the CUDA tests and the norm tests on the GPU machine, the norm benchmark, the training benchmark
# (normlab vs the standard loop) on a GPU grid, and a short gn_batch_size sweep on CIFAR-10 with its report.
# Logs, CSV and markdown tables go to OUTDIR; OUTDIR/summary.txt collects the headlines.
set -uo pipefail
zip=${1:?usage: gpu_check.sh CIFAR10_JPEG_ZIP OUTDIR}
out=${2:?usage: gpu_check.sh CIFAR10_JPEG_ZIP OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NORMLAB_CIFAR10_JPEG="$zip"
if ! python3 -c "import hydra, omegaconf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log() { echo "== $*" | tee -a "$out/summary.txt"; }
log "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader) · $(python3 -c 'import torch; print("torch", torch.__version__)')"

log "tests on the GPU machine: CUDA paths, compile vs eager, norms, models"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compile.py tests/test_norms.py tests/test_models.py \
  > "$out/tests.txt" 2>&1
tail -1 "$out/tests.txt" | tee -a "$out/summary.txt"

log "numerics: every norm on CUDA vs CPU; per-worker BN vs a loop (fp32, bf16)"
python3 scripts/cuda_norm_check.py cuda > "$out/cuda_norm_check.txt" 2>&1
tail -1 "$out/cuda_norm_check.txt" | tee -a "$out/summary.txt"

log "bench_norms on CUDA"
python3 scripts/bench_norms.py --device cuda --seconds 2 --csv "$out/bench_norms_cuda.csv" > "$out/bench_norms_cuda.txt" 2>&1
sed -n '/targets/,$p' "$out/bench_norms_cuda.txt" | tee -a "$out/summary.txt"

log "bench_train on CUDA: normlab vs the standard loop"
python3 scripts/bench_train.py --models resnet20 resnet18 --norms bn gn --per-worker 64 32 2 --workers 8 --steps 20 \
  --images 8192 --csv "$out/bench_train_cuda.csv" > "$out/bench_train_cuda.txt" 2>&1
tail -n +3 "$out/bench_train_cuda.txt" | tee -a "$out/summary.txt"

log "short gn_batch_size sweep on CIFAR-10 (resnet18, 2 epochs, N ∈ {32, 8}, W=8) and its report"
python3 -m normlab.train -m experiment=gn_batch_size data=cifar10_jpeg data.cache_dir="$out/cache" \
  batch.per_worker=32,8 seed=0 trainer.epochs=2 trainer.progress=false logger=none \
  "hydra.sweep.dir=$out/sweep" > "$out/sweep.log" 2>&1
grep -E "sweep: |sweep finished" "$out/sweep.log" | sed 's/.*\] //' | tee -a "$out/summary.txt"
python3 -m normlab.cli "$out/sweep" --out "$out/report" > "$out/report.log" 2>&1 && cat "$out/report/table_batch_size.md" \
  | tee -a "$out/summary.txt"
rm -rf "$out/cache" "$out"/sweep/*/checkpoint.pt
