"""The paper's tables from a runs table: error per batch size per norm (Table 2), group ablations (Table 3).

Statistics use finished runs (status ``done``); the others are counted, not averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from normlab.analysis.metrics_info import METRICS, norm_label, norm_sort_key
from normlab.protocol import DEFAULT_GROUPS, PAPER

DEFAULT_METRIC = "val_error_median5"


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["status"] == "done") & runs["per_worker_batch"].notna()]


def protocols(runs: pd.DataFrame) -> list[str]:
    """The batch protocols of the finished runs, the paper's first: each gets its own figure, table and claim check."""
    found = set(finished(runs)["protocol"].dropna())
    return sorted(found, key=lambda p: (p != PAPER, p))


def of_protocol(runs: pd.DataFrame, protocol: str) -> pd.DataFrame:
    return runs[runs["protocol"] == protocol]


def main_setting(runs: pd.DataFrame) -> pd.DataFrame:
    """For each norm, only the runs at its most common group setting (ties go to the paper's G=32): the batch-size
    comparison is between norms as configured, and a group ablation in the same runs stays out of it."""
    runs = finished(runs)
    setting = runs["groups"].astype("string").fillna("-") + "/" + runs["group_size"].astype("string").fillna("-")
    keep = pd.Series(False, index=runs.index)
    for _norm, idx in runs.groupby("norm").groups.items():
        counts = setting[idx].value_counts()
        tied = sorted(counts[counts == counts.max()].index)
        keep[idx] = setting[idx] == (f"{DEFAULT_GROUPS}/-" if f"{DEFAULT_GROUPS}/-" in tied else tied[0])
    return runs[keep]


def stats(runs: pd.DataFrame, by: list[str], metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Mean, std (ddof=1; 0 for a single run) and count of `metric` over seeds, per `by` group."""
    done = finished(runs).dropna(subset=[metric])
    grouped = done.groupby(by, dropna=False)[metric]
    out = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "n"}).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def batch_size_table(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Rows: norms (and GN−BN); columns: per-worker batch, largest first. Cells hold mean, std and n, or,
    where no run finished, what became of the runs (e.g. "diverged 2/2"), so a lost cell is never blank."""
    s = stats(main_setting(runs), ["norm", "per_worker_batch"], metric)
    if s.empty:
        return pd.DataFrame()
    attempted = runs[runs["per_worker_batch"].notna() & runs["norm"].isin(s["norm"])]
    batches = sorted(set(s["per_worker_batch"]) | set(attempted["per_worker_batch"]), reverse=True)
    norms = sorted(s["norm"].unique(), key=norm_sort_key)
    table = {}
    for norm in norms:
        rows = s[s["norm"] == norm].set_index("per_worker_batch")
        table[norm] = {int(b): (rows.loc[b, "mean"], rows.loc[b, "std"], int(rows.loc[b, "n"])) if b in rows.index
                       else _outcome(attempted[(attempted["norm"] == norm) & (attempted["per_worker_batch"] == b)])
                       for b in batches}
    if "bn" in table and "gn" in table:
        table["gn−bn"] = {b: (table["gn"][b][0] - table["bn"][b][0], None, None)
                          if isinstance(table["gn"][b], tuple) and isinstance(table["bn"][b], tuple) else None
                          for b in table["bn"]}
    return pd.DataFrame(table).T


def _outcome(runs: pd.DataFrame) -> str | None:
    """What became of runs with no result: "diverged 2/3, failed 1/3"."""
    if runs.empty:
        return None
    counts = runs["status"].fillna("unknown").value_counts()
    return ", ".join(f"{status} {n}/{len(runs)}" for status, n in counts.items())


def _cell(value, fmt: str = "{:.1f}", signed: bool = False) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    mean, std, n = value
    text = ("{:+.1f}" if signed else fmt).format(mean)
    return text if std is None or n == 1 else f"{text} ± {std:.1f}"


def _seeds(row) -> str:
    counts = sorted({v[2] for v in row if isinstance(v, tuple) and v[2]})
    return "" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _row_label(norm: str) -> str:
    return "GN − BN" if norm == "gn−bn" else norm_label(norm)


def to_markdown(table: pd.DataFrame, corner: str, cell: Callable = _cell) -> str:
    if table.empty:
        return "_no finished runs_\n"
    header = f"| {corner} | " + " | ".join(str(c) for c in table.columns) + " | seeds |"
    lines = [header, "|" + "---|" * (len(table.columns) + 2)]
    for norm, row in table.iterrows():
        cells = [cell(v, signed=norm == "gn−bn") for v in row]
        lines.append(f"| {_row_label(norm)} | " + " | ".join(cells) + f" | {_seeds(row)} |")
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, corner: str, caption: str) -> str:
    if table.empty:
        return "% no finished runs\n"
    cols = "l" + "c" * len(table.columns) + "c"
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", rf"\begin{{tabular}}{{{cols}}}",
             r"\toprule", f"{corner} & " + " & ".join(str(c) for c in table.columns) + r" & seeds \\", r"\midrule"]
    for norm, row in table.iterrows():
        cells = [_cell(v, signed=norm == "gn−bn").replace("±", r"$\pm$").replace("–", "--") for v in row]
        label = r"GN $-$ BN" if norm == "gn−bn" else norm_label(norm)
        lines.append(f"{label} & " + " & ".join(cells) + f" & {_seeds(row)} " + r"\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def groups_tables(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> dict[str, pd.DataFrame]:
    """Table 3's two ablations at the most common per-worker batch of the group-norm runs.

    ``groups``: G fixed (LN is G=1); ``group_size``: channels per group fixed (IN is 1 channel per group).
    A run with ``group_size`` set belongs to the second; every other GN run to the first.
    """
    runs = finished(runs)
    grouped = runs[runs["norm"].isin(["gn", "ln", "in"])]
    if grouped.empty or grouped[grouped["norm"] == "gn"].empty:
        return {}
    counts = grouped[grouped["norm"] == "gn"]["per_worker_batch"].value_counts()
    batch = max(counts[counts == counts.max()].index)  # the batch with most GN runs; the largest on a tie
    grouped = grouped[grouped["per_worker_batch"] == batch]
    by_groups = grouped[((grouped["norm"] == "gn") & grouped["group_size"].isna()) | (grouped["norm"] == "ln")]
    by_size = grouped[((grouped["norm"] == "gn") & grouped["group_size"].notna()) | (grouped["norm"] == "in")]
    out = {}
    for key, subset in (("groups", by_groups), ("group_size", by_size)):
        if subset["norm"].eq("gn").any() and subset[key].nunique() > 1:  # an ablation needs two values
            s = stats(subset, [key], metric).sort_values(key, ascending=False)
            s[key] = s[key].astype(int)
            out[key] = s.assign(per_worker_batch=int(batch))
    return out


def groups_markdown(tables: dict[str, pd.DataFrame], metric: str = DEFAULT_METRIC) -> str:
    parts = []
    for key, table in tables.items():
        label = METRICS[key].label
        batch = int(table["per_worker_batch"].iloc[0])
        parts.append(f"**{label}** fixed, {batch} images per worker ({METRICS[metric].label})\n")
        parts.append(f"| {label} | " + " | ".join(str(v) for v in table[key]) + " |")
        parts.append("|---|" + "---|" * len(table))
        parts.append("| error | " + " | ".join(_cell((m, s, int(n))) for m, s, n in
                                                zip(table["mean"], table["std"], table["n"])) + " |")
        parts.append("| seeds | " + " | ".join(str(int(n)) for n in table["n"]) + " |\n")
    return "\n".join(parts) if parts else "_no group ablation in these runs_\n"
