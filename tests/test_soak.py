"""Soak tests (slow): a sweep of many tiny jobs killed with SIGKILL again and again, then rerun; two sweeps at once.

Afterwards every job is done, its metrics hold each epoch exactly once, and its summary agrees with them.
"""

from __future__ import annotations

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


def assert_every_job_done_once(sweep_dir: Path, jobs: int) -> None:
    folders = [p.parent for p in sweep_dir.rglob("config.yaml") if ".hydra" not in p.parts]
    assert len(folders) == jobs
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        epochs = [row["epoch"] for row in read_metrics(folder / "metrics.jsonl")]
        assert summary["status"] == "done", folder
        assert epochs == list(range(1, EPOCHS + 1)), (folder, epochs)  # none missing, none twice
        assert summary["epochs"] == len(epochs)


def test_a_sweep_killed_at_random_moments_finishes_every_job_exactly_once(tmp_path):
    jobs, rng = 100, random.Random(0)
    for _ in range(4):
        proc = start(tmp_path, jobs)
        time.sleep(rng.uniform(4, 15))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc = subprocess.run(sweep_command(tmp_path, jobs), cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_every_job_done_once(tmp_path, jobs)


def test_two_sweeps_into_one_folder_split_the_jobs_and_never_double_one(tmp_path):
    jobs = 40
    first, second = start(tmp_path, jobs), start(tmp_path, jobs)
    assert {first.wait(timeout=1800), second.wait(timeout=1800)} <= {0, 1}  # 1: it skipped a job as busy
    assert_every_job_done_once(tmp_path, jobs)  # a job one sweep skipped as busy, the other one finished
