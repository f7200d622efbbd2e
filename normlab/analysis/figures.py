"""The paper's figures: error vs batch size (Figure 1), the group ablation (Table 3), training curves (Figures 4–5).

Print style: every seed's point beside the mean and its 95% interval, a line only between batch sizes that both have
runs, one colour and marker per norm everywhere (metrics_info), the seed count spelled out, PNG and PDF of each.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from normlab.analysis.cells import DEFAULT_METRIC, main_setting  # noqa: E402
from normlab.analysis.intervals import estimate  # noqa: E402
from normlab.analysis.metrics_info import (METRICS, norm_color, norm_label, norm_marker,  # noqa: E402
                                           norm_sort_key, protocol_label)
from normlab.analysis.reference import paper_table  # noqa: E402
from normlab.analysis.untrusted import file_token  # noqa: E402

STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "pdf.fonttype": 42}  # TrueType in the PDF: a journal's checker accepts it
FORMATS = ("png", "pdf")


def save(fig, path: Path, formats=FORMATS) -> list[Path]:
    """Byte for byte the same from the same runs: no creation date in a PDF (published figures regenerate)."""
    written = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        fig.savefig(target, dpi=150, bbox_inches="tight", metadata=metadata)
        written.append(target)
    plt.close(fig)
    return written


def _log2_axis(ax, values, descending: bool = True) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({int(v) for v in values}, reverse=descending)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    if descending:
        ax.set_xlim(max(ticks) * 1.3, min(ticks) / 1.3)
    else:
        ax.set_xlim(min(ticks) / 1.3, max(ticks) * 1.3)


def _segments(present: list, grid: list) -> list[list]:
    """The runs of consecutive grid values that are all present: a line is drawn only within one."""
    out, current = [], []
    for value in grid:
        if value in present:
            current.append(value)
        else:
            out, current = out + [current] * bool(current), []
    return out + [current] * bool(current)


def seeds_text(counts) -> str:
    low, high = int(min(counts)), int(max(counts))
    n = str(low) if low == high else f"{low}–{high}"
    return f"{n} seed" + ("s" if high > 1 else "")


def plot_cells(ax, long: pd.DataFrame, x: str, grid: list, color: str, marker: str, label: str,
               linestyle: str = "-", dodge: float = 1.0, points: bool = True) -> None:
    """One series: each seed's value (open markers), the mean with its 95% interval (error bar), and a line through
    the means of neighbouring grid values only. `long`: one row per seed, columns `x` and ``value``; `dodge`
    shifts the series sideways (a factor on a log axis) so that series at equal values stay visible."""
    cells = {v: estimate(g["value"]) for v, g in long.groupby(x)}
    if not cells:
        return
    xs = sorted(cells, key=grid.index)
    for segment in _segments(xs, grid):
        if len(segment) > 1:
            ax.plot([v * dodge for v in segment], [cells[v].mean for v in segment], color=color,
                    linestyle=linestyle, linewidth=1.8, zorder=2)
    if points:
        ax.scatter(long[x].astype(float) * dodge, long["value"], s=18, facecolors="none", edgecolors=color,
                   marker=marker, linewidths=0.9, alpha=0.75, zorder=3)
    low = [cells[v].mean - (cells[v].low if cells[v].low is not None else cells[v].mean) for v in xs]
    high = [(cells[v].high if cells[v].high is not None else cells[v].mean) - cells[v].mean for v in xs]
    ax.errorbar([v * dodge for v in xs], [cells[v].mean for v in xs], yerr=[low, high], color=color, marker=marker,
                markersize=6, linestyle="none", capsize=3, elinewidth=1.2, label=label, zorder=4)


def per_seed(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (norm, N, seed) of each norm's main setting: the value the figures plot."""
    runs = main_setting(runs).dropna(subset=[metric])
    long = runs.assign(seed=runs["seed"].fillna(-1)).groupby(["norm", "per_worker_batch", "seed"])[metric].mean()
    return long.rename("value").reset_index()


def _norm_panel(ax, long: pd.DataFrame, points: bool = True) -> None:
    grid = sorted({int(v) for v in long["per_worker_batch"]}, reverse=True)
    long = long.assign(per_worker_batch=long["per_worker_batch"].astype(int))
    norms = sorted(long["norm"].unique(), key=norm_sort_key)
    for i, norm in enumerate(norms):
        series = long[long["norm"] == norm]
        counts = series.groupby("per_worker_batch").size()
        label = f"{norm_label(norm)} ({seeds_text(counts)})" if points else norm_label(norm)
        plot_cells(ax, series, "per_worker_batch", grid, norm_color(norm), norm_marker(norm), label,
                   dodge=1.05 ** (i - (len(norms) - 1) / 2), points=points)
    _log2_axis(ax, grid)
    ax.set_xlabel(METRICS["per_worker_batch"].label + ", batch statistics per worker")
    ax.legend(frameon=False)


