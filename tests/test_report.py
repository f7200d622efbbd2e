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
from scipy import stats as scipy_stats

from normlab.analysis.claims import findings, sanity
from normlab.analysis.collect import collect
from normlab.analysis.intervals import difference, estimate
from normlab.analysis.tables import batch_size_table, groups_tables, norms_table
from normlab.cli import main as report_main
from tests.conftest import REPO, TINY, run_cli

EXPECTED_FILES = ["runs.csv", "fig_batch_size.png", "fig_batch_size.pdf", "table_batch_size.md",
                  "table_batch_size.tex", "fig_curves_bn.png", "fig_curves_bn.pdf", "fig_curves_gn.png", "fig_curves_gn.pdf",
                  "report.md", "report.html"]


def without_intervals(text: str) -> str:
    """A table with its bracketed 95% intervals taken out: the means and standard deviations alone."""
    return re.sub(r" \[[^\]]*\]", "", text)


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
    gap = [float(c.replace("−", "-")) for c in rows["GN − BN"]]  # the minus sign
    bn = [float(c) for c in rows["BN"]]
    gn = [float(c) for c in rows["GN"]]
    assert gap == pytest.approx([g - b for g, b in zip(gn, bn)], abs=0.11)


def test_runs_csv_is_one_tidy_table(sweep):
    report_main([str(sweep)])
    runs = pd.read_csv(sweep / "report" / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"done"}
    assert {"norm", "per_worker_batch", "workers", "seed", "val_error_median5", "run_dir"} <= set(runs.columns)
    assert set(runs["dataset"]) == {"synthetic"} and set(runs["data"]) == {"synthetic"}  # the data config Hydra chose
    assert set(runs["evals_at_final_lr"]) == {1}  # one epoch: one evaluation at the final lr
    report = (sweep / "report" / "report.md").read_text()
    assert "(`val_error`), chosen by the runs' lr records" in report and "fewest: 1" in report


def test_mean_std_and_seed_count_across_seeds(tmp_path):
    for seed, error in enumerate((10.0, 12.0, 14.0)):
        fake_run(tmp_path, f"bn32s{seed}", "bn", 32, seed, error)
        fake_run(tmp_path, f"gn32s{seed}", "gn", 32, seed, error + 1)
    table = batch_size_table(collect([tmp_path]))
    cell = table.loc["bn", 32]
    assert (cell.mean, cell.std, cell.n) == (12.0, statistics.stdev([10.0, 12.0, 14.0]), 3)
    low, high = scipy_stats.t.interval(0.95, 2, loc=12.0, scale=scipy_stats.sem([10.0, 12.0, 14.0]))
    assert (cell.low, cell.high) == (pytest.approx(low), pytest.approx(high))
    assert table.loc["gn−bn", 32].mean == pytest.approx(1.0)


def test_failed_diverged_and_unfinished_runs_are_listed_not_averaged(tmp_path):
    fake_run(tmp_path, "ok", "bn", 32, 0, 10.0)
    fake_run(tmp_path, "failed", "bn", 32, 1, None, status="failed", error="RuntimeError: boom")
    fake_run(tmp_path, "diverged", "bn", 32, 2, None, status="diverged", diverged_epoch=2)
    fake_run(tmp_path, "preempted", "bn", 32, 3, None, status="preempted",
             preempted_at={"epoch": 3, "step": 17, "steps": 40})
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
    assert by_dir == {"ok": "done", "failed": "failed", "diverged": "diverged", "preempted": "preempted",
                      "unfinished": "unfinished", "broken": "unfinished"}
    stopped = runs[runs["run_dir"].str.endswith("preempted")].iloc[0]  # where it stopped, as numbers
    assert (stopped["preempted_at_epoch"], stopped["preempted_at_step"], stopped["preempted_at_steps"]) == (3, 17, 40)
    assert "preempted_at" not in runs
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
    assert re.search(r"\| groups \(G\) \| 64 \| 32 \| 8 \| 1 \(LN\) \|", text)
    assert "| paper | 24.6 | 24.1 | 24.4 | 25.3 |" in text  # the paper's Table 3 (a) beside ours
    assert "| paper | 24.2 | 24.8 | 28.4 |" in text  # and (b)
    assert (tmp_path / "report" / "table_groups.tex").is_file() and (tmp_path / "report" / "fig_groups.pdf").is_file()


