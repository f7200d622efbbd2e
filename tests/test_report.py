"""normlab-report: collect runs, tables against means computed by hand, figures, statuses, the claim check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import statistics
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from normlab.analysis.claims import findings
from normlab.analysis.collect import collect
from normlab.analysis.tables import batch_size_table, groups_tables
from normlab.cli import main as report_main
from tests.conftest import REPO, TINY, run_cli

EXPECTED_FILES = ["runs.csv", "fig_batch_size.png", "fig_batch_size.pdf", "table_batch_size.md",
                  "table_batch_size.tex", "fig_curves_bn.png", "fig_curves_gn.png", "report.md", "report.html"]


def fake_run(root: Path, name: str, norm: str, n: int, seed: int, val_error: float | None, status: str = "done",
             **extra) -> Path:
    """A run directory as the trainer writes it, with a chosen result."""
    run = root / name
    run.mkdir(parents=True)
    error = val_error
    summary = {"status": status, "val_error": error, "val_error_median5": error, "best_val_error": error,
               "epochs": 3, "wall_time_s": 1.0, "experiment": "t", "model": "resnet20", "norm": norm,
               "groups": None, "group_size": None, "per_worker_batch": n, "workers": 8, "total_batch": 8 * n,
               "lr": 0.1 * n / 32, "data": "synthetic", "seed": seed, "epochs_planned": 3, **extra}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_error": 50.0 - e, "val_error": error})
                                               + "\n" for e in (1, 2, 3)))
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real tiny multirun: 2 norms × 2 batch sizes × 1 epoch on synthetic data."""
    root = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", *TINY, "norm=bn,gn", "batch.per_worker=4,2", f"hydra.sweep.dir={root}")
    assert result.returncode == 0, result.stderr
    return root


def test_report_from_a_real_tiny_sweep_writes_every_file(sweep):
    assert report_main([str(sweep)]) == 0
    out = sweep / "report"
    for name in EXPECTED_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
        assert png.stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<table>" in html and "src=\"fig_" not in html
    assert "23.6" in html and "34.7" in html  # the paper's numbers beside ours


def test_table_2_equals_means_computed_from_the_summaries(sweep):
    report_main([str(sweep)])
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    table = (sweep / "report" / "table_batch_size.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-2]]
            for line in table.splitlines()[2:]}
    for norm, label in (("bn", "BN"), ("gn", "GN")):
        for column, n in enumerate((4, 2)):
            errors = [s["val_error_median5"] for s in summaries if s["norm"] == norm and s["per_worker_batch"] == n]
            assert rows[label][column] == f"{statistics.mean(errors):.1f}"  # one seed: no ± to show
    gap = [float(c) for c in rows["GN − BN"]]
    bn = [float(c) for c in rows["BN"]]
    gn = [float(c) for c in rows["GN"]]
    assert gap == pytest.approx([g - b for g, b in zip(gn, bn)], abs=0.11)


def test_runs_csv_is_one_tidy_table(sweep):
    report_main([str(sweep)])
    runs = pd.read_csv(sweep / "report" / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"done"}
    assert {"norm", "per_worker_batch", "workers", "seed", "val_error_median5", "run_dir"} <= set(runs.columns)


def test_mean_std_and_seed_count_across_seeds(tmp_path):
    for seed, error in enumerate((10.0, 12.0, 14.0)):
        fake_run(tmp_path, f"bn32s{seed}", "bn", 32, seed, error)
        fake_run(tmp_path, f"gn32s{seed}", "gn", 32, seed, error + 1)
    table = batch_size_table(collect([tmp_path]))
    mean, std, n = table.loc["bn", 32]
    assert (mean, std, n) == (12.0, statistics.stdev([10.0, 12.0, 14.0]), 3)
    assert table.loc["gn−bn", 32][0] == pytest.approx(1.0)


