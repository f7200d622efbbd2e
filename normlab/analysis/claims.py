"""Does the paper's claim hold in these runs? The numbers behind each sentence, ours beside the paper's, and the noise.

The claim (Wu & He 2018, Figure 1 and Table 1): BN's error rises fast as the per-worker batch
shrinks, GN's stays flat, GN beats BN at small batches, and at 32 images per worker BN < GN < LN < IN.

Every verdict weighs a margin against its uncertainty: the larger of the seed standard deviations of the
cells it compares (where a cell has two seeds or more) and their test sets' binomial standard errors.
A margin beyond the uncertainty "holds" or "does not hold"; one inside it is "within noise".

Under a fixed total batch (protocol ``fixed_total``) the batch-independent norms never see N, so their
flatness is no finding: the check is that their runs are identical at every N, an invariance that can fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from normlab.analysis.metrics_info import norm_label
from normlab.analysis.reference import paper_table
from normlab.analysis.tables import DEFAULT_METRIC, finished, main_setting, stats
from normlab.protocol import FIXED_TOTAL

HOLDS, FAILS, NOISE, NA = "holds", "does not hold", "within noise", "n/a"
GN_FLAT_POINTS = 2.0  # "flat": GN's spread over N within this many points
ORDER = ("bn", "gn", "ln", "in")  # Table 1's ordering at 32 images per GPU
BATCH_DEPENDENT = ("bn", "brn", "evonorm_b0")  # for runs recorded before summaries said `batch_dependent`


@dataclass
class Finding:
    what: str
    ours: str
    paper: str
    margin: float | None  # > 0: the claim's way
    uncertainty: float | None  # points; the noise the margin is judged against
    verdict: str

    @property
    def holds(self) -> bool | None:
        return {HOLDS: True, FAILS: False}.get(self.verdict)


def judge(margin: float, uncertainty: float) -> str:
    if margin > uncertainty:
        return HOLDS
    return FAILS if margin < -uncertainty else NOISE


class Cells:
    """Mean, seed std, seed count and binomial standard error of each (norm, N) cell."""

    def __init__(self, runs: pd.DataFrame, metric: str) -> None:
        runs = main_setting(runs)
        by = ["norm", "per_worker_batch"]
        self.table = stats(runs, by, metric).set_index(by)
        sizes = pd.to_numeric(runs.get("test_size", pd.Series(index=runs.index, dtype=float)), errors="coerce")
        self.test_size = runs.assign(test_size=sizes).groupby(by)["test_size"].min()

    def mean(self, norm: str, n: int) -> float | None:
        return self.table["mean"].get((norm, n))

    def noise(self, norm: str, n: int) -> float:
        """The seed std (two seeds or more), and at least the test set's binomial standard error, in points."""
        row = self.table.loc[(norm, n)]
        spread = float(row["std"]) if row["n"] >= 2 else 0.0
        size, p = self.test_size.get((norm, n)), float(row["mean"]) / 100
        binomial = 100 * math.sqrt(p * (1 - p) / size) if size and not pd.isna(size) and 0 <= p <= 1 else 0.0
        return max(spread, binomial)

    def batches(self) -> list[int]:
        return sorted({n for _, n in self.table.index})

    def seeds(self) -> int:
        return int(self.table["n"].max()) if len(self.table) else 0


