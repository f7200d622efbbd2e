"""scripts/reproduce_cifar10_resnet20.py: its run folders are Hydra's, its plan runs nothing twice, and it moves
only finished runs' records between the sweep and the published runs/."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, run_cli

spec = importlib.util.spec_from_file_location("study_driver", REPO / "scripts" / "reproduce_cifar10_resnet20.py")
driver = importlib.util.module_from_spec(spec)
spec.loader.exec_module(driver)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of the plan's first job, made by a Hydra sweep: (its sweep folder, the overrides it ran with)."""
    job = driver.plan(extend=False, grid_epochs=None)[0]
    tiny = dict(t.split("=", 1) for t in TINY if not t.startswith(("batch.", "trainer.epochs", "trainer.progress")))
    overrides = {**job["overrides"], **tiny, "trainer.epochs": 1, "batch.workers": "null", "batch.total": 64}
    sweep = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", f"experiment={job['experiment']}", *[f"{k}={v}" for k, v in overrides.items()],
                     "trainer.progress=false", f"hydra.sweep.dir={sweep}")  # progress: not in folder names
    assert result.returncode == 0, result.stderr
    return sweep, overrides


def test_folder_names_are_hydras_override_dirname(finished_run):
    sweep, overrides = finished_run
    made = [p.name for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists()]
    assert made == [driver.folder_name(overrides)]


def test_the_plan_follows_the_readme():
    jobs = driver.plan(extend=False, grid_epochs=None)
    assert len(jobs) == 2 * 4 * 3  # two seeds × four budgets × three settings, seed 0 first
    assert {j["overrides"]["seed"] for j in jobs[:12]} == {0} and {j["overrides"]["seed"] for j in jobs[12:]} == {1}
    full = driver.plan(extend=True, grid_epochs=40)
    names = [driver.folder_name(j["overrides"]) for j in full]
    assert len(names) == len(set(names))
    # the grid at 40 epochs shares the map's six runs at 40: 24 + 6 (80 epochs) + 26 grid runs − 6 shared
    assert len(full) == 24 + 6 + 26 - 6


def test_only_finished_runs_are_copied_and_never_their_checkpoints(tmp_path):
    sweep, published = tmp_path / "sweep", tmp_path / "runs"
    for name, status in (("a", "done"), ("b", "failed"), ("c", None)):
        folder = sweep / name
        folder.mkdir(parents=True)
        for file in ("config.yaml", "metrics.jsonl", "checkpoint.pt"):
            (folder / file).write_text(name)
        if status:
            (folder / "summary.json").write_text(json.dumps({"status": status}))
    assert driver.copy_finished(sweep, published) == 1
    assert sorted(p.name for p in (published / "a").iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
    assert not (published / "b").exists() and not (published / "c").exists()
    assert driver.copy_finished(sweep, published) == 0  # already there


def test_the_plan_uses_the_given_epoch_time_else_the_slowest_finished_runs(tmp_path):
    for name, wall, epochs in (("slow", 4800, 5), ("quiet", 2500, 10), ("running", 10, 1)):
        (tmp_path / name).mkdir()
        status = "done" if name != "running" else "running"
        (tmp_path / name / "summary.json").write_text(json.dumps({"status": status, "wall_time_s": wall,
                                                                  "epochs": epochs}))
    assert driver.planning_rate(tmp_path, None) == 960.0
    assert driver.planning_rate(tmp_path, 260.0) == 260.0


def test_the_driver_reads_the_study_checkout_it_is_given(tmp_path):
    sweep = tmp_path / "study" / "results" / "cifar10_resnet20" / "study"
    job = driver.plan(extend=False, grid_epochs=None)[0]
    (sweep / driver.folder_name(job["overrides"])).mkdir(parents=True)
    (sweep / driver.folder_name(job["overrides"]) / "summary.json").write_text(json.dumps({"status": "done"}))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_cifar10_resnet20.py"), "--study",
                             str(tmp_path / "study"), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "24 jobs planned, 1 finished, 23 to run" in result.stdout


def test_a_rerun_of_a_finished_run_compares_every_number_it_recorded(finished_run):
    """--rerun trains the run again at the study's checkout and compares all it recorded, timings aside: a run
    reproduces itself (exit 0), on another CPU too (the kernel's name is reported, not counted), and a published
    number changed afterwards is found and named (exit 1)."""
    sweep, overrides = finished_run
    name = driver.folder_name(overrides)

    def rerun(what: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_cifar10_resnet20.py"), "--study",
                               str(REPO), "--sweep", str(sweep), "--any-cpu", "--rerun", what], capture_output=True,
                              text=True, timeout=300)

    same = rerun(name)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "all identical" in same.stdout and (sweep / "rerun" / name / "summary.json").exists()
    summary = sweep / name / "summary.json"
    moved = {**json.loads(summary.read_text()), "cpu_kernel": "cpu_kernel-0123456789abcdef.so"}  # another CPU's
    summary.write_text(json.dumps(moved))
    elsewhere = rerun(name)
    assert elsewhere.returncode == 0 and "another machine: cpu_kernel" in elsewhere.stdout, elsewhere.stdout
    metrics = sweep / name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[0]["val_error"] += 0.01
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    changed = rerun(name)  # the rerun is done already: compared again, not trained again
    assert changed.returncode == 1 and "differs: epoch 1: val_error" in changed.stdout, changed.stdout
    assert rerun("no-such-run").returncode == 2


