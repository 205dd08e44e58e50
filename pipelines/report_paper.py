"""The paper comparison of ``maxa report``: the paper's numbers (shipped as package data), which
backbone row of ours compares with which row of the paper, and the tables laid out as the paper's.

Tables follow the paper: Table 2 (instance awareness on COCO), Table 3 (VOC / COCO-Stuff semantic
segmentation, NYUv2 depth), Table 4 (adapter variants). Rows are backbones (``head=maxa``,
``variant=base`` for Tables 2/3), cells are the mean ± sample std over seeds (std only with more than
one seed; ``n`` is the number of seeds).
Under each row whose backbone has a paper row (the registry's ``paper_row``) come the paper's value and
Δ = ours − paper. Task/dataset pairs the paper has no table for (e.g. ``shapes``) go to "Other datasets".

Scales: our IoU / mIoU / ARI are percents, as the paper's Tables 2/3. The paper's Table 4 gives ARI as
a fraction (converted ×100 here) and its Table 3 depth MSE ×100 (22.8 for DINOv2, whose Table 4/5
value is 0.23): converted ÷100 to compare with our MSE.
"""

from __future__ import annotations

import csv
import io
from importlib import resources
from typing import Any

from pipelines.report_records import _order_key, backbone_info
from pipelines.report_shared import METRICS, PROBE_TASKS, TASK_LABELS, TASK_METRICS
from pipelines.report_tables import Column, Table, _fill, _fmt, _info, _labels, _trivial_row

__all__ = ["load_reference", "paper_row_for", "build_tables"]

#: (task, dataset) pairs of the paper's Tables 2 and 3
PAPER_PAIRS = {("instances", "coco"), ("boundaries", "coco"), ("distance", "coco"), ("semseg", "voc"),
               ("semseg", "cocostuff"), ("depth", "nyuv2")}
#: Table 4's datasets and metric per task; paper column stems per paper row
ABLATION_TASKS = {"instances": ("coco", "ari", 100.0), "semseg": ("voc", "miou", 1.0), "depth": ("nyuv2", "mse", 1.0)}
ABLATION_BACKBONES = {"Dino V2": "dinov2", "SigLIP-384": "siglip384", "MAE": "mae"}
VARIANT_PAPER_ROWS = {"base": "base", "d16": "D=16", "no-sigma": "no sigma", "shared-sigma": "no individual sigma",
                      "single-layer": "single MCA layer"}
VARIANT_ORDER = ("base", "d16", "no-sigma", "shared-sigma", "single-layer", "paper-budget")


