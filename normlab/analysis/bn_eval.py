"""BN's error per evaluation mode (EMA, precise, batch statistics) vs images per worker, from runs that compared them
(``eval.compare_bn_stats``): how much of BN's small-batch rise is its test-time statistics, and how much is left
when evaluation is consistent with training. GN's line is drawn for reference.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from normlab.analysis.cells import finished, main_setting, protocol_of, stats
from normlab.analysis.figures import STYLE, _log2_axis, plot_cells, plt, save, seeds_text
from normlab.analysis.metrics_info import METRICS, norm_color, norm_label, norm_marker
from normlab.analysis.intervals import difference
from normlab.analysis.tables import CELL_NOTE, DIFF_NOTE, cell_text, estimate_of
from normlab.protocol import FIXED_TOTAL

MODES = {"ema": "EMA (running averages)", "precise": "precise (recomputed population statistics)",
         "batch": "batch statistics (as in training)"}
STYLES = {"ema": "-", "precise": "--", "batch": ":"}


def mode_column(metric: str, mode: str) -> str:
    """The per-mode column of a metric: val_error_median5 → val_error_ema_median5, val_error → val_error_ema."""
    return metric.replace("val_error", f"val_error_{mode}", 1)


def long_by_mode(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (run, mode) of the BN runs that compared modes, and one per reference run (GN), tidy."""
    runs = main_setting(runs)
    frames = []
    for mode in MODES:
        column = mode_column(metric, mode)
        if column in runs:
            bn = runs[(runs["norm"] == "bn") & runs[column].notna()]
            frames.append(bn.assign(mode=mode, value=pd.to_numeric(bn[column], errors="coerce")))
    if not frames:
        return pd.DataFrame()
    reference = runs[runs["norm"] == "gn"]
    frames.append(reference.assign(mode="reference", value=pd.to_numeric(reference[metric], errors="coerce")))
    return pd.concat(frames, ignore_index=True).dropna(subset=["value"])


def per_seed(line: pd.DataFrame, n: int) -> pd.Series:
    """One line's values at N, per seed (index: seed)."""
    at = line[line["per_worker_batch"] == n]
    return at.groupby(at["seed"].fillna(-1))["value"].mean()


def bn_eval_table(long: pd.DataFrame) -> pd.DataFrame:
    """Rows: BN per mode (and GN); columns: N, largest first; cells Estimates; a last column, the rise from the
    largest N to the smallest, paired by seed where every N shares seeds and data order (fixed total batch)."""
    if long.empty:
        return pd.DataFrame()
    s = stats(long, ["mode", "norm", "per_worker_batch"], "value")
    batches = sorted(s["per_worker_batch"].unique(), reverse=True)
    big, small = max(batches), min(batches)
    paired = protocol_of(long) == FIXED_TOTAL
    rows = {}
    for (mode, norm), cell in s.groupby(["mode", "norm"], sort=False):
        cell = cell.set_index("per_worker_batch")
        label = f"{norm_label(norm)}, {mode}" if mode != "reference" else norm_label(norm)
        rows[label] = {int(b): estimate_of(cell.loc[b]) if b in cell.index else None for b in batches}
        line = long[(long["mode"] == mode) & (long["norm"] == norm)]
        rows[label][f"rise {big}→{small}"] = (difference(per_seed(line, small), per_seed(line, big), paired)
                                             if {big, small} <= set(cell.index) else None)
    return pd.DataFrame(rows).T


def mode_differences(long: pd.DataFrame) -> pd.DataFrame:
    """Rows: each BN mode but EMA, minus EMA; columns: N, largest first; cells the paired difference (one run
    evaluated both ways, so always paired by seed)."""
    bn = long[long["norm"] == "bn"]
    batches = sorted({int(n) for n in bn["per_worker_batch"]}, reverse=True)
    ema = bn[bn["mode"] == "ema"]
    rows = {}
    for mode in MODES:
        line = bn[bn["mode"] == mode]
        if mode == "ema" or line.empty or ema.empty:
            continue
        pairs = {n: (per_seed(line, n), per_seed(ema, n)) for n in batches}
        rows[f"{mode} − EMA"] = {n: difference(a, b, paired=True) if not (a.empty or b.empty) else None
                                 for n, (a, b) in pairs.items()}
    return pd.DataFrame(rows).T


def bn_eval_markdown(table: pd.DataFrame, metric: str, differences: pd.DataFrame | None = None) -> str:
    if table.empty:
        return "_no runs compared BN's evaluation modes_\n"
    columns = list(table.columns)
    lines = ["| BN evaluated with \\ N | " + " | ".join(map(str, columns)) + " |", "|---|" + "---|" * len(columns)]
    for label, row in table.iterrows():
        cells = [cell_text(None if isinstance(v, float) and pd.isna(v) else v) for v in row.iloc[:-1]]
        cells.append(cell_text(row.iloc[-1], signed=True))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = f"{METRICS[metric].label}: {CELL_NOTE}; {DIFF_NOTE}.\n\n" + "\n".join(lines) + "\n"
    if differences is not None and not differences.empty:
        lines = ["| BN, mode − EMA \\ N | " + " | ".join(map(str, differences.columns)) + " |",
                 "|---|" + "---|" * len(differences.columns)]
        lines += [f"| {label} | " + " | ".join(cell_text(v, signed=True) for v in row) + " |"
                  for label, row in differences.iterrows()]
        text += ("\nEach mode against EMA, the same runs evaluated both ways (paired by seed): mean [95% interval], "
                 "in points.\n\n" + "\n".join(lines) + "\n")
    return text


def fig_bn_eval(long: pd.DataFrame, out: Path, metric: str, name: str = "fig_bn_eval") -> list[Path]:
    if long.empty:
        return []
    grid = sorted({int(v) for v in long["per_worker_batch"]}, reverse=True)
    long = long.assign(per_worker_batch=long["per_worker_batch"].astype(int))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        series = list(long.groupby(["mode", "norm"], sort=False))
        for i, ((mode, norm), line) in enumerate(series):
            counts = line.groupby("per_worker_batch").size()
            label = (f"BN, {MODES[mode]}" if mode in MODES else f"{norm_label(norm)} (for reference)") + \
                f" ({seeds_text(counts)})"
            marker = {"ema": "o", "precise": "v", "batch": "^"}.get(mode, norm_marker(norm))
            plot_cells(ax, line, "per_worker_batch", grid, norm_color(norm), marker, label,
                       linestyle=STYLES.get(mode, "-"),
                       dodge=1.05 ** (i - (len(series) - 1) / 2))
        _log2_axis(ax, grid)
        ax.set_xlabel(METRICS["per_worker_batch"].label)
        ax.set_ylabel(METRICS[metric].label)
        ax.set_title("BN at test time: which statistics normalize the test images", fontsize=11)
        ax.legend(frameon=False, fontsize=9)
        return save(fig, out / name)


def has_modes(runs: pd.DataFrame, metric: str) -> bool:
    """Whether any finished run compared BN's evaluation modes for `metric`."""
    done = finished(runs)
    return any(done[mode_column(metric, m)].notna().any() for m in MODES if mode_column(metric, m) in done)
