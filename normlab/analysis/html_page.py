"""The report's Markdown as one self-contained HTML page: tables, headings, paragraphs, bold, and its PNG figures
embedded, so that the page opens offline and can be mailed as one file.

It reads only the Markdown the report writes (a subset: ``|`` tables, ``#`` headings, ``**bold**``, ``![name](file)``)
and escapes every text it copies, so nothing read from disk (a run's name, a problem message) becomes markup.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1rem}td,th{border:1px solid #ccc;padding:0.25rem 0.6rem;
text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}h2{margin-top:2rem}"""


def _pairs(text: str, mark: str, tag: str) -> str:
    """Each pair of `mark`s around a span as <tag>…</tag>; an unpaired mark stays as it is."""
    parts = text.split(mark)
    if len(parts) < 3:
        return text
    pairs = (len(parts) - 1) // 2 * 2
    out = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        out += ((f"<{tag}>" if i % 2 else f"</{tag}>") if i <= pairs else mark) + part
    return out


def _inline(text: str) -> str:
    return _pairs(_pairs(html.escape(text), "**", "b"), "`", "code")


def _image(name: str, folder: Path) -> str:
    """A figure of the report's own folder, embedded; any other path is left out."""
    path = folder / name
    ok = "/" not in name and "\\" not in name and name.endswith(".png") and path.is_file()
    if not ok:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>'


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
            body.append(_image(line[line.index("(") + 1:line.rindex(")")], folder))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            italic = len(line) > 2 and line.startswith("_") and line.endswith("_")  # markdown's _a note_
            body.append(f"<p><em>{_inline(line[1:-1])}</em></p>" if italic else f"<p>{_inline(line)}</p>")
    flush_table()
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>normlab report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
