"""Where the paper's claim holds: GN's lag, BN's small-batch penalty and the crossing margin against the budget.

A regime map is BN at a large and a small N and GN, under a fixed total batch, each trained for several budgets
(each budget its own run with its own schedule), with the same seeds at every budget. Per budget and seed:

    lag     = GN − BN(N large)       GN's cost where BN has all its images (the paper: +0.5 at N=32)
    penalty = BN(N small) − BN(N large)   BN's cost of few images per worker
    margin  = BN(N small) − GN       the claim itself: > 0 when GN beats BN at the small N

paired by seed (the runs of one seed share their initialization draw and data order). The crossing rule,
fixed before the study ran (results/reference/cifar10_resnet20/README.md), picks the shortest budget whose
mean margin exceeds twice its seed spread and twice the test set's binomial error, and stays positive at every
longer budget.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from normlab.analysis.cells import finished, main_setting
from normlab.analysis.figures import STYLE, plt, save
from normlab.analysis.intervals import binomial_error, binomial_floor, estimate, verdict
from normlab.analysis.metrics_info import with_sign

DIFFERENCES = {  # column: (label, colour; Okabe-Ito, colour-blind safe)
    "lag": ("GN − BN(N={big}): GN's lag", "#D55E00"),
    "penalty": ("BN(N={small}) − BN(N={big}): BN's penalty", "#0072B2"),
    "margin": ("BN(N={small}) − GN: the crossing margin", "#009E73"),
}
FALLBACK_EPOCHS = 40  # Figure 1's budget when no budget of the map shows the crossing
EXTENSION_MOVE = 2.0  # points the margin must move from 20 to 40 epochs for the 80-epoch runs


def reproductions() -> pd.DataFrame:
    """Published CIFAR reproductions of the claim (normlab/reference/cifar_reproductions.csv)."""
    with resources.files("normlab").joinpath("reference/cifar_reproductions.csv").open() as f:
        return pd.read_csv(f)


def budgets(runs: pd.DataFrame) -> list[int]:
    """The distinct planned epoch counts of the finished runs, smallest first."""
    return sorted(int(e) for e in finished(runs)["epochs_planned"].dropna().unique())


def per_seed(runs: pd.DataFrame, metric: str = "val_error") -> pd.DataFrame:
    """One row per (budget, seed) with all three settings finished: their errors and the three differences.
    GN is the study's own setting (its most common group count), never a group ablation beside it."""
    done = main_setting(runs)
    done = done[done["norm"].isin(["bn", "gn"]) & done[metric].notna()]
    bn, gn = done[done["norm"] == "bn"], done[done["norm"] == "gn"]
    if bn.empty or gn.empty:
        return pd.DataFrame()
    big, small = int(bn["per_worker_batch"].max()), int(bn["per_worker_batch"].min())
    if big == small:
        return pd.DataFrame()
    rows = []
    for (epochs, seed), cell in done.groupby(["epochs_planned", "seed"]):
        def error(frame, n=None):
            pick = frame[(frame["epochs_planned"] == epochs) & (frame["seed"] == seed)]
            pick = pick if n is None else pick[pick["per_worker_batch"] == n]
            return float(pick[metric].mean()) if len(pick) else math.nan  # GN at several N: they agree
        bn_big, bn_small, gn_err = error(bn, big), error(bn, small), error(gn)
        if any(math.isnan(v) for v in (bn_big, bn_small, gn_err)):
            continue
        sample = cell.iloc[0]
        train_size = sample.get("train_size")
        steps_per_epoch = sample.get("steps_per_epoch")
        rows.append({
            "epochs": int(epochs), "seed": int(seed), "big": big, "small": small,
            "images": int(epochs * train_size) if pd.notna(train_size) else None,
            "steps": int(epochs * steps_per_epoch) if pd.notna(steps_per_epoch) else None,
            "test_size": sample.get("test_size"),
            "bn_big": bn_big, "bn_small": bn_small, "gn": gn_err,
            "lag": gn_err - bn_big, "penalty": bn_small - bn_big, "margin": bn_small - gn_err,
        })
    return pd.DataFrame(rows)


