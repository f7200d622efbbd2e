"""The paper's figures: error vs batch size (Figure 1), the group ablation (Table 3), training curves (Figures 4–5).

Publication style: readable fonts, one color per norm everywhere (metrics_info), mean over seeds
with a ±1 std band, and the seed count in the legend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from normlab.analysis.metrics_info import METRICS, norm_color, norm_label, norm_sort_key, protocol_label  # noqa: E402
from normlab.analysis.reference import paper_table  # noqa: E402
from normlab.analysis.tables import DEFAULT_METRIC, main_setting, stats  # noqa: E402

STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}


def save(fig, path: Path, formats=("png",)) -> list[Path]:
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
        ax.set_xlim(max(ticks) * 1.25, min(ticks) / 1.25)


def _band(ax, x, s, color, label) -> None:
    ax.plot(x, s["mean"], marker="o", color=color, label=label, linewidth=2)
    if (s["std"] > 0).any():
        ax.fill_between(x, s["mean"] - s["std"], s["mean"] + s["std"], color=color, alpha=0.15, linewidth=0)


def _batch_size_lines(ax, s: pd.DataFrame, counts: bool = True) -> None:
    for norm in sorted(s["norm"].unique(), key=norm_sort_key):
        line = s[s["norm"] == norm].sort_values("per_worker_batch", ascending=False)
        n = int(line["n"].min()) if line["n"].min() == line["n"].max() else f"{line['n'].min()}–{line['n'].max()}"
        _band(ax, line["per_worker_batch"], line, norm_color(norm), f"{norm_label(norm)} (n={n})" if counts
              else norm_label(norm))
    _log2_axis(ax, s["per_worker_batch"])
    ax.set_xlabel(METRICS["per_worker_batch"].label + ", batch statistics per worker")
    ax.legend(frameon=False)


def fig_batch_size(runs: pd.DataFrame, out: Path, metric: str = DEFAULT_METRIC, protocol: str | None = None,
                   name: str = "fig_batch_size") -> list[Path]:
    """Error vs images per worker, one line per norm, x from the largest batch down to the smallest; beside it,
    the paper's Figure 1 (ImageNet, ResNet-50) on the same axis, so that the shapes compare at a glance."""
    s = stats(main_setting(runs), ["norm", "per_worker_batch"], metric)
    if s.empty:
        return []
    paper = paper_table("table2").rename(columns={"val_error_top1": "mean"}).assign(std=0.0, n=1)
    with plt.rc_context(STYLE):
        fig, (ours, theirs) = plt.subplots(1, 2, figsize=(11, 4.2))
        _batch_size_lines(ours, s)
        ours.set_ylabel(METRICS[metric].label)
        title = "Ours: mean ± 1 std over seeds"
        ours.set_title(f"{title}\n({protocol_label(protocol)})" if protocol else title, fontsize=11)
        _batch_size_lines(theirs, paper, counts=False)
        theirs.set_ylabel("top-1 val error (%)")
        theirs.set_title("Wu & He 2018, Figure 1: ImageNet, ResNet-50, 8 workers", fontsize=11)
        fig.tight_layout()
        return save(fig, out / name, ("png", "pdf"))


def fig_groups(tables: dict[str, pd.DataFrame], out: Path, metric: str = DEFAULT_METRIC) -> list[Path]:
    """Table 3 as a plot: error vs G (fixed count) and vs channels per group (fixed size)."""
    if not tables:
        return []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 3.8), squeeze=False)
        for ax, (key, table) in zip(axes[0], tables.items()):
            _band(ax, table[key], table, norm_color("gn"), "GN")
            _log2_axis(ax, table[key])
            ax.set_xlabel(METRICS[key].label)
            ax.set_ylabel(METRICS[metric].label)
            ends = "G=1 is LN" if key == "groups" else "1 channel per group is IN"
            ax.set_title(f"{METRICS[key].label} fixed ({ends})", fontsize=11)
        fig.tight_layout()
        return save(fig, out / "fig_groups")


def fig_curves(curves: pd.DataFrame, norm: str, out: Path, name: str | None = None) -> list[Path]:
    """Train (dashed) and val (solid) error vs epoch, one color per batch size, mean over seeds."""
    curves = curves[(curves["norm"] == norm) & curves["per_worker_batch"].notna()]
    if curves.empty:
        return []
    batches = sorted(curves["per_worker_batch"].unique(), reverse=True)
    cmap = plt.get_cmap("viridis")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, batch in enumerate(batches):
            color = cmap(i / max(1, len(batches) - 1) * 0.9)
            mean = curves[curves["per_worker_batch"] == batch].groupby("epoch")[["train_error", "val_error"]].mean()
            ax.plot(mean.index, mean["train_error"], linestyle="--", color=color, linewidth=1.5)
            val = mean["val_error"].dropna()
            ax.plot(val.index, val, linestyle="-", color=color, linewidth=2, label=f"N={int(batch)}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.set_title(f"{norm_label(norm)}: train (dashed) and val (solid) error")
        ax.legend(frameon=False, title="images per worker", ncols=2)
        return save(fig, out / (name or f"fig_curves_{norm}"))
