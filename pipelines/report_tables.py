"""The tables of ``maxa report`` as data, before Markdown or HTML: the table model (:class:`Table` of
:class:`Row` of :class:`Cell`), how a cell summarises the records of several seeds (mean ± std,
several configurations apart), which cell is best, and the flat tables (All records, Speed,
Duplicates). Which tables there are and their paper rows: :mod:`pipelines.report_paper`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from pipelines.report_records import (DuplicateGroup, _by_configuration, _finished, _order_key, backbone_info,
                                      configuration_differences)
from pipelines.report_shared import (METRICS, PROBE_TASKS, UNKNOWN_METRIC, metric_decimals, primary_metric,
                                     relative_to_vitb16)

__all__ = ["Cell", "Row", "Column", "Table", "all_records_table", "speed_table", "duplicates_table",
           "DUPLICATES_CAPTION"]


@dataclass
class Cell:
    text: str = ""
    best: bool = False
    n: int | None = None
    cls: str = ""  # "better" / "worse" for Δ cells


@dataclass
class Row:
    label: str
    cells: list[Cell]
    kind: str = "ours"  # ours | paper | delta | trivial
    info: list[str] = field(default_factory=list)  # I, F, P


@dataclass
class Column:
    group: str
    name: str
    task: str
    dataset: str
    metric: str | None  # None: P_learn (M)
    paper_key: str | None = None
    paper_scale: float = 1.0
    backbone: tuple[str, str] | None = None  # Table 4: the column's (backbone, weights)

    @property
    def higher(self) -> bool | None:
        return METRICS.get(self.metric, UNKNOWN_METRIC)[1] if self.metric else None

    @property
    def decimals(self) -> int:
        return metric_decimals(self.metric) if self.metric else 3


@dataclass
class Table:
    key: str
    title: str
    caption: str
    columns: list[Column]
    rows: list[Row]
    info_header: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. cells that mix configurations

    @property
    def label_header(self) -> str:
        """Heading of the label column: what a row is."""
        return "Variant" if self.key == "table4" else "Backbone"


def _stats(values: list[float]) -> tuple[float, float | None, int] | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _fmt(v: float | None, dec: int) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.{dec}f}"


def _value(r: dict[str, Any], col: Column, trivial: bool = False) -> float | None:
    if col.metric is None:
        return None if trivial or r.get("p_learn") is None else r["p_learn"] / 1e6
    v = (r["trivial"] if trivial else r["metrics"]).get(col.metric)
    return None if v is None else float(v)


def _delta_cell(ours: float | None, paper: float | None, col: Column) -> Cell:
    if ours is None or paper is None:
        return Cell("")
    d = ours - paper
    text = f"{d:+.{col.decimals}f}"
    cls = ""
    if col.higher is not None and round(d, col.decimals) != 0:
        cls = "better" if (d > 0) == col.higher else "worse"
    return Cell(text, cls=cls)


def _cell(col: Column, recs: list[dict]) -> tuple[Cell, float | None]:
    """The cell of ``recs`` and its mean; several configurations are shown apart and have no mean."""
    configs = _by_configuration(recs)
    parts = []
    for conf in configs:
        s = _stats([_value(r, col) for r in conf])
        if s is None:
            continue
        mean, std, n = s
        parts.append((_fmt(mean, col.decimals) + (f" ± {_fmt(std, col.decimals)}" if std is not None else ""), n,
                      mean, conf[0].get("_config", "")))
    if not parts:
        return Cell(""), None
    if len(configs) == 1:
        text, n, mean, _ = parts[0]
        return Cell(text, n=n), mean
    return Cell(" / ".join(f"{text} (n={n}) [{cid}]" for text, n, _, cid in parts), cls="mixed"), None


def _fill(columns: list[Column], groups: list[tuple[str, list[list[dict]], str | None, list[str]]],
          paper_value, title: str = "", notes: list[str] | None = None) -> list[Row]:
    """Our rows (+ paper and Δ rows) from ``groups`` = (label, records per column, paper row or None, I/F/P);
    ``paper_value(paper_row, column)`` is the paper's number (``column=None``: the paper row's I/F/P).
    A cell whose records are of several configurations gets a line in ``notes`` (per column group)."""
    ours_rows: list[tuple[Row, list[float | None]]] = []
    rows: list[Row] = []
    for label, per_col, paper_row, info in groups:
        cells, means = [], []
        noted: set[str] = set()
        for col, recs in zip(columns, per_col):
            cell, mean = _cell(col, recs)
            cells.append(cell)
            means.append(mean)
            if cell.cls == "mixed" and notes is not None and col.group not in noted:
                noted.add(col.group)
                n_conf = len(_by_configuration(recs))
                notes.append(f"{title} · {label} · {col.group} ({col.task} on {col.dataset}) mixes {n_conf} "
                             f"configurations: each is shown apart (newest first, [configuration id] as in All "
                             f"records), without best or Δ; they differ in {configuration_differences(recs)}.")
        row = Row(label, cells, "ours", info)
        rows.append(row)
        ours_rows.append((row, means))
        if paper_row is not None:
            pvals = [paper_value(paper_row, col) for col in columns]
            if any(p is not None for p in pvals):
                prow = Row(f"paper: {paper_row}", [Cell(_fmt(p, c.decimals) if p is not None else "") for p, c in zip(pvals, columns)],
                           "paper", paper_value(paper_row, None) or [])
                drow = Row("Δ ours − paper", [_delta_cell(m, p, c) for m, p, c in zip(means, pvals, columns)], "delta")
                rows += [prow, drow]
    # best per metric column among our rows (needs two or more rows with a value)
    for j, col in enumerate(columns):
        if col.higher is None:
            continue
        vals = [(m[j], row) for row, m in ours_rows if m[j] is not None and not math.isnan(m[j])]
        if len(vals) < 2:
            continue
        best = max(v for v, _ in vals) if col.higher else min(v for v, _ in vals)
        for v, row in vals:
            if round(v, col.decimals + 2) == round(best, col.decimals + 2):
                row.cells[j].best = True
    return rows


def _trivial_row(columns: list[Column], per_col: list[list[dict]]) -> Row | None:
    cells, any_value = [], False
    for col, recs in zip(columns, per_col):
        s = _stats([_value(r, col, trivial=True) for r in recs]) if col.metric else None
        any_value |= s is not None
        cells.append(Cell(_fmt(s[0], col.decimals) if s else ""))
    return Row("trivial predictor", cells, "trivial") if any_value else None


def _labels(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    count: dict[str, int] = {}
    for b, _ in keys:
        count[b] = count.get(b, 0) + 1
    return {(b, w): (f"{b} [{w}]" if count[b] > 1 else b) for b, w in keys}


def _info(backbone: str) -> list[str]:
    i = backbone_info(backbone)
    return [str(i["I"] or "–"), str(i["F"] or "–"), _fmt(i["P"], 1) if i["P"] else "–"]


def all_records_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Every (task, dataset, backbone, weights, variant, head, configuration) group: primary metric, P_learn,
    epochs, time; ``config`` is the configuration id (records of one group differ in their seed only)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = tuple(str(r.get(k)) for k in ("task", "dataset", "backbone", "weights", "variant", "head", "_config"))
        groups.setdefault(key, []).append(r)
    header = ["task", "dataset", "backbone", "weights", "variant", "head", "config", "metric", "value", "trivial",
              "P_learn (M)", "seeds", "epochs", "time (s)"]
    body = []
    for k in sorted(groups, key=lambda k: (PROBE_TASKS.index(k[0]), k[1], _order_key((k[2], k[3])), k[4], k[5], k[6])):
        recs = groups[k]
        m = primary_metric(recs[0])
        dec = metric_decimals(m)
        s = _stats([r["metrics"].get(m) for r in recs])
        t = _stats([r["trivial"].get(m) for r in recs])
        val = "–" if s is None else _fmt(s[0], dec) + (f" ± {_fmt(s[1], dec)}" if s[1] is not None else "")
        p = _stats([r.get("p_learn", 0) / 1e6 for r in recs if r.get("p_learn") is not None])
        ep = _stats([r.get("epochs") for r in recs if r.get("epochs") is not None])
        tm = _stats([(r.get("timings") or {}).get("total_s") for r in recs])
        body.append([*k, m, val, _fmt(t[0], dec) if t else "–", _fmt(p[0], 3) if p else "–",
                     ",".join(str(r.get("seed")) for r in sorted(recs, key=lambda r: str(r.get("seed")))),
                     _fmt(ep[0], 1) if ep else "–", _fmt(tm[0], 1) if tm else "–"])
    return header, body


#: Probe config keys that name the experiment's row, not its settings (shown in their own columns).
_ROW_KEYS = ("task", "variant", "head", "seed")


#: How an unset (None) probe setting reads: what the probe did in its place.
_UNSET = {"lr": "the task's", "max_train_images": "all", "val_fraction": "default"}


def _setting_text(key: str, value: Any, config: dict[str, Any]) -> str:
    if value is None and key == "lr" and config.get("lr") is not None:  # the rate the task chose
        return f"lr {config['lr']} (the task's)"
    return f"{key} {_UNSET.get(key, 'default') if value is None else value}"


def configurations_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """What each configuration id of All records stands for: its probe settings (every field the
    record keeps: epochs, patience, batch size, learning rate, …), the maxa versions and devices of its
    records."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(str(r.get("_config")), []).append(r)
    header = ["config", "task", "dataset", "backbone", "variant", "head", "probe settings", "records", "maxa", "device"]
    body = []
    for cid, recs in sorted(by.items(), key=lambda kv: (PROBE_TASKS.index(kv[1][0]["task"])
                                                         if kv[1][0].get("task") in PROBE_TASKS else 99, kv[0])):
        r0 = recs[0]
        config = r0.get("config") if isinstance(r0.get("config"), dict) else {}
        probe = config.get("probe") or {}
        settings = ", ".join(_setting_text(k, v, config) for k, v in sorted(probe.items())
                             if k not in _ROW_KEYS and v != {}) or "not recorded"
        body.append([cid, *(str(r0.get(k)) for k in ("task", "dataset", "backbone", "variant", "head")), settings,
                     str(len(recs)), ", ".join(sorted({str(r.get("tool_version") or "–") for r in recs})),
                     ", ".join(sorted({str(r.get("device") or "–") for r in recs}))])
    return header, body


