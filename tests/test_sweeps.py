"""Sweeps a script can trust: the exit code says whether every job finished, the folders carry no date, and
``--dry-run`` lists the jobs (and the invalid ones) without training anything."""

from __future__ import annotations

import json

from normlab import sweep_outcome
from normlab.records import read_metrics
from tests.conftest import TINY, run_cli

GROUPS = ["-m", *TINY, "model.width=16", "norm=gn"]  # G=32 does not divide the 16 channels: invalid


def test_a_sweep_with_an_invalid_job_finishes_the_valid_ones_then_exits_1(tmp_path):
    result = run_cli(*GROUPS, "norm.groups=8,32", f"hydra.sweep.dir={tmp_path}", timeout=180)
    assert result.returncode == 1, result.stderr
    done = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    assert [(s["groups"], s["status"]) for s in done] == [(8, "done")]
    last = [line for line in (result.stdout + result.stderr).splitlines() if "sweep" in line][-1]  # the tally
    assert "sweep finished: 2 of 2 jobs reported · 1 done, 1 invalid" in last and "1 not finished" in last


def test_an_all_done_rerun_into_a_dated_folder_of_an_earlier_version_exits_0(tmp_path):
    dated = tmp_path / "2026-11-30"  # where earlier versions put a sweep: results/<name>/<date>/
    first = run_cli(*GROUPS, "norm.groups=8,16", f"hydra.sweep.dir={dated}", timeout=180)
    assert first.returncode == 0, first.stderr
    again = run_cli(*GROUPS, "norm.groups=8,16", f"hydra.sweep.dir={dated}", timeout=180)
    assert again.returncode == 0, again.stderr
    out = again.stdout + again.stderr
    assert "2 of 2 finished · done (already done, skipped)" in out
    assert "2 of 2 jobs reported · 2 done (already done, skipped)" in out


def test_a_rerun_into_a_dated_folder_of_an_earlier_version_resumes_its_unfinished_job(tmp_path):
    """A job killed after its first epoch (its epoch-1 checkpoint, no summary): the rerun resumes it there and ends
    with the uninterrupted job's metrics (the reference: the first sweep's own record of it)."""
    dated = tmp_path / "2026-11-30"
    sweep = [*GROUPS, "norm.groups=8,16", "trainer.epochs=2", "trainer.checkpoint=true", f"hydra.sweep.dir={dated}"]
    assert run_cli(*sweep, timeout=180).returncode == 0
    job = next(dated.glob("*norm.groups=16*"))
    whole = [{k: v for k, v in row.items() if k not in ("images_per_sec", "epoch_time_s")}
             for row in read_metrics(job / "metrics.jsonl")]
    (job / "summary.json").unlink()  # as if killed in epoch 2: epoch 1's checkpoint is the latest
    (job / "checkpoint.prev.pt").replace(job / "checkpoint.pt")
    again = run_cli(*sweep, timeout=180)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert f"resuming {job} after epoch 1" in out and "1 done (already done, skipped)" in out
    assert [{k: v for k, v in row.items() if k not in ("images_per_sec", "epoch_time_s")}
            for row in read_metrics(job / "metrics.jsonl")] == whole


def test_unfinished_counts_every_status_but_done_and_diverged_and_every_silent_job():
    assert sweep_outcome.count_unfinished(["done", "diverged", "done (already done, skipped)"], 3) == 0
    assert sweep_outcome.count_unfinished(["done", "invalid", "busy (another process holds its folder)",
                                           "failed (RuntimeError)", "no summary.json"], 5) == 4
    assert sweep_outcome.count_unfinished(["done"], 3) == 2  # two jobs never reported back


def test_dry_run_lists_the_jobs_their_folders_and_the_invalid_ones_and_runs_nothing(tmp_path):
    result = run_cli(*GROUPS, "norm.groups=8,32", f"hydra.sweep.dir={tmp_path / 'sweep'}", "--dry-run", timeout=120)
    assert result.returncode == 1, result.stderr  # as the sweep would end
    lines = result.stdout.splitlines()
    assert lines[0].startswith("#0 norm.groups=8 · train · ") and lines[0].endswith("norm.groups=8,norm=gn,trainer.epochs=1")
    assert lines[1].startswith("#1 norm.groups=32 · invalid: ") and "norm.groups=32" in lines[1]
    assert lines[2] == "dry run: 2 jobs · 1 train, 1 invalid · nothing was run"
    assert not (tmp_path / "sweep").exists()


def test_default_folders_are_named_by_the_config_not_the_date(tmp_path):
    result = run_cli("-m", "experiment=demo", "--dry-run", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "#0 norm=bn batch.per_worker=32 · train · results/demo/batch.per_worker=32,norm=bn" in result.stdout
    assert "dry run: 6 jobs · 6 train" in result.stdout


def test_dry_run_says_what_each_job_will_do_with_its_folder_as_the_job_decides(tmp_path):
    """After a sweep: done jobs skip; a job killed after a checkpoint resumes; trainer.force=true starts each over;
    a folder holding another config's run is refused (the same ConfigError the job raises), unless forced."""
    sweep = [*GROUPS, "norm.groups=8,16", "trainer.checkpoint=true", f"hydra.sweep.dir={tmp_path}"]
    assert run_cli(*sweep, timeout=180).returncode == 0

    def actions(*extra: str) -> tuple[int, list[str]]:
        result = run_cli(*sweep, *extra, "--dry-run", timeout=120)
        return result.returncode, [line.split(" · ")[1] for line in result.stdout.splitlines()[:2]]

    assert actions() == (0, ["skip: done", "skip: done"])
    assert actions("trainer.force=true") == (0, ["train: starts over (trainer.force=true)"] * 2)
    sixteen = next(tmp_path.glob("*norm.groups=16*"))
    (sixteen / "summary.json").unlink()  # killed after its last checkpoint
    assert actions() == (0, ["skip: done", "resume"])
    config = sixteen / "config.yaml"
    config.write_text(config.read_text().replace("\nseed: 0\n", "\nseed: 7\n"))  # another config's run in its folder
    code, found = actions()
    assert code == 1 and found[0] == "skip: done"
    assert found[1].startswith("invalid: ") and found[1].endswith("of another config: seed was 7, now 0. trainer.force=true replaces it; another "
                                                     "hydra.sweep.dir (or hydra.run.dir) keeps both")
    assert actions("trainer.force=true")[1][1] == "train: starts over (trainer.force=true)"
    assert (sixteen / "checkpoint.pt").exists()  # a dry run deletes nothing


def test_an_option_hydra_cannot_find_refuses_the_sweep_and_the_precheck_goes_on_past_it(tmp_path):
    """Hydra refuses a sweep with an unknown group option before any job (exit 2, naming it): the pre-check does
    not call that job skipped, and still finds the invalid jobs listed after it."""
    result = run_cli(*GROUPS, "norm.groups=32", "norm=bogus,gn", f"hydra.sweep.dir={tmp_path}", timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Could not find 'norm/bogus'" in out and "Traceback" not in out
    assert "1 of 2 jobs will be skipped" in out and "skip norm=gn: " in out and "skip norm=bogus" not in out
    assert not list(tmp_path.glob("*/summary.json"))


def test_dry_run_refuses_what_the_sweep_refuses_with_one_line_and_exit_2(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for args, words in ((["bogus=1"], "Could not override 'bogus'"),
                        ([f"hydra.sweep.dir={a_file}"], "is a file, not a folder")):
        result = run_cli(*GROUPS, *args, "--dry-run", timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr and words in result.stderr, args
