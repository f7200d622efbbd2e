"""Soak tests (slow): two sweeps at once into one folder; and the soak at scale: 200 jobs in a basic and a
joblib sweep side by side, 30 random SIGKILLs and SIGTERMs, each killed sweep started again over its jobs left.

Afterwards every job is done, its metrics hold each epoch exactly once, and its summary agrees with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.records import read_metrics
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow
EPOCHS = 3


def sweep_command(sweep_dir: Path, jobs: int) -> list[str]:
    return [sys.executable, "-m", "normlab.train", "-m", *TINY, f"trainer.epochs={EPOCHS}", "data.num_train=32",
            f"seed=range(0,{jobs})", f"hydra.sweep.dir={sweep_dir}"]


def start(sweep_dir: Path, jobs: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(sweep_command(sweep_dir, jobs), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def assert_every_job_done_once(sweep_dir: Path, jobs: int, epochs: int = EPOCHS) -> None:
    folders = [p.parent for p in sweep_dir.rglob("config.yaml") if ".hydra" not in p.parts]
    assert len(folders) == jobs
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        rows = [row["epoch"] for row in read_metrics(folder / "metrics.jsonl")]
        assert summary["status"] == "done", folder
        assert rows == list(range(1, epochs + 1)), (folder, rows)  # none missing, none twice
        assert summary["epochs"] == len(rows)


def test_two_sweeps_into_one_folder_split_the_jobs_and_never_double_one(tmp_path):
    jobs = 4
    first, second = start(tmp_path, jobs), start(tmp_path, jobs)
    assert {first.wait(timeout=1800), second.wait(timeout=1800)} <= {0, 1}  # 1: it skipped a job as busy
    assert_every_job_done_once(tmp_path, jobs)  # a job one sweep skipped as busy, the other one finished


# ---------------------------------------------------------------- the soak at scale

SOAK_JOBS = 100  # per sweep: two sweeps, 200 jobs
SOAK_KILLS = 30
SOAK_JOB = ["data=synthetic", "data.num_train=16", "data.num_test=16", "data.size=8", "model=resnet8", "model.width=8",
            "batch.per_worker=4", "batch.workers=2", "trainer.epochs=2", "trainer.progress=false", "trainer.threads=1",
            "trainer.channels_last=false"]
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


def soak_sweep(sweep_dir: Path, launcher: str) -> subprocess.Popen:
    """The sweep over the jobs not yet done (as a rerun script would start it; its folders are the same).
    Without the progress callback, whose check of every job up front would cost more than the jobs here; in
    batches of 10, since Hydra composes every job of a batch before it launches the first, and a sweep here is
    killed a job or two after each start."""
    done = {json.loads(text)["seed"] for text in done_summaries(sweep_dir).values()}
    seeds = ",".join(str(seed) for seed in range(SOAK_JOBS) if seed not in done) or "0"
    command = [sys.executable, "-m", "normlab.train", "-m", *SOAK_JOB, *LAUNCHERS[launcher], f"seed={seeds}",
               f"hydra.sweep.dir={sweep_dir}", "~hydra.callbacks.sweep_progress", "hydra.sweeper.max_batch_size=10"]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def epochs_written(sweep_dir: Path) -> int:
    """Lines in all the sweep's metrics files: it grows while the sweep trains."""
    return sum(len(path.read_bytes().splitlines()) for path in sweep_dir.glob("*/metrics.jsonl"))


def done_summaries(sweep_dir: Path) -> dict[Path, bytes]:
    """The summary.json bytes of every job that is done."""
    found = {}
    for path in sweep_dir.glob("*/summary.json"):
        text = path.read_bytes()
        with contextlib.suppress(ValueError):
            if json.loads(text).get("status") == "done":
                found[path] = text
    return found


def done_count(sweep_dir: Path) -> int:
    return len(done_summaries(sweep_dir))


SOAK_MINUTES = 20  # a bound that only a hung sweep reaches: the soak takes a few minutes on 2 free cores


