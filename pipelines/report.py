"""``maxa report``: the results table(s) of one or more store roots as ``results.md`` and ``index.html``.

This module writes the report; its parts live beside it:

- :mod:`pipelines.report_records`: which records count (one per experiment, configurations apart);
- :mod:`pipelines.report_tables`: the table model, cells over seeds, the flat tables;
- :mod:`pipelines.report_paper`: the paper's numbers and the tables laid out as the paper's;
- :mod:`pipelines.report_markdown`, :mod:`pipelines.report_html`: the two renderings;
- :mod:`pipelines.plots`: the figures; :mod:`pipelines.report_shared`: what they and the report share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines import plots
from pipelines.report_html import render_html
from pipelines.report_markdown import render_markdown
from pipelines.report_paper import build_tables, load_reference
from pipelines.report_records import (NON_IDENTITY_FIELDS, DuplicateGroup, _read_all, collect_records, dedupe_records,
                                      record_identity)
from pipelines.report_shared import DEFAULT_FEATURE_IMAGES, Figure
from pipelines.report_tables import (Table, all_records_table, configurations_table, duplicates_table,
                                     provenance_table, speed_table)

__all__ = ["ReportPaths", "write_report", "load_reference", "collect_records", "dedupe_records", "record_identity",
           "build_tables", "Table", "DuplicateGroup", "NON_IDENTITY_FIELDS", "Figure", "speed_table"]


@dataclass
class ReportPaths:
    out_dir: str
    markdown: str
    html: str
    images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read(roots: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[DuplicateGroup], list[str]]:
    """(probe records, one per experiment; speed records; conflicting duplicates; notes on what was read)."""
    notes = [f"store root {r} does not exist" for r in roots if not Path(r).is_dir()]
    records, speed = _read_all(roots)
    records, duplicates = dedupe_records(records)
    if not records:
        notes.append("no probe records found (train some with `maxa probe`).")
    conflicts = [d for d in duplicates if d.conflicting]
    if conflicts:
        notes.append(f"{len(conflicts)} experiment(s) were recorded more than once with different metrics: the newest "
                     "record of each is used; all of them are listed under Duplicates.")
    same = sum(len(d.others) for d in duplicates if not d.conflicting)
    if same:
        notes.append(f"{same} record(s) repeated an experiment with the same metrics; the newest of each is used.")
    return records, speed, conflicts, notes


def _figures(roots: list[str], records: list[dict[str, Any]], speed: list[dict[str, Any]],
             max_feature_images: int) -> tuple[list[Figure], list[str]]:
    """Every figure of the report, and the notes on those that could not be drawn."""
    figures: list[Figure] = []
    notes: list[str] = []
    for figs, more in (plots.score_vs_speed(records, speed), plots.score_vs_plearn(records, speed),
                       plots.feature_pca(roots, records, max_images=max_feature_images),
                       plots.prediction_resolutions(records)):
        figures += figs
        notes += more
    return figures, notes


def _save_images(img_dir: Path, figures: list[Figure]) -> list[str]:
    paths = []
    for f in figures:
        path = img_dir / f.name
        path.write_bytes(f.png)
        paths.append(str(path))
    return paths


CONFIGURATIONS_CAPTION = ("What each configuration id (the config column) stands for: records of one id differ in "
                          "their seed only.")
PROVENANCE_CAPTION = ("One row per record: its run directory holds the adapter (adapter.pt) and the full record "
                      "(meta.json: settings, history, store paths).")


def write_report(store_roots: list[str], out_dir: str, *,
                 max_feature_images: int = DEFAULT_FEATURE_IMAGES) -> ReportPaths:
    """Read the results of ``store_roots`` and write ``results.md``, ``index.html`` and ``img/*.png`` to ``out_dir``.

    ``index.html`` is self-contained (inline CSS, images as data URIs); ``results.md`` links ``img/``.
    """
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    roots = [str(r) for r in store_roots]
    records, speed, conflicts, notes = _read(roots)
    tables = build_tables(records)
    notes += [n for t in tables for n in t.notes]
    figures, figure_notes = _figures(roots, records, speed, max_feature_images)
    notes += figure_notes
    images = _save_images(out / "img", figures)
    all_records, speed_rows, duplicates = all_records_table(records), speed_table(speed), duplicates_table(conflicts)
    from runtime.provenance import tool_version

    meta = {"generated": datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "roots": roots,
            "n_records": len(records), "n_speed": len(speed), "maxa": tool_version()}
    provenance = [("Configurations", CONFIGURATIONS_CAPTION, configurations_table(records)),
                  ("Where each number comes from", PROVENANCE_CAPTION, provenance_table(records))]
    md_path = out / "results.md"
    md_path.write_text(render_markdown(meta, notes, tables, figures, speed_rows, duplicates, all_records, provenance),
                       encoding="utf-8")
    html_path = out / "index.html"
    html_path.write_text(render_html(meta, notes, tables, figures, speed_rows, all_records, duplicates, provenance),
                         encoding="utf-8")
    return ReportPaths(str(out), str(md_path), str(html_path), images, notes)
