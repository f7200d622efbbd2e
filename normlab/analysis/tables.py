"""The paper's tables from a runs table, ours beside the paper's: Table 1 (norms at the largest N), Table 2 (error per
batch size per norm) and Table 3 (the group ablations), each in Markdown and LaTeX.

A cell is the mean ± standard deviation over seeds with its 95% Student-t interval in brackets; a difference is its
mean with its own interval, paired by seed where the runs allow (``cells``). Statistics use finished runs (status
``done``); the others are counted, not averaged.
"""

from __future__ import annotations

import pandas as pd

from normlab.analysis.cells import DEFAULT_METRIC, Cells, finished, main_setting, stats
from normlab.analysis.intervals import Estimate
from normlab.analysis.metrics_info import METRICS, norm_label, norm_sort_key, with_sign
from normlab.analysis.reference import paper_table
from normlab.protocol import PAPER

__all__ = ["DEFAULT_METRIC", "finished", "main_setting", "stats", "protocols", "of_protocol", "batch_size_table",
           "norms_table", "groups_tables"]

MIN_ABLATION = 3  # settings of G (or of channels per group) before Table 3 is drawn
CELL_NOTE = "mean ± std over seeds [95% Student-t interval of the mean]"
DIFF_NOTE = "differences: mean [95% interval], paired by seed where the runs share seeds and data order"


def protocols(runs: pd.DataFrame) -> list[str]:
    """The batch protocols of the finished runs, the paper's first: each gets its own figure, table and claim check."""
    found = set(finished(runs)["protocol"].dropna())
    return sorted(found, key=lambda p: (p != PAPER, p))


def of_protocol(runs: pd.DataFrame, protocol: str) -> pd.DataFrame:
    return runs[runs["protocol"] == protocol]


# ---------------------------------------------------------------- formatting

def cell_text(value, signed: bool = False) -> str:
    """An Estimate as "51.0 ± 1.1 [48.3, 53.7]" (a difference: "+9.9 [7.1, 12.7]"); one seed: the mean alone.
    A string (what became of a cell's runs) as it is; nothing as "–"."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    number = with_sign if signed else "{:.1f}".format
    text = number(value.mean)
    if value.n < 2:
        return text
    spread = "" if signed else f" ± {value.std:.1f}"
    interval = "" if value.low is None else f" [{number(value.low)}, {number(value.high)}]"
    return text + spread + interval


LATEX_SPECIALS = {"%": r"\%", "&": r"\&", "#": r"\#", "_": r"\_"}  # characters LaTeX reads as commands


def latex_text(text: str) -> str:
    """Table text as LaTeX: its special characters escaped, ±, –, − and Δ as LaTeX writes them."""
    text = "".join(LATEX_SPECIALS.get(c, c) for c in text)
    return text.replace("±", r"$\pm$").replace("–", "--").replace("−", "$-$").replace("Δ", r"$\Delta$")


def _seeds(values) -> str:
    counts = sorted({v.n for v in values if isinstance(v, Estimate)})
    return "" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _latex(header: list[str], rows: list[list[str]], caption: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_text(caption)}}}",
             rf"\begin{{tabular}}{{l{'c' * (len(header) - 1)}}}", r"\toprule",
             " & ".join(latex_text(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_text(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Table 2: error per batch size

def batch_size_table(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Rows: norms (and GN − BN); columns: per-worker batch, largest first. Cells hold an Estimate, or, where no run
    finished, what became of the runs (e.g. "diverged 2/2"), so a lost cell is never blank. GN − BN is paired by
    seed (the same seed across norms at one N)."""
    cells = Cells(runs, metric)
    if cells.empty:
        return pd.DataFrame()
    norms = sorted(cells.norms(), key=norm_sort_key)
    attempted = runs[runs["per_worker_batch"].notna() & runs["norm"].isin(norms)]
    batches = sorted(set(cells.batches()) | {int(b) for b in attempted["per_worker_batch"]}, reverse=True)
    table = {norm: {b: cells.cell(norm, b) if cells.has(norm, b) else
                    _outcome(attempted[(attempted["norm"] == norm) & (attempted["per_worker_batch"] == b)])
                    for b in batches} for norm in norms}
    if "bn" in table and "gn" in table:
        table["gn−bn"] = {b: cells.difference(("gn", b), ("bn", b)) if cells.has("gn", b) and cells.has("bn", b)
                          else None for b in batches}
    return pd.DataFrame(table).T


