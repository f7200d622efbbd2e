"""Write the report: runs table, figures, tables, and report.md + a self-contained report.html.

Everything goes to one folder (``PATH/report/`` by default). The report says first how it reads the runs (the
metric and why) and where they come from (data set, commits), then, per batch protocol (and per budget), whether
the paper's claim holds, the sanity checks, Figure 1 and Tables 1–2, each beside the paper's; Table 3 where the
runs hold a group ablation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from normlab.analysis import bn_eval, figures, regime, tables
from normlab.analysis.cells import Cells, mixed_cells, shared_seeds
from normlab.analysis.claims import findings, findings_markdown, sanity, sanity_markdown
from normlab.analysis.collect import collect_curves, setting_differences, write_runs
from normlab.analysis.html_page import to_html
from normlab.analysis.metrics_info import METRICS, norm_label, norm_sort_key, protocol_label, with_sign
from normlab.analysis.provenance import provenance_markdown
from normlab.analysis.reading import Reading, choose, reading_markdown
from normlab.analysis.reference import paper_table
from normlab.analysis.untrusted import file_token

log = logging.getLogger("normlab.report")


def paper_markdown() -> str:
    t2 = paper_table("table2").pivot(index="norm", columns="per_worker_batch", values="val_error_top1")
    t2 = t2[sorted(t2.columns, reverse=True)]
    lines = ["| norm | " + " | ".join(str(c) for c in t2.columns) + " |", "|---|" + "---|" * len(t2.columns)]
    for norm in sorted(t2.index, key=norm_sort_key):
        lines.append(f"| {norm_label(norm)} | " + " | ".join(f"{v:.1f}" for v in t2.loc[norm]) + " |")
    gap = t2.loc["gn"] - t2.loc["bn"]
    lines.append("| GN − BN | " + " | ".join(with_sign(v) for v in gap) + " |")
    t1 = paper_table("table1").sort_values("norm", key=lambda c: c.map(norm_sort_key))
    table1 = " · ".join(f"{norm_label(r.norm)} {r.val_error_top1:.1f}" for r in t1.itertuples())
    return "\n".join(lines) + f"\n\nTable 1 (32 images per GPU): {table1}\n"


def status_markdown(runs: pd.DataFrame) -> str:
    counts = runs["status"].fillna("unknown").value_counts()
    line = ", ".join(f"{n} {status}" for status, n in counts.items())
    others = runs[runs["status"] != "done"]
    if others.empty:
        return f"{len(runs)} runs: {line}.\n"
    rows = ["| run | norm | N | seed | status | epochs | why |", "|---|---|---|---|---|---|---|"]
    for r in others.itertuples():
        run_dir = getattr(r, "run_dir", None)
        name = Path(run_dir).name if isinstance(run_dir, str) else "–"
        why = "" if pd.isna(r.problem) else r.problem
        cells = (name, r.norm, r.per_worker_batch, r.seed, r.status, r.epochs, why)
        rows.append("| " + " | ".join(map(one_line, cells)) + " |")
    return f"{len(runs)} runs: {line}. Not finished, or not done:\n\n" + "\n".join(rows) + "\n"


def one_line(value) -> str:
    """Text read from disk (a folder's name, a problem) as one table cell or line of the report: no '|' or line
    break of its own to end the cell or start a heading."""
    return " ".join(str(value).replace("|", "/").split())


def beware_markdown(runs: pd.DataFrame) -> str:
    """A note per table cell that averages what it should not, also logged: finished runs that share a seed
    (copies from another sweep: the seed count and interval overstate what they show), or that differ in model,
    data or lr (runs of other experiments collected together)."""
    notes = []
    for setting, run_dirs in shared_seeds(runs):
        log.warning("%d finished runs share a cell and a seed (%s), averaged as one seed: %s", len(run_dirs),
                    setting, ", ".join(run_dirs))
        notes.append(f"**Beware**: {len(run_dirs)} finished runs share a cell and a seed ({one_line(setting)}): the "
                     f"cell averages them as one seed. Runs: {one_line(', '.join(run_dirs))}.\n")
    for setting, differs in mixed_cells(runs, setting_differences):
        log.warning("the cell %s averages runs that differ: %s", setting, "; ".join(differs))
        notes.append(f"**Beware**: the cell {one_line(setting)} averages runs that differ in {one_line('; '.join(differs))}"
                     ": report them apart (one folder or runs.csv each).\n")
    return "\n".join(notes)


def _budgets_apart(runs: pd.DataFrame) -> list[int | None]:
    """Runs trained for several budgets are tabulated per budget, never averaged together."""
    found = regime.budgets(runs)
    return found if len(found) > 1 else [None]


def build_report(runs: pd.DataFrame, out: Path, metric: str | None = None, sources: list[str] | None = None,
                 reading: Reading | None = None) -> dict[str, list[Path]]:
    """Write every output file into `out`; return them by kind. The metric is `reading`'s, else `metric`, else
    the one the runs' records support (``reading.choose``)."""
    reading = reading or choose(runs, metric, {}, None)
    metric = reading.metric
    if reading.dataset and "dataset" in runs:
        runs = runs.assign(dataset=runs["dataset"].astype("object").where(runs["dataset"].notna(), reading.dataset))
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"runs": write_runs(runs, out), "tables": [], "figures": []}

    def table_file(name: str, text: str) -> None:
        (out / name).write_text(text)
        written["tables"].append(out / name)

    note = "named by the study's reading file, for runs that predate the dataset column" if reading.dataset else None
    beware = beware_markdown(runs)
    sections = [("How these runs are read", reading_markdown(reading) + ("\n" + beware if beware else "")),
                ("Provenance", provenance_markdown(runs, note))]
    curve_sections = []
    found = tables.protocols(runs) or ["paper"]
    cells = [(protocol, epochs) for protocol in found
             for epochs in _budgets_apart(tables.of_protocol(runs, protocol) if len(found) > 1 else runs)]
    for protocol, epochs in cells:
        subset = tables.of_protocol(runs, protocol) if len(found) > 1 else runs
        subset = subset if epochs is None else subset[subset["epochs_planned"] == epochs]
        suffix = "" if len(cells) == 1 else f"_{file_token(protocol)}" + ("" if epochs is None else f"_{epochs}ep")
        heading = f" ({protocol_label(protocol)}" + ("" if epochs is None else f"; {epochs} epochs") + ")"
        setting = heading.strip(" ()")
        t2 = tables.batch_size_table(subset, metric)
        t2_md = tables.to_markdown(t2, "norm \\ N")
        table_file(f"table_batch_size{suffix}.md", t2_md)
        table_file(f"table_batch_size{suffix}.tex", tables.to_latex(
            t2, "norm", f"{METRICS[metric].label} vs images per worker ({setting})"))
        written["figures"] += figures.fig_batch_size(subset, out, metric, setting, f"fig_batch_size{suffix}")
        claim_md = findings_markdown(findings(subset, metric, protocol), Cells(subset, metric, protocol).seeds())
        sections.append((f"Does the claim hold?{heading}", claim_md))
        checks = sanity(subset, metric, protocol)
        if checks:
            sections.append((f"Sanity checks{heading}", sanity_markdown(checks)))
        sections.append((f"Figure 1: error vs batch size{heading}",
                         f"![fig_batch_size{suffix}](fig_batch_size{suffix}.png)\n"))
        t1 = tables.norms_table(subset, metric)
        if not t1.empty:
            t1_md = tables.norms_markdown(t1, metric)
            table_file(f"table_norms{suffix}.md", t1_md)
            table_file(f"table_norms{suffix}.tex", tables.norms_latex(
                t1, metric, f"Table 1: {METRICS[metric].label} of each norm at {int(t1['N'].iloc[0])} images per "
                f"worker ({setting})"))
            sections.append((f"Table 1: the norms at N={int(t1['N'].iloc[0])}, beside the paper's{heading}", t1_md))
        sections.append((f"Table 2: error per batch size, ours{heading}",
                         f"{METRICS[metric].label}: {tables.CELL_NOTE}; GN − BN: {tables.DIFF_NOTE}.\n\n{t2_md}"))
        if bn_eval.has_modes(subset, metric):
            long = bn_eval.long_by_mode(subset, metric)
            table_md = bn_eval.bn_eval_markdown(bn_eval.bn_eval_table(long), metric, bn_eval.mode_differences(long))
            table_file(f"table_bn_eval{suffix}.md", table_md)
            written["figures"] += bn_eval.fig_bn_eval(long, out, metric, f"fig_bn_eval{suffix}")
            sections.append((f"BN at test time: EMA, precise and batch statistics{heading}",
                             table_md + f"\n![fig_bn_eval{suffix}](fig_bn_eval{suffix}.png)\n"))
        curves = collect_curves(tables.main_setting(subset))  # one curve per batch size: no ablation blended in
        curve_norms = sorted(curves["norm"].dropna().unique(), key=norm_sort_key) if not curves.empty else []
        names = {norm: f"fig_curves_{file_token(norm)}{suffix}" for norm in curve_norms}
        for norm, name in names.items():
            written["figures"] += figures.fig_curves(curves, norm, out, name)
        curve_sections += [(f"Training curves{heading}", "\n".join(
            f"![{name}]({name}.png)" for name in names.values()) + "\n")] * bool(curve_norms)
    for protocol in found:
        subset = tables.of_protocol(runs, protocol) if len(found) > 1 else runs
        seeds = regime.per_seed(subset, metric) if len(regime.budgets(subset)) > 1 else pd.DataFrame()
        summary = regime.budget_summary(seeds) if not seeds.empty else pd.DataFrame()
        if len(summary) > 1:
            name = "fig_budget" if len(found) == 1 else f"fig_budget_{file_token(protocol)}"
            table_md = regime.regime_markdown(summary, seeds, METRICS[metric].label)
            table_file(f"table_budget_{file_token(protocol)}.md", table_md)
            written["figures"] += regime.fig_regime(seeds, summary, regime.reproductions(), out, name)
            sections.append((f"Where the claim holds: the crossing vs the training budget ({protocol_label(protocol)})",
                             table_md + f"\n![{name}]({name}.png)\n"))
    sections.append(("The paper's numbers (ImageNet, ResNet-50, top-1 val error %)", paper_markdown()))

    groups = tables.groups_tables(runs, metric)
    if groups:
        groups_md = tables.groups_markdown(groups, metric)
        table_file("table_groups.md", groups_md)
        table_file("table_groups.tex", tables.groups_latex(groups, metric))
        written["figures"] += figures.fig_groups(groups, out, metric)
        sections.append(("Table 3: group ablation, beside the paper's",
                         groups_md + "\n![fig_groups](fig_groups.png)\n"))
    sections += curve_sections
    sections += [("Runs", status_markdown(runs))]
    source = f"Runs from: {', '.join(sources)}\n\n" if sources else ""
    markdown = "# normlab report\n\n" + source + "\n".join(f"## {title}\n\n{body}" for title, body in sections)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(to_html(markdown, out))
    written["report"] = [out / "report.md", out / "report.html"]
    return written
