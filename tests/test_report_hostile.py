"""normlab-report on records made to break it: a value from disk never names a file outside --out, never crashes the
report (its run is listed invalid or unreadable, saying why), and a flag that cannot work is refused with exit 2."""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from normlab.analysis.collect import collect
from normlab.analysis.report import build_report
from normlab.analysis.untrusted import file_token
from normlab.cli import main as report_main
from tests.conftest import REPO
from tests.test_report import fake_run

GOOD_TABLE_ROW = "| BN | 10.0 | 1 |"  # the good run alone is averaged


def hostile_summary(root: Path, text: str) -> Path:
    """A good run and a run whose summary.json is `text`."""
    fake_run(root, "good", "bn", 32, 0, 10.0)
    bad = fake_run(root, "bad", "bn", 32, 1, 12.0)
    (bad / "summary.json").write_text(text)
    return root


def by_folder(root: Path) -> pd.DataFrame:
    runs = collect([root])
    return runs.set_index(runs["run_dir"].map(lambda p: Path(p).name))


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


# ---------------------------------------------------------------- 1. file names from data

def test_a_norm_that_is_a_path_writes_nothing_outside_out_and_the_report_is_made(tmp_path):
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    outside.mkdir()
    fake_run(runs, "good", "bn", 32, 0, 10.0)
    fake_run(runs, "evil", "x/../../../outside/TRAVERSAL", 32, 0, 10.0)  # from report/fig_curves_x/: outside/
    (runs / "report" / "fig_curves_x").mkdir(parents=True)
    before = files_under(tmp_path) - files_under(runs / "report")
    assert report_main([str(runs)]) == 0
    assert not list(outside.iterdir())
    assert files_under(tmp_path) - files_under(runs / "report") == before  # every new file is in the report
    evil = by_folder(runs).loc["evil"]
    assert evil["status"] == "invalid" and "norm='x/../../../outside/TRAVERSAL' is not a norm's name" in evil["problem"]
    assert GOOD_TABLE_ROW in (runs / "report" / "table_batch_size.md").read_text()
    assert (runs / "report" / "fig_curves_bn.png").is_file()


def test_a_norm_with_a_slash_is_invalid_not_a_disk_error(tmp_path):
    fake_run(tmp_path, "good", "bn", 32, 0, 10.0)
    fake_run(tmp_path, "slash", "a/b", 32, 0, 11.0)
    assert report_main([str(tmp_path)]) == 0
    assert by_folder(tmp_path).loc["slash", "status"] == "invalid"
    assert GOOD_TABLE_ROW in (tmp_path / "report" / "table_batch_size.md").read_text()


def test_file_names_from_a_runs_table_that_skipped_the_checks_still_stay_in_out(tmp_path):
    """build_report builds every file name from data through file_token, whatever table it is given."""
    fake_run(tmp_path / "runs", "good", "bn", 32, 0, 10.0)
    runs = collect([tmp_path / "runs"]).assign(norm="../../escaped")
    out = tmp_path / "runs" / "report"
    written = build_report(runs, out)
    assert all(path.parent == out for paths in written.values() for path in paths)
    name = "fig_curves_" + "_" * 6 + "escaped"  # each of '../../' a '_'
    assert (out / f"{name}.png").is_file() and not (tmp_path / "escaped.png").exists()
    assert f"![{name}]({name}.png)" in (out / "report.md").read_text()


@pytest.mark.parametrize("value", ["../../etc/passwd", "..", ".", "", "a.b", "x" * 300, "fixed_total/../..", 5])
def test_a_file_name_part_from_data_is_one_safe_token(value):
    token = file_token(value)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", token)


def test_names_built_from_good_values_are_unchanged():
    assert [file_token(v) for v in ("bn", "gn_ws", "evonorm_b0", "fixed_total", "paper")] == \
        ["bn", "gn_ws", "evonorm_b0", "fixed_total", "paper"]


# ---------------------------------------------------------------- 2. values that crashed the report

GOOD_SUMMARY = {"status": "done", "val_error": 12.0, "val_error_median5": 12.0, "best_val_error": 12.0, "epochs": 3,
                "wall_time_s": 1.0, "experiment": "t", "model": "resnet20", "norm": "bn", "groups": None,
                "group_size": None, "per_worker_batch": 32, "workers": 8, "total_batch": 256, "lr": 0.1,
                "data": "synthetic", "seed": 1, "epochs_planned": 3}


