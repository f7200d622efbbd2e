"""Run folders that can't be corrupted: one process each, checkpoints that can't run code, damaged files survived."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from normlab.errors import ConfigError, RunFolderBusy
from normlab.train import train
from normlab.records import RunDir, read_metrics
from tests.conftest import REPO, TINY


def test_a_second_process_on_a_held_run_folder_stops_at_once_and_changes_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.hold():
        before = sorted(p.name for p in run.path.iterdir())
        result = subprocess.run([sys.executable, "-m", "normlab.train", *TINY, f"hydra.run.dir={run.path}"],
                                capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{run.path} is in use by another normlab job (host " in result.stderr
        assert f"pid {os.getpid()}, started " in result.stderr
        assert not run.summary.exists() and not run.config.exists() and not run.metrics.exists()
        assert {p for p in before} <= {p.name for p in run.path.iterdir()}
    assert train_once(run)  # the lock went with its holder


def train_once(run: RunDir) -> dict:
    from tests.conftest import compose_config

    return train(compose_config(TINY), run.path)


def test_the_lock_refuses_a_second_holder_in_the_same_process_too(tmp_path):
    run = RunDir(tmp_path)
    with run.hold():
        with pytest.raises(RunFolderBusy, match="is in use by another normlab job"):
            with RunDir(tmp_path).hold():
                pass


def test_an_unreadable_summary_makes_the_folder_occupied_not_empty(tiny, tmp_path):
    """A finished run without a checkpoint whose summary.json was damaged: another config must not overwrite it."""
    train(tiny("trainer.checkpoint=false"), tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"cannot be read: summary\.json \(JSONDecodeError.*trainer\.force=true"):
        train(tiny("optim.base_lr=0.05"), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert train(tiny("optim.base_lr=0.05", "trainer.force=true"), tmp_path)["status"] == "done"


def test_a_broken_config_yaml_is_named(tiny, tmp_path):
    train(tiny(), tmp_path)
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config\.yaml \(.*Error"):
        train(tiny(), tmp_path)


class Planted:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_runs_no_code_and_is_moved_aside(tiny, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    train(tiny("trainer.epochs=1"), run)
    (run / "summary.json").unlink()  # as if killed after the checkpoint
    torch.save({"model": Planted(marker)}, run / "checkpoint.pt")
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)
    summary = train(tiny("trainer.epochs=1"), run)
    assert not marker.exists()
    assert summary["status"] == "done" and summary["epochs"] == 1  # started over
    assert any(p.name.startswith("checkpoint.pt.corrupt-") for p in run.iterdir())


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_and_metrics_follow_it(tiny, tmp_path, caplog):
    train(tiny("trainer.epochs=3"), tmp_path)
    (tmp_path / "summary.json").unlink()  # killed after epoch 3's checkpoint
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    summary = train(tiny("trainer.epochs=3"), tmp_path)
    assert "cannot be read" in caplog.text and "moved aside" in caplog.text
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # epoch 3 trained again from epoch 2's checkpoint
    assert summary["epochs"] == len(rows) == 3 and summary["status"] == "done"


def test_force_starts_a_folder_with_a_damaged_checkpoint_over(tiny, tmp_path):
    train(tiny("trainer.epochs=2"), tmp_path)
    (tmp_path / "summary.json").unlink()
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"garbage")
    summary = train(tiny("trainer.epochs=2", "trainer.force=true"), tmp_path)
    assert summary["status"] == "done" and summary["epochs"] == 2 == len(read_metrics(tmp_path / "metrics.jsonl"))
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2


def test_the_summary_counts_the_epochs_metrics_jsonl_holds_when_a_resume_fails(tiny, tmp_path):
    """A checkpoint that reads but does not fit the model: set aside, the job fails, the summary agrees with metrics."""
    train(tiny("trainer.epochs=2"), tmp_path)
    (tmp_path / "summary.json").unlink()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["model"] = {"nonsense": torch.zeros(1)}
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="does not fit this job .* moved aside"):
        train(tiny("trainer.epochs=2"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs"] == len(read_metrics(tmp_path / "metrics.jsonl"))


def test_a_run_that_fails_part_way_reports_the_time_of_the_epochs_it_trained(tiny, tmp_path, monkeypatch):
    """The summary's wall time is the recorded epochs' time summed, for a failure after a resume too."""
    from normlab.engine import trainer

    evaluate = trainer.evaluate_epoch

    def fails_in_epoch_3(spec, job, epoch):
        if epoch == 3:
            raise RuntimeError("boom in epoch 3")
        return evaluate(spec, job, epoch)

    monkeypatch.setattr(trainer, "evaluate_epoch", fails_in_epoch_3)
    for _ in range(2):  # started, then resumed from its epoch-2 checkpoint: the same epochs, the same time
        with pytest.raises(RuntimeError, match="boom in epoch 3"):
            train(tiny("trainer.epochs=4"), tmp_path)
        rows = read_metrics(tmp_path / "metrics.jsonl")
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["epochs"] == 2 == len(rows)
        assert summary["wall_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in rows), abs=1e-3)
        assert summary["wall_time_s"] > 0


@pytest.mark.parametrize("stopped_epoch", [
    {"steps": "3"}, [1, 2], {"steps": True, "loss": 1.0, "errors": 1.0, "errors_top5": 1.0, "count": 1, "time_s": 1.0},
    {"steps": 2.5, "loss": 1.0, "errors": 1.0, "errors_top5": 1.0, "count": 1, "time_s": 1.0},
    {"steps": -1, "loss": 1.0, "errors": 1.0, "errors_top5": 1.0, "count": 1, "time_s": 1.0},
    {"steps": 10_000, "loss": 1.0, "errors": 1.0, "errors_top5": 1.0, "count": 1, "time_s": 1.0},
    {"steps": float("inf"), "loss": 1.0, "errors": 1.0, "errors_top5": 1.0, "count": 1, "time_s": 1.0},
    {"steps": 1, "loss": 10**400, "errors": 1.0, "errors_top5": 1.0, "count": 1, "time_s": 1.0},
    {"steps": 1, "loss": 1.0, "errors": 1.0, "errors_top5": 1.0, "count": 1, "time_s": float("nan")},
])
def test_a_checkpoints_stopped_epoch_that_makes_no_sense_is_moved_aside_and_the_rerun_uses_the_previous_one(
        tiny, tmp_path, stopped_epoch):
    """The step a preempted run stopped at is data from disk: nonsense fails the job by name, nothing runs on it."""
    train(tiny("trainer.epochs=2"), tmp_path)
    (tmp_path / "summary.json").unlink()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["stopped_epoch"] = stopped_epoch
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="checkpoint.pt does not fit this job .*(stopped epoch|step 10000).* moved aside"):
        train(tiny("trainer.epochs=2"), tmp_path)
    assert train(tiny("trainer.epochs=2"), tmp_path)["status"] == "done"  # from checkpoint.prev.pt (epoch 1)
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def hostile_records(folder) -> dict:
    """Files no record should be: each must read as unreadable, at once, without a traceback or a hang."""
    folder.mkdir(parents=True, exist_ok=True)
    fifo = folder / "fifo.json"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    device = folder / "zero.json"
    device.symlink_to("/dev/zero")  # endless bytes
    nested = folder / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    digits = folder / "digits.json"
    digits.write_text('{"val_error": ' + "9" * 5000 + "}")  # beyond Python's int-digit limit
    latin = folder / "latin.json"
    latin.write_bytes(b'{"norm": "\xe9"}')
    directory = folder / "dir.json"
    directory.mkdir()
    return {"fifo": fifo, "device": device, "nested": nested, "digits": digits, "latin": latin, "dir": directory}


def test_records_that_are_not_records_read_as_unreadable_without_blocking_or_filling_memory(tmp_path, monkeypatch):
    from normlab import records

    for name, path in hostile_records(tmp_path).items():
        assert records.read_json(path) is None, name
        assert records.unreadable_reason(path), name
        assert records.read_metrics(path) == [], name
    nested_yaml = tmp_path / "nested.yaml"
    nested_yaml.write_text("a: " + "[" * 50_000 + "]" * 50_000)
    assert "nested too deeply" in records.unreadable_reason(nested_yaml)
    big = tmp_path / "big.json"
    big.write_text('{"a": 1}')
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 4)
    assert records.read_json(big) is None and "more than a record can be" in records.unreadable_reason(big)
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"epoch": 1}\n[1, 2]\n"x"\n{"epoch": ' + "9" * 5000 + '}\n{"epoch": 2}\n{"epo')
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 2**20)
    assert records.read_metrics(lines) == [{"epoch": 1}, {"epoch": 2}]  # only whole JSON objects are rows


@pytest.mark.parametrize("kind", ["fifo", "device", "nested", "latin"])
def test_a_job_whose_summary_is_not_a_record_is_refused_by_name_not_hung_or_crashed(tiny, tmp_path, kind):
    hostile = hostile_records(tmp_path / "made")[kind]
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").symlink_to(hostile)
    with pytest.raises(ConfigError, match=r"holds records that cannot be read: summary\.json"):
        train(tiny("trainer.epochs=1"), run)


@pytest.mark.parametrize("forged", [{"epoch": "abc"}, {"epoch": -5}, {"epoch": True}, {"metrics": [1, 2]},
                                    {"metrics": [{"epoch": 2}, {"epoch": 1}]}, {"wall_time_s": "x"},
                                    {"wall_time_s": float("nan")}])
def test_a_checkpoint_whose_bookkeeping_is_forged_is_moved_aside_and_the_run_resumes_from_the_one_before(
        tiny, tmp_path, forged):
    """Reference: the same job run straight through. The latest checkpoint's epoch, metrics or time is not what
    normlab writes: it is set aside by name and the job goes on from checkpoint.prev.pt to the same metrics."""
    run = tmp_path / "run"
    whole = train(tiny("trainer.epochs=3"), run)  # then as if killed at its end, with its latest checkpoint forged
    (run / "summary.json").unlink()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, **forged}, run / "checkpoint.pt")
    summary = train(tiny("trainer.epochs=3"), run)
    assert summary["status"] == "done" and summary["val_error"] == whole["val_error"]
    assert any(p.name.startswith("checkpoint.pt.corrupt-") for p in run.iterdir())


def test_a_checkpoint_with_more_epochs_than_the_job_fails_the_job_by_name_and_the_rerun_goes_on(tiny, tmp_path):
    train(tiny("trainer.epochs=2"), tmp_path)
    (tmp_path / "summary.json").unlink()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    rows = state["metrics"] + [{**state["metrics"][-1], "epoch": e} for e in range(3, 10**3 + 1)]
    torch.save({**state, "epoch": 10**3, "metrics": rows}, tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match=r"checkpoint\.pt does not fit this job \(ValueError: it has 1000 epochs "
                                           r"done; this job has 2\)"):
        train(tiny("trainer.epochs=2"), tmp_path)
    assert train(tiny("trainer.epochs=2"), tmp_path)["status"] == "done"  # from checkpoint.prev.pt (epoch 1)


def test_epochs_that_no_checkpoint_resumes_are_kept_aside_not_overwritten(tiny, tmp_path):
    train(tiny("trainer.epochs=2"), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "summary.json").unlink()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).write_bytes(b"garbage")
    assert train(tiny("trainer.epochs=2"), tmp_path)["status"] == "done"  # started over
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("metrics.jsonl.unresumed-")]
    assert len(kept) == 1 and kept[0].read_text() == before
