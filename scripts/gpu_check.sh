#!/usr/bin/env bash
# The prepared GPU check: numerics on CUDA, the norm benchmark, and training throughput on real CIFAR-10.
# Runs offline on a machine with PyTorch+CUDA; hydra-core/omegaconf may come as wheels in .whl/.
#   bash scripts/gpu_check.sh /path/to/cifar10-jpeg.zip OUTDIR
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

log "numerics: every norm on CUDA vs CPU; per-worker BN vs a loop (fp32, bf16)"
python3 scripts/cuda_norm_check.py 2>&1 | tee "$out/cuda_norm_check.txt" | tail -1 | tee -a "$out/summary.txt"

log "bench_norms on CUDA"
python3 scripts/bench_norms.py --device cuda --seconds 2 --csv "$out/bench_norms_cuda.csv" 2>&1 \
  | tee "$out/bench_norms_cuda.txt" | sed -n '/targets/,$p' | tee -a "$out/summary.txt"

log "training throughput: resnet20 on CIFAR-10 (JPEG zip), bf16 autocast, channels_last auto"
mkdir -p "$out/runs"
for job in "norm=bn batch.per_worker=32 trainer.epochs=2" "norm=gn norm.groups=8 batch.per_worker=32 trainer.epochs=2" \
           "norm=bn batch.per_worker=2 trainer.epochs=1" "norm=gn norm.groups=8 batch.per_worker=2 trainer.epochs=1"; do
  dir="$out/runs/$(echo "$job" | tr ' =' '_-')"
  python3 -m normlab.train data=cifar10_jpeg data.cache_dir="$out/cache" model=resnet20 batch.workers=8 $job \
    trainer.progress=false logger=none "hydra.run.dir=$dir" > "$dir.log" 2>&1
  python3 - "$dir" "$job" <<'PY' | tee -a "$out/summary.txt"
import json, sys
from pathlib import Path
d, job = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
last = rows[-1] if rows else {}
print(f"{job:55s} status={s.get('status')} {s.get('precision')} {s.get('memory_format')} "
      f"img/s={last.get('images_per_sec', 0):.0f} epoch_s={last.get('epoch_time_s', 0):.1f} val_error={s.get('val_error')}")
PY
done
rm -rf "$out/cache" "$out"/runs/*/checkpoint.pt
