"""Where the runs come from: the data set they read and the commits they record. A study whose runs come from more
than one commit, or from a tree with uncommitted changes (``-dirty``), is flagged: its rows may not be one code's.
"""

from __future__ import annotations

import pandas as pd

DIRTY = "-dirty"


def commits(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per recorded commit: commit (without the dirty mark), dirty, runs."""
    recorded = runs["git_commit"] if "git_commit" in runs else pd.Series(pd.NA, index=runs.index, dtype="object")
    recorded = recorded.astype("string").fillna("unrecorded")
    table = recorded.value_counts().rename_axis("recorded").reset_index(name="runs")
    table["dirty"] = table["recorded"].str.endswith(DIRTY)
    table["commit"] = table["recorded"].str.removesuffix(DIRTY)
    return table.sort_values(["commit", "dirty"]).reset_index(drop=True)[["commit", "dirty", "runs"]]


def flags(runs: pd.DataFrame) -> list[str]:
    """What a reader must know about the runs' code: several commits, a dirty tree, unrecorded commits."""
    table = commits(runs)
    found = []
    distinct = sorted(set(table["commit"]) - {"unrecorded"})
    if len(distinct) > 1:
        found.append(f"mixed commits: the runs come from {len(distinct)} commits ({', '.join(distinct)})")
    dirty = int(table.loc[table["dirty"], "runs"].sum())
    if dirty:
        found.append(f"dirty tree: {dirty} of {len(runs)} runs were made with uncommitted changes")
    unrecorded = int(table.loc[table["commit"] == "unrecorded", "runs"].sum())
    if unrecorded:
        found.append(f"{unrecorded} of {len(runs)} runs record no commit")
    return found


def datasets(runs: pd.DataFrame) -> list[str]:
    """"cifar10_jpeg (imagefolder)": each data set the runs read, beside its source kind."""
    if runs.empty:
        return []
    name = runs["dataset"].astype("string") if "dataset" in runs else pd.Series(pd.NA, index=runs.index)
    kind = runs["data"].astype("string") if "data" in runs else pd.Series(pd.NA, index=runs.index)
    pairs = sorted({(n if not pd.isna(n) else "unnamed", k if not pd.isna(k) else "?") for n, k in zip(name, kind)})
    return [f"{n} ({k})" if n != k else n for n, k in pairs]


def provenance_markdown(runs: pd.DataFrame, dataset_note: str | None = None) -> str:
    table = commits(runs)
    rows = ["| commit | uncommitted changes | runs |", "|---|---|---|"]
    rows += [f"| {r.commit} | {'yes' if r.dirty else 'no'} | {r.runs} |" for r in table.itertuples()]
    text = f"Data: {', '.join(datasets(runs)) or '–'}" + (f" ({dataset_note})" if dataset_note else "") + ".\n\n"
    text += "Code: the commits the runs record.\n\n" + "\n".join(rows) + "\n"
    found = flags(runs)
    if found:
        text += "\n" + "\n".join(f"**Flagged: {f}.**" for f in found) + "\n"
    else:
        text += "\nEvery run records the same commit, clean.\n"
    return text
