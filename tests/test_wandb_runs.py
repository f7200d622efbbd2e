"""W&B as its users expect: one run per job across kills and resumes, every epoch once, the epoch as the step,
the run's records as an artifact. Read back offline from W&B's own transaction logs (.wandb)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from normlab.records import read_metrics
from tests.conftest import REPO, parse_wandb_log, read_wandb_records, record_key, run_cli

pytest.importorskip("wandb")
pytestmark = pytest.mark.slow  # jobs in subprocesses, one of them killed and resumed

JOB = ["data=synthetic", "data.num_train=512", "data.size=16", "model=resnet8", "batch.per_worker=8",
       "batch.workers=2", "trainer.epochs=4", "trainer.progress=false", "trainer.threads=1", "trainer.checkpoint=true",
       "logger=wandb", "logger.mode=offline"]


def history_and_ids(log_file):
    """(the epochs of its history records, its run ids, its artifacts' names) in one .wandb file."""
    epochs, ids, artifacts = [], set(), []
    for record in parse_wandb_log(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
        elif kind == "history":
            epochs += [json.loads(i.value_json) for i in record.history.item if record_key(i) == "epoch"]
        elif kind == "artifact":
            artifacts.append(record.artifact.name)
    return epochs, ids, artifacts


@pytest.fixture
def inherited_wandb_service():
    """A W&B service started by this (the launching) process, its token in the environment the jobs inherit:
    what any earlier in-process W&B run leaves behind (in CI, test_train's)."""
    import wandb

    wandb.setup()
    assert os.environ.get("WANDB_SERVICE")
    yield
    wandb.teardown()


def test_a_killed_and_resumed_job_is_one_wandb_run_with_every_epoch_once(tmp_path, inherited_wandb_service):
    run_dir = tmp_path / "job"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "normlab.train", *JOB, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(run_dir / "metrics.jsonl")) >= 2:
            proc.send_signal(signal.SIGKILL)  # the job; W&B's service writes what it was given, and ends
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    resumed = run_cli(*JOB, f"hydra.run.dir={run_dir}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 2  # one W&B process per attempt ...
    read_wandb_records(next(runs[-1].glob("*.wandb")))  # (the second's log complete)
    (killed, killed_ids, _), (last, last_ids, artifacts) = (history_and_ids(next(r.glob("*.wandb"))) for r in runs)
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id] and last_ids == {run_id}  # ... one run
    assert killed_ids <= {run_id}  # (the killed one's run record, when its service wrote it before the kill)
    assert len(killed) == len(set(killed)) <= 2  # what the killed attempt's service wrote: epochs 1-2 or fewer
    assert last == [1, 2, 3, 4]  # the resumed one sends every epoch, in order: W&B has each once
    assert artifacts == [f"records-{run_id}"]


def test_a_job_preempted_in_its_first_epoch_goes_on_in_the_same_wandb_run(tmp_path):
    """No epoch recorded yet, but a checkpoint at the stopped step: the rerun resumes, so W&B continues its run."""
    run_dir = tmp_path / "job"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "normlab.train", *JOB, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (run_dir / "wandb.json").exists():
        time.sleep(0.02)  # W&B's run has started: training begins now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "preempted" and stopped["preempted_at"]["epoch"] == 1, stopped
    assert read_metrics(run_dir / "metrics.jsonl") == []
    first_id = json.loads((run_dir / "wandb.json").read_text())["id"]

    resumed = run_cli(*JOB, f"hydra.run.dir={run_dir}", timeout=300)
    assert resumed.returncode == 0 and "in epoch 1 at step" in resumed.stdout + resumed.stderr, resumed.stderr
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [first_id, first_id]
    assert json.loads((run_dir / "wandb.json").read_text())["id"] == first_id
    last, last_ids, _ = history_and_ids(next(runs[-1].glob("*.wandb")))
    assert last == [1, 2, 3, 4] and last_ids == {first_id}


def test_a_job_started_over_gets_a_new_run_and_the_epoch_is_the_step(tmp_path):
    job = [*JOB[:6], "trainer.epochs=2", *JOB[7:], f"hydra.run.dir={tmp_path}"]
    assert run_cli(*job, timeout=300).returncode == 0
    first = json.loads((tmp_path / "wandb.json").read_text())
    assert run_cli(*job, "trainer.force=true", timeout=300).returncode == 0
    second = json.loads((tmp_path / "wandb.json").read_text())
    assert second["id"] != first["id"]
    records = read_wandb_records(next(sorted(tmp_path.glob("wandb/offline-run-*"))[-1].glob("*.wandb")))
    metrics = {r.metric.name or r.metric.glob_name: r.metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert metrics["*"].step_metric == "epoch"
    assert metrics["val_error"].summary.min and metrics["train_error"].summary.min


def test_the_sweeps_summary_run_carries_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", *JOB[:6], "trainer.epochs=1", *JOB[7:], "norm=bn,gn", "model.width=32",
                     f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode == 0  # its callback logs the summary run
    (summary_run,) = [r for r in sweep.glob("wandb/offline-run-*")]
    run_id = summary_run.name.rsplit("-", 1)[1]  # W&B names the folder after the run
    assert f"W&B sweep summary: run {run_id} (" in result.stdout + result.stderr  # the user is told which run
    records = read_wandb_records(next(summary_run.glob("*.wandb")))
    logged = {record_key(i) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert "report/fig_batch_size/_type" in logged and "runs_table/_type" in logged  # W&B flattens its media
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert "report" in [a.type for a in artifacts]
    assert (sweep / "report" / "report.md").is_file()