@pytest.mark.parametrize("text, problem", [
    (json.dumps(GOOD_SUMMARY).replace('"val_error": 12.0', '"val_error": 1' + "0" * 400), "val_error=1000"),
    (json.dumps({**GOOD_SUMMARY, "per_worker_batch": 4.5}), "per_worker_batch=4.5 is not a whole number"),
    (json.dumps({**GOOD_SUMMARY, "status": ["done"]}), "status=['done'] is not one of done, diverged"),
    (json.dumps({**GOOD_SUMMARY, "status": 5}), "status=5 is not one of"),
    (json.dumps({**GOOD_SUMMARY, "norm": 5}), "norm=5 is not a norm's name"),
    (json.dumps({**GOOD_SUMMARY, "val_error": True, "val_error_median5": True}), "val_error=True is not a number"),
    (json.dumps({**GOOD_SUMMARY, "per_worker_batch": False}), "per_worker_batch=False is not a whole number"),
    (json.dumps({**GOOD_SUMMARY, "per_worker_batch": -4}), "per_worker_batch=-4 is not a whole number in [1,"),
    (json.dumps({**GOOD_SUMMARY, "workers": 0}), "workers=0 is not a whole number in [1,"),
    (json.dumps({**GOOD_SUMMARY, "seed": -1}), "seed=-1 is not a whole number in [0,"),
    (json.dumps({**GOOD_SUMMARY, "val_error_median5": 250.0}), "val_error_median5=250.0 is not a number in [0, 100]"),
    (json.dumps({**GOOD_SUMMARY, "protocol": "sideways"}), "protocol='sideways' is not one of paper, fixed_total"),
    (json.dumps({**GOOD_SUMMARY, "test_size": "many"}), "test_size='many' is not a whole number"),
    (json.dumps({**GOOD_SUMMARY, "batch_dependent": "yes"}), "batch_dependent='yes' is not true or false"),
], ids=["huge-int", "fraction", "status-list", "status-int", "norm-int", "bool-error", "bool-batch", "negative-batch",
        "no-workers", "negative-seed", "error-over-100", "unknown-protocol", "text-size", "text-flag"])