def _outcome(runs: pd.DataFrame) -> str | None:
    """What became of runs with no result: "diverged 2/3, failed 1/3"."""
    if runs.empty:
        return None
    counts = runs["status"].fillna("unknown").value_counts()
    return ", ".join(f"{status} {n}/{len(runs)}" for status, n in counts.items())


def _row_label(norm: str) -> str:
    return "GN − BN" if norm == "gn−bn" else norm_label(norm)


def _batch_rows(table: pd.DataFrame) -> list[list[str]]:
    return [[_row_label(norm)] + [cell_text(v, signed=norm == "gn−bn") for v in row]
            + ["" if norm == "gn−bn" else _seeds(row)] for norm, row in table.iterrows()]


def to_markdown(table: pd.DataFrame, corner: str) -> str:
    if table.empty:
        return "_no finished runs_\n"
    return _markdown([corner, *map(str, table.columns), "seeds"], _batch_rows(table))


def to_latex(table: pd.DataFrame, corner: str, caption: str) -> str:
    if table.empty:
        return "% no finished runs\n"
    return _latex([corner, *map(str, table.columns), "seeds"], _batch_rows(table), f"{caption}; {CELL_NOTE}")


# ---------------------------------------------------------------- Table 1: the norms at the largest batch

def norms_table(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Every norm at the largest N that BN ran: its error, Δ vs BN paired by seed, and the paper's Table 1 beside
    them. Empty unless BN and at least one other norm ran at that N."""
    cells = Cells(runs, metric)
    bn_batches = [n for n in cells.batches() if cells.has("bn", n)]
    if not bn_batches:
        return pd.DataFrame()
    big = max(bn_batches)
    norms = sorted((n for n in cells.norms() if cells.has(n, big)), key=norm_sort_key)
    if len(norms) < 2:
        return pd.DataFrame()
    paper = paper_table("table1").set_index("norm")["val_error_top1"]
    rows = []
    for norm in norms:
        rows.append({"norm": norm, "N": big, "ours": cells.cell(norm, big),
                     "delta": None if norm == "bn" else cells.difference((norm, big), ("bn", big)),
                     "paper": paper.get(norm), "paper_delta": None if norm == "bn" or norm not in paper
                     else paper[norm] - paper["bn"]})
    return pd.DataFrame(rows)


def _norms_rows(table: pd.DataFrame) -> list[list[str]]:
    return [[norm_label(r.norm), cell_text(r.ours), cell_text(r.delta, signed=True), str(r.ours.n),
             "–" if pd.isna(r.paper) else f"{r.paper:.1f}",
             "–" if r.paper_delta is None or pd.isna(r.paper_delta) else with_sign(r.paper_delta)]
            for r in table.itertuples(index=False)]


def _norms_header(table: pd.DataFrame) -> list[str]:
    return [f"norm (N={int(table['N'].iloc[0])})", "ours", "Δ vs BN", "seeds", "paper (N=32)", "paper Δ vs BN"]


def norms_markdown(table: pd.DataFrame, metric: str) -> str:
    if table.empty:
        return "_Table 1 needs BN and another norm at the same largest N_\n"
    return (f"{METRICS[metric].label}: {CELL_NOTE}; Δ vs BN paired by seed. The paper: ImageNet, ResNet-50, "
            f"top-1 val error (%), 32 images per GPU.\n\n" + _markdown(_norms_header(table), _norms_rows(table)))


def norms_latex(table: pd.DataFrame, metric: str, caption: str) -> str:
    if table.empty:
        return "% Table 1 needs BN and another norm at the same largest N\n"
    return _latex(_norms_header(table), _norms_rows(table),
                  f"{caption}; {CELL_NOTE}; Δ vs BN paired by seed; the paper: ImageNet, ResNet-50")


# ---------------------------------------------------------------- Table 3: the group ablations

GROUP_TABLES = {"groups": ("table3a", "groups", "(a) number of groups fixed", "ln"),
                "group_size": ("table3b", "channels_per_group", "(b) channels per group fixed", "in")}


def groups_tables(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> dict[str, pd.DataFrame]:
    """Table 3's two ablations at the per-worker batch with most GN runs (the largest on a tie), each only when the
    runs hold at least MIN_ABLATION settings of it. ``groups``: G fixed (LN is G=1); ``group_size``: channels per
    group fixed (IN is 1 channel per group). A run with ``group_size`` set belongs to the second; every other GN run
    to the first. Each row: the setting, mean, std, n, interval, and the paper's error at that setting."""
    runs = finished(runs).dropna(subset=[metric])
    grouped = runs[runs["norm"].isin(["gn", "ln", "in"])]
    if grouped.empty or grouped[grouped["norm"] == "gn"].empty:
        return {}
    counts = grouped[grouped["norm"] == "gn"]["per_worker_batch"].value_counts()
    batch = max(counts[counts == counts.max()].index)
    grouped = grouped[grouped["per_worker_batch"] == batch]
    gn = grouped["norm"] == "gn"
    subsets = {"groups": grouped[(gn & grouped["group_size"].isna()) | (grouped["norm"] == "ln")],
               "group_size": grouped[(gn & grouped["group_size"].notna()) | (grouped["norm"] == "in")]}
    out = {}
    for key, subset in subsets.items():
        if subset["norm"].eq("gn").any() and subset[key].nunique() >= MIN_ABLATION:
            table, column = paper_table(GROUP_TABLES[key][0]), GROUP_TABLES[key][1]
            paper = dict(zip(pd.to_numeric(table[column]).fillna(1).astype(int), table["val_error_top1"]))
            s = stats(subset, [key], metric).sort_values(key, ascending=False)
            s[key] = s[key].astype(int)
            out[key] = s.assign(per_worker_batch=int(batch), paper=[paper.get(v) for v in s[key]])
            out[key] = out[key].reset_index(drop=True)
    return out


def _groups_rows(key: str, table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    end = GROUP_TABLES[key][3]
    header = [METRICS[key].label] + [f"{v} ({norm_label(end)})" if v == 1 else str(v) for v in table[key]]
    ours = [estimate_of(r) for _, r in table.iterrows()]
    rows = [["ours"] + [cell_text(e) for e in ours], ["seeds"] + [str(e.n) for e in ours],
            ["paper"] + ["–" if v is None or pd.isna(v) else f"{v:.1f}" for v in table["paper"]]]
    return header, rows


def estimate_of(row: pd.Series) -> Estimate:
    """An Estimate from a row of stats()."""
    low = None if pd.isna(row["low"]) else float(row["low"])
    high = None if low is None else float(row["high"])
    return Estimate(float(row["mean"]), float(row["std"]), int(row["n"]), low, high)


def _groups_caption(key: str, table: pd.DataFrame, metric: str) -> str:
    batch = int(table["per_worker_batch"].iloc[0])
    return (f"Table 3 {GROUP_TABLES[key][2]}, {batch} images per worker: {METRICS[metric].label}, {CELL_NOTE}. "
            f"The paper: ImageNet, ResNet-50, 32 images per GPU")


def groups_markdown(tables: dict[str, pd.DataFrame], metric: str = DEFAULT_METRIC) -> str:
    parts = []
    for key, table in tables.items():
        header, rows = _groups_rows(key, table)
        parts.append(f"**{_groups_caption(key, table, metric)}.**\n\n" + _markdown(header, rows))
    return "\n".join(parts) if parts else f"_no group ablation of {MIN_ABLATION} settings or more in these runs_\n"


def groups_latex(tables: dict[str, pd.DataFrame], metric: str = DEFAULT_METRIC) -> str:
    return "\n".join(_latex(*_groups_rows(key, table), _groups_caption(key, table, metric))
                     for key, table in tables.items())
