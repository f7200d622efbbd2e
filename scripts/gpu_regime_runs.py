#!/usr/bin/env python
"""The ResNet-20 study's runs on a lent GPU: one epoch timed, then as many of the regime map's three settings
(BN N=32, BN N=2, GN G=8 N=32) at 100 epochs, seed 0, as fit in the time left, side by side on the one GPU.

A small model at a total batch of 128 leaves most of a big GPU idle, so the runs share it; the timing epoch runs
the three settings side by side too, and warms the decoded-image cache the long runs then read. A run that would
not finish in the time left is not started; one still running at the deadline gets SIGTERM, checkpoints and is
packed unfinished (its summary says so). Everything that comes back is one archive of run folders (config.yaml,
metrics.jsonl, summary.json), in the layout of the study's runs/, and a summary:

    OUT/gpu_runs.tar.gz   runs/<Hydra's folder name>/{config.yaml,metrics.jsonl,summary.json}, card.txt
    OUT/summary.txt       the card, the timed epoch, what ran and how each run ended

On the device machine (no hydra there: carry its wheels, as scripts/gpu_check.sh says; the zip in a carried,
git-ignored folder):

    python3 scripts/gpu_regime_runs.py --zip data/cifar10-jpeg.zip --out "$OUT" --seconds 480

Back here: ``tar xzf gpu_runs.tar.gz -C results/reference/cifar10_resnet20/gpu/``. Tested on a CPU at a tiny
size (tests/test_gpu_regime_runs.py): ``--device cpu --epochs 2`` and overrides for a synthetic set.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = (("bn", 32), ("bn", 2), ("gn8", 32))  # the map's three, in its order
KEPT = ("config.yaml", "metrics.jsonl", "summary.json")
STARTUP_MARGIN = 1.25  # the timed run's start-up (imports, data, the first graph) is measured; this is slack on top


def folder_name(overrides: dict) -> str:
    """Hydra's hydra.job.override_dirname: the overrides, sorted (as the study's runs/ names its folders)."""
    return ",".join(sorted(f"{k}={v}" for k, v in overrides.items()))


def start(overrides: dict, run_dir: Path, device: str, extra: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "normlab.train", "experiment=gn_regime",
               *[f"{k}={v}" for k, v in overrides.items()], f"trainer.device={device}", "trainer.progress=false",
               *extra, f"hydra.run.dir='{run_dir}'"]
    return subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def epoch_seconds(run_dir: Path) -> float | None:
    """The run's slowest epoch (its first, with the warm-up), from its metrics.jsonl."""
    times = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []:
        try:
            times.append(float(json.loads(line)["epoch_time_s"]))
        except (ValueError, KeyError, TypeError):
            continue
    return max(times) if times else None


def ended(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "no summary"


def wait_all(procs: dict[subprocess.Popen, Path], deadline: float) -> None:
    """Wait for `procs`; at the deadline, SIGTERM the ones left (they checkpoint) and give them 60 s."""
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(2)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zip", type=Path, help="cifar10-jpeg.zip (sets NORMLAB_CIFAR10_JPEG)")
    parser.add_argument("--out", type=Path, required=True, help="where gpu_runs.tar.gz and summary.txt go")
    parser.add_argument("--seconds", type=float, default=480.0, help="the whole script's time (default: 480)")
    parser.add_argument("--epochs", type=int, default=100, help="each long run's budget (default: 100)")
    parser.add_argument("--device", default="cuda", help="trainer.device (default: cuda)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_regime_runs"), help="the run folders")
    parser.add_argument("extra", nargs="*", help="overrides for every run (tests only: they change the runs)")
    args = parser.parse_args()
    deadline = time.time() + args.seconds
    if args.zip is not None:
        os.environ["NORMLAB_CIFAR10_JPEG"] = str(args.zip.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    lines = [f"card: {card(args.device)}"]

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        (args.out / "summary.txt").write_text("\n".join(lines) + "\n")

    timed_dir = args.work / "timing"
    jobs = [{"norm": norm, "batch.per_worker": n, "seed": 0} for norm, n in SETTINGS]
    began = time.time()
    procs = {start({**j, "trainer.epochs": 1}, timed_dir / folder_name(j), args.device, args.extra,
                   args.work / f"timing-{i}.log"): timed_dir / folder_name(j) for i, j in enumerate(jobs)}
    wait_all(procs, deadline)
    startup = time.time() - began
    per_epoch = [epoch_seconds(d) for d in procs.values()]
    if None in per_epoch:
        say(f"the timing epoch did not finish ({', '.join(ended(d) for d in procs.values())}): nothing else ran")
        return pack(args.out, [], say)
    epoch = max(per_epoch)
    startup -= epoch
    say(f"one epoch, the three settings side by side: {', '.join(f'{t:.1f}' for t in per_epoch)} s "
        f"(start-up {startup:.0f} s)")
    need = STARTUP_MARGIN * startup + 1.1 * args.epochs * epoch
    left = deadline - time.time()
    if need > left:
        say(f"{args.epochs} epochs need about {need:.0f} s, {left:.0f} s are left: no long run started")
        return pack(args.out, [], say)
    say(f"{args.epochs} epochs need about {need:.0f} s of the {left:.0f} s left: the three settings, side by side")
    runs_dir = args.work / "runs"
    long_jobs = [{**j, "trainer.epochs": args.epochs} for j in jobs]
    procs = {start(j, runs_dir / folder_name(j), args.device, args.extra, args.work / f"run-{i}.log"):
             runs_dir / folder_name(j) for i, j in enumerate(long_jobs)}
    wait_all(procs, deadline - 30)
    for run_dir in procs.values():
        summary = json.loads((run_dir / "summary.json").read_text()) if ended(run_dir) != "no summary" else {}
        say(f"{run_dir.name}: {ended(run_dir)}, final val_error {summary.get('val_error')}, "
            f"{summary.get('wall_time_s')} s")
    return pack(args.out, list(procs.values()), say)


def card(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} · torch {torch.__version__}"
    return f"{device} · torch {torch.__version__}"


def pack(out: Path, run_dirs: list[Path], say) -> int:
    """The run folders' KEPT files and the card into OUT/gpu_runs.tar.gz."""
    with tarfile.open(out / "gpu_runs.tar.gz", "w:gz") as archive:
        for run_dir in run_dirs:
            for name in KEPT:
                if (run_dir / name).is_file():
                    archive.add(run_dir / name, arcname=f"runs/{run_dir.name}/{name}")
        archive.add(out / "summary.txt", arcname="card.txt")
    say(f"packed {len(run_dirs)} run folder(s) into {out / 'gpu_runs.tar.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