def findings(runs: pd.DataFrame, metric: str = DEFAULT_METRIC, protocol: str | None = None) -> list[Finding]:
    """The claim's sentences for runs of one batch protocol (`protocol`, or the one the runs have)."""
    if protocol is None:
        found = set(finished(runs)["protocol"].dropna()) if "protocol" in runs else set()
        protocol = found.pop() if len(found) == 1 else "paper"
    cells = Cells(runs, metric)
    if cells.table.empty:
        return []
    paper2 = paper_table("table2").set_index(["norm", "per_worker_batch"])["val_error_top1"]
    batches = cells.batches()
    big, small = max(batches), min(batches)
    at, noise = cells.mean, cells.noise
    out = []

    if at("bn", big) is not None and at("bn", small) is not None and big != small:
        rise, u = at("bn", small) - at("bn", big), max(noise("bn", small), noise("bn", big))
        out.append(_finding(f"BN's error rises from N={big} to N={small}", f"{rise:+.1f} points",
                            f"{paper2[('bn', 2)] - paper2[('bn', 32)]:+.1f} points (N=32 → 2)", rise, u))
    if protocol == FIXED_TOTAL:
        out += _invariance(runs, metric)
    else:
        gn = [(at("gn", n), n) for n in batches if at("gn", n) is not None]
        if len(gn) > 1:
            (low, n_low), (high, n_high) = min(gn), max(gn)
            spread, u = high - low, max(noise("gn", n_low), noise("gn", n_high))
            paper_gn = [paper2[("gn", n)] for n in (32, 16, 8, 4, 2)]
            out.append(_finding(f"GN is flat over N ∈ {{{', '.join(map(str, sorted(batches, reverse=True)))}}} "
                                f"(spread ≤ {GN_FLAT_POINTS:g} points)", f"spread {spread:.1f} points",
                                f"spread {max(paper_gn) - min(paper_gn):.1f} points", GN_FLAT_POINTS - spread, u))
    if at("gn", small) is not None and at("bn", small) is not None:
        gap, u = at("bn", small) - at("gn", small), max(noise("bn", small), noise("gn", small))
        out.append(_finding(f"GN beats BN at N={small}", f"BN − GN = {gap:+.1f} points",
                            f"BN − GN = {paper2[('bn', 2)] - paper2[('gn', 2)]:+.1f} points (N=2)", gap, u))
    ranked = [n for n in ORDER if at(n, big) is not None]
    if len(ranked) > 1:
        paper1 = paper_table("table1").set_index("norm")["val_error_top1"]
        gaps = [at(b, big) - at(a, big) for a, b in zip(ranked, ranked[1:])]
        u = max(noise(n, big) for n in ranked)
        ours = " < ".join(norm_label(n) for n in sorted(ranked, key=lambda n: at(n, big)))
        values = ", ".join(f"{norm_label(n)} {at(n, big):.1f}" for n in ranked)
        paper = " < ".join(f"{norm_label(n)} {paper1[n]:.1f}" for n in ORDER)
        out.append(_finding(f"Ordering at N={big} (Table 1)", f"{ours} ({values})", paper, min(gaps), u))
    return out


def _finding(what: str, ours: str, paper: str, margin: float, uncertainty: float) -> Finding:
    return Finding(what, ours, paper, margin, uncertainty, judge(margin, uncertainty))


def _invariance(runs: pd.DataFrame, metric: str) -> list[Finding]:
    """Each batch-independent norm: the same seed gives the same error at every N (fixed total batch)."""
    runs = main_setting(runs).dropna(subset=[metric])
    dependent = runs["batch_dependent"] if "batch_dependent" in runs else runs["norm"].isin(BATCH_DEPENDENT)
    out = []
    for norm, group in runs[~dependent.fillna(False).astype(bool)].groupby("norm"):
        per_seed = group.groupby("seed")[metric].agg(lambda s: s.max() - s.min())
        compared = group.groupby("seed")["per_worker_batch"].nunique()
        per_seed = per_seed[compared > 1]
        if per_seed.empty:
            continue
        worst = float(per_seed.max())
        batches = ", ".join(map(str, sorted(group["per_worker_batch"].unique(), reverse=True)))
        out.append(Finding(f"{norm_label(norm)} identical at N ∈ {{{batches}}} (invariance: it never sees N)",
                           f"largest difference {worst:.2f} points over {len(per_seed)} seed(s)",
                           "by construction", -worst, 0.0, HOLDS if worst == 0 else FAILS))
    return out


def findings_markdown(items: list[Finding], seeds: int | None = None) -> str:
    if not items:
        return "_not enough finished runs to test the claim_\n"
    lines = ["| claim | ours | margin ± noise | paper (ImageNet, ResNet-50) | verdict |", "|---|---|---|---|---|"]
    for f in items:
        judged = "–" if f.margin is None else f"{f.margin:+.1f} ± {f.uncertainty:.1f}"
        lines.append(f"| {f.what} | {f.ours} | {judged} | {f.paper} | {f.verdict} |")
    text = "\n".join(lines) + "\n"
    text += ("\nA margin is the claim's way when positive; a verdict needs it beyond the noise (the larger seed "
             "standard deviation of the cells compared, and at least their test sets' binomial standard error).\n")
    if seeds == 1:
        text += ("\n**One seed per cell.** The noise here is the test set's binomial error alone; the variation "
                 "from seed to seed, usually larger, is not measured, so a margin of a point or two cannot be "
                 "decided from these runs. The published studies (results/reference/) have 2–3 seeds per cell.\n")
    return text
