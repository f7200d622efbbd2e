"""How the claim depends on the training budget: GN's lag behind BN at the largest N, and BN's deficit to GN
at the smallest N, for runs of one protocol trained for several budgets (each budget its own runs and schedule).

GN's lag shrinks as training goes on; BN's small-batch penalty does not. Where the two lines cross zero
says at which budget GN overtakes BN at the smallest batch, and by how much.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from normlab.analysis.cells import DEFAULT_METRIC, finished, main_setting, stats
from normlab.analysis.figures import STYLE, plt, save
from normlab.analysis.metrics_info import METRICS, norm_color


def budgets(runs: pd.DataFrame) -> list[int]:
    """The distinct planned epoch counts of the finished runs, smallest first."""
    return sorted(int(e) for e in finished(runs)["epochs_planned"].dropna().unique())


def budget_table(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """One row per budget: steps, BN at the largest and smallest N, GN, GN's lag and BN's deficit (points)."""
    runs = main_setting(runs)
    s = stats(runs, ["epochs_planned", "norm", "per_worker_batch"], metric)
    if s.empty or not {"bn", "gn"} <= set(s["norm"]):
        return pd.DataFrame()
    big, small = s["per_worker_batch"].max(), s["per_worker_batch"].min()
    steps = runs.groupby("epochs_planned")["steps_per_epoch"].max() if "steps_per_epoch" in runs else None
    rows = []
    for epochs, cell in s.groupby("epochs_planned"):
        mean = cell.set_index(["norm", "per_worker_batch"])["mean"]
        gn = cell[cell["norm"] == "gn"]["mean"].mean()  # GN never sees N under a fixed total batch
        bn_big, bn_small = mean.get(("bn", big)), mean.get(("bn", small))
        if bn_big is None or bn_small is None or pd.isna(gn):
            continue
        per_epoch = None if steps is None else steps.get(epochs)
        rows.append({"epochs": int(epochs), "steps": None if per_epoch is None or pd.isna(per_epoch)
                     else int(per_epoch * epochs), f"bn_N{big}": bn_big, f"bn_N{small}": bn_small, "gn": gn,
                     "gn_lag": gn - bn_big, "bn_deficit": bn_small - gn, "seeds": int(cell["n"].min())})
    return pd.DataFrame(rows)


def budget_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no BN and GN runs at several budgets_\n"
    big, small = (c.split("_N")[1] for c in table.columns if c.startswith("bn_N"))
    lines = [f"| epochs | steps | BN, N={big} | BN, N={small} | GN | GN − BN(N={big}) | BN(N={small}) − GN | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        d = r._asdict()
        lines.append(f"| {d['epochs']} | {d['steps'] if d['steps'] is not None else '–'} | {d[f'bn_N{big}']:.1f} | "
                     f"{d[f'bn_N{small}']:.1f} | {d['gn']:.1f} | {d['gn_lag']:+.1f} | {d['bn_deficit']:+.1f} | "
                     f"{d['seeds']} |")
    return "\n".join(lines) + ("\n\nGN − BN(N=%s) > 0: GN trails BN at the largest batch. BN(N=%s) − GN > 0: GN beats "
                               "BN at the smallest batch.\n" % (big, small))


def fig_budget(table: pd.DataFrame, out: Path, metric: str = DEFAULT_METRIC, name: str = "fig_budget") -> list[Path]:
    if table.empty:
        return []
    big, small = (c.split("_N")[1] for c in table.columns if c.startswith("bn_N"))
    by_steps = bool(table["steps"].notna().all())
    x = table["steps"] if by_steps else table["epochs"]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.plot(x, table["gn_lag"], marker="o", linewidth=2, color=norm_color("gn"),
                label=f"GN − BN(N={big}): GN's lag")
        ax.plot(x, table["bn_deficit"], marker="s", linewidth=2, color=norm_color("bn"),
                label=f"BN(N={small}) − GN: GN's lead at N={small}")
        ax.axhline(0, color="#333333", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(x))
        ax.set_xticklabels([str(int(v)) for v in x])
        ax.minorticks_off()
        ax.set_xlabel("training steps (one run each, its own schedule)" if by_steps else "epochs")
        ax.set_ylabel(f"difference in {METRICS[metric].label.split(',')[0].replace(' (%)', '')} (points)")
        ax.set_title("The crossing vs the training budget", fontsize=11)
        ax.legend(frameon=False)
        return save(fig, out / name)