def test_claim_check_on_the_papers_own_numbers_holds(tmp_path):
    """Three seeds scattered ±0.05 around the paper's numbers: every sentence of the claim holds."""
    paper = {("bn", 32): 23.6, ("bn", 16): 23.7, ("bn", 8): 24.8, ("bn", 4): 27.3, ("bn", 2): 34.7,
             ("gn", 32): 24.1, ("gn", 16): 24.2, ("gn", 8): 24.0, ("gn", 4): 24.2, ("gn", 2): 24.1,
             ("ln", 32): 25.3, ("in", 32): 28.4}
    for (norm, n), error in paper.items():
        for seed, noise in enumerate((-0.05, 0.0, 0.05)):
            fake_run(tmp_path, f"{norm}{n}s{seed}", norm, n, seed, error + noise)
    results = findings(collect([tmp_path]))
    assert [f.verdict for f in results] == ["holds"] * 5, [(f.what, f.verdict) for f in results]
    assert results[0].ours == "+11.1 points" and results[1].ours == "spread 0.2 points"
    assert results[4].ours.startswith("GN < LN < IN")


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


REFERENCE = REPO / "results" / "reference"
PUBLISHED_STUDIES = sorted(path.parent for path in REFERENCE.rglob("runs.csv") if "runs" not in path.parent.parts)


def test_every_folder_with_published_tables_is_a_study_the_regeneration_test_covers():
    """A study published later is covered without editing this file: its tables sit beside its runs.csv."""
    with_tables = {path.parent for path in REFERENCE.rglob("table_*")}
    assert with_tables and with_tables <= set(PUBLISHED_STUDIES), with_tables - set(PUBLISHED_STUDIES)


@pytest.mark.parametrize("folder", PUBLISHED_STUDIES, ids=lambda p: str(p.relative_to(REFERENCE)))
def test_every_published_study_regenerates_byte_for_byte_from_its_runs_csv_with_no_flag(tmp_path, folder):
    """normlab-report on the published runs.csv alone (no run directories, no --metric: the study's reading.yaml
    says how it is read) rebuilds every committed table; a study that publishes its whole report has no other."""
    assert (folder / "runs.csv").exists() and (folder / "reading.yaml").exists(), f"{folder} is a published study"
    assert report_main([str(folder / "runs.csv"), "--out", str(tmp_path)]) == 0
    published = sorted(p.name for p in folder.glob("table_*"))
    regenerated = sorted(p.name for p in tmp_path.glob("table_*"))
    whole_report = (folder / "report.md").exists()
    assert published and (published == regenerated if whole_report else set(published) <= set(regenerated))
    for table in published:
        assert (tmp_path / table).read_text() == (folder / table).read_text(), table
    runs = pd.read_csv(folder / "runs.csv")
    assert set(runs["status"]) == {"done"}  # every run of the grid, none left out


def test_the_resnet20_regime_table_is_its_runs_summaries_and_the_readme_rule(tmp_path):
    """The ResNet-20 study publishes run folders as they finish, its tables only when every run is done: rebuilt
    from the folders, the regime table holds the seed means of their summaries, the paired margin, and the
    README's threshold max(2 sd, 2 se) computed here from its formula."""
    runs = REFERENCE / "cifar10_resnet20" / "runs"
    assert report_main([str(runs), "--out", str(tmp_path)]) == 0
    summaries = pd.DataFrame([json.loads(path.read_text()) for path in runs.glob("*/summary.json")])
    summaries["setting"] = summaries["norm"] + summaries["per_worker_batch"].astype(str)
    error = summaries.pivot_table(index=["epochs_planned", "seed"], columns="setting", values="val_error")
    table = (tmp_path / "table_budget_fixed_total.md").read_text().splitlines()
    rows = {int(line.split("|")[1]): [cell.strip() for cell in line.split("|")[1:-1]] for line in table
            if re.match(r"\| \d+ \|", line)}
    assert set(rows) == set(error.index.get_level_values(0))
    for epochs, row in rows.items():
        by_seed = error.loc[epochs]
        means = [f"{by_seed[setting].mean():.1f}" for setting in ("bn32", "bn2", "gn32")]
        assert row[4:7] == means, (epochs, row)
        margins = by_seed["bn2"] - by_seed["gn32"]
        assert row[9].replace("−", "-").startswith(f"{margins.mean():+.1f}"), (epochs, row)
        p = (by_seed["bn2"].mean() + by_seed["gn32"].mean()) / 200
        threshold = max(2 * margins.std(ddof=1), 2 * 100 * (p * (1 - p) / 10_000) ** 0.5)
        assert row[10] == f"{threshold:.1f}", (epochs, row)
        assert row[11] == ("yes" if margins.mean() > threshold else "no"), (epochs, row)