# -- the paper's numbers --------------------------------------------------------------------------
def _read_csv(name: str) -> list[dict[str, str]]:
    text = resources.files("probe").joinpath("paper", name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def load_reference() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """The paper's Tables 2/3 (by backbone row) and Table 4 (by variant row), shipped as package data."""
    def num(v: str) -> float | str:
        try:
            return float(v)
        except ValueError:
            return v

    results = {r["backbone"]: {k: num(v) for k, v in r.items() if k != "backbone"} for r in _read_csv("reference_results.csv")}
    ablation = {r["variant"]: {k: num(v) for k, v in r.items() if k != "variant"} for r in _read_csv("reference_ablation.csv")}
    return results, ablation


def _is_random(weights: str) -> bool:
    return weights.startswith("random")


def paper_row_for(backbone: str, weights: str) -> str | None:
    """The paper row a record compares with: the registry's ``paper_row``, unless the weights are random
    for a backbone the paper ran pretrained."""
    info = backbone_info(backbone)
    if info["paper_row"] is None or (_is_random(weights) and not info["random_only"]):
        return None
    return info["paper_row"]


# -- the tables ---------------------------------------------------------------------------------
def _backbone_table(key: str, title: str, caption: str, columns: list[Column], records: list[dict], ref) -> Table | None:
    sel = [r for r in records if r["head"] == "maxa" and r["variant"] == "base"]
    per_key: dict[tuple[str, str], list[list[dict]]] = {}
    for r in sel:
        for j, c in enumerate(columns):
            if r["task"] == c.task and r["dataset"] == c.dataset:
                per_key.setdefault((r["backbone"], r["weights"]), [[] for _ in columns])[j].append(r)
    if not per_key:
        return None
    keys = sorted(per_key, key=_order_key)
    labels = _labels(keys)

    def paper_value(paper_row: str, col: Column | None):
        prow = ref.get(paper_row)
        if prow is None:
            return None
        if col is None:  # the paper row's I, F, P
            return [str(int(prow["image_size"])), str(int(prow["feature_size"])), _fmt(prow["params_M"], 1)]
        v = prow.get(col.paper_key) if col.paper_key else None
        return None if not isinstance(v, float) else v * col.paper_scale

    groups = [(labels[k], per_key[k], paper_row_for(*k), _info(k[0])) for k in keys]
    notes: list[str] = []
    rows = _fill(columns, groups, paper_value, title, notes)
    all_per_col = [[r for k in keys for r in per_key[k][j]] for j in range(len(columns))]
    triv = _trivial_row(columns, all_per_col)
    if triv:
        rows.append(triv)
    caption += " I: input image side (px), F: feature grid side, P: backbone parameters (millions)."
    return Table(key, title, caption, columns, rows, ["I", "F", "P (M)"], notes)


def _cols(task: str, dataset: str, group: str, paper_prefix: str | None, scale: dict[str, float] | None = None,
          metrics: tuple[str, ...] | None = None) -> list[Column]:
    cols = []
    for m in metrics or TASK_METRICS[task]:
        pk = f"{paper_prefix}_{m}" if paper_prefix else None
        cols.append(Column(group, METRICS[m][0], task, dataset, m, pk, (scale or {}).get(m, 1.0)))
    cols.append(Column(group, "P_learn", task, dataset, None, f"{paper_prefix}_plearn_M" if paper_prefix else None))
    return cols


def _ablation_table(records: list[dict], ablation_ref) -> Table | None:
    sel = [r for r in records if r["head"] == "maxa" and r["task"] in ABLATION_TASKS]
    if not any(r["variant"] != "base" for r in sel):
        return None
    # a column per (task, dataset, backbone) that was run with some non-base variant
    col_keys = sorted({(r["task"], r["dataset"], r["backbone"], r["weights"]) for r in sel if r["variant"] != "base"},
                      key=lambda k: (list(ABLATION_TASKS).index(k[0]), k[1] != ABLATION_TASKS[k[0]][0], k[1],
                                     _order_key((k[2], k[3]))))
    labels = _labels(sorted({(k[2], k[3]) for k in col_keys}))
    columns = []
    for task, ds, b, w in col_keys:
        dataset, metric, scale = ABLATION_TASKS[task]
        prow = paper_row_for(b, w) if ds == dataset else None
        stem = ABLATION_BACKBONES.get(prow or "")
        pk = f"{'instdisc' if task == 'instances' else task}_{stem}" if stem else None
        arrow = "↑" if METRICS[metric][1] else "↓"
        columns.append(Column(f"{TASK_LABELS[task]} {METRICS[metric][0]} {arrow} ({ds})", labels[(b, w)], task, ds,
                              metric, pk, scale, (b, w)))
    variants = sorted({r["variant"] for r in sel}, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99)
    groups = []
    for v in variants:
        per_col = [[r for r in sel if r["variant"] == v and r["task"] == c.task and r["dataset"] == c.dataset
                    and (r["backbone"], r["weights"]) == c.backbone] for c in columns]
        groups.append((v, per_col, VARIANT_PAPER_ROWS.get(v), []))

    def paper_value(paper_row: str, col: Column | None):
        prow = ablation_ref.get(paper_row)
        if prow is None or col is None or not col.paper_key:
            return None
        val = prow.get(col.paper_key)
        return None if not isinstance(val, float) else val * col.paper_scale

    title = "Table 4 — ablation (adapter variants)"
    notes: list[str] = []
    rows = _fill(columns, groups, paper_value, title, notes)
    caption = ("Adapter variants (head maxa) × backbones; paper values from its Table 4 (ARI ×100 to percent) for "
               "instances on coco, semseg on voc, depth on nyuv2.")
    return Table("table4", title, caption, columns, rows, notes=notes)


def build_tables(records: list[dict[str, Any]]) -> list[Table]:
    ref, ablation_ref = load_reference()
    tables = []
    t2_cols = (_cols("instances", "coco", "Inst. Disc.", "instdisc")
               + _cols("boundaries", "coco", "Boundaries", "boundaries")
               + _cols("distance", "coco", "Distance Transform", "disttransform"))
    t2 = _backbone_table("table2", "Table 2 — instance awareness (COCO)",
                         "Inst. Disc. ARI (%) ↑ | Boundaries CE ↓, IoU (%) ↑ | Distance MSE ↓; P_learn in millions.",
                         t2_cols, records, ref)
    t3_cols = (_cols("semseg", "voc", "Pascal VOC2012", "voc")
               + _cols("semseg", "cocostuff", "COCO-Stuff", "cocostuff")
               + _cols("depth", "nyuv2", "Depth (NYUv2)", "nyu_depth", scale={"mse": 0.01}))
    t3 = _backbone_table("table3", "Table 3 — local semantics and depth",
                         "VOC / COCO-Stuff CE ↓, mIoU (%) ↑ | NYUv2 depth MSE ↓ (the paper's Table 3 MSE is ×100: "
                         "shown ÷100); P_learn in millions.", t3_cols, records, ref)
    tables += [t for t in (t2, t3, _ablation_table(records, ablation_ref)) if t is not None]
    other = sorted({r["dataset"] for r in records if (r["task"], r["dataset"]) not in PAPER_PAIRS})
    for ds in other:
        cols = []
        for task in PROBE_TASKS:
            if any(r["task"] == task and r["dataset"] == ds for r in records):
                cols += _cols(task, ds, TASK_LABELS[task], None)
        t = _backbone_table(f"other-{ds}", f"Other datasets — {ds}",
                            f"maxa base adapters on {ds} (no paper numbers); trivial predictor for reference.",
                            cols, records, {})
        if t is not None:
            tables.append(t)
    return tables
