"""Where a training step's time goes: wall time vs GPU kernel time, and kernel launches per step.

On CUDA: a step whose wall time far exceeds its kernel time is bound by launches and Python (a CUDA graph
helps); one whose kernel time is close to its wall time is bound by the kernels themselves (the top
kernels say which: convolutions, the norm's reductions, elementwise traffic). On the CPU: the ops that
take each step's time (self time, so a convolution's share is its own arithmetic).

    python scripts/profile_step.py --model resnet20 --norm bn --per-worker 2 --workers 8 --cuda-graph true
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train import NormlabLoop, load_images, probed_format, sync  # noqa: E402


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
    make = functools.partial(NormlabLoop, args.model, args.norm, args.per_worker, args.workers, images, labels, device,
                             cuda_graph=args.cuda_graph == "true")
    channels_last = (probed_format(make, args.per_worker * args.workers, device) if args.channels_last == "auto"
                     else args.channels_last == "true")
    loop = make(channels_last=channels_last)
    loop.run(6)  # warm-up (and the capture, with a graph)
    sync(device)
    start = time.perf_counter()
    loop.run(args.steps)
    wall = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        loop.run(args.steps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} {args.norm} N={args.per_worker} W={args.workers} · {loop.setting} · {name}")
    if device.type == "cuda":
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        busy_us = sum(e.self_device_time_total for e in events) / args.steps
        launches = sum(e.count for e in events) / args.steps
        print(f"wall {wall * 1e3:.2f} ms/step · GPU kernels {busy_us / 1e3:.2f} ms/step "
              f"({100 * busy_us / 1e6 / wall:.0f}% busy) · {launches:.0f} kernels/step")
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:  # the CPU runs the ops itself: where does each step's time go, op by op
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        ops = sum(e.count for e in events) / args.steps
        print(f"wall {wall * 1e3:.2f} ms/step · {ops:.0f} ops/step")
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    for e in sorted(events, key=lambda e: -time_of(e))[:args.top]:
        share = 100 * time_of(e) / args.steps / 1e6 / wall
        print(f"  {time_of(e) / args.steps / 1e3:7.3f} ms {share:4.0f}%  ×{e.count / args.steps:5.1f}  {e.key[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