def test_a_soak_of_two_hundred_jobs_in_two_sweeps_signalled_at_random_finishes_each_job_once(tmp_path):
    """A basic and a joblib sweep of 100 jobs each, side by side; 30 times in all, a sweep that has jobs left is
    sent SIGKILL or SIGTERM (15 of each, in a seeded order) in its whole process group, a seeded 1-4 epochs after
    it last started and 0-0.3 s later (in a step, a checkpoint, between jobs), and started again; then both are
    rerun until they exit 0. Every job is done once, no epoch twice, no done summary ever changes, and
    normlab-report counts 200 runs, all done. Kills are paced by epochs written, not by the clock, so a fast
    machine cannot finish the jobs before the 30th kill."""
    started, deadline = time.time(), time.time() + SOAK_MINUTES * 60
    signals = ["SIGKILL", "SIGTERM"] * (SOAK_KILLS // 2)
    random.Random(24).shuffle(signals)
    rngs = {launcher: random.Random(f"24-{launcher}") for launcher in LAUNCHERS}
    dirs = {launcher: tmp_path / launcher for launcher in LAUNCHERS}
    procs = {launcher: soak_sweep(folder, launcher) for launcher, folder in dirs.items()}
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    reruns, first_seen = 0, {}

    def keep_summaries() -> None:  # a done summary, once seen, never changes
        for folder in dirs.values():
            for path, text in done_summaries(folder).items():
                assert first_seen.setdefault(path, text) == text, f"{path} was rewritten"

    def next_kill(launcher: str) -> dict:
        rng = rngs[launcher]
        return {"rows": epochs_written(dirs[launcher]) + rng.randint(1, 4), "delay": rng.uniform(0.0, 0.3), "at": None}

    def restart(launcher: str) -> None:
        nonlocal reruns
        procs[launcher].wait(timeout=120)
        procs[launcher], plans[launcher] = soak_sweep(dirs[launcher], launcher), next_kill(launcher)
        reruns += 1

    plans = {launcher: next_kill(launcher) for launcher in procs}
    while signals:
        assert time.time() < deadline, f"the soak ran past {SOAK_MINUTES} minutes with {len(signals)} kills left"
        unfinished = [launcher for launcher in procs if done_count(dirs[launcher]) < SOAK_JOBS]
        assert unfinished, f"every job was done after only {kills} kills"
        for launcher in unfinished:
            proc, plan = procs[launcher], plans[launcher]
            if proc.poll() is not None:  # it ended on its own (e.g. its jobs left were busy in a killed one's lock)
                keep_summaries()
                restart(launcher)
                continue
            if plan["at"] is None and epochs_written(dirs[launcher]) >= plan["rows"]:
                plan["at"] = time.time() + plan["delay"]
            if plan["at"] is None or time.time() < plan["at"] or not signals:
                continue
            keep_summaries()
            name = signals.pop()
            with contextlib.suppress(ProcessLookupError):  # unreaped, so its group exists even if it just ended
                os.killpg(proc.pid, getattr(signal, name))
            kills[name] += 1
            restart(launcher)
        time.sleep(0.1)
    while procs:  # rerun until each sweep ends cleanly
        assert time.time() < deadline, f"the soak ran past {SOAK_MINUTES} minutes"
        for launcher, proc in list(procs.items()):
            if proc.poll() is None:
                continue
            keep_summaries()
            if proc.returncode == 0 and done_count(dirs[launcher]) == SOAK_JOBS:
                del procs[launcher]
            else:
                restart(launcher)
        time.sleep(0.5)
    keep_summaries()

    for folder in dirs.values():
        assert_every_job_done_once(folder, SOAK_JOBS, epochs=2)
    report = subprocess.run([sys.executable, "-m", "normlab.cli", *map(str, dirs.values()), "--out",
                             str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"{2 * SOAK_JOBS} runs ({2 * SOAK_JOBS} done)" in report.stdout, report.stdout
    assert kills == {"SIGKILL": SOAK_KILLS // 2, "SIGTERM": SOAK_KILLS // 2}
    print(f"\nsoak: {2 * SOAK_JOBS} jobs, kills {kills}, sweep restarts {reruns}, "
          f"{(time.time() - started) / 60:.1f} minutes")
