"""Write the report: runs table, figures, tables, and report.md + a self-contained report.html.

Everything goes to one folder (``PATH/report/`` by default). The HTML embeds its figures, so it
opens offline and can be mailed as one file; beside our numbers it shows the paper's.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from normlab.analysis import bn_eval, budget, figures, tables
from normlab.analysis.claims import Cells, findings, findings_markdown
from normlab.analysis.collect import collect_curves, write_runs
from normlab.analysis.metrics_info import METRICS, norm_label, norm_sort_key, protocol_label
from normlab.analysis.reference import paper_table


def paper_markdown() -> str:
    t2 = paper_table("table2").pivot(index="norm", columns="per_worker_batch", values="val_error_top1")
    t2 = t2[sorted(t2.columns, reverse=True)]
    lines = ["| norm | " + " | ".join(str(c) for c in t2.columns) + " |", "|---|" + "---|" * len(t2.columns)]
    for norm in sorted(t2.index, key=norm_sort_key):
        lines.append(f"| {norm_label(norm)} | " + " | ".join(f"{v:.1f}" for v in t2.loc[norm]) + " |")
    gap = t2.loc["gn"] - t2.loc["bn"]
    lines.append("| GN − BN | " + " | ".join(f"{v:+.1f}" for v in gap) + " |")
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
        why = "" if pd.isna(r.problem) else str(r.problem).replace("|", "/")
        rows.append(f"| {name} | {r.norm} | {r.per_worker_batch} | {r.seed} | {r.status} | {r.epochs} | {why} |")
    return f"{len(runs)} runs: {line}. Not finished, or not done:\n\n" + "\n".join(rows) + "\n"


def _budgets_apart(runs: pd.DataFrame) -> list[int | None]:
    """Runs trained for several budgets are tabulated per budget, never averaged together."""
    found = budget.budgets(runs)
    return found if len(found) > 1 else [None]


def build_report(runs: pd.DataFrame, out: Path, metric: str = tables.DEFAULT_METRIC,
                 sources: list[str] | None = None) -> dict[str, list[Path]]:
    """Write every output file into `out`; return them by kind."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"runs": write_runs(runs, out)}

    sections, curve_sections, written["tables"], written["figures"] = [], [], [], []
    found = tables.protocols(runs) or ["paper"]
    cells = [(protocol, epochs) for protocol in found
             for epochs in _budgets_apart(tables.of_protocol(runs, protocol) if len(found) > 1 else runs)]
    for protocol, epochs in cells:
        subset = tables.of_protocol(runs, protocol) if len(found) > 1 else runs
        subset = subset if epochs is None else subset[subset["epochs_planned"] == epochs]
        suffix = "" if len(cells) == 1 else f"_{protocol}" + ("" if epochs is None else f"_{epochs}ep")
        heading = f" ({protocol_label(protocol)}" + ("" if epochs is None else f"; {epochs} epochs") + ")"
        t2 = tables.batch_size_table(subset, metric)
        t2_md = tables.to_markdown(t2, "norm \\ N")
        (out / f"table_batch_size{suffix}.md").write_text(t2_md)
        (out / f"table_batch_size{suffix}.tex").write_text(tables.to_latex(
            t2, "norm", f"{METRICS[metric].label} vs images per worker ({heading.strip(' ()')})"))
        written["tables"] += [out / f"table_batch_size{suffix}.md", out / f"table_batch_size{suffix}.tex"]
        written["figures"] += figures.fig_batch_size(subset, out, metric, heading.strip(" ()"), f"fig_batch_size{suffix}")
        claim_md = findings_markdown(findings(subset, metric, protocol), Cells(subset, metric).seeds())
        sections += [
            (f"Does the claim hold?{heading}", claim_md),
            (f"Figure 1: error vs batch size{heading}", f"![fig_batch_size{suffix}](fig_batch_size{suffix}.png)\n"),
            (f"Table 2: error per batch size, ours{heading}",
             f"{METRICS[metric].label}, mean ± std over seeds.\n\n{t2_md}"),
        ]
        if bn_eval.has_modes(subset, metric):
            long = bn_eval.long_by_mode(subset, metric)
            table_md = bn_eval.bn_eval_markdown(bn_eval.bn_eval_table(long), metric)
            (out / f"table_bn_eval{suffix}.md").write_text(table_md)
            written["tables"].append(out / f"table_bn_eval{suffix}.md")
            written["figures"] += bn_eval.fig_bn_eval(long, out, metric, f"fig_bn_eval{suffix}")
            sections.append((f"BN at test time: EMA, precise and batch statistics{heading}",
                             table_md + f"\n![fig_bn_eval{suffix}](fig_bn_eval{suffix}.png)\n"))
        curves = collect_curves(tables.main_setting(subset))  # one curve per batch size: no ablation blended in
        curve_norms = sorted(curves["norm"].dropna().unique(), key=norm_sort_key) if not curves.empty else []
        for norm in curve_norms:
            written["figures"] += figures.fig_curves(curves, norm, out, f"fig_curves_{norm}{suffix}")
        curve_sections += [(f"Training curves{heading}", "\n".join(
            f"![fig_curves_{n}{suffix}](fig_curves_{n}{suffix}.png)" for n in curve_norms) + "\n")] * bool(curve_norms)
    for protocol in found:
        subset = tables.of_protocol(runs, protocol) if len(found) > 1 else runs
        table = budget.budget_table(subset, metric) if len(budget.budgets(subset)) > 1 else pd.DataFrame()
        if not table.empty:
            name = "fig_budget" if len(found) == 1 else f"fig_budget_{protocol}"
            (out / f"table_budget_{protocol}.md").write_text(budget.budget_markdown(table))
            written["tables"].append(out / f"table_budget_{protocol}.md")
            written["figures"] += budget.fig_budget(table, out, metric, name)
            sections.append((f"The crossing vs the training budget ({protocol_label(protocol)})",
                             budget.budget_markdown(table) + f"\n![{name}]({name}.png)\n"))
    sections.append(("The paper's numbers (ImageNet, ResNet-50, top-1 val error %)", paper_markdown()))

    groups = tables.groups_tables(runs, metric)
    groups_md = ""
    if groups:
        groups_md = tables.groups_markdown(groups, metric)
        (out / "table_groups.md").write_text(groups_md)
        written["tables"].append(out / "table_groups.md")
        written["figures"] += figures.fig_groups(groups, out, metric)

    if groups:
        sections += [("Table 3: group ablation", groups_md + "\n![fig_groups](fig_groups.png)\n")]
    sections += curve_sections
    sections += [("Runs", status_markdown(runs))]
    source = f"Runs from: {', '.join(sources)}\n\n" if sources else ""
    markdown = "# normlab report\n\n" + source + "\n".join(f"## {title}\n\n{body}" for title, body in sections)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(to_html(markdown, out))
    written["report"] = [out / "report.md", out / "report.html"]
    return written


# ---------------------------------------------------------------- a small markdown → html for our own report

CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1rem}td,th{border:1px solid #ccc;padding:0.25rem 0.6rem;
text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}h2{margin-top:2rem}"""


def _inline(text: str) -> str:
    text = html.escape(text)
    while "**" in text:
        text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return text


def to_html(markdown: str, folder: Path) -> str:
    """The report's markdown as one self-contained page: tables, headings, paragraphs, embedded PNGs."""
    body, rows = [], []

    def flush_table():
        if rows:
            head, *rest = [r for r in rows if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = lambda r: [c.strip() for c in r.strip().strip("|").split("|")]  # noqa: E731
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells(head)) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells(r)) + "</tr>"
                                  for r in rest) + "</table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            rows.append(line)
            continue
        flush_table()
        if line.startswith("!["):
            name = line[line.index("(") + 1:line.index(")")]
            data = base64.b64encode((folder / name).read_bytes()).decode() if (folder / name).exists() else ""
            body.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line).replace('_', '') if line.startswith('_') else _inline(line)}</p>")
    flush_table()
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>normlab report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