def provenance_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Where every number comes from: one row per record with its run directory (the adapter and
    ``meta.json``), its root, when it finished, the device and the maxa version."""
    header = ["task", "dataset", "backbone", "variant", "head", "seed", "config", "metric", "value", "run dir",
              "root", "finished", "device", "maxa"]
    body = []
    for r in sorted(records, key=lambda r: (PROBE_TASKS.index(r["task"]) if r.get("task") in PROBE_TASKS else 99,
                                            str(r.get("dataset")), _order_key((str(r.get("backbone")), "")),
                                            str(r.get("variant")), str(r.get("head")), str(r.get("_config")),
                                            str(r.get("seed")))):
        m = primary_metric(r)
        v = r["metrics"].get(m)
        body.append([*(str(r.get(k)) for k in ("task", "dataset", "backbone", "variant", "head", "seed", "_config")),
                     m, "–" if v is None else _fmt(float(v), metric_decimals(m)), str(r.get("run_dir") or "–"),
                     str(r.get("_root", "–")), _when(r), str(r.get("device") or "–"), str(r.get("tool_version") or "–")])
    return header, body


def speed_table(speed: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    by: dict[str, list[dict]] = {}
    for r in speed:
        by.setdefault(str(r.get("backbone")), []).append(r)
    header = ["backbone", "seconds / batch", "relative to ViT-B/16 224", "records"]
    body = []
    for b in sorted(by, key=lambda b: _order_key((b, ""))):
        s = _stats([r["metrics"].get("seconds_per_batch") for r in by[b]])
        rel = _stats([relative_to_vitb16(r) for r in by[b]])  # none from records timed against another reference
        body.append([b, _fmt(s[0], 4) if s else "–", _fmt(rel[0], 2) if rel else "–", str(len(by[b]))])
    return header, body


DUPLICATES_CAPTION = ("Records of the same experiment (every identity field equal, seed included) whose metrics "
                      "disagree: the tables use the newest (used = yes); compare the runs before trusting either.")


def _when(r: dict[str, Any]) -> str:
    """When ``r`` finished, in local time to the second (as the report's other times), or ``–``."""
    t = _finished(r)
    return t.isoformat(timespec="seconds") if t is not None else str(r.get("finished") or "–")


def duplicates_table(groups: list[DuplicateGroup]) -> tuple[list[str], list[list[str]]]:
    """One row per record of each conflicting experiment: root, run dir, finished, primary metric, used?"""
    header = ["experiment", "used", "root", "run dir", "finished", "metric", "value"]
    body = []
    for g in groups:
        u = g.used
        exp = " · ".join(str(u.get(k)) for k in ("task", "dataset", "backbone", "weights", "variant", "head"))
        exp += f" · seed {u.get('seed')} [{u.get('_config', '')}]"
        m = primary_metric(u)
        dec = metric_decimals(m)
        for r in [u, *g.others]:
            v = r["metrics"].get(m)
            body.append([exp, "yes" if r is u else "no", str(r.get("_root", "")), str(r.get("run_dir") or "–"),
                         _when(r), m, "–" if v is None else _fmt(float(v), dec + 2)])
    return header, body