def fig_batch_size(runs: pd.DataFrame, out: Path, metric: str = DEFAULT_METRIC, protocol: str | None = None,
                   name: str = "fig_batch_size") -> list[Path]:
    """Error vs images per worker, one series per norm, x from the largest batch down to the smallest; beside it,
    the paper's Figure 1 (ImageNet, ResNet-50) on the same axis, so that the shapes compare at a glance."""
    long = per_seed(runs, metric)
    if long.empty:
        return []
    paper = paper_table("table2").rename(columns={"val_error_top1": "value"}).assign(seed=0)
    with plt.rc_context(STYLE):
        fig, (ours, theirs) = plt.subplots(1, 2, figsize=(11, 4.4))
        _norm_panel(ours, long)
        ours.set_ylabel(METRICS[metric].label)
        title = "Ours: each seed (open), mean and 95% interval"
        ours.set_title(f"{title}\n({protocol_label(protocol)})" if protocol else title, fontsize=10)
        _norm_panel(theirs, paper, points=False)
        theirs.set_ylabel("top-1 val error (%)")
        theirs.set_title("Wu & He 2018, Figure 1: ImageNet, ResNet-50, 8 workers", fontsize=10)
        fig.tight_layout()
        return save(fig, out / name)


def fig_groups(tables: dict[str, pd.DataFrame], out: Path, metric: str = DEFAULT_METRIC) -> list[Path]:
    """Table 3 as a plot: error vs G (fixed count) and vs channels per group (fixed size), mean and 95% interval,
    the paper's values on their own axis at the right."""
    if not tables:
        return []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(tables), figsize=(5.6 * len(tables), 3.9), squeeze=False)
        for ax, (key, table) in zip(axes[0], tables.items()):
            grid = sorted(table[key].tolist())
            low = (table["mean"] - table["low"].fillna(table["mean"])).tolist()
            high = (table["high"].fillna(table["mean"]) - table["mean"]).tolist()
            ax.errorbar(table[key], table["mean"], yerr=[low, high], color=norm_color("gn"), marker="s",
                        capsize=3, linewidth=1.8, label=f"ours ({seeds_text(table['n'])})")
            end = "ln" if key == "groups" else "in"  # G=1 is LN, one channel per group is IN: their own colour
            at_end = table[table[key] == 1]
            if not at_end.empty:
                ax.scatter(at_end[key], at_end["mean"], color=norm_color(end), marker=norm_marker(end), s=50,
                           zorder=5, label=norm_label(end))
            paper = table.dropna(subset=["paper"])
            if not paper.empty:
                right = ax.twinx()
                right.plot(paper[key], paper["paper"], color="#555555", marker="o", linestyle="--", linewidth=1.2,
                           label="paper (ImageNet), right axis")
                right.set_ylabel("paper: top-1 val error (%)", color="#555555")
                right.spines["right"].set_visible(True)
                right.grid(False)
                handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
                ax.legend(handles, [h.get_label() for h in handles], frameon=False, fontsize=9)
            _log2_axis(ax, grid, descending=False)
            ax.set_xlabel(METRICS[key].label)
            ax.set_ylabel(METRICS[metric].label.split(",")[0])
            ends = "G=1 is LN" if key == "groups" else "1 channel per group is IN"
            ax.set_title(f"{'(a)' if key == 'groups' else '(b)'} {METRICS[key].label} fixed ({ends})", fontsize=10)
        fig.tight_layout()
        return save(fig, out / "fig_groups")


RAMP_END = 0.6  # plasma beyond this is too pale on white (under 3:1, WCAG's bound for graphics)


def fig_curves(curves: pd.DataFrame, norm: str, out: Path, name: str | None = None) -> list[Path]:
    """Train (dashed) and val (solid) error vs epoch, one colour per batch size (a dark-to-orange ramp with contrast
    on white), mean over seeds."""
    curves = curves[(curves["norm"] == norm) & curves["per_worker_batch"].notna()]
    if curves.empty:
        return []
    batches = sorted(curves["per_worker_batch"].unique(), reverse=True)
    cmap = plt.get_cmap("plasma")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, batch in enumerate(batches):
            color = cmap(i / max(1, len(batches) - 1) * RAMP_END)
            mean = curves[curves["per_worker_batch"] == batch].groupby("epoch")[["train_error", "val_error"]].mean()
            ax.plot(mean.index, mean["train_error"], linestyle="--", color=color, linewidth=1.5)
            val = mean["val_error"].dropna()
            ax.plot(val.index, val, linestyle="-", color=color, linewidth=2, label=f"N={int(batch)}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.set_title(f"{norm_label(norm)}: train (dashed) and val (solid) error")
        ax.legend(frameon=False, title="images per worker", ncols=2)
        return save(fig, out / (name or f"fig_curves_{file_token(norm)}"))
