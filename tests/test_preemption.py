"""Preemption as schedulers send it, with real signals: SIGTERM, SIGUSR1, SIGUSR2 to a training job.

The job finishes its step, checkpoints that step, records itself as ``preempted`` and exits with 128 + the
signal (or hands the signal to the handler installed before normlab's: submitit's requeues the job). A rerun
goes on from the next step and ends with an uninterrupted run's metrics (the reference: the same job never
signalled).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.engine.checkpoint import read_checkpoint
from normlab.records import read_metrics
from tests.conftest import REPO, run_cli

# Epochs of about a second on a busy CPU, and enough of them that a fast one is still training when the signal
# sent after the first epoch arrives.
EPOCHS = 6
JOB = ["data=synthetic", "data.num_train=384", "data.size=16", "model=resnet8", "batch.per_worker=8",
       "batch.workers=2", f"trainer.epochs={EPOCHS}", "trainer.progress=false", "trainer.threads=1"]
TIMING_KEYS = {"images_per_sec", "epoch_time_s"}


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_epochs(folder_glob: Path, pattern: str, epochs: int, proc: subprocess.Popen, timeout: float = 240) -> Path:
    """The metrics file under `folder_glob` matching `pattern` once it holds `epochs` rows (the job still running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in folder_glob.glob(pattern):
            if len(read_metrics(path)) >= epochs:
                return path
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError("the job did not reach its epoch in time")


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert run_cli(*JOB, f"hydra.run.dir={folder}").returncode == 0
    return comparable(read_metrics(folder / "metrics.jsonl"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_a_signal_mid_run_records_preempted_exits_128_plus_it_and_the_rerun_ends_as_if_uninterrupted(
        tmp_path, signum, uninterrupted):
    proc = start([sys.executable, "-m", "normlab.train", *JOB, f"hydra.run.dir={tmp_path}"])
    wait_for_epochs(tmp_path, "metrics.jsonl", 1, proc)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output and f"preempted by {signal.Signals(signum).name}" in output
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) < EPOCHS  # no partial epoch
    stopped_in = stopped_at_a_step(tmp_path, len(rows))
    assert f"in epoch {stopped_in['epoch']} after step {stopped_in['step']} of {STEPS}" in output

    resumed = run_cli(*JOB, f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0
    assert f"in epoch {stopped_in['epoch']} at step {stopped_in['step'] + 1} of {STEPS}" in resumed.stdout + resumed.stderr
    assert comparable(read_metrics(tmp_path / "metrics.jsonl")) == uninterrupted
    assert summary(tmp_path)["status"] == "done"


STEPS = 384 // 16  # per epoch: data.num_train over N·W


def stopped_at_a_step(folder: Path, epochs_done: int) -> dict:
    """The preempted run's summary and checkpoint agree on where it stopped: a step of the epoch after the last
    recorded one (the checkpoint holds that step, with the epoch's totals so far)."""
    record = summary(folder)
    assert record["status"] == "preempted" and record["preempted_at"]["epoch"] == epochs_done + 1
    state = read_checkpoint(folder / "checkpoint.pt")
    assert state["epoch"] == epochs_done and state["stopped_epoch"]["steps"] == record["preempted_at"]["step"]
    assert 1 <= state["stopped_epoch"]["steps"] <= STEPS and state["stopped_epoch"]["count"] == 16 * state[
        "stopped_epoch"]["steps"]
    assert state["schedule"]["last_step"] == epochs_done * STEPS + state["stopped_epoch"]["steps"]
    trained = sum(r["epoch_time_s"] for r in read_metrics(folder / "metrics.jsonl"))  # and on the time it trained
    assert state["wall_time_s"] == pytest.approx(trained, abs=1e-6)
    assert record["wall_time_s"] == pytest.approx(trained + state["stopped_epoch"]["time_s"], abs=1e-3)
    return record["preempted_at"]


def test_a_streamed_run_signalled_twice_goes_on_from_each_stopped_step_to_an_uninterrupted_runs_metrics(tmp_path):
    """Streamed images (a DataLoader worker decodes them): each crop is seeded by its place in the epoch, so the
    rerun's epoch from the stopped step on is the uninterrupted epoch's."""
    from tests.test_data import write_image_tree

    write_image_tree(tmp_path / "images", per_class=(32, 4), size=(18, 18))
    job = ["data=imagefolder", f"data.root={tmp_path / 'images'}", "data.image_size=16", "data.in_memory_max_gb=0",
           "data.loader_workers=1", *(key for key in JOB if not key.startswith("data"))]
    assert run_cli(*job, f"hydra.run.dir={tmp_path / 'whole'}").returncode == 0
    uninterrupted = comparable(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    run = tmp_path / "run"
    for signal_after in (1, 3):  # epochs recorded before each signal
        proc = start([sys.executable, "-m", "normlab.train", *job, f"hydra.run.dir={run}"])
        wait_for_epochs(run, "metrics.jsonl", signal_after, proc)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in output, output[-3000:]
        summary_before = summary(run)
        assert summary_before["status"] == "preempted" and summary_before["preempted_at"]["step"] >= 1
    resumed = run_cli(*job, f"hydra.run.dir={run}")
    assert resumed.returncode == 0 and f"at step {summary_before['preempted_at']['step'] + 1} of" in resumed.stdout + resumed.stderr
    assert comparable(read_metrics(run / "metrics.jsonl")) == uninterrupted


EARLIER_HANDLER = """
import signal, sys
marker, signum = sys.argv[1], int(sys.argv[2])
def earlier(signum, frame):
    open(marker, "w").write(signal.Signals(signum).name)
signal.signal(signum, earlier)
sys.argv = ["normlab-train", *sys.argv[3:]]
from normlab.train import cli
cli()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_the_handler_installed_before_normlabs_is_called_after_the_run_is_recorded(tmp_path, signum):
    marker, run = tmp_path / "earlier_handler_ran", tmp_path / "run"
    proc = start([sys.executable, "-c", EARLIER_HANDLER, str(marker), str(int(signum)), *JOB,
                  f"hydra.run.dir={run}"])
    wait_for_epochs(run, "metrics.jsonl", 1, proc)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert marker.read_text() == signal.Signals(signum).name, output[-3000:]
    assert proc.returncode == 128 + signum and summary(run)["status"] == "preempted"


def test_a_signalled_multirun_starts_no_further_job_and_exits_non_zero(tmp_path):
    proc = start([sys.executable, "-m", "normlab.train", "-m", *JOB, "seed=0,1,2", f"hydra.sweep.dir={tmp_path}"])
    first = wait_for_epochs(tmp_path, "*/metrics.jsonl", 1, proc).parent
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert summary(first)["status"] == "preempted"
    assert [p.parent for p in tmp_path.glob("*/config.yaml")] == [first]  # no later job began


def submitit_task(parent: int) -> int | None:
    """The pid of the submitit task (``submitit.core._submit``) below process `parent`, if it runs."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    stack = [parent]
    while stack:
        pid = stack.pop()
        try:
            if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
        stack += children.get(pid, [])
    return None


def test_through_submitits_local_executor_sigusr2_requeues_and_the_job_resumes_to_done(tmp_path, uninterrupted):
    proc = start([sys.executable, "-m", "normlab.train", "-m", "hydra/launcher=submitit_local", *JOB,
                  f"hydra.sweep.dir={tmp_path}"])
    metrics = wait_for_epochs(tmp_path, "**/metrics.jsonl", 1, proc, timeout=300)
    task = submitit_task(proc.pid)
    assert task is not None
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before the time limit, and submitit's local executor too
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*_log.*"))
    assert "preempted by SIGUSR2" in logs and "Requeued job" in logs, logs[-3000:]
    assert comparable(read_metrics(metrics)) == uninterrupted
    assert summary(metrics.parent)["status"] == "done"