def test_a_job_starts_if_what_it_has_left_fits_and_one_too_long_for_any_stretch_only_with_carry_over(tmp_path):
    jobs = driver.plan(extend=False, grid_epochs=None)
    by_epochs = {e: next(j for j in jobs if j["epochs"] == e) for e in (5, 40)}
    hour = 3600.0
    # rate 250 s: 5 epochs need 1.1·5·250 + 120 = 1,495 s; 40 epochs 11,120 s, more than a 2.8-hour stretch
    assert driver.next_job([by_epochs[40], by_epochs[5]], tmp_path, 250, 120, 2.8 * hour, 2.8 * hour, False) is by_epochs[5]
    assert driver.next_job([by_epochs[40]], tmp_path, 250, 120, 2.8 * hour, 2.8 * hour, False) is None
    assert driver.next_job([by_epochs[40]], tmp_path, 250, 120, 2.8 * hour, 2.8 * hour, True) is by_epochs[40]
    assert driver.next_job([by_epochs[40]], tmp_path, 250, 120, 300, 2.8 * hour, True) is None  # not one epoch left
    assert driver.next_job([by_epochs[5]], tmp_path, 250, 120, 1400, 2.8 * hour, True) is None  # it fits a stretch
    folder = tmp_path / driver.folder_name(by_epochs[40]["overrides"])  # 30 epochs done in earlier stretches
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, 31)))
    assert driver.seconds_needed(by_epochs[40], tmp_path, 250, 120) == 1.1 * 10 * 250 + 120
    assert driver.next_job([by_epochs[40]], tmp_path, 250, 120, 3100, 2.8 * hour, False) is by_epochs[40]


def test_the_driver_stops_its_jobs_at_its_deadline(tmp_path):
    """Both slots run jobs too long for the stretch (--carry-over); at --hours the driver stops them with SIGTERM
    (this normlab records them as preempted, to resume) and exits 0."""
    sweep = tmp_path / "sweep"
    # trainer.epochs comes after the plan's own and wins: the jobs outlast the deadline on any machine, however fast
    slow = ["data=synthetic", "data.num_train=2048", "data.num_test=64", "data.size=16", "model=resnet8",
            "trainer.progress=false", "trainer.channels_last=false", "trainer.epochs=1000"]
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_cifar10_resnet20.py"), "--study",
                             str(REPO), "--sweep", str(sweep), "--hours", "0.01", "--epoch-seconds", "8",
                             "--start-seconds", "1",
                             "--carry-over", "--any-cpu", *slow], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(" start (carries over): " in line for line in lines) == 2, result.stdout
    assert sum(" stopped at the deadline after " in line for line in lines) == 2, result.stdout
    assert "0 of 24 jobs finished, 24 left, 0 failed this stretch" in result.stdout
    statuses = [json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json")]
    assert statuses == ["preempted", "preempted"], statuses


def test_on_a_cpu_without_native_bf16_the_driver_refuses_before_any_job_unless_told(tmp_path, monkeypatch, capsys):
    """The study pins bf16; a CPU that emulates it would take days (the study README's pace), so the driver says so
    and starts nothing (exit 2); --any-cpu runs anyway, and --dry-run only prints."""
    monkeypatch.setattr(driver, "has_fast_bf16", lambda: False)
    monkeypatch.setenv("NORMLAB_CIFAR10_JPEG", str(tmp_path / "cifar10-jpeg.zip"))
    sweep = tmp_path / "sweep"
    base = ["reproduce", "--study", str(REPO), "--sweep", str(sweep)]
    monkeypatch.setattr(sys, "argv", base)
    started = []
    monkeypatch.setattr(driver.subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("a job started"))
    assert driver.main() == 2 and not started and not sweep.exists()
    refusal = capsys.readouterr().err
    assert "neither AVX512-BF16 nor AMX" in refusal and "--any-cpu" in refusal, refusal
    monkeypatch.setattr(sys, "argv", [*base, "--dry-run"])
    assert driver.main() == 0 and not started
