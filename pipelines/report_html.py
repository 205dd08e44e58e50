"""``index.html`` of ``maxa report``: one self-contained page (inline CSS, images as PNG data URIs, no script)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from pipelines.report_shared import FIGURE_SECTIONS
from pipelines.report_tables import DUPLICATES_CAPTION

__all__ = ["render_html"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 1.8em; }
p.meta, p.caption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; text-align: center; }
td.label { text-align: left; font-weight: 600; }
tr.paper td { color: #666; font-style: italic; background: #fafafa; }
tr.paper td.label, tr.delta td.label, tr.trivial td.label { font-weight: normal; padding-left: 18px; }
tr.delta td { color: #555; font-size: 0.92em; }
tr.trivial td { color: #888; background: #f7f7f7; }
td.best { background: #e6f4e6; }
td.best b { color: #0a5d0a; }
tr.delta td.better { color: #0a7a0a; }
tr.delta td.worse { color: #b00020; }
span.n { color: #999; font-size: 0.85em; margin-left: 3px; }
ul.notes li { color: #8a5a00; }
figure { display: inline-block; margin: 6px 10px 10px 0; vertical-align: top; }
figure img { border: 1px solid #ddd; max-width: 100%; }
figcaption { font-size: 0.8em; color: #444; max-width: 900px; }
div.row { margin-bottom: 14px; }
div.scroll { max-width: 100%; overflow-x: auto; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(t) -> str:
    first = t.label_header
    groups: list[tuple[str, int]] = []
    for c in t.columns:
        if groups and groups[-1][0] == c.group:
            groups[-1] = (c.group, groups[-1][1] + 1)
        else:
            groups.append((c.group, 1))
    lead = len(t.info_header) + 1
    h1 = [f'<th rowspan="2">{first}</th>'] + [f'<th rowspan="2">{escape(h)}</th>' for h in t.info_header]
    h1 += [f'<th colspan="{n}">{escape(g)}</th>' for g, n in groups]
    h2 = [f"<th>{escape(c.name)}</th>" for c in t.columns]
    out = [f'<table id="{escape(t.key)}" data-lead="{lead}">', "<thead>", "<tr>" + "".join(h1) + "</tr>",
           "<tr>" + "".join(h2) + "</tr>", "</thead>", "<tbody>"]
    for row in t.rows:
        info = row.info + [""] * (len(t.info_header) - len(row.info))
        tds = [f'<td class="label">{escape(row.label)}</td>'] + [f"<td>{escape(x)}</td>" for x in info]
        for c in row.cells:
            cls = " ".join(x for x in ("best" if c.best else "", c.cls) if x)
            text = f"<b>{escape(c.text)}</b>" if c.best else escape(c.text)
            if c.n is not None:
                text += f'<span class="n">n={c.n}</span>'
            tds.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        out.append(f'<tr class="{row.kind}">' + "".join(tds) + "</tr>")
    out += ["</tbody>", "</table>"]
    return (f"<h3>{escape(t.title)}</h3>\n<p class=\"caption\">{escape(t.caption)}</p>\n"
            '<div class="scroll">' + "\n".join(out) + "</div>")


def _simple(header: list[str], body: list[list[str]], table_id: str) -> str:
    rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{escape(str(x))}</td>" for x in r) + "</tr>" for r in body]
    return f'<div class="scroll"><table id="{table_id}">' + "\n".join(rows) + "</table></div>"


def _duplicates(header: list[str], body: list[list[str]]) -> str:
    return (f'<h2 id="duplicates">Duplicates</h2>\n<p class="caption">{escape(DUPLICATES_CAPTION)}</p>\n'
            + _simple(header, body, "duplicates-table"))


def _figures(figures, section: str) -> str:
    sel = [f for f in figures if f.section == section]
    parts = []
    for group in dict.fromkeys(f.group for f in sel):
        members = [f for f in sel if f.group == group]
        cls = ' class="pred"' if section == "predictions" else ""
        figs = "".join(f'<figure{cls}><img alt="{escape(f.caption)}" src="{_data_uri(f.png)}">'
                       f"<figcaption>{escape(f.caption)}</figcaption></figure>" for f in members)
        head = f"<p><b>{escape(group)}</b></p>" if group else ""
        parts.append(f'<div class="row">{head}{figs}</div>')
    return "\n".join(parts)


def render_html(meta: dict[str, Any], notes: list[str], tables, figures, speed, all_records, duplicates=None,
                provenance=()) -> str:
    """The whole page; ``speed`` and ``duplicates`` (``(header, body)`` like ``all_records``) only when
    they have rows; ``provenance``: (title, caption, table) sections after All records, folded."""
    roots = ", ".join(meta["roots"])
    by = f" by maxa {meta['maxa']}" if meta.get("maxa") else ""
    body = ["<h1>maxa report</h1>",
            f'<p class="meta">Generated {escape(meta["generated"])}{escape(by)} from {escape(roots)}: {meta["n_records"]} probe '
            f'record(s), {meta["n_speed"]} speed record(s). Cells: mean ± std over seeds (n = seeds); '
            "<b>bold</b>/green = best in column; italic rows: the paper's numbers; Δ = ours − paper "
            "(green: ours better).</p>"]
    if notes:
        body += ["<h2>Notes</h2>", '<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"]
    body += ["<h2>Tables</h2>"] + [_table(t) for t in tables]
    for section, title in FIGURE_SECTIONS:
        if any(f.section == section for f in figures):
            body += [f'<h2 id="{section}">{escape(title)}</h2>', _figures(figures, section)]
    if speed[1]:
        body += ["<h2>Speed</h2>", _simple(*speed, "speed")]
    if duplicates and duplicates[1]:
        body.append(_duplicates(*duplicates))
    body += ["<h2>All records</h2>", _simple(*all_records, "all-records")]
    for n, (title, caption, table) in enumerate(provenance):
        if table[1]:
            body += [f"<details><summary><b>{escape(title)}</b> ({len(table[1])} rows)</summary>",
                     f"<p>{escape(caption)}</p>", _simple(*table, f"provenance-{n}"), "</details>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>maxa report</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
