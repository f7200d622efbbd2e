#!/usr/bin/env bash
# The prepared GPU check, < 8 minutes on one GPU, offline. PyTorch with CUDA must be installed; hydra-core,
# omegaconf (and their needs) may come as wheels in .whl/, and wandb may be missing (logger=none).
#   bash scripts/gpu_check.sh /path/to/cifar10-jpeg.zip OUTDIR
# Steps, most important first, each under its own time limit so that one slow step cannot starve the rest:
#   1. the CUDA tests (CUDA graph vs eager, every norm on CUDA, a CUDA training run), and compiled vs eager
#      for every norm and a compiled run on CUDA (Triton's kernels);
#   2. bench_train: normlab vs the standard loop on a GPU grid, eager vs CUDA graph vs compile
#      (reduce-overhead) at small batches, channels_last vs NCHW per norm, a profile of the small step;
#   3. one full CIFAR-10 epoch of resnet20 at N=2 × W=8 (3,125 steps) through a CUDA graph;
#   4. a short gn_batch_size sweep on CIFAR-10 and its report;
#   5. the norm numerics check and the norm benchmark;
#   6. with the time left, the quick test suite (its training tests run on CUDA: trainer.device=auto).
# Logs, CSV and markdown tables go to OUTDIR; OUTDIR/summary.txt collects the headlines. The whole check keeps
# to GPU_CHECK_SECONDS (default 470): a step gets its own limit or what is left, whichever is less.
# Offline wheels for a machine without hydra (git-ignored .whl/, carried with the checkout), made where pip works:
#   pip download --no-deps -d .whl hydra-core omegaconf pyyaml
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3      # published as a source package only
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
budget=${GPU_CHECK_SECONDS:-470}
step() {  # step SECONDS LOGNAME COMMAND...: run with a time limit, keep its log, note a failure or timeout
  local limit=$1 name=$2; shift 2
  local start=$SECONDS left=$((budget - SECONDS))
  if [ $left -lt 15 ]; then
    echo "   ($name: skipped, the ${budget}s budget is spent)" | tee -a "$out/summary.txt" > "$out/$name.txt"
    return 124
  fi
  [ "$limit" -le $left ] || limit=$left
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || echo "   ($name: exit $rc$([ $rc -eq 124 ] && echo ", over ${limit}s"))" | tee -a "$out/summary.txt"
  echo "   ($name: $((SECONDS - start))s)" >> "$out/summary.txt"
  return $rc
}
bench=(python3 scripts/bench_train.py)  # an array, not a function: `timeout` runs programs
log "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader) · $(python3 -c 'import torch; print("torch", torch.__version__)')"

log "1. CUDA tests: CUDA graph vs eager, norms on CUDA, a CUDA training run; compile vs eager on CUDA (Triton)"
step 150 tests_cuda python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
tail -3 "$out/tests_cuda.txt" | tee -a "$out/summary.txt"
step 180 tests_compile python3 -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda
tail -1 "$out/tests_compile.txt" | tee -a "$out/summary.txt"

log "2a. bench_train, small batches: eager vs CUDA graph (resnet20, N=2 × W=8) beside the standard loop"
step 90 bench_small_eager "${bench[@]}" --models resnet20 --norms bn gn --per-worker 2 --workers 8 --steps 30 --warmup 5 \
  --images 4096 --cuda-graph false --csv "$out/bench_small_eager.csv"
step 90 bench_small_graph "${bench[@]}" --models resnet20 --norms bn gn --per-worker 2 --workers 8 --steps 60 --warmup 5 \
  --images 4096 --cuda-graph true --skip-reference --csv "$out/bench_small_graph.csv"
tail -n +3 "$out/bench_small_eager.txt" "$out/bench_small_graph.txt" | tee -a "$out/summary.txt"