def test_a_hostile_summary_value_makes_its_run_invalid_and_the_rest_is_reported(tmp_path, capsys, text, problem):
    root = hostile_summary(tmp_path, text)
    assert report_main([str(root)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    bad = by_folder(root).loc["bad"]
    assert bad["status"] == "invalid" and problem in bad["problem"]
    assert GOOD_TABLE_ROW in (root / "report" / "table_batch_size.md").read_text()
    report = (root / "report" / "report.md").read_text()
    assert re.search(r"2 runs: (1 done, 1 invalid|1 invalid, 1 done)\.", report)


@pytest.mark.parametrize("value, problem", [("1e400", "per_worker_batch=inf is not a whole number"),
                                            ("4.5", "per_worker_batch=4.5 is not a whole number")])
def test_a_hostile_value_in_a_runs_csv_makes_its_row_invalid(tmp_path, value, problem):
    path = tmp_path / "runs.csv"
    path.write_text("norm,per_worker_batch,status,val_error,val_error_median5,seed\n"
                    f"bn,32,done,10.0,10.0,0\nbn,{value},done,12.0,12.0,1\n")
    assert report_main([str(path), "--out", str(tmp_path / "out")]) == 0
    runs = collect([path])
    assert list(runs["status"]) == ["done", "invalid"] and problem in runs["problem"].iloc[1]
    assert GOOD_TABLE_ROW in (tmp_path / "out" / "table_batch_size.md").read_text()


def unfinished_run(root: Path, name: str, norm: str, optim: str, batch: str = "{per_worker: 8, workers: 8}") -> Path:
    """A run with only its config (no summary yet)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: t\nseed: 0\nmodel: {{name: resnet20}}\nnorm: {norm}\nbatch: {batch}\n"
                                     f"optim: {optim}\ndata: {{name: synthetic}}\ntrainer: {{epochs: 3}}\n")
    return run


@pytest.mark.parametrize("norm, optim, batch, problem", [
    ("{name: gn, groups: 8}", "{base_lr: 0.1, base_batch: 0, lr: null}", "{per_worker: 8, workers: 8}",
     "optim.base_batch=0 is not a whole number"),
    ("null", "{base_lr: 0.1, base_batch: 256, lr: null}", "{per_worker: 8, workers: 8}", "AttributeError"),
    ("{name: gn}", "{base_lr: 0.1, base_batch: 256, lr: null}", "{per_worker: x, workers: 1000000000000}",
     "batch.per_worker='x' is not a whole number"),
    ("{name: gn}", "{base_lr: 0.1, base_batch: 256, lr: null}", "{per_worker: 3, total: 1000000000000000007}",
     "batch.total=1000000000000000007 is not a whole number in [1, 1048576]"),  # its divisors would take years
    ("{name: gn}", "{base_lr: 0.1, base_batch: 256, lr: 1" + "0" * 400 + "}", "{per_worker: 8, workers: 8}",
     "optim.lr=1000"),
], ids=["base-batch-0", "norm-null", "text-batch", "huge-total", "huge-lr"])
def test_a_config_that_cannot_be_read_makes_an_unfinished_run_unreadable(tmp_path, norm, optim, batch, problem):
    fake_run(tmp_path, "good", "bn", 32, 0, 10.0)
    unfinished_run(tmp_path, "started", norm, optim, batch)
    assert report_main([str(tmp_path)]) == 0
    started = by_folder(tmp_path).loc["started"]
    assert started["status"] == "unreadable" and started["problem"].startswith("config.yaml: ")
    assert problem in started["problem"]
    assert GOOD_TABLE_ROW in (tmp_path / "report" / "table_batch_size.md").read_text()


@pytest.mark.parametrize("line", ['{"epoch": [1]}', '{"epoch": {"a": 1}}', '{"epoch": true, "val_error": 3.0}',
                                  '{"epoch": 4, "lr": 1' + "0" * 400 + ', "val_error": 9.0}',
                                  '{"epoch": 4, "train_error": "x", "val_error": [1]}',
                                  '{"epoch": 1e400, "train_error": -1e308, "val_error": 1e308}'])
def test_hostile_metrics_rows_are_treated_as_missing(tmp_path, capsys, line):
    fake_run(tmp_path, "good", "bn", 32, 0, 10.0)
    odd = fake_run(tmp_path, "odd", "bn", 32, 1, 12.0)
    (odd / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "lr": 0.1, "train_error": 40.0 - e,
                                                           "val_error": 12.0}) + "\n" for e in (1, 2, 3)) + line + "\n")
    assert report_main([str(tmp_path)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    runs = by_folder(tmp_path)
    assert runs.loc["odd", "status"] == "done"  # the summary is the result: odd metrics rows only go missing
    assert (tmp_path / "report" / "fig_curves_bn.png").is_file()


def test_an_unfinished_runs_last_error_is_its_last_finite_one(tmp_path):
    run = unfinished_run(tmp_path, "started", "{name: gn, groups: 8}", "{base_lr: 0.1, base_batch: 256, lr: null}")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "val_error": 30.0}\n{"epoch": 2, "val_error": "bad"}\n'
                                       '{"epoch": 3, "val_error": 1e999}\n')
    started = by_folder(tmp_path).loc["started"]
    assert started["status"] == "unfinished" and started["val_error"] == 30.0


# ---------------------------------------------------------------- 3. flags that cannot work

def test_a_metric_no_run_records_is_refused_naming_the_flag_and_the_metrics_there_are(tmp_path, capsys):
    fake_run(tmp_path, "good", "bn", 32, 0, 10.0)
    assert report_main([str(tmp_path), "--metric", "val_error_batch"]) == 2
    err = capsys.readouterr().err
    assert "--metric val_error_batch" in err and "val_error_median5, val_error, best_val_error" in err
    assert "Traceback" not in err and not (tmp_path / "report").exists()  # refused before any work


def test_a_reading_file_naming_a_metric_no_run_records_is_refused(tmp_path, capsys):
    fake_run(tmp_path, "good", "bn", 32, 0, 10.0)
    (tmp_path / "reading.yaml").write_text("metric: val_error_batch\nwhy: BN with batch statistics\n")
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "reading.yaml: metric='val_error_batch'" in err and "val_error_median5" in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("out", ["a_file", "/dev/null", "a_file/inside"])
def test_out_that_is_a_file_is_refused_with_exit_2(tmp_path, capsys, out):
    fake_run(tmp_path, "good", "bn", 32, 0, 10.0)
    (tmp_path / "a_file").write_text("not a folder")
    target = out if out.startswith("/") else str(tmp_path / out)
    with pytest.raises(SystemExit) as exit_:
        report_main([str(tmp_path), "--out", target])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {target!r}" in err and "is a file, not a folder" in err
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ---------------------------------------------------------------- 4. runs mixed from several sweeps

def test_runs_sharing_a_cell_and_a_seed_are_named_in_the_report_and_the_log(tmp_path, caplog):
    first = fake_run(tmp_path / "sweep_a", "bn32", "bn", 32, 0, 10.0)
    second = fake_run(tmp_path / "sweep_b", "bn32", "bn", 32, 0, 14.0)
    fake_run(tmp_path / "sweep_a", "gn32", "gn", 32, 0, 11.0)
    with caplog.at_level(logging.WARNING, logger="normlab.report"):
        assert report_main([str(tmp_path)]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    note = next(line for line in report.splitlines() if "share a cell and a seed" in line)
    assert "2 finished runs" in note and "BN, N=32, seed 0" in note and str(first) in note and str(second) in note
    assert any("share a cell and a seed" in r.getMessage() and str(second) in r.getMessage() for r in caplog.records)
    assert "| BN | 12.0 | 1 |" in (tmp_path / "report" / "table_batch_size.md").read_text()  # the table as before


def test_runs_with_one_run_per_seed_get_no_such_note(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, f"bn32s{seed}", "bn", 32, seed, 10.0 + seed)
    fake_run(tmp_path, "bn32-16ep", "bn", 32, 0, 9.0, epochs_planned=16)  # another budget: another cell
    assert report_main([str(tmp_path)]) == 0
    assert "share a cell and a seed" not in (tmp_path / "report" / "report.md").read_text()


def test_a_cell_whose_runs_differ_in_model_data_or_lr_is_named_and_alike_runs_are_not(tmp_path, caplog):
    fake_run(tmp_path / "a", "bn32s0", "bn", 32, 0, 10.0)
    fake_run(tmp_path / "b", "bn32s1", "bn", 32, 1, 30.0, model="resnet8", lr=0.2)  # another experiment's run
    fake_run(tmp_path / "a", "gn32s0", "gn", 32, 0, 11.0, dataset=None)  # unrecorded: not a difference
    fake_run(tmp_path / "b", "gn32s1", "gn", 32, 1, 12.0, dataset="digits")
    with caplog.at_level(logging.WARNING, logger="normlab.report"):
        assert report_main([str(tmp_path)]) == 0
    notes = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if "averages runs" in line]
    assert len(notes) == 1, notes
    assert "BN, N=32" in notes[0] and "model resnet20 / resnet8 (1 / 1 runs)" in notes[0]
    assert "lr 0.1 / 0.2 (1 / 1 runs)" in notes[0]
    assert any("averages runs that differ" in r.getMessage() for r in caplog.records)


def test_out_that_is_a_run_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    run = fake_run(tmp_path, "bn32", "bn", 32, 0, 10.0)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(SystemExit) as exit_:
        report_main([str(tmp_path), "--out", str(run)])
    assert exit_.value.code == 2
    assert f"--out {str(run)!r} is a run's folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    assert report_main([str(run)]) == 0 and (run / "report" / "runs.csv").is_file()  # the default: its report/


def test_a_cell_whose_run_configs_differ_in_a_setting_names_it_and_not_where_or_how_they_ran(tmp_path):
    for seed, decay, device in ((0, 1e-4, "cpu"), (1, 5e-4, "cuda")):
        run = fake_run(tmp_path, f"bn32s{seed}", "bn", 32, seed, 10.0 + seed)
        (run / "config.yaml").write_text(yaml.safe_dump({"name": f"sweep{seed}", "seed": seed, "optim": {
            "weight_decay": decay}, "trainer": {"device": device, "threads": seed + 1}}))
    hostile = fake_run(tmp_path, "gn32s0", "gn", 32, 0, 11.0)
    (hostile / "config.yaml").write_text("[" * 5000)  # unreadable: no difference, no traceback
    deep = fake_run(tmp_path, "gn32s1", "gn", 32, 1, 12.0)
    (deep / "config.yaml").write_text(yaml.safe_dump(functools.reduce(lambda inner, _: {"a": inner}, range(50), 1)))
    assert report_main([str(tmp_path)]) == 0
    notes = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if "averages runs" in line]
    assert len(notes) == 1 and "BN, N=32" in notes[0], notes
    assert "optim.weight_decay 0.0001 / 0.0005" in notes[0]
    assert "seed" not in notes[0].split("differ in", 1)[1] and "device" not in notes[0] and "threads" not in notes[0]


def test_two_seeds_of_a_published_study_differ_in_no_setting():
    from normlab.analysis.collect import setting_differences

    runs = REPO / "results" / "reference" / "cifar10_resnet20" / "runs"
    by_setting: dict[str, list[str]] = {}
    for config in sorted(runs.glob("*/config.yaml")):
        by_setting.setdefault(config.parent.name.replace("seed=1", "seed=0"), []).append(str(config.parent))
    pairs = [folders for folders in by_setting.values() if len(folders) == 2]
    assert len(pairs) == 12  # 3 settings × 4 budgets, seeds 0 and 1
    for folders in pairs:
        assert setting_differences(folders) == [], folders
    assert setting_differences([pairs[0][0], pairs[1][0]])  # runs of two cells do differ
