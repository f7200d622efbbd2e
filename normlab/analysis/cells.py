"""Which runs are compared, and the cells they form: finished runs, each norm at its main group setting, and the
(norm, N) cells of one batch protocol with their per-seed values, estimates and differences.

Two cells are paired by seed when their runs share seeds and data order: the same seed across norms at one N
(always), and the same seed across N under the fixed-total protocol (every N trains on the same batches in the
same order; only the normalization batch changes). Under the paper's protocol N changes the steps and the data
order, so differences across N are unpaired.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from normlab.analysis.intervals import Estimate, binomial_floor, difference, estimate
from normlab.analysis.metrics_info import norm_label
from normlab.protocol import DEFAULT_GROUPS, FIXED_TOTAL, PAPER

DEFAULT_METRIC = "val_error_median5"


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["status"] == "done") & runs["per_worker_batch"].notna()]


CELL = ["protocol", "epochs_planned", "norm", "groups", "group_size", "per_worker_batch"]  # a table cell's keys
# What every run of one cell must share beyond its keys, or the cell averages unlike runs (two models, say)
ALIKE = ["model", "dataset", "data", "total_batch", "lr", "train_size"]


def _setting(key: tuple, seed=False) -> str:
    """A cell (and a seed) in words: "GN G=8, N=32, seed 0, fixed_total protocol, 40 epochs"."""
    protocol, epochs, norm, groups, group_size, n, *rest = (None if pd.isna(v) else v for v in key)
    setting = ["norm unrecorded" if norm is None else norm_label(norm), f"N={n}"]
    setting += [f"seed {'unrecorded' if rest[0] is None else rest[0]}"] if seed else []
    setting += [f"{protocol or PAPER} protocol"] + [f"{epochs} epochs"] * (epochs is not None)
    setting[0] += (f" G={groups}" if groups is not None else "") + (
        f" with {group_size} channels per group" if group_size is not None else "")
    return ", ".join(setting)


def _folders(group: pd.DataFrame) -> list[str]:
    folders = group["run_dir"] if "run_dir" in group else pd.Series(pd.NA, index=group.index)
    return [d if isinstance(d, str) else "a row with no run_dir" for d in folders]


def shared_seeds(runs: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """(the setting, the run folders) of each table cell whose finished runs share a seed: copies from two sweeps or
    experiments collected together, which the cell averages as one seed."""
    return [(_setting(key, seed=True), _folders(group))
            for key, group in finished(runs).groupby([*CELL, "seed"], dropna=False) if len(group) > 1]


def mixed_cells(runs: pd.DataFrame, settings: Callable[[list[str]], list[str]] | None = None
                ) -> list[tuple[str, list[str]]]:
    """(the setting, what differs) of each table cell whose finished runs differ in what ``ALIKE`` names (runs of
    two models, data sets or learning rates collected together, which the cell would average as seeds of one
    setting) or, given `settings` (the run folders' differing config keys: ``collect.setting_differences``), in
    any other setting of their configs (a swept weight decay). A value a run did not record is not a difference."""
    found = []
    for key, group in finished(runs).groupby(CELL, dropna=False):
        folders = [d for d in group["run_dir"] if isinstance(d, str)] if "run_dir" in group else []
        differs = [d for d in (settings(folders) if settings is not None and len(folders) > 1 else [])
                   if d.split(" ", 1)[0] not in ("model.name", "data.name")]  # said by the columns below
        for column in (c for c in ALIKE if c in group):
            values = group[column].dropna()
            values = values.map(lambda v: float(f"{v:.12g}")) if column == "lr" else values.astype("string")
            if values.nunique() > 1:
                counts = values.value_counts().sort_index()
                shown = " / ".join(f"{v:.12g}" if column == "lr" else f"{v}" for v in counts.index)
                differs.append(f"{column} {shown} ({' / '.join(map(str, counts))} runs)")
        if differs:
            found.append((_setting(key), differs))
    return found


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
    """Per `by` group of finished runs: mean, std (ddof=1; 0 for one run), count n, and the 95% Student-t interval
    of the mean over seeds (low, high; NaN for one run)."""
    done = finished(runs).dropna(subset=[metric])
    rows = []
    for key, group in done.groupby(by, dropna=False)[metric]:
        e = estimate(group)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "mean": e.mean, "std": e.std,
                     "n": e.n, "low": e.low, "high": e.high})
    out = pd.DataFrame(rows, columns=[*by, "mean", "std", "n", "low", "high"])
    out[["low", "high"]] = out[["low", "high"]].astype(float)
    return out


def protocol_of(runs: pd.DataFrame) -> str:
    found = set(finished(runs)["protocol"].dropna()) if "protocol" in runs else set()
    return found.pop() if len(found) == 1 else PAPER


class Cells:
    """The (norm, N) cells of one protocol's runs at each norm's main setting: per-seed values and what follows."""

    def __init__(self, runs: pd.DataFrame, metric: str, protocol: str | None = None) -> None:
        self.metric = metric
        self.protocol = protocol or protocol_of(runs)
        runs = main_setting(runs).dropna(subset=[metric])
        keys = ["norm", "per_worker_batch", "seed"]
        self.per_seed = runs.assign(seed=runs["seed"].fillna(-1)).groupby(keys)[metric].mean()
        sizes = pd.to_numeric(runs.get("test_size", pd.Series(index=runs.index, dtype=float)), errors="coerce")
        self.test_size = runs.assign(test_size=sizes).groupby(["norm", "per_worker_batch"])["test_size"].min()

    @property
    def empty(self) -> bool:
        return self.per_seed.empty

    def values(self, norm: str, n: int) -> pd.Series:
        """The cell's value per seed (index: seed); empty when it has no runs."""
        try:
            return self.per_seed.loc[(norm, n)]
        except KeyError:
            return pd.Series(dtype=float)

    def has(self, norm: str, n: int) -> bool:
        return not self.values(norm, n).empty

    def cell(self, norm: str, n: int) -> Estimate | None:
        values = self.values(norm, n)
        return None if values.empty else estimate(values)

    def mean(self, norm: str, n: int) -> float | None:
        cell = self.cell(norm, n)
        return None if cell is None else cell.mean

    def batches(self) -> list[int]:
        return sorted({int(n) for _, n, _ in self.per_seed.index})

    def norms(self) -> list[str]:
        return sorted({norm for norm, _, _ in self.per_seed.index})

    def seeds(self) -> int:
        """The most seeds any cell has."""
        return int(self.per_seed.groupby(level=[0, 1]).size().max()) if not self.empty else 0

    def paired(self, a: tuple[str, int], b: tuple[str, int]) -> bool:
        return a[1] == b[1] or self.protocol == FIXED_TOTAL

    def difference(self, a: tuple[str, int], b: tuple[str, int]) -> Estimate:
        """Cell a − cell b, paired by seed where the two share seeds and data order."""
        return difference(self.values(*a), self.values(*b), self.paired(a, b))

    def floor(self, *cells: tuple[str, int]) -> float:
        """The binomial floor of a difference between these cells (their test sets' sampling error)."""
        return binomial_floor(*((self.mean(*c), self.test_size.get(c)) for c in cells))
