"""Does the paper's claim hold in these runs? The numbers behind each sentence, ours beside the paper's.

The claim (Wu & He 2018, Figure 1 and Table 1): BN's error rises fast as the per-worker batch
shrinks, GN's stays flat, GN beats BN at small batches, and at 32 images per worker BN < GN < LN < IN.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from normlab.analysis.metrics_info import norm_label
from normlab.analysis.reference import paper_table
from normlab.analysis.tables import DEFAULT_METRIC, main_setting, stats


@dataclass
class Finding:
    what: str
    ours: str
    paper: str
    holds: bool | None  # None: not enough runs to say


def _means(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    by = ["norm", "per_worker_batch"]
    return stats(main_setting(runs), by, metric).set_index(by)["mean"]


def findings(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> list[Finding]:
    means = _means(runs, metric)
    if means.empty:
        return []
    paper2 = paper_table("table2").set_index(["norm", "per_worker_batch"])["val_error_top1"]
    batches = sorted({b for _, b in means.index})
    big, small = max(batches), min(batches)
    out = []

    def at(norm, batch):
        return means.get((norm, batch))

    if at("bn", big) is not None and at("bn", small) is not None and big != small:
        rise, paper_rise = at("bn", small) - at("bn", big), paper2[("bn", 2)] - paper2[("bn", 32)]
        out.append(Finding(f"BN's error rises from N={big} to N={small}", f"{rise:+.1f} points",
                           f"{paper_rise:+.1f} points (N=32 → 2)", rise >= 3.0))
    gn = [at("gn", b) for b in batches if at("gn", b) is not None]
    if len(gn) > 1:
        paper_gn = [paper2[("gn", b)] for b in (32, 16, 8, 4, 2)]
        out.append(Finding(f"GN's spread over N ∈ {{{', '.join(map(str, sorted(batches, reverse=True)))}}}",
                           f"{max(gn) - min(gn):.1f} points", f"{max(paper_gn) - min(paper_gn):.1f} points",
                           max(gn) - min(gn) <= 2.0))
    if at("gn", small) is not None and at("bn", small) is not None:
        gap = at("bn", small) - at("gn", small)
        out.append(Finding(f"GN beats BN at N={small}", f"BN − GN = {gap:+.1f} points",
                           f"BN − GN = {paper2[('bn', 2)] - paper2[('gn', 2)]:+.1f} points (N=2)", gap > 0))
    ranked = [(at(n, big), n) for n in ("bn", "gn", "ln", "in") if at(n, big) is not None]
    if len(ranked) > 1:
        paper1 = paper_table("table1").set_index("norm")["val_error_top1"]
        ours = " < ".join(norm_label(n) for _, n in sorted(ranked))
        expected = [n for n in ("bn", "gn", "ln", "in") if n in {n for _, n in ranked}]
        paper = " < ".join(f"{norm_label(n)} {paper1[n]:.1f}" for n in ("bn", "gn", "ln", "in"))
        out.append(Finding(f"Ordering at N={big} (Table 1)", ours + " (" + ", ".join(
            f"{norm_label(n)} {e:.1f}" for e, n in sorted(ranked)) + ")", paper,
            [n for _, n in sorted(ranked)] == expected))
    return out


def findings_markdown(items: list[Finding]) -> str:
    if not items:
        return "_not enough finished runs to test the claim_\n"
    mark = {True: "holds", False: "does not hold", None: "n/a"}
    lines = ["| claim | ours | paper (ImageNet, ResNet-50) | verdict |", "|---|---|---|---|"]
    lines += [f"| {f.what} | {f.ours} | {f.paper} | {mark[f.holds]} |" for f in items]
    return "\n".join(lines) + "\n"
