"""Does the paper's claim hold in these runs? The numbers behind each sentence, ours beside the paper's, and how sure.

The claim (Wu & He 2018, Figure 1 and Table 1): BN's error rises fast as the per-worker batch shrinks, GN's stays
flat, GN beats BN at small batches, and at 32 images per worker GN is close to BN and GN < LN < IN.

Each sentence is a margin (> 0: the claim's way) read off a difference between cells, with the difference's 95%
interval over seeds (paired by seed where the runs share seeds and data order, ``cells``), widened to at least the
test sets' binomial error. The claim "holds" when that interval lies above zero, "does not hold" when it lies
below, and is "undecided" when it covers zero or there is no interval (one seed).

Under a fixed total batch (protocol ``fixed_total``) the batch-independent norms never see N, so their flatness is
no finding: whether their runs are identical at every N is a sanity check of the harness, reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from normlab.analysis.cells import DEFAULT_METRIC, Cells, main_setting
from normlab.analysis.intervals import FAILS, HOLDS, UNDECIDED, Estimate, judged, verdict
from normlab.analysis.metrics_info import norm_label, with_sign
from normlab.analysis.reference import paper_table
from normlab.protocol import FIXED_TOTAL

GN_FLAT_POINTS = 2.0  # "flat": GN's spread over N within this many points
GN_NEAR_BN_POINTS = 1.0  # "close to BN" at the largest N: GN trails by less than this (the paper: 0.5)
ORDER = ("gn", "ln", "in")  # Table 1's ordering after BN at 32 images per GPU
BATCH_DEPENDENT = ("bn", "brn", "evonorm_b0")  # for runs recorded before summaries said `batch_dependent`


@dataclass
class Finding:
    what: str
    ours: str
    paper: str
    margin: Estimate | None  # > 0: the claim's way
    floor: float  # the binomial floor, in points, under the margin's interval
    verdict: str

    @property
    def holds(self) -> bool | None:
        return {HOLDS: True, FAILS: False}.get(self.verdict)

    @property
    def interval(self) -> tuple[float | None, float | None]:
        return (None, None) if self.margin is None else judged(self.margin, self.floor)


def _finding(what: str, ours: str, paper: str, margin: Estimate, floor: float) -> Finding:
    return Finding(what, ours, paper, margin, floor, verdict(margin, floor))


def findings(runs: pd.DataFrame, metric: str = DEFAULT_METRIC, protocol: str | None = None) -> list[Finding]:
    """The claim's sentences for runs of one batch protocol (`protocol`, or the one the runs have)."""
    cells = Cells(runs, metric, protocol)
    if cells.empty:
        return []
    paper2 = paper_table("table2").set_index(["norm", "per_worker_batch"])["val_error_top1"]
    batches = cells.batches()
    big, small = max(batches), min(batches)
    has, at = cells.has, cells.mean
    out = []

    if has("bn", big) and has("bn", small) and big != small:
        rise = cells.difference(("bn", small), ("bn", big))
        out.append(_finding(f"BN's error rises from N={big} to N={small}", f"{with_sign(rise.mean)} points",
                            f"{with_sign(paper2[('bn', 2)] - paper2[('bn', 32)])} points (N=32 → 2)", rise,
                            cells.floor(("bn", small), ("bn", big))))
    if cells.protocol != FIXED_TOTAL:
        gn = sorted((at("gn", n), n) for n in batches if has("gn", n))
        if len(gn) > 1:
            (low, n_low), (high, n_high) = gn[0], gn[-1]
            spread = cells.difference(("gn", n_high), ("gn", n_low))
            paper_gn = [paper2[("gn", n)] for n in (32, 16, 8, 4, 2)]
            out.append(_finding(f"GN is flat over N ∈ {{{', '.join(map(str, sorted(batches, reverse=True)))}}} "
                                f"(spread < {GN_FLAT_POINTS:g} points)", f"spread {high - low:.1f} points",
                                f"spread {max(paper_gn) - min(paper_gn):.1f} points",
                                spread.shifted(GN_FLAT_POINTS, -1), cells.floor(("gn", n_high), ("gn", n_low))))
    if has("gn", small) and has("bn", small):
        gap = cells.difference(("bn", small), ("gn", small))
        out.append(_finding(f"GN beats BN at N={small}", f"BN − GN = {with_sign(gap.mean)} points",
                            f"BN − GN = {with_sign(paper2[('bn', 2)] - paper2[('gn', 2)])} points (N=2)", gap,
                            cells.floor(("bn", small), ("gn", small))))
    paper1 = paper_table("table1").set_index("norm")["val_error_top1"]
    if has("gn", big) and has("bn", big):
        lag = cells.difference(("gn", big), ("bn", big))
        out.append(_finding(f"GN is close to BN at N={big} (trails by < {GN_NEAR_BN_POINTS:g} point)",
                            f"GN − BN = {with_sign(lag.mean)} points",
                            f"GN − BN = {with_sign(paper1['gn'] - paper1['bn'])} points (Table 1, N=32)",
                            lag.shifted(GN_NEAR_BN_POINTS, -1), cells.floor(("gn", big), ("bn", big))))
    ranked = [n for n in ORDER if has(n, big)]
    if len(ranked) > 1:
        pairs = [(a, b, cells.difference((b, big), (a, big)), cells.floor((a, big), (b, big)))
                 for a, b in zip(ranked, ranked[1:])]
        verdicts = [verdict(gap, floor) for _, _, gap, floor in pairs]
        # the pair that decides: the first reversed one, else the least certain one
        deciding = next((p for p, v in zip(pairs, verdicts) if v == FAILS),
                        min(pairs, key=lambda p: judged(p[2], p[3])[0] if p[2].low is not None else float("-inf")))
        ours = " < ".join(norm_label(n) for n in sorted(ranked, key=lambda n: at(n, big)))
        values = ", ".join(f"{norm_label(n)} {at(n, big):.1f}" for n in ranked)
        paper = " < ".join(f"{norm_label(n)} {paper1[n]:.1f}" for n in ORDER)
        result = FAILS if FAILS in verdicts else HOLDS if set(verdicts) == {HOLDS} else UNDECIDED
        a, b, gap, floor = deciding
        out.append(Finding(f"Ordering {' < '.join(map(norm_label, ranked))} at N={big} (Table 1; the margin: "
                           f"{norm_label(b)} − {norm_label(a)})", f"{ours} ({values})", paper, gap, floor, result))
    return out


