"""``results.md`` of ``maxa report``: the report as Markdown, its images linked from ``img/``
(the HTML twin is :mod:`pipelines.report_html`)."""

from __future__ import annotations

from typing import Any

from pipelines.report_shared import FIGURE_SECTIONS, Figure
from pipelines.report_tables import DUPLICATES_CAPTION, Table

__all__ = ["render_markdown", "table_markdown", "simple_markdown"]

SimpleTable = tuple[list[str], list[list[str]]]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(t: Table) -> str:
    head = [t.label_header, *t.info_header,
            *[f"{c.group} {c.name}" for c in t.columns]]
    lines = [f"### {t.title}", "", t.caption, "", "| " + " | ".join(map(_md_escape, head)) + " |",
             "|" + "---|" * len(head)]
    for row in t.rows:
        cells = []
        for c in row.cells:
            text = f"**{c.text}**" if c.best and c.text else c.text
            if c.n is not None:
                text += f" (n={c.n})"
            cells.append(text)
        info = row.info + [""] * (len(t.info_header) - len(row.info))
        label = row.label if row.kind == "ours" else f"*{row.label}*"
        lines.append("| " + " | ".join(_md_escape(x) for x in [label, *info, *cells]) + " |")
    return "\n".join(lines) + "\n"


def simple_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(str(x)) for x in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _figures_markdown(figures: list[Figure]) -> list[str]:
    md: list[str] = []
    for section, title in FIGURE_SECTIONS:
        sel = [f for f in figures if f.section == section]
        if not sel:
            continue
        md += [f"## {title}", ""]
        for group in dict.fromkeys(f.group for f in sel):
            members = [f for f in sel if f.group == group]
            if group:
                md += [f"**{group}**", "", " ".join(f"![{f.caption}](img/{f.name})" for f in members),
                       "", " · ".join(f.caption for f in members), ""]
            else:
                md += [f"![{f.caption}](img/{f.name})\n\n*{f.caption}*\n" for f in members]
    return md


def render_markdown(meta: dict[str, Any], notes: list[str], tables: list[Table], figures: list[Figure],
                    speed: SimpleTable, duplicates: SimpleTable, all_records: SimpleTable,
                    provenance: list[tuple[str, str, SimpleTable]] = ()) -> str:
    """The whole ``results.md``; ``speed`` and ``duplicates`` sections only when they have rows;
    ``provenance``: (title, caption, table) sections after All records."""
    roots = meta["roots"]
    by = f" by maxa {meta['maxa']}" if meta.get("maxa") else ""
    md = ["# maxa report", "", f"Generated {meta['generated']}{by} from {', '.join(roots)}: {meta['n_records']} probe "
          f"record(s), {meta['n_speed']} speed record(s). Cells: mean ± std over seeds (n = seeds); **bold** = best in "
          "column; paper rows from the paper's tables, Δ = ours − paper.", ""]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    md += ["## Tables", ""] + [table_markdown(t) for t in tables]
    md += _figures_markdown(figures)
    if speed[1]:
        md += ["## Speed", "", simple_markdown(*speed)]
    if duplicates[1]:
        md += ["## Duplicates", "", DUPLICATES_CAPTION, "", simple_markdown(*duplicates)]
    md += ["## All records", "", simple_markdown(*all_records)]
    for title, caption, table in provenance:
        if table[1]:
            md += [f"## {title}", "", caption, "", simple_markdown(*table)]
    return "\n".join(md)