def test_the_published_table_2_is_the_mean_of_its_runs(tmp_path):
    folder = REFERENCE / "cifar10_small"
    report_main([str(folder / "runs.csv"), "--out", str(tmp_path)])
    runs = pd.read_csv(folder / "runs.csv")
    assert len(runs) == 24
    means = runs.groupby(["norm", "per_worker_batch"])["val_error_median5"].mean()  # Table 2, the slow way
    published = (tmp_path / "table_batch_size.md").read_text()
    for (norm, n), mean in means.items():
        assert f"{mean:.1f}" in published, (norm, n, mean)
    report = (tmp_path / "report.md").read_text()
    assert "chosen by the study's reading file" in report and "cifar10_jpeg (imagefolder)" in report


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
    paper = (out / "table_batch_size_paper.md").read_text()
    fixed = (out / "table_batch_size_fixed_total.md").read_text()
    assert "| BN | 20.5 ± 0.7 [14.1, 26.9] | 30.5 ± 0.7 [24.1, 36.9] | 2 |" in paper  # t with 1 df: ±12.7 SE
    assert "| BN | 25.5 ± 0.7 | 35.5 ± 0.7 | 2 |" in without_intervals(fixed)
    report = (out / "report.md").read_text()
    assert "## Does the claim hold? (paper protocol" in report and "## Does the claim hold? (fixed total batch" in report
    assert "W fixed" in (out / "table_batch_size_paper.tex").read_text()


def test_one_seed_cannot_decide_and_says_so(tmp_path):
    """One seed per cell: no interval over seeds, so every verdict is undecided and the report says why."""
    for norm, n, error in (("bn", 32, 2.0), ("bn", 2, 12.6), ("gn", 32, 2.2), ("gn", 2, 2.3)):
        fake_run(tmp_path, f"{norm}{n}", norm, n, 0, error, test_size=360)
    results = {f.what: f for f in findings(collect([tmp_path]))}
    assert results["BN's error rises from N=32 to N=2"].margin.mean == pytest.approx(10.6)
    assert {f.verdict for f in results.values()} == {"undecided"} and all(f.holds is None for f in results.values())
    report_main([str(tmp_path)])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| GN beats BN at N=2 | BN − GN = +10.3 points | +10.3 (one seed: no interval) |" in report
    assert "One seed per cell" in report


def test_a_margin_whose_interval_covers_zero_reads_undecided(tmp_path):
    """GN ahead of BN at N=2 by 1 point on average, but one seed of three the other way: undecided."""
    for seed, (bn2, gn2) in enumerate([(31.0, 29.0), (30.0, 30.5), (32.0, 30.5)]):
        for norm, n, error in (("bn", 32, 20.0 + seed), ("bn", 2, bn2), ("gn", 32, 24.0 + seed), ("gn", 2, gn2)):
            fake_run(tmp_path, f"{norm}{n}-s{seed}", norm, n, seed, error)
    crossing = {f.what: f for f in findings(collect([tmp_path]))}["GN beats BN at N=2"]
    diffs = [31.0 - 29.0, 30.0 - 30.5, 32.0 - 30.5]
    low, high = scipy_stats.t.interval(0.95, 2, loc=statistics.mean(diffs), scale=scipy_stats.sem(diffs))
    assert crossing.margin.mean == pytest.approx(1.0) and crossing.margin.paired
    assert crossing.interval == (pytest.approx(low), pytest.approx(high)) and low < 0 < high
    assert crossing.verdict == "undecided"