def sanity(runs: pd.DataFrame, metric: str = DEFAULT_METRIC, protocol: str | None = None) -> list[Finding]:
    """Checks of the harness, not of the paper: under a fixed total batch each batch-independent norm gives the same
    error for the same seed at every N (it never sees N)."""
    if (protocol or Cells(runs, metric).protocol) != FIXED_TOTAL:
        return []
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
        out.append(Finding(f"{norm_label(norm)} identical at N ∈ {{{batches}}} (it never sees N)",
                           f"largest difference {worst:.2f} points over {len(per_seed)} seed(s)",
                           "by construction", None, 0.0, HOLDS if worst == 0 else FAILS))
    return out


def _margin_text(f: Finding) -> str:
    if f.margin is None:
        return "–"
    low, high = f.interval
    if low is None:
        return f"{with_sign(f.margin.mean)} (one seed: no interval)"
    widened = " (binomial floor)" if f.floor > (f.margin.half_width or 0) else ""
    pairing = "paired" if f.margin.paired else "unpaired"
    return f"{with_sign(f.margin.mean)} [{with_sign(low)}, {with_sign(high)}]{widened}, {pairing}, {f.margin.n} seeds"


def findings_markdown(items: list[Finding], seeds: int | None = None) -> str:
    if not items:
        return "_not enough finished runs to test the claim_\n"
    lines = ["| claim | ours | margin [95% interval] | paper (ImageNet, ResNet-50) | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {f.what} | {f.ours} | {_margin_text(f)} | {f.paper} | {f.verdict} |" for f in items]
    text = "\n".join(lines) + "\n"
    text += ("\nA margin is the claim's way when positive. Its interval is the 95% Student-t interval over seeds of "
             "the difference behind it, paired by seed where the runs share seeds and data order, and never narrower "
             "than the test sets' binomial 95% error. The claim holds when the interval lies above zero, does not "
             "hold when it lies below, and is undecided when it covers zero (docs/reports.md).\n")
    if seeds == 1:
        text += ("\n**One seed per cell.** No interval over seeds can be formed, so no verdict can be decided from "
                 "these runs: every claim reads undecided. The published studies (results/reference/) have 2–3 "
                 "seeds per cell.\n")
    return text


def sanity_markdown(items: list[Finding]) -> str:
    lines = ["| check | ours | expected | result |", "|---|---|---|---|"]
    lines += [f"| {f.what} | {f.ours} | {f.paper} | {'passes' if f.holds else 'FAILS'} |" for f in items]
    return "\n".join(lines) + ("\n\nNot a claim of the paper: a check that the harness does what the protocol says "
                               "(under a fixed total batch a batch-independent norm never sees N).\n")
