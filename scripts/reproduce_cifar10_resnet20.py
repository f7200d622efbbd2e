#!/usr/bin/env python
"""Run the ResNet-20 CIFAR-10 study (results/reference/cifar10_resnet20/) in stretches of a few hours.

The study is longer than one sitting: the regime map (experiments/gn_regime.yaml) and Figure 1
(experiments/gn_batch_size_resnet20.yaml) need many hours of CPU. This script runs its planned jobs in a
fixed order, `--slots` one-thread jobs at a time, and starts a job only if it can finish before `--hours`
run out, so every stretch ends with finished runs only. A job too long for any stretch (a 40-epoch run at
this machine kind's pace) starts with `--carry-over` only: stopped at the deadline, it resumes from its last
epoch's checkpoint in the next stretch on the same machine. A rerun skips what is done (normlab skips a folder
whose summary.json says done for the same config), so stretches on different machines add up:

    NORMLAB_CIFAR10_JPEG=/path/to/cifar10-jpeg.zip python scripts/reproduce_cifar10_resnet20.py \\
        --published /path/to/main/results/reference/cifar10_resnet20/runs --hours 2.8

--published names the runs/ folder of a checkout of main: its finished runs are copied into the sweep folder
first, so none runs twice, and each run that finishes is copied there (config.yaml, metrics.jsonl,
summary.json; no checkpoints) and committed in that checkout, those paths only. Parts, in order: the map at 5, 10, 20
and 40 epochs, seed 0 then seed 1; its 80-epoch extension (--extend, only if the README's rule asks for it);
the Figure 1 grid at --grid-epochs (the budget the README's rule gave), its ablation of groups last.
The jobs run the normlab of `--study`, a git worktree at the study's commit S (default: this script's own
checkout). This script only schedules, so main's copy may drive a worktree at S:

    git worktree add --detach ../study cb1d2df
    NORMLAB_CIFAR10_JPEG=... python scripts/reproduce_cifar10_resnet20.py --study ../study --epoch-seconds 260 \
        --published results/reference/cifar10_resnet20/runs --hours 2.7

The study's jobs pin bf16, which a CPU without AVX512-BF16 or AMX emulates many times slower, so on such a CPU
the script starts nothing and says so (exit 2) unless given `--any-cpu`.

Before the study is published, `--rerun NAME` runs one finished run again at S (into the sweep's rerun/ folder)
and compares every number it recorded with the finished run's, timings and the CPU's name aside: exit 0 when all
are identical.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from normlab.engine.cpu_features import has_fast_bf16
from normlab.records import FINAL_STATUSES, RunDir, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SWEEP = Path("results") / "cifar10_resnet20" / "study"  # in the study's checkout (--study)
KEPT = ("config.yaml", "metrics.jsonl", "summary.json")  # what a finished run publishes
TIMINGS = ("images_per_sec", "epoch_time_s", "wall_time_s")  # what a rerun may change
MACHINE = ("cpu_kernel",)  # provenance a rerun may change: the C++ kernel's file name is hashed from the CPU
MAP_BUDGETS = (5, 10, 20, 40)
MAP_SETTINGS = (("bn", 32), ("bn", 2), ("gn8", 32))


def job(experiment: str, norm: str, n: int, seed: int, epochs: int, **extra) -> dict:
    overrides = {"norm": norm, "batch.per_worker": n, "seed": seed, "trainer.epochs": epochs, **extra}
    return {"experiment": experiment, "overrides": overrides, "epochs": epochs}


def folder_name(overrides: dict) -> str:
    """The run folder's name, as Hydra's hydra.job.override_dirname writes it: the overrides, sorted."""
    return ",".join(sorted(f"{k}={v}" for k, v in overrides.items()))


def plan(extend: bool, grid_epochs: int | None) -> list[dict]:
    jobs = [job("gn_regime", norm, n, seed, e) for seed in (0, 1) for e in MAP_BUDGETS for norm, n in MAP_SETTINGS]
    if extend:
        jobs += [job("gn_regime", norm, n, seed, 80) for seed in (0, 1) for norm, n in MAP_SETTINGS]
    if grid_epochs is not None:
        grid = "gn_batch_size_resnet20"
        e = grid_epochs
        jobs += [job(grid, norm, n, seed, e) for seed in (0, 1, 2) for norm, n in MAP_SETTINGS]
        jobs += [job(grid, "bn", n, seed, e) for seed in (0, 1) for n in (16, 8, 4)]
        jobs += [job(grid, norm, 32, seed, e) for seed in (0, 1) for norm in ("ln", "in")]
        jobs += [job(grid, "gn8", 2, 0, e)]
        jobs += [job(grid, "gn", 32, seed, e, **{"norm.groups": g}) for g in (2, 4, 16) for seed in (0, 1)]
    seen: set[str] = set()  # a map run at the grid's budget is a run of the grid: one job
    return [j for j in jobs if not (folder_name(j["overrides"]) in seen or seen.add(folder_name(j["overrides"])))]


def job_command(j: dict, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "normlab.train", f"experiment={j['experiment']}",
            *[f"{k}={v}" for k, v in j["overrides"].items()], *extra, f"hydra.run.dir='{run_dir}'"]


def summary_of(folder: Path) -> dict | None:
    return RunDir(folder).read_summary()


def is_finished(folder: Path) -> bool:
    return RunDir(folder).is_final()


def copy_finished(source_dir: Path, target_dir: Path) -> int:
    """The finished runs in `source_dir` into `target_dir`, where it has none of its own: their KEPT files."""
    copied = 0
    for source in sorted(p for p in source_dir.iterdir() if p.is_dir()) if source_dir.is_dir() else []:
        target = target_dir / source.name
        if is_finished(source) and not is_finished(target):
            target.mkdir(parents=True, exist_ok=True)
            for name in KEPT:
                shutil.copyfile(source / name, target / name)
            copied += 1
    return copied


def commit(runs: Path, message: str) -> None:
    """Commit what changed under `runs` in its git checkout, and nothing else (retried: another git command
    may hold the index for a moment)."""
    for attempt in range(10):
        added = subprocess.run(["git", "add", "--", "."], cwd=runs, capture_output=True, text=True)
        done = added.returncode == 0 and subprocess.run(
            ["git", "commit", "--quiet", "-m", message, "--", "."], cwd=runs, capture_output=True, text=True)
        if done and (done.returncode == 0 or "nothing" in done.stdout + done.stderr):
            return
        time.sleep(3)
    print(f"could not commit {runs}: {(done or added).stderr.strip()}", file=sys.stderr, flush=True)


def recorded_numbers(folder: Path) -> dict[str, object]:
    """Every value a run recorded (each epoch's metrics, its summary), timings and the machine aside, keyed by
    where it is."""
    rows = read_metrics(folder / "metrics.jsonl")
    found = {f"epoch {row['epoch']}: {k}": v for row in rows for k, v in row.items() if k not in TIMINGS}
    found.update({f"summary: {k}": v for k, v in (summary_of(folder) or {}).items() if k not in TIMINGS + MACHINE})
    return found


def rerun_check(name: str, study: Path, sweep: Path, extra: list[str], nice: int) -> int:
    """Run the finished run `name` again at the study's commit and say whether every number it recorded is the
    same: 0 if so, 1 if any differs (each listed), 2 if there is no such finished run."""
    finished = summary_of(sweep / name)
    if not is_finished(sweep / name):
        print(f"reproduce: --rerun {name!r}: no finished run of that name in {sweep}", file=sys.stderr)
        return 2
    again = sweep / "rerun" / name
    overrides = dict(item.split("=", 1) for item in name.split(","))
    command = job_command({"experiment": finished["experiment"], "overrides": overrides}, again, extra)
    again.parent.mkdir(parents=True, exist_ok=True)
    if not is_finished(again):  # a rerun that finished before is compared, not trained again
        print(f"{time.strftime('%H:%M')} rerun: {shlex.join(command[3:-1])}", flush=True)
        with open(sweep / "rerun" / f"{name}.log", "a") as log:
            subprocess.run(command, cwd=study, stdout=log, stderr=subprocess.STDOUT, check=False,
                           preexec_fn=lambda: os.nice(nice))
    if not is_finished(again):
        print(f"reproduce: the rerun of {name} did not finish: see {again.parent / (name + '.log')}", file=sys.stderr)
        return 1
    first, second = recorded_numbers(sweep / name), recorded_numbers(again)
    for key in MACHINE:
        if finished.get(key) != summary_of(again).get(key):
            print(f"  another machine: {key}: {finished.get(key)!r} then {summary_of(again).get(key)!r}")
    differ = [k for k in sorted(first.keys() | second.keys()) if first.get(k) != second.get(k)]
    for key in differ:
        print(f"  differs: {key}: {first.get(key)!r} then {second.get(key)!r}")
    print(f"{time.strftime('%H:%M')} rerun of {name} at {finished.get('git_commit')}: {len(first)} numbers compared "
          f"(timings aside), {'all identical' if not differ else f'{len(differ)} differ'}", flush=True)
    return 1 if differ else 0


def epochs_done(folder: Path) -> int:
    """The epochs a run has recorded: a stopped run resumes after the last of them, from its checkpoint."""
    return len(read_metrics(folder / "metrics.jsonl"))


def seconds_needed(j: dict, sweep: Path, rate: float, start: float) -> float:
    """What the job still needs: its epochs left at `rate`, with a tenth to spare, and `start` to load its data."""
    return 1.1 * max(j["epochs"] - epochs_done(sweep / folder_name(j["overrides"])), 0) * rate + start


def next_job(pending: list[dict], sweep: Path, rate: float, start: float, left: float, stretch: float | None,
             carry_over: bool) -> dict | None:
    """The first pending job, in the plan's order, that can finish in the `left` seconds. With `carry_over`, also
    one that could not finish even in a whole stretch (`stretch` seconds), if one epoch fits: it runs to the
    deadline and resumes from its checkpoint in the next stretch on this machine."""
    for j in pending:
        need = seconds_needed(j, sweep, rate, start)
        if need <= left or (carry_over and stretch is not None and need > stretch and left >= 1.1 * rate + start):
            return j
    return None


def seconds_per_epoch(sweep: Path, default: float) -> float:
    """The slowest per-epoch wall time among this sweep's finished runs (default with none)."""
    rates = [s["wall_time_s"] / s["epochs"] for s in map(summary_of, sweep.iterdir() if sweep.is_dir() else [])
             if isinstance(s, dict) and s.get("status") in FINAL_STATUSES and s.get("epochs") and s.get("wall_time_s")]
    return max(rates) if rates else default


def planning_rate(sweep: Path, given: float | None) -> float:
    """Seconds per epoch to plan with: the one given (measured on a quiet machine), else the slowest measured."""
    return given if given is not None else seconds_per_epoch(sweep, 95.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=None, help="time left in this stretch (default: no limit)")
    parser.add_argument("--slots", type=int, default=2, help="one-thread jobs at a time")
    parser.add_argument("--study", type=Path, default=ROOT, help="the checkout at the study's commit S whose normlab "
                        "runs the jobs (default: this script's; the scheduling here never changes a run's numbers)")
    parser.add_argument("--sweep", type=Path, help="the sweep folder (default: results/cifar10_resnet20/study in "
                        "--study, git-ignored)")
    parser.add_argument("--published", type=Path, help="main's runs/ folder: copied in first, each finished run "
                        "copied out and committed")
    parser.add_argument("--extend", action="store_true", help="the map's 80-epoch runs (the README's rule)")
    parser.add_argument("--grid-epochs", type=int, help="the Figure 1 grid's budget (the README's rule)")
    parser.add_argument("--epoch-seconds", type=float, help="seconds per epoch to plan with (default: the slowest "
                        "finished run's, which a run on a loaded machine inflates)")
    parser.add_argument("--start-seconds", type=float, default=120.0, help="what to plan for a job's start, its "
                        "data load (default: 120)")
    parser.add_argument("--carry-over", action="store_true", help="also start jobs too long for a whole stretch: "
                        "they run to the deadline and resume from their checkpoint in the next stretch on this "
                        "machine (on another, they start over)")
    parser.add_argument("--nice", type=int, default=5, help="the jobs' niceness (numbers do not depend on it)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is left, run nothing")
    parser.add_argument("--rerun", metavar="NAME", help="run the finished run NAME again at S and compare every "
                        "number it recorded, timings aside (the check before publishing)")
    parser.add_argument("--any-cpu", action="store_true", help="run even on a CPU without AVX512-BF16 or AMX, where "
                        "the study's bf16 is emulated and many times slower")
    parser.add_argument("extra", nargs="*", help="overrides given to every job (tests only: they change the runs)")
    args = parser.parse_args()
    overrides = [*args.extra, *(args.rerun.split(",") if args.rerun else [])]
    if not args.dry_run and not os.environ.get("NORMLAB_CIFAR10_JPEG") and not any(
            a.startswith("data=") for a in overrides):
        print("reproduce: NORMLAB_CIFAR10_JPEG is not set: point it at cifar10-jpeg.zip", file=sys.stderr)
        return 2
    if not (args.dry_run or args.any_cpu or has_fast_bf16()):
        print("reproduce: this CPU has neither AVX512-BF16 nor AMX: the study's jobs pin trainer.precision=bf16 (so "
              "that every machine computes the same numbers), which this CPU emulates, many times slower than on one "
              "that has them (the study README's pace); run the study there, or pass --any-cpu", file=sys.stderr)
        return 2
    deadline = None if args.hours is None else time.time() + args.hours * 3600
    args.study = args.study.resolve()
    args.sweep = args.sweep or args.study / SWEEP
    args.sweep.mkdir(parents=True, exist_ok=True)
    if args.published is not None:
        args.published.mkdir(parents=True, exist_ok=True)
        print(f"copied {copy_finished(args.published, args.sweep)} published runs into {args.sweep}", flush=True)
    if args.rerun is not None:
        return rerun_check(args.rerun, args.study, args.sweep, args.extra, args.nice)
    jobs = plan(args.extend, args.grid_epochs)
    pending = [j for j in jobs if not is_finished(args.sweep / folder_name(j["overrides"]))]
    print(f"{len(jobs)} jobs planned, {len(jobs) - len(pending)} finished, {len(pending)} to run", flush=True)
    if args.dry_run:
        for j in pending:
            print(f"  {j['experiment']}: {folder_name(j['overrides'])}")
        return 0
    running: dict[subprocess.Popen, dict] = {}
    failed = 0
    stop = False

    def on_signal(signum, frame):  # stop starting jobs; the running ones get the signal and checkpoint
        nonlocal stop
        stop = True
        for proc in running:
            proc.send_signal(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    logs = args.sweep / "logs"
    logs.mkdir(exist_ok=True)
    while pending or running:
        for proc, j in list(running.items()):
            if proc.poll() is None:
                continue
            del running[proc]
            name = folder_name(j["overrides"])
            ok = is_finished(args.sweep / name)
            failed += not ok
            print(f"{time.strftime('%H:%M')} {'finished' if ok else f'NOT finished (exit {proc.returncode})'}: "
                  f"{name}", flush=True)
            if ok and args.published is not None:
                copy_finished(args.sweep, args.published)
                commit(args.published, f"cifar10_resnet20 study: publish finished runs (latest {name})")
        if deadline is not None and time.time() >= deadline and running:  # the stretch is over
            for proc, j in running.items():
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                name = folder_name(j["overrides"])
                print(f"{time.strftime('%H:%M')} stopped at the deadline after {epochs_done(args.sweep / name)} of "
                      f"{j['epochs']} epochs (resumes next stretch): {name}", flush=True)
            running.clear()
            break
        rate = planning_rate(args.sweep, args.epoch_seconds)
        while not stop and pending and len(running) < args.slots:
            left = float("inf") if deadline is None else deadline - time.time()
            j = next_job(pending, args.sweep, rate, args.start_seconds, left, args.hours and args.hours * 3600,
                         args.carry_over)
            if j is None:
                break
            pending.remove(j)
            name = folder_name(j["overrides"])
            command = job_command(j, args.sweep / name, args.extra)
            log = open(logs / f"{name}.log", "a")
            carried = " (carries over)" if seconds_needed(j, args.sweep, rate, args.start_seconds) > left else ""
            print(f"{time.strftime('%H:%M')} start{carried}: {shlex.join(command[3:-1])}", flush=True)
            running[subprocess.Popen(command, cwd=args.study, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=lambda: os.nice(args.nice))] = j
        if not running:
            break
        time.sleep(5)
    left = [j for j in jobs if not is_finished(args.sweep / folder_name(j["overrides"]))]
    print(f"{len(jobs) - len(left)} of {len(jobs)} jobs finished, {len(left)} left, {failed} failed this stretch",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