def test_verdicts_rest_on_the_paired_interval_of_the_difference(tmp_path):
    for seed, (bn2, gn2) in enumerate([(30.0, 25.0), (34.0, 27.0), (32.0, 26.0)]):
        for norm, n, error in (("bn", 32, 20.0 + seed), ("bn", 2, bn2), ("gn", 32, 24.0 + seed), ("gn", 2, gn2)):
            fake_run(tmp_path, f"{norm}{n}-s{seed}", norm, n, seed, error)
    crossing = {f.what: f for f in findings(collect([tmp_path]))}["GN beats BN at N=2"]
    diffs = [5.0, 7.0, 6.0]
    low, high = scipy_stats.t.interval(0.95, 2, loc=6.0, scale=scipy_stats.sem(diffs))
    assert crossing.margin.mean == pytest.approx(6.0) and crossing.interval == (pytest.approx(low), pytest.approx(high))
    assert crossing.verdict == "holds"


def test_intervals_equal_scipys_and_pairing_narrows_them_when_seeds_share_noise():
    values = [10.0, 12.5, 11.0, 13.0]
    e = estimate(values)
    low, high = scipy_stats.t.interval(0.95, 3, loc=statistics.mean(values), scale=scipy_stats.sem(values))
    assert (e.mean, e.std, e.n) == (pytest.approx(11.625), pytest.approx(statistics.stdev(values)), 4)
    assert (e.low, e.high) == (pytest.approx(low), pytest.approx(high))
    seed_noise = pd.Series([0.0, 3.0, -2.0, 1.5, -1.0])  # what a seed does to both cells alike (data order, init)
    a, b = 50.0 + seed_noise + pd.Series([0.1, -0.1, 0.0, 0.05, -0.05]), 48.0 + seed_noise
    paired, unpaired = difference(a, b, paired=True), difference(a, b, paired=False)
    welch = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (unpaired.low, unpaired.high) == (pytest.approx(welch.low), pytest.approx(welch.high))
    rel = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (paired.low, paired.high) == (pytest.approx(rel.low), pytest.approx(rel.high))
    assert paired.mean == pytest.approx(unpaired.mean) == pytest.approx(2.0)
    assert paired.half_width < unpaired.half_width / 10 and paired.low > 0 > unpaired.low


def test_under_a_fixed_total_batch_the_claim_check_tests_the_invariance(tmp_path):
    for seed in (0, 1, 2):
        for n, bn in ((32, 20.0), (8, 22.0), (2, 31.0)):
            fixed_total_run(tmp_path, "bn", n, seed, bn + seed)
        for n in (32, 2):
            fixed_total_run(tmp_path, "gn", n, seed, 25.0 + seed)
            fixed_total_run(tmp_path, "ln", n, seed, 27.0 + seed + (0.5 if (n, seed) == (2, 1) else 0.0))
    runs = collect([tmp_path])
    results = {f.what: f for f in findings(runs)}
    assert not any(what.startswith("GN is flat") for what in results)  # flatness is no finding under fixed B
    assert not any("identical" in what for what in results)  # the invariance is a sanity check, not a claim
    checks = {f.what: f for f in sanity(runs)}
    assert checks["GN identical at N ∈ {32, 2} (it never sees N)"].verdict == "holds"
    ln = checks["LN identical at N ∈ {32, 2} (it never sees N)"]
    assert ln.verdict == "does not hold" and "0.50 points" in ln.ours
    assert results["BN's error rises from N=32 to N=2"].margin.paired  # every N shares seeds and data order
    assert results["BN's error rises from N=32 to N=2"].verdict == "holds"
    assert results["GN beats BN at N=2"].margin.mean == pytest.approx(6.0)
    report_main([str(tmp_path)])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Sanity checks" in report and "| LN identical at N ∈ {32, 2} (it never sees N) |" in report