def budget_summary(seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per budget: mean, seed spread and 95% half-width of each difference, and the rule's verdict."""
    rows = []
    for epochs, cell in seeds.groupby("epochs"):
        row = {"epochs": int(epochs), "images": cell["images"].iloc[0], "steps": cell["steps"].iloc[0],
               "seeds": len(cell), "bn_big": cell["bn_big"].mean(), "bn_small": cell["bn_small"].mean(),
               "gn": cell["gn"].mean()}
        spreads = {column: estimate(cell[column]) for column in DIFFERENCES}
        for column, spread in spreads.items():
            row[column] = spread.mean
            row[f"{column}_sd"] = spread.std if spread.n >= 2 else math.nan
            row[f"{column}_ci"] = math.nan if spread.half_width is None else spread.half_width
        test_size = cell["test_size"].iloc[0]  # not recorded: no binomial error, so no threshold either
        row["binomial"] = binomial_error((row["bn_small"] + row["gn"]) / 2, test_size)
        known = row["seeds"] >= 2 and not math.isnan(row["binomial"])
        row["threshold"] = max(2 * row["margin_sd"], 2 * row["binomial"]) if known else math.nan
        row["clears"] = bool(known and row["margin"] > row["threshold"])
        floor = binomial_floor((row["bn_small"], test_size), (row["gn"], test_size))
        row["interval"] = verdict(spreads["margin"], floor)  # the report's general reading, beside the rule
        rows.append(row)
    return pd.DataFrame(rows).sort_values("epochs").reset_index(drop=True)


def crossing_budget(summary: pd.DataFrame) -> int | None:
    """The shortest budget whose margin clears its threshold and stays positive at every longer budget."""
    for i, row in summary.iterrows():
        if row["clears"] and (summary.loc[i:, "margin"] > 0).all():
            return int(row["epochs"])
    return None


def needs_extension(summary: pd.DataFrame) -> bool:
    """The 80-epoch runs: the margin at 40 epochs still at or below its threshold, and moved by more than
    EXTENSION_MOVE points from 20 to 40."""
    by = summary.set_index("epochs")
    if not {20, 40} <= set(by.index) or by.loc[40, "seeds"] < 2:
        return False
    return bool(not by.loc[40, "clears"] and abs(by.loc[40, "margin"] - by.loc[20, "margin"]) > EXTENSION_MOVE)


def trend(summary: pd.DataFrame) -> dict | None:
    """A least-squares line of the mean margin against log2(training images), and where it reaches zero."""
    if len(summary) < 2 or summary["images"].isna().any():
        return None
    x, y = np.log2(summary["images"].astype(float)), summary["margin"].astype(float)
    slope, intercept = np.polyfit(x, y, 1)
    zero = None if slope <= 0 else float(2 ** (-intercept / slope))
    per_epoch = float(summary["images"].iloc[0] / summary["epochs"].iloc[0])
    return {"slope_per_doubling": float(slope), "zero_images": zero,
            "zero_epochs": None if zero is None else zero / per_epoch}


def reproduction_points(reference: pd.DataFrame) -> pd.DataFrame:
    """The same three differences from each published reproduction, wherever its rows allow them."""
    rows = []
    for (source, images), cell in reference.groupby(["source", "images_seen"]):
        bn, gn = cell[cell["norm"] == "bn"], cell[cell["norm"] == "gn"]
        if bn.empty or gn.empty:
            continue
        big, small = bn["per_worker_batch"].max(), bn["per_worker_batch"].min()
        at = lambda frame, n: frame.loc[frame["per_worker_batch"] == n, "val_error"]  # noqa: E731
        gn_big = at(gn, big)
        gn_small = at(gn, small) if small in set(gn["per_worker_batch"]) else gn_big
        total = big * int(cell["workers"].iloc[0])
        point = {"source": source, "images": float(images), "steps": float(images) / total}
        if len(gn_big):
            point["lag"] = float(gn_big.iloc[0] - at(bn, big).iloc[0])
        if small < big:
            point["penalty"] = float(at(bn, small).iloc[0] - at(bn, big).iloc[0])
            point["margin"] = float(at(bn, small).iloc[0] - gn_small.iloc[0])
        rows.append(point)
    return pd.DataFrame(rows)


def regime_markdown(summary: pd.DataFrame, seeds: pd.DataFrame, metric_label: str = "final top-1 val error (%)") -> str:
    if summary.empty:
        return "_no budget with BN at two N and GN finished for a common seed_\n"
    big, small = int(seeds["big"].iloc[0]), int(seeds["small"].iloc[0])

    def cell(row, column):
        text = with_sign(row[column])
        if not math.isnan(row[f"{column}_sd"]):
            text += f" ± {row[f'{column}_sd']:.1f} [±{row[f'{column}_ci']:.1f}]"
        return text

    lines = [f"| epochs | images | steps | seeds | BN, N={big} | BN, N={small} | GN | GN − BN(N={big}) | "
             f"BN(N={small}) − BN(N={big}) | BN(N={small}) − GN | threshold | clears | 95% interval |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        threshold = "–" if math.isnan(r["threshold"]) else f"{r['threshold']:.1f}"
        count = {k: "–" if r[k] is None or pd.isna(r[k]) else f"{int(r[k]):,}" for k in ("images", "steps")}
        lines.append(f"| {r['epochs']} | {count['images']} | {count['steps']} | {r['seeds']} | {r['bn_big']:.1f} | "
                     f"{r['bn_small']:.1f} | {r['gn']:.1f} | {cell(r, 'lag')} | {cell(r, 'penalty')} | "
                     f"{cell(r, 'margin')} | {threshold} | {'yes' if r['clears'] else 'no'} | {r['interval']} |")
    lines += ["", f"{metric_label[0].upper()}{metric_label[1:]}, mean over seeds; differences in points, paired by seed: "
              "mean ± sample standard deviation [± half-width of the Student-t 95% interval]. The threshold is "
              "max(2 × the margin's seed spread, 2 × the test set's binomial error): the rule that picks Figure 1's budget, "
              "fixed before the ResNet-20 study ran. The last column is the report's general verdict on the margin (docs/reports.md): holds "
              "when its 95% interval, widened to the test set's binomial floor, lies above zero, does not hold below "
              "it, undecided when it covers zero or there is one seed."]
    found = crossing_budget(summary)
    line = trend(summary)
    if summary["seeds"].max() < 2:
        verdict = "One seed per budget: the margin has no seed spread, so the rule cannot decide."
    elif found is not None:
        verdict = f"The crossing: BN(N={small}) − GN clears its threshold from {found} epochs on."
    else:
        verdict = (f"No crossing by {int(summary['epochs'].max())} epochs: no budget's margin clears its threshold "
                   "and stays positive.")
    if found is None and line is not None and line["zero_epochs"] is not None:
        verdict += (f" A line through the mean margins against log2(images) rises {line['slope_per_doubling']:.1f}"
                    f" points per doubling and reaches zero near {line['zero_epochs']:.0f} epochs "
                    f"({line['zero_images']:,.0f} images): an extrapolation, not a measurement.")
    elif found is None and line is not None:
        verdict += " The mean margin does not rise with the budget."
    return "\n".join(lines) + "\n\n" + verdict + next_step(summary, found) + "\n"


def next_step(summary: pd.DataFrame, found: int | None) -> str:
    """What the plan's rules make of the map (the study README): the 80-epoch runs, or Figure 1's budget."""
    if summary["seeds"].max() < 2:
        return ""
    if needs_extension(summary) and 80 not in set(summary["epochs"]):
        return (f" The plan's next step: at 40 epochs the margin is at or below its threshold and moved by more than "
                f"{EXTENSION_MOVE:g} points from 20 epochs, so the 80-epoch runs come before Figure 1's budget is read.")
    budget = found if found is not None else FALLBACK_EPOCHS
    return f" Figure 1's budget by the rule: {budget} epochs" + ("." if found is not None else " (no crossing).")


def fig_regime(seeds: pd.DataFrame, summary: pd.DataFrame, reference: pd.DataFrame, out: Path,
               name: str = "fig_regime") -> list[Path]:
    """The three differences against training images and against steps, per-seed points and 95% intervals,
    with the published reproductions' points (hollow) on the same axes."""
    if summary.empty:
        return []
    big, small = int(seeds["big"].iloc[0]), int(seeds["small"].iloc[0])
    published = reproduction_points(reference)
    markers = dict(zip(sorted(published["source"].unique()) if len(published) else [], "^vDsP"))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
        for ax, x in zip(axes, ("images", "steps")):
            for column, (label, colour) in DIFFERENCES.items():
                ax.errorbar(summary[x], summary[column], yerr=summary[f"{column}_ci"].fillna(0), color=colour,
                            marker="o", linewidth=2, capsize=3,
                            label=label.format(big=big, small=small) if ax is axes[0] else None)
                ax.scatter(seeds[x], seeds[column], color=colour, s=12, alpha=0.6, zorder=3)
                for source, points in published.groupby("source") if len(published) else []:
                    points = points.dropna(subset=[column]) if column in points else points.iloc[0:0]
                    ax.scatter(points[x], points[column], facecolors="none", edgecolors=colour,
                               marker=markers[source], s=55, linewidths=1.5, zorder=4)
            ax.axhline(0, color="#333333", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("training images (one run per budget)" if x == "images" else "optimizer steps")
        for source, marker in markers.items():
            axes[1].scatter([], [], marker=marker, facecolors="none", edgecolors="#555555",
                            label=f"published: {source.split(' ')[0]}")
        axes[0].set_ylabel("difference in top-1 test error (points)")
        handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
        labels = [label for ax in axes for label in ax.get_legend_handles_labels()[1]]
        fig.legend(handles, labels, frameon=False, fontsize=9, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.03))
        fig.suptitle("Where the claim holds: the three differences against the training budget", fontsize=12)
        return save(fig, out / name, ("png", "pdf"))
