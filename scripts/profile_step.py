"""Where a training step's time goes: wall time vs GPU kernel time, and kernel launches per step.

A step whose wall time far exceeds its kernel time is bound by launches and Python (a CUDA graph helps);
one whose kernel time is close to its wall time is bound by the kernels themselves (the top kernels say
which: convolutions, the norm's reductions, elementwise traffic).

    python scripts/profile_step.py --model resnet20 --norm bn --per-worker 2 --workers 8 --cuda-graph true
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train import NormlabLoop, load_images, sync  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--per-worker", type=int, default=2)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cuda-graph", default="false", choices=["true", "false"])
    parser.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels, _ = load_images(2048)
    loop = NormlabLoop(args.model, args.norm, args.per_worker, args.workers, images, labels, device,
                       channels_last=args.channels_last, cuda_graph=args.cuda_graph == "true")
    loop.run(6)  # warm-up (and the capture, with a graph)
    sync(device)
    start = time.perf_counter()
    loop.run(args.steps)
    wall = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        loop.run(args.steps)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernel_us = sum(e.self_device_time_total for e in events) / args.steps
    launches = sum(e.count for e in events) / args.steps
    print(f"{args.model} {args.norm} N={args.per_worker} W={args.workers} · {loop.setting} · "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    print(f"wall {wall * 1e3:.2f} ms/step · GPU kernels {kernel_us / 1e3:.2f} ms/step "
          f"({100 * kernel_us / 1e6 / wall:.0f}% busy) · {launches:.0f} kernels/step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"  {e.self_device_time_total / args.steps / 1e3:7.3f} ms  ×{e.count / args.steps:5.1f}  {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