def test_runs_at_several_budgets_get_a_table_each_and_the_crossing_vs_budget(tmp_path):
    """Each budget is its own Table 2 (never averaged with another); the budget table has GN's lag, BN's penalty
    and the crossing margin at N=2, computed here from the cells by hand."""
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
    assert "| 4 | – | 400 | 1 | 50.0 | 62.0 | 60.0 | +10.0 | +12.0 | +2.0 | – | no |" in budget
    assert "| 16 | – | 1,600 | 1 | 30.0 | 38.0 | 35.0 | +5.0 | +8.0 | +3.0 | – | no |" in budget
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
    table = without_intervals((tmp_path / "report" / "table_bn_eval.md").read_text())
    assert "| BN, ema | 20.5 ± 0.7 | 35.5 ± 0.7 | +15.0 |" in table
    assert "| BN, precise | 19.5 ± 0.7 | 30.5 ± 0.7 | +11.0 |" in table
    assert "| BN, batch | 21.5 ± 0.7 | 26.5 ± 0.7 | +5.0 |" in table
    assert "| GN | 24.5 ± 0.7 | 24.5 ± 0.7 | 0.0 |" in table
    assert "| precise − EMA | −1.0 | −5.0 |" in table and "| batch − EMA | +1.0 | −9.0 |" in table
    # each seed's rise is the same 15.0: paired by seed (fixed total batch), its interval has no width
    assert "+15.0 [+15.0, +15.0]" in (tmp_path / "report" / "table_bn_eval.md").read_text()
    assert (tmp_path / "report" / "fig_bn_eval.png").is_file()
    assert report_main([str(tmp_path), "--metric", "val_error_batch_median5", "--out", str(tmp_path / "b")]) == 0
    batch_table = without_intervals((tmp_path / "b" / "table_batch_size.md").read_text())
    assert "| BN | 21.5 ± 0.7 | 26.5 ± 0.7 | 2 |" in batch_table


# ---------------------------------------------------------------- Tables 1 and 3, provenance, the metric

def test_table_1_appears_beside_the_papers_only_when_bn_and_another_norm_share_the_largest_n(tmp_path):
    for seed in (0, 1, 2):
        for norm, error in (("bn", 30.0), ("gn", 31.0), ("ln", 33.0)):
            fake_run(tmp_path / "all", f"{norm}-s{seed}", norm, 32, seed, error + seed)
        fake_run(tmp_path / "bn_only", f"bn32-s{seed}", "bn", 32, seed, 30.0 + seed)
        fake_run(tmp_path / "bn_only", f"gn8-s{seed}", "gn", 8, seed, 31.0 + seed)
    table = norms_table(collect([tmp_path / "all"]))
    assert table["norm"].tolist() == ["bn", "gn", "ln"]
    gn = table.set_index("norm").loc["gn"]
    assert gn["delta"].mean == pytest.approx(1.0) and gn["delta"].paired and gn["delta"].half_width == 0
    assert gn["paper"] == 24.1 and gn["paper_delta"] == pytest.approx(0.5)
    assert report_main([str(tmp_path / "all")]) == 0
    text = (tmp_path / "all" / "report" / "table_norms.md").read_text()
    assert "| GN | 32.0 ± 1.0 [29.5, 34.5] | +1.0 [+1.0, +1.0] | 3 | 24.1 | +0.5 |" in text
    assert "\\toprule" in (tmp_path / "all" / "report" / "table_norms.tex").read_text()
    assert norms_table(collect([tmp_path / "bn_only"])).empty
    assert report_main([str(tmp_path / "bn_only")]) == 0
    assert not (tmp_path / "bn_only" / "report" / "table_norms.md").exists()


def test_table_3_needs_an_ablation_of_three_settings(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, f"g8-s{seed}", "gn", 32, seed, 30.0 + seed, groups=8)
        fake_run(tmp_path, f"ln-s{seed}", "ln", 32, seed, 31.0 + seed, groups=1)
        fake_run(tmp_path, f"bn-s{seed}", "bn", 32, seed, 29.0 + seed)
    assert groups_tables(collect([tmp_path])) == {}  # G=8 beside LN: two settings, no ablation
    assert report_main([str(tmp_path)]) == 0
    assert not any((tmp_path / "report" / name).exists() for name in ("table_groups.md", "fig_groups.png"))