log "2a'. the other way to replay small steps: torch.compile mode=reduce-overhead (resnet20, N=2 × W=8)"
step 120 bench_small_reduce_overhead "${bench[@]}" --models resnet20 --norms bn gn --per-worker 2 --workers 8 \
  --steps 60 --warmup 10 --images 4096 --cuda-graph false --compile reduce-overhead --skip-reference \
  --csv "$out/bench_small_reduce_overhead.csv"
tail -n +3 "$out/bench_small_reduce_overhead.txt" | tee -a "$out/summary.txt"

log "2b. bench_train, large batches: resnet18 at N=64, 32 × W=8 (graph on), beside the standard loop"
step 150 bench_large "${bench[@]}" --models resnet18 --norms bn gn --per-worker 64 32 --workers 8 --steps 20 --warmup 5 \
  --images 8192 --csv "$out/bench_large.csv"
tail -n +3 "$out/bench_large.txt" | tee -a "$out/summary.txt"

log "2c. layout per norm on CUDA: channels_last vs NCHW (normlab alone)"
for layout in true false; do
  step 90 "bench_layout_$layout" "${bench[@]}" --models resnet18 --norms bn gn ln in --per-worker 32 --workers 8 --steps 15 \
    --warmup 5 --images 4096 --channels-last $layout --skip-reference --csv "$out/bench_layout_$layout.csv"
  tail -n +3 "$out/bench_layout_$layout.txt" | head -5 | tee -a "$out/summary.txt"
done

log "2d. profile: resnet20 bn N=2 × W=8, eager and graph"
for graph in false true; do
  step 60 "profile_graph_$graph" python3 scripts/profile_step.py --model resnet20 --norm bn --per-worker 2 \
    --workers 8 --cuda-graph $graph
  head -6 "$out/profile_graph_$graph.txt" | tee -a "$out/summary.txt"
done

log "3. one CIFAR-10 epoch of resnet20 at N=2 × W=8 (3,125 steps), CUDA graph"
step 120 epoch python3 -m normlab.train -m data=cifar10_jpeg model=resnet20 norm=bn,gn8 \
  batch.per_worker=2 trainer.epochs=1 trainer.cuda_graph=true trainer.checkpoint=false trainer.progress=false \
  logger=none name=epoch "hydra.sweep.dir=$out/epoch"
grep -hE "epoch 1/1|error" "$out/epoch.txt" | sed 's/.*\] - //' | tee -a "$out/summary.txt"

log "4. short gn_batch_size sweep (resnet18, 2 epochs, N ∈ {32, 8}, W=8, CUDA graph) and its report"
step 150 sweep python3 -m normlab.train -m experiment=gn_batch_size data=cifar10_jpeg batch.per_worker=32,8 seed=0 \
  trainer.epochs=2 trainer.cuda_graph=true trainer.checkpoint=false trainer.progress=false logger=none \
  "hydra.sweep.dir=$out/sweep"
grep -E "sweep: |sweep finished" "$out/sweep.txt" | sed 's/.*\] //' | tee -a "$out/summary.txt"
step 60 report python3 -m normlab.cli "$out/sweep" --out "$out/report" && \
  cat "$out/report/table_batch_size.md" | tee -a "$out/summary.txt"

log "5. norm numerics and the norm benchmark"
step 60 cuda_norm_check python3 scripts/cuda_norm_check.py cuda
tail -1 "$out/cuda_norm_check.txt" | tee -a "$out/summary.txt"
step 60 bench_norms python3 scripts/bench_norms.py --device cuda --seconds 1 --csv "$out/bench_norms_cuda.csv"
sed -n '/targets/,$p' "$out/bench_norms.txt" | tee -a "$out/summary.txt"

log "6. the quick test suite with the GPU visible (trainer.device=auto runs its training tests on CUDA)"
step 240 tests_suite python3 -m pytest -q -p no:cacheprovider -m "not slow"
tail -3 "$out/tests_suite.txt" | tee -a "$out/summary.txt"
rm -rf "$out"/*/*/checkpoint.pt "$out"/*/*/wandb
