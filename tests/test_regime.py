"""The regime map's differences, intervals and crossing rule, against hand arithmetic and scipy."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from normlab.analysis import regime
from normlab.analysis.collect import tidy
from normlab.analysis.intervals import binomial_error


def runs_from(margins: dict[int, list[float]], lag: float = 5.0, penalty: float = 4.0) -> pd.DataFrame:
    """Runs whose paired differences are known: at each budget and seed, BN(32) = 20, BN(2) = 20 + penalty,
    GN = BN(2) - margin."""
    rows = []
    for epochs, per_seed in margins.items():
        for seed, margin in enumerate(per_seed):
            bn_small = 20 + penalty
            for norm, n, error, groups in (("bn", 32, 20.0, None), ("bn", 2, bn_small, None),
                                           ("gn", 32, bn_small - margin, 8)):
                rows.append({"status": "done", "norm": norm, "per_worker_batch": n, "groups": groups, "seed": seed,
                             "epochs_planned": epochs, "val_error": error, "train_size": 50_000,
                             "steps_per_epoch": 390, "test_size": 10_000})
    return tidy(pd.DataFrame(rows))  # the columns a collected runs table has


def test_differences_are_paired_by_seed():
    seeds = regime.per_seed(runs_from({5: [-3.0, -1.0]}))
    assert list(seeds["seed"]) == [0, 1]
    assert seeds["margin"].tolist() == pytest.approx([-3.0, -1.0])
    assert seeds["penalty"].tolist() == pytest.approx([4.0, 4.0])
    assert seeds["lag"].tolist() == pytest.approx([7.0, 5.0])  # GN − BN(32) = penalty − margin
    assert seeds["images"].tolist() == [250_000, 250_000] and seeds["steps"].tolist() == [1950, 1950]


def test_the_margins_interval_is_students_t_and_its_verdict_is_beside_the_rule():
    values = np.array([1.0, 2.5, 4.0])
    row = regime.budget_summary(regime.per_seed(runs_from({5: list(values)}))).iloc[0]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert row["margin"] == pytest.approx(2.5) and row["margin_sd"] == pytest.approx(values.std(ddof=1))
    assert (row["margin"] - row["margin_ci"], row["margin"] + row["margin_ci"]) == pytest.approx((low, high))
    assert low < 0 and row["interval"] == "undecided"  # the interval covers zero
    tight = regime.budget_summary(regime.per_seed(runs_from({5: [2.4, 2.5, 2.6]}))).iloc[0]
    assert tight["interval"] == "holds" and tight["clears"]  # here the two readings agree
    one = regime.budget_summary(regime.per_seed(runs_from({5: [2.0]}))).iloc[0]
    assert math.isnan(one["margin_ci"]) and one["interval"] == "undecided"


def test_binomial_error_formula():
    assert binomial_error(20.0, 10_000) == pytest.approx(100 * math.sqrt(0.2 * 0.8 / 10_000))
    assert math.isnan(binomial_error(20.0, None)) and math.isnan(binomial_error(20.0, float("nan")))
    unknown = runs_from({5: [3.0, 3.1]}).assign(test_size=pd.NA)  # no test set size recorded: no threshold
    row = regime.budget_summary(regime.per_seed(unknown)).iloc[0]
    assert math.isnan(row["threshold"]) and not row["clears"]


def test_the_rule_picks_the_shortest_budget_that_clears_and_stays_positive():
    summary = regime.budget_summary(regime.per_seed(runs_from(
        {5: [-6.0, -5.0], 10: [3.0, -1.0], 20: [3.0, 3.2], 40: [4.0, 4.4]})))
    assert summary["clears"].tolist() == [False, False, True, True]  # at 10, the spread (2.8) beats the mean
    assert regime.crossing_budget(summary) == 20


def test_the_rule_refuses_a_crossing_that_does_not_last():
    summary = regime.budget_summary(regime.per_seed(runs_from({5: [3.0, 3.1], 10: [-0.5, -0.4]})))
    assert summary["clears"].tolist() == [True, False]
    assert regime.crossing_budget(summary) is None


def test_one_seed_never_clears():
    summary = regime.budget_summary(regime.per_seed(runs_from({5: [9.0]})))
    assert not summary["clears"].any() and regime.crossing_budget(summary) is None


@pytest.mark.parametrize("m20, m40, expected", [([-8.0, -8.2], [-4.0, -4.2], True),   # moved 4 points, below
                                                ([-5.0, -5.2], [-4.0, -4.2], False),  # moved 1 point
                                                ([-8.0, -8.2], [4.0, 4.2], False)])   # cleared at 40
def test_the_80_epoch_extension(m20, m40, expected):
    summary = regime.budget_summary(regime.per_seed(runs_from({20: m20, 40: m40})))
    assert regime.needs_extension(summary) is expected
    text = regime.regime_markdown(summary, regime.per_seed(runs_from({20: m20, 40: m40})))
    assert ("the 80-epoch runs come before Figure 1's budget is read" in text) is expected
    assert ("Figure 1's budget by the rule: " in text) is not expected


def test_reproduction_points_from_the_published_numbers():
    points = regime.reproduction_points(regime.reproductions()).set_index("source")
    befranke = points.loc["BeFranke/GroupNorm results.csv"]
    assert befranke["lag"] == pytest.approx(14.05 - 13.60)
    assert befranke["penalty"] == pytest.approx(19.70 - 13.60)
    assert befranke["margin"] == pytest.approx(19.70 - 14.21)  # GN at N=2, where it was run
    assert befranke["steps"] == pytest.approx(5_000_000 / 32)


def test_the_table_and_figure_say_what_the_rule_found(tmp_path):
    seeds = regime.per_seed(runs_from({5: [-6.0, -5.0], 10: [-4.0, -3.6], 20: [-2.0, -2.2]}))
    summary = regime.budget_summary(seeds)
    text = regime.regime_markdown(summary, seeds)
    assert "No crossing by 20 epochs" in text and "reaches zero near" in text
    assert text.rstrip().endswith("Figure 1's budget by the rule: 40 epochs (no crossing).")
    crossing = regime.budget_summary(regime.per_seed(runs_from({5: [-6.0, -5.0], 10: [3.0, 3.2], 20: [4.0, 4.4]})))
    assert regime.next_step(crossing, regime.crossing_budget(crossing)) == " Figure 1's budget by the rule: 10 epochs."
    written = regime.fig_regime(seeds, summary, regime.reproductions(), tmp_path)
    assert {p.name for p in written} == {"fig_regime.png", "fig_regime.pdf"}


def test_a_group_ablation_beside_the_map_stays_out_of_it():
    runs = runs_from({5: [-3.0, -1.0], 10: [-2.0, -1.0]})
    ablation = runs[runs["norm"] == "gn"].assign(groups=2, val_error=99.0)
    seeds = regime.per_seed(pd.concat([runs, ablation.iloc[:1]], ignore_index=True))  # 1 ablation run, 4 of G=8
    assert seeds["margin"].tolist() == pytest.approx([-3.0, -1.0, -2.0, -1.0])