def test_a_report_from_runs_of_two_commits_names_both_and_flags_it(tmp_path):
    fake_run(tmp_path / "one", "a", "bn", 32, 0, 10.0, git_commit="aaaa1111")
    fake_run(tmp_path / "one", "b", "bn", 32, 1, 11.0, git_commit="aaaa1111")
    assert report_main([str(tmp_path / "one")]) == 0
    clean = (tmp_path / "one" / "report" / "report.md").read_text()
    assert "| aaaa1111 | no | 2 |" in clean and "Flagged" not in clean
    fake_run(tmp_path / "two", "a", "bn", 32, 0, 10.0, git_commit="aaaa1111")
    fake_run(tmp_path / "two", "b", "bn", 32, 1, 11.0, git_commit="bbbb2222-dirty")
    assert report_main([str(tmp_path / "two")]) == 0
    report = (tmp_path / "two" / "report" / "report.md").read_text()
    assert "| aaaa1111 | no | 1 |" in report and "| bbbb2222 | yes | 1 |" in report
    assert "**Flagged: mixed commits: the runs come from 2 commits (aaaa1111, bbbb2222).**" in report
    assert "**Flagged: dirty tree: 1 of 2 runs were made with uncommitted changes.**" in report


def test_without_a_reading_the_median_of_5_is_not_used_on_runs_that_decay_to_zero(tmp_path):
    """Runs whose lr changes every epoch (cosine) have one evaluation at their final lr: the report uses the final
    evaluation and says why; runs with 5 or more at their final lr keep the paper's median of the last 5."""
    for name, lrs in (("cosine", [0.1, 0.08, 0.05, 0.02, 0.005, 0.001]), ("step", [0.1, 0.01, 0.01, 0.01, 0.01, 0.01])):
        for seed in (0, 1):
            run = fake_run(tmp_path / name, f"bn-s{seed}", "bn", 32, seed, 10.0 + seed)
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "val_error": 10.0 + seed,
                                                          "val_error_median5": 20.0 + seed}))
            rows = [{"epoch": e + 1, "lr": lr, "train_error": 9.0, "val_error": 10.0} for e, lr in enumerate(lrs)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert report_main([str(tmp_path / "cosine")]) == 0
    report = (tmp_path / "cosine" / "report" / "report.md").read_text()
    assert "(`val_error`), chosen by the runs' lr records" in report and "fewest: 1" in report
    assert "| BN | 10.5 ± 0.7 [4.1, 16.9] |" in (tmp_path / "cosine" / "report" / "table_batch_size.md").read_text()
    assert report_main([str(tmp_path / "step")]) == 0
    assert "| BN | 20.5 ± 0.7" in (tmp_path / "step" / "report" / "table_batch_size.md").read_text()
    out = tmp_path / "asked"  # the median asked for by --metric on the cosine runs: used, with a warning
    assert report_main([str(tmp_path / "cosine"), "--metric", "val_error_median5", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "chosen by --metric" in report and "**Beware**: 2 of 2 runs have fewer than 5 evaluations" in report
    assert "| BN | 20.5 ± 0.7" in (out / "table_batch_size.md").read_text()


def test_the_binomial_floor_widens_a_verdict_the_seeds_alone_would_decide():
    from normlab.analysis.intervals import Estimate, binomial_floor, verdict

    tight = Estimate(mean=1.0, std=0.1, n=3, low=0.75, high=1.25)  # seeds agree: the interval is above zero
    floor = binomial_floor((40.0, 10_000), (41.0, 10_000))
    assert floor == pytest.approx(1.96 * 100 * ((0.4 * 0.6 + 0.41 * 0.59) / 10_000) ** 0.5, rel=1e-3)
    assert verdict(tight) == "holds" and verdict(tight, floor) == "undecided"  # 1.0 ± 1.37 covers zero
    assert verdict(Estimate(mean=3.0, std=0.1, n=3, low=2.75, high=3.25), floor) == "holds"


def test_figure_lines_break_where_n_has_no_runs_and_legends_spell_out_seeds():
    from normlab.analysis.figures import _segments, seeds_text

    assert _segments([32, 16, 4, 2], [32, 16, 8, 4, 2]) == [[32, 16], [4, 2]]
    assert _segments([32, 2], [32, 16, 8, 4, 2]) == [[32], [2]]  # two points, no line across N=16, 8, 4
    assert (seeds_text([1]), seeds_text([2, 2]), seeds_text([2, 3])) == ("1 seed", "2 seeds", "2–3 seeds")


@pytest.mark.parametrize("content, words", [("metric: val_eror\nwhy: typo\n", "metric='val_eror'"),
                                            ("metric: val_error\n", "needs a 'why'"),
                                            ("colour: red\n", "unknown key 'colour'"), ("[1, 2\n", "cannot be read")])
def test_a_bad_reading_file_is_refused_before_any_work(tmp_path, capsys, content, words):
    fake_run(tmp_path, "a", "bn", 32, 0, 10.0)
    (tmp_path / "reading.yaml").write_text(content)
    assert report_main([str(tmp_path)]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "report").exists()


def test_the_html_page_escapes_what_it_read_from_disk(tmp_path):
    fake_run(tmp_path, "<img src=x onerror=alert(1)>", "bn", 32, 0, None, status="failed", error="x")
    fake_run(tmp_path, "ok", "bn", 32, 1, 10.0)
    assert report_main([str(tmp_path)]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_html_page_keeps_underscores_inside_an_italic_line_and_embeds_only_its_own_figures(tmp_path):
    from normlab.analysis.html_page import to_html

    Image.new("RGB", (2, 2)).save(tmp_path / "fig_a.png")
    (tmp_path.parent / "outside.png").write_bytes(b"not ours")
    page = to_html("_no runs of val_error_median5_\n![a](fig_a.png)\n![b](../outside.png)\n![c](missing.png)", tmp_path)
    assert "<p><em>no runs of val_error_median5</em></p>" in page
    assert page.count("<img") == 1 and 'alt="fig_a.png" src="data:image/png;base64,' in page


def contrast_on_white(color) -> float:
    """WCAG 2's contrast ratio against white, from its relative-luminance formula."""
    from matplotlib.colors import to_rgb

    channel = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(color)]
    luminance = 0.2126 * channel[0] + 0.7152 * channel[1] + 0.0722 * channel[2]
    return 1.05 / (luminance + 0.05)


def test_every_norms_colour_and_the_curves_ramp_keep_3_to_1_contrast_on_white():
    import matplotlib

    from normlab.analysis.figures import RAMP_END
    from normlab.analysis.metrics_info import NORM_COLORS

    ramp = matplotlib.colormaps["plasma"]
    colours = {**NORM_COLORS, "ramp end": ramp(RAMP_END)}
    assert {name: round(contrast_on_white(c), 2) for name, c in colours.items() if contrast_on_white(c) < 3} == {}
    assert len(set(NORM_COLORS.values())) == len(NORM_COLORS)  # the same norm always one colour, no two alike
    from normlab.analysis.metrics_info import NORM_LABELS, NORM_MARKERS
    from normlab.norms.registry import NORMS

    assert set(NORMS) == set(NORM_LABELS) == set(NORM_COLORS) == set(NORM_MARKERS)  # every registered norm drawn


def test_latex_tables_escape_what_latex_reads_as_commands_and_write_one_minus_sign():
    from normlab.analysis.metrics_info import with_sign
    from normlab.analysis.tables import latex_text

    assert latex_text("error (%) & x_1 #2: −0.6 ± 1.0 – Δ") == \
        r"error (\%) \& x\_1 \#2: $-$0.6 $\pm$ 1.0 -- $\Delta$"
    assert (with_sign(-0.64), with_sign(0.0), with_sign(2.26)) == ("−0.6", "0.0", "+2.3")
    assert (with_sign(-0.04), with_sign(0.049), with_sign(-0.051)) == ("0.0", "0.0", "−0.1")  # no "−0.0"
