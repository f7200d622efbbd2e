"""Do two commits train the same? Short jobs at each, from two temporary git worktrees, metric by metric.

For each commit a detached worktree is made (and removed at the end); every job runs there as
``python -m normlab.train`` with PYTHONPATH set to that worktree, on the CPU with one thread, so that nothing but
the code differs. The jobs: per-worker BN with W > 1 and GN, in both memory formats (trainer.channels_last) and
both precisions (trainer.precision), on tiny synthetic data (or --data digits). The table gives, per job, the
largest absolute difference over every numeric metric of every epoch (metrics.jsonl and summary.json's final
metrics; timings excluded): 0 means bit for bit.

    python scripts/compare_commits.py cb1d2df HEAD
    python scripts/compare_commits.py cb1d2df HEAD --epochs 3 --extra trainer.compile=true   # what compiling changes
    NORMLAB_CPU_KERNEL=0 python scripts/compare_commits.py cb1d2df HEAD                     # torch's ops only
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from normlab.records import RunDir, read_metrics

REPO = Path(__file__).resolve().parent.parent
TIMING = ("time", "seconds", "img_s", "images_per_s", "throughput", "duration", "elapsed", "_ms", "memory")
DATA = {
    "synthetic": ["data=synthetic", "data.num_train=64", "data.num_test=32", "data.size=8"],
    "digits": ["data=digits"],
}
NORMS = {"bn": ["norm=bn", "batch.per_worker=4", "batch.workers=2"],
         "gn": ["norm=gn", "norm.groups=4", "batch.per_worker=4", "batch.workers=2"]}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def jobs(epochs: int, data: str, extra: list[str]) -> dict[str, list[str]]:
    """Job name -> overrides: bn and gn × memory format × precision."""
    common = [*DATA[data], "model=resnet8", "model.width=16", f"trainer.epochs={epochs}", "trainer.device=cpu",
              "trainer.threads=1", "trainer.progress=false", "trainer.checkpoint=false", "logger=none", *extra]
    out = {}
    for norm, channels_last, precision in itertools.product(NORMS, ("false", "true"), ("fp32", "bf16")):
        layout = "channels_last" if channels_last == "true" else "nchw"
        out[f"{norm}-{layout}-{precision}"] = [*common, *NORMS[norm], f"trainer.channels_last={channels_last}",
                                               f"trainer.precision={precision}"]
    return out


def run(tree: Path, overrides: list[str], run_dir: Path, cache: Path) -> str | None:
    """One job from worktree `tree`; None, or why it failed."""
    env = {**os.environ, "PYTHONPATH": str(tree), "NORMLAB_CACHE": str(cache), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "normlab.train", *overrides, f"hydra.run.dir={run_dir}"],
                          check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip()[-1500:]


def numbers(run_dir: Path) -> dict[str, float]:
    """Every numeric, non-timing metric of a run, keyed by epoch and name, and the summary's final ones."""
    out = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not timing(key):
                out[f"epoch {row.get('epoch')}: {key}"] = float(value)
    summary = RunDir(run_dir).read_summary() or {}
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not timing(key):
            out[f"summary: {key}"] = float(value)
    return out


def timing(key: str) -> bool:
    return any(part in key for part in TIMING)


def largest_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    """(largest |a - b|, where) over the keys both hold; inf if their keys differ."""
    if set(a) != set(b):
        return math.inf, f"different metrics: {sorted(set(a) ^ set(b))[:4]}"
    worst, where = 0.0, "-"
    for key, value in a.items():
        other = b[key]
        diff = 0.0 if value == other or (math.isnan(value) and math.isnan(other)) else abs(value - other)
        if diff > worst or math.isnan(diff):
            worst, where = diff, key
    return worst, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("head")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", choices=sorted(DATA), default="synthetic")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every job, at both commits")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at once (one thread each)")
    parser.add_argument("--keep", type=Path, help="keep the runs here instead of a temporary folder")
    args = parser.parse_args(argv)
    commits = {label: git("rev-parse", "--verify", f"{ref}^{{commit}}") for label, ref in
               (("base", args.base), ("head", args.head))}
    folder = args.keep or Path(tempfile.mkdtemp(prefix="normlab-compare-"))
    folder.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="normlab-compare-cache-"))
    trees = {label: folder / f"tree-{label}" for label in commits}
    table = jobs(args.epochs, args.data, args.extra)
    try:
        for label, commit in commits.items():
            git("worktree", "add", "--detach", "--force", str(trees[label]), commit)
        work = [(label, name) for name in table for label in commits]
        with ThreadPoolExecutor(args.parallel) as pool:
            failures = dict(zip(work, pool.map(
                lambda item: run(trees[item[0]], table[item[1]], folder / item[0] / item[1], cache), work)))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        for tree in trees.values():
            if tree.exists():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False,
                               capture_output=True)
    print(f"base {args.base} = {commits['base'][:10]} · head {args.head} = {commits['head'][:10]} · "
          f"{args.epochs} epochs of {args.data} · extra: {' '.join(args.extra) or '-'} · "
          f"NORMLAB_CPU_KERNEL={os.environ.get('NORMLAB_CPU_KERNEL', '1')}\n")
    print(f"{'job':24s} {'largest difference':>18s}  where")
    worst_overall = 0.0
    for name in table:
        failed = {label: failures[(label, name)] for label in commits if failures[(label, name)]}
        if failed:
            worst_overall = math.inf
            print(f"{name:24s} {'failed':>18s}  " + "; ".join(f"{k}: {v.splitlines()[-1]}" for k, v in failed.items()))
            continue
        diff, where = largest_difference(*(numbers(folder / label / name) for label in commits))
        worst_overall = max(worst_overall, diff)
        print(f"{name:24s} {diff:18.3g}  {where}")
    print(f"\nlargest difference over every job: {worst_overall:.3g}" + ("" if args.keep else f"  (runs in {folder})"))
    return 0 if worst_overall == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