def test_failed_diverged_and_unfinished_runs_are_listed_not_averaged(tmp_path):
    fake_run(tmp_path, "ok", "bn", 32, 0, 10.0)
    fake_run(tmp_path, "failed", "bn", 32, 1, None, status="failed", error="RuntimeError: boom")
    fake_run(tmp_path, "diverged", "bn", 32, 2, None, status="diverged", diverged_epoch=2)
    unfinished = fake_run(tmp_path, "unfinished", "gn", 8, 0, 30.0)
    (unfinished / "summary.json").unlink()
    (unfinished / "config.yaml").write_text(
        "name: t\nseed: 0\nmodel: {name: resnet20}\nnorm: {name: gn, groups: 8, group_size: null}\n"
        "batch: {per_worker: 8, workers: 8}\noptim: {base_lr: 0.1, base_batch: 256, lr: null}\n"
        "data: {name: synthetic}\ntrainer: {epochs: 3}\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text('{"epoch": 1, "val_err')  # a torn first line
    assert report_main([str(tmp_path)]) == 0
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    by_dir = {Path(r).name: s for r, s in zip(runs["run_dir"], runs["status"])}
    assert by_dir == {"ok": "done", "failed": "failed", "diverged": "diverged", "unfinished": "unfinished",
                      "broken": "unfinished"}
    unfinished_row = runs[runs["run_dir"].str.endswith("unfinished")].iloc[0]
    assert unfinished_row["norm"] == "gn" and unfinished_row["groups"] == 8 and unfinished_row["epochs"] == 3
    assert "| BN | 10.0 | 1 |" in (tmp_path / "report" / "table_batch_size.md").read_text()
    assert "failed" in (tmp_path / "report" / "report.md").read_text()


def test_group_ablation_tables_and_figure(tmp_path):
    for g, error in ((64, 25.0), (32, 24.0), (8, 24.5), (1, 26.0)):
        fake_run(tmp_path, f"g{g}", "ln" if g == 1 else "gn", 32, 0, error, groups=g)
    for size, error in ((16, 24.2), (4, 24.8), (1, 28.0)):
        fake_run(tmp_path, f"c{size}", "in" if size == 1 else "gn", 32, 0, error, group_size=size)
    fake_run(tmp_path, "other_batch", "gn", 2, 0, 99.0, groups=32)
    tables = groups_tables(collect([tmp_path]))
    assert tables["groups"]["groups"].tolist() == [64, 32, 8, 1]
    assert tables["groups"]["mean"].tolist() == [25.0, 24.0, 24.5, 26.0]
    assert tables["group_size"]["group_size"].tolist() == [16, 4, 1]
    assert tables["group_size"]["mean"].tolist() == [24.2, 24.8, 28.0]
    report_main([str(tmp_path)])
    assert (tmp_path / "report" / "fig_groups.png").is_file()
    text = (tmp_path / "report" / "table_groups.md").read_text()
    assert re.search(r"\| groups \(G\) \| 64 \| 32 \| 8 \| 1 \|", text)


def test_claim_check_on_the_papers_own_numbers_holds(tmp_path):
    paper = {("bn", 32): 23.6, ("bn", 16): 23.7, ("bn", 8): 24.8, ("bn", 4): 27.3, ("bn", 2): 34.7,
             ("gn", 32): 24.1, ("gn", 16): 24.2, ("gn", 8): 24.0, ("gn", 4): 24.2, ("gn", 2): 24.1,
             ("ln", 32): 25.3, ("in", 32): 28.4}
    for (norm, n), error in paper.items():
        fake_run(tmp_path, f"{norm}{n}", norm, n, 0, error)
    results = findings(collect([tmp_path]))
    assert [f.holds for f in results] == [True, True, True, True]
    assert results[0].ours == "+11.1 points" and results[1].ours == "spread 0.2 points"
    assert results[3].ours.startswith("BN < GN < LN < IN")


def test_report_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 1
    assert "no runs found" in capsys.readouterr().err


def test_the_report_side_never_imports_torch():
    code = ("import sys, normlab.cli, normlab.analysis.report, normlab.analysis.wandb_source; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_cell_whose_runs_all_diverged_says_so(tmp_path):
    fake_run(tmp_path, "bn32", "bn", 32, 0, 10.0)
    fake_run(tmp_path, "gn32", "gn", 32, 0, 11.0)
    fake_run(tmp_path, "gn2", "gn", 2, 0, 11.5)
    fake_run(tmp_path, "bn2a", "bn", 2, 0, None, status="diverged")
    fake_run(tmp_path, "bn2b", "bn", 2, 1, None, status="diverged")
    report_main([str(tmp_path)])
    table = (tmp_path / "report" / "table_batch_size.md").read_text()
    assert "| BN | 10.0 | diverged 2/2 | 1 |" in table and "| GN − BN | +1.0 | – |" in table


PUBLISHED = REPO / "results" / "reference" / "cifar10_small"


def test_the_published_cifar10_study_regenerates_from_its_runs_csv(tmp_path):
    """normlab-report on the published runs.csv alone (no run directories) rebuilds the committed tables."""
    assert (PUBLISHED / "runs.csv").exists(), "results/reference/cifar10_small/runs.csv is the published study"
    assert report_main([str(PUBLISHED / "runs.csv"), "--out", str(tmp_path)]) == 0
    for table in ("table_batch_size.md", "table_batch_size.tex"):
        assert (tmp_path / table).read_text() == (PUBLISHED / table).read_text(), table
    runs = pd.read_csv(PUBLISHED / "runs.csv")
    assert len(runs) == 24 and set(runs["status"]) == {"done"}  # every run of the grid, none left out
    means = runs.groupby(["norm", "per_worker_batch"])["val_error_median5"].mean()  # Table 2, the slow way
    published = (tmp_path / "table_batch_size.md").read_text()
    for (norm, n), mean in means.items():
        assert f"{mean:.1f}" in published, (norm, n, mean)


# ---------------------------------------------------------------- protocols and noise

def fixed_total_run(root: Path, norm: str, n: int, seed: int, error: float, **extra) -> Path:
    return fake_run(root, f"ft-{norm}{n}-s{seed}-e{extra.get('epochs_planned', 3)}", norm, n, seed, error, protocol="fixed_total", workers=32 // n,
                    total_batch=32, lr=0.1, batch_dependent=norm == "bn", **extra)


def test_runs_of_both_protocols_make_two_figures_and_tables_never_one_blended_line(tmp_path):
    for seed in (0, 1):
        for n, error in ((32, 20.0), (2, 30.0)):
            fake_run(tmp_path, f"paper-bn{n}-s{seed}", "bn", n, seed, error + seed)
            fixed_total_run(tmp_path, "bn", n, seed, error + 5 + seed)
    assert report_main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    for protocol in ("paper", "fixed_total"):
        assert (out / f"fig_batch_size_{protocol}.png").is_file() and (out / f"table_batch_size_{protocol}.md").is_file()
    assert not (out / "fig_batch_size.png").exists()
    assert "| BN | 20.5 ± 0.7 | 30.5 ± 0.7 | 2 |" in (out / "table_batch_size_paper.md").read_text()
    assert "| BN | 25.5 ± 0.7 | 35.5 ± 0.7 | 2 |" in (out / "table_batch_size_fixed_total.md").read_text()
    report = (out / "report.md").read_text()
    assert "## Does the claim hold? (paper protocol" in report and "## Does the claim hold? (fixed total batch" in report
    assert "W fixed" in (out / "table_batch_size_paper.tex").read_text()


def test_a_margin_below_the_noise_reads_within_noise(tmp_path):
    """GN ahead of BN at N=2 by 0.3 points on 360 test images (binomial error ~0.7 points): undecided."""
    for norm, n, error in (("bn", 32, 2.0), ("bn", 2, 2.6), ("gn", 32, 2.2), ("gn", 2, 2.3)):
        fake_run(tmp_path, f"{norm}{n}", norm, n, 0, error, test_size=360)
    results = {f.what: f for f in findings(collect([tmp_path]))}
    crossing = results["GN beats BN at N=2"]
    assert crossing.margin == pytest.approx(0.3)
    assert crossing.uncertainty == pytest.approx(100 * (0.026 * 0.974 / 360) ** 0.5)  # the larger binomial SE
    assert crossing.verdict == "within noise" and crossing.holds is None
    report_main([str(tmp_path)])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| GN beats BN at N=2 | BN − GN = +0.3 points | +0.3 ± 0.8 |" in report
    assert "One seed per cell" in report


def test_verdicts_weigh_the_margin_against_the_seed_spread(tmp_path):
    for seed, (bn2, gn2) in enumerate([(30.0, 25.0), (34.0, 27.0), (32.0, 26.0)]):
        for norm, n, error in (("bn", 32, 20.0 + seed), ("bn", 2, bn2), ("gn", 32, 24.0 + seed), ("gn", 2, gn2)):
            fake_run(tmp_path, f"{norm}{n}-s{seed}", norm, n, seed, error)
    crossing = {f.what: f for f in findings(collect([tmp_path]))}["GN beats BN at N=2"]
    assert crossing.margin == pytest.approx(32.0 - 26.0) and crossing.uncertainty == pytest.approx(2.0)
    assert crossing.verdict == "holds"


def test_under_a_fixed_total_batch_the_claim_check_tests_the_invariance(tmp_path):
    for seed in (0, 1, 2):
        for n, bn in ((32, 20.0), (8, 22.0), (2, 31.0)):
            fixed_total_run(tmp_path, "bn", n, seed, bn + seed)
        for n in (32, 2):
            fixed_total_run(tmp_path, "gn", n, seed, 25.0 + seed)
            fixed_total_run(tmp_path, "ln", n, seed, 27.0 + seed + (0.5 if (n, seed) == (2, 1) else 0.0))
    results = {f.what: f for f in findings(collect([tmp_path]))}
    assert not any(what.startswith("GN is flat") for what in results)  # flatness is no finding under fixed B
    assert results["GN identical at N ∈ {32, 2} (invariance: it never sees N)"].verdict == "holds"
    ln = results["LN identical at N ∈ {32, 2} (invariance: it never sees N)"]
    assert ln.verdict == "does not hold" and "0.50 points" in ln.ours
    assert results["BN's error rises from N=32 to N=2"].verdict == "holds"
    assert results["GN beats BN at N=2"].margin == pytest.approx(6.0)


def test_runs_at_several_budgets_get_a_table_each_and_the_crossing_vs_budget(tmp_path):
    """Each budget is its own Table 2 (never averaged with another); the budget table has GN's lag and BN's
    deficit at N=2, computed here from the cells by hand."""
    cells = {4: {("bn", 32): 50.0, ("bn", 2): 62.0, ("gn", 32): 60.0},
             16: {("bn", 32): 30.0, ("bn", 2): 38.0, ("gn", 32): 35.0}}
    for epochs, errors in cells.items():
        for (norm, n), error in errors.items():
            fixed_total_run(tmp_path, norm, n, 0, error, epochs_planned=epochs, steps_per_epoch=100,
                            experiment=f"e{epochs}")
    assert report_main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    assert "| BN | 50.0 | 62.0 | 1 |" in (out / "table_batch_size_fixed_total_4ep.md").read_text()
    assert "| BN | 30.0 | 38.0 | 1 |" in (out / "table_batch_size_fixed_total_16ep.md").read_text()
    budget = (out / "table_budget_fixed_total.md").read_text()
    assert "| 4 | 400 | 50.0 | 62.0 | 60.0 | +10.0 | +2.0 | 1 |" in budget
    assert "| 16 | 1600 | 30.0 | 38.0 | 35.0 | +5.0 | +3.0 | 1 |" in budget
    assert (out / "fig_budget.png").is_file()


# ---------------------------------------------------------------- records that cannot be trusted

def test_the_report_never_crashes_on_a_record_and_says_what_it_could_not_use(tmp_path):
    fake_run(tmp_path, "good", "bn", 32, 0, 10.0)
    fake_run(tmp_path, "text", "bn", 32, 1, 12.0)
    summary = json.loads((tmp_path / "text" / "summary.json").read_text())
    (tmp_path / "text" / "summary.json").write_text(json.dumps({**summary, "val_error_median5": "twelve"}))
    fake_run(tmp_path, "torn", "bn", 32, 2, 11.0)
    (tmp_path / "torn" / "summary.json").write_text('{"status": "do')
    fake_run(tmp_path, "nan", "bn", 32, 3, None)  # done, but its metric is NaN (written as null)
    twice = fake_run(tmp_path, "twice", "bn", 32, 4, 9.0)
    with open(twice / "metrics.jsonl", "a") as f:  # two processes wrote one folder
        f.write(json.dumps({"epoch": 1, "train_error": 1.0, "val_error": 9.0}) + "\n")
    assert report_main([str(tmp_path)]) == 0
    runs = collect([tmp_path]).set_index(pd.Series([Path(p).name for p in collect([tmp_path])["run_dir"]]))
    assert runs.loc["good", "status"] == "done"
    assert runs.loc["text", "status"] == "invalid" and "val_error_median5='twelve' is not a number" in runs.loc["text", "problem"]
    assert runs.loc["torn", "status"] == "unreadable" and "summary.json: JSONDecodeError" in runs.loc["torn", "problem"]
    assert runs.loc["nan", "status"] == "invalid" and runs.loc["nan", "problem"] == "done, but no finite val_error"
    assert runs.loc["twice", "status"] == "invalid" and "repeats epoch(s) 1" in runs.loc["twice", "problem"]
    out = tmp_path / "report"
    assert "| BN | 10.0 | 1 |" in (out / "table_batch_size.md").read_text()  # only the good run is averaged
    report = (out / "report.md").read_text()
    tally = re.search(r"5 runs: ([^.]*)\.", report).group(1)
    assert sorted(tally.split(", ")) == ["1 done", "1 unreadable", "3 invalid"]
    assert "JSONDecodeError" in report and "repeats epoch(s) 1" in report


@pytest.mark.parametrize("content, reason", [("norm,seed\nbn,0\n", "no column per_worker_batch, status"),
                                             ("\x00\x01\x02", ""), ("", "EmptyDataError")])
def test_a_malformed_runs_csv_is_listed_as_unreadable(tmp_path, content, reason):
    path = tmp_path / "runs.csv"
    path.write_text(content)
    runs = collect([path])
    assert list(runs["status"]) == ["unreadable"] and reason in runs["problem"].iloc[0]
    assert report_main([str(path), "--out", str(tmp_path / "out")]) == 0


def test_runs_that_compared_bn_evaluation_modes_get_a_table_and_a_figure_per_mode(tmp_path):
    errors = {(32, "ema"): 20.0, (32, "precise"): 19.0, (32, "batch"): 21.0,
              (2, "ema"): 35.0, (2, "precise"): 30.0, (2, "batch"): 26.0}
    for seed in (0, 1):
        for n in (32, 2):
            modes = {f"val_error_{m}_median5": errors[(n, m)] + seed for m in ("ema", "precise", "batch")}
            fixed_total_run(tmp_path, "bn", n, seed, errors[(n, "ema")] + seed, **modes)
            fixed_total_run(tmp_path, "gn", n, seed, 24.0 + seed)
    assert report_main([str(tmp_path)]) == 0
    table = (tmp_path / "report" / "table_bn_eval.md").read_text()
    assert "| BN, ema | 20.5 ± 0.7 | 35.5 ± 0.7 | +15.0 |" in table
    assert "| BN, precise | 19.5 ± 0.7 | 30.5 ± 0.7 | +11.0 |" in table
    assert "| BN, batch | 21.5 ± 0.7 | 26.5 ± 0.7 | +5.0 |" in table
    assert "| GN | 24.5 ± 0.7 | 24.5 ± 0.7 | +0.0 |" in table
    assert (tmp_path / "report" / "fig_bn_eval.png").is_file()
    assert report_main([str(tmp_path), "--metric", "val_error_batch_median5", "--out", str(tmp_path / "b")]) == 0
    assert "| BN | 21.5 ± 0.7 | 26.5 ± 0.7 | 2 |" in (tmp_path / "b" / "table_batch_size.md").read_text()


NORM_BATCH = REPO / "results" / "reference" / "cifar10_norm_batch"


@pytest.mark.parametrize("folder, tables", [
    (NORM_BATCH, ("table_batch_size.md", "table_batch_size.tex", "table_bn_eval.md")),
    (NORM_BATCH / "budget", ("table_budget_fixed_total.md", "table_batch_size_fixed_total_4ep.md")),
    (REPO / "results" / "reference" / "cifar10_bn_eval", ("table_bn_eval.md",)),
])
def test_the_published_fixed_total_studies_regenerate_from_their_runs_csv(tmp_path, folder, tables):
    assert (folder / "runs.csv").exists(), f"{folder} is a published study"
    assert report_main([str(folder / "runs.csv"), "--out", str(tmp_path), "--metric", "val_error"]) == 0
    for table in tables:
        assert (tmp_path / table).read_text() == (folder / table).read_text(), table
    runs = pd.read_csv(folder / "runs.csv")
    assert set(runs["status"]) == {"done"} and set(runs["protocol"]) == {"fixed_total"}
