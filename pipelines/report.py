"""``maxa report``: the results table(s) of one or more store roots as ``results.md`` and ``index.html``.

Tables follow the paper: Table 2 (instance awareness on COCO), Table 3 (VOC / COCO-Stuff semantic
segmentation, NYUv2 depth), Table 4 (adapter variants). Rows are backbones (``head=maxa``,
``variant=base`` for Tables 2/3), cells are the mean ± sample std over seeds (std only with more than
one seed; ``n`` is the number of seeds).
Under each row whose backbone has a paper row (the registry's ``paper_row``) come the paper's value and
Δ = ours − paper. Task/dataset pairs the paper has no table for (e.g. ``shapes``) go to "Other datasets".

Which records count (``collect_records``). Two records are the *same experiment* when every field
that says what was run is equal: the store keys (``train_store``, ``eval_store``, ``train_targets``,
``eval_targets``), the resolved config (``config["probe"]`` with epochs, batch size, lr, ...,
``config["adapter"]``, ``config["task_options"]``, ``config["lr"]``), backbone, weights, dataset,
seed, image counts and any identity field a newer maxa adds (``dataset_id``, counts of excluded
images, ...). The identity is *every* field except :data:`NON_IDENTITY_FIELDS` (outcomes such as
``metrics``, ``trivial``, ``epochs`` run and ``best_epoch``, and bookkeeping such as ``timings``,
``run_dir``, ``finished``, ``tool_version``, the device), so a new field counts without a change
here; a field that is absent equals one that is ``None`` (old records load and match each other).
Of the records of one experiment the newest (``finished``; records without it count as oldest, ties
go to the later root argument) is used, whatever the order of the roots. When they disagree in
their metrics beyond float noise they are listed under "Duplicates" (roots, run dirs, finished
times, primary metric), never dropped silently.

Records that differ in an identity field other than the seed (another eval store, another epoch
cap, ...) are different *configurations*. A table cell never averages over configurations: a cell
holding several shows each one's mean apart (newest first, with its configuration id), is left out
of "best" and Δ, and a note names the fields that differ. "All records" has one row per
configuration (column ``config``); the plots draw one point per configuration.

Scales: our IoU / mIoU / ARI are percents, as the paper's Tables 2/3. The paper's Table 4 gives ARI as
a fraction (converted ×100 here) and its Table 3 depth MSE ×100 (22.8 for DINOv2, whose Table 4/5
value is 0.23): converted ÷100 to compare with our MSE.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from html import escape as html_escape
from importlib import resources
from pathlib import Path
from typing import Any

from probe.results import read_results

__all__ = ["ReportPaths", "write_report", "load_reference", "collect_records", "dedupe_records", "record_identity",
           "build_tables", "Table", "DuplicateGroup", "NON_IDENTITY_FIELDS"]

PROBE_TASKS = ("instances", "boundaries", "distance", "semseg", "depth")
TASK_LABELS = {"instances": "Inst. Disc.", "boundaries": "Boundaries", "distance": "Distance Transform",
               "semseg": "Semseg", "depth": "Depth"}
#: metric → (label, higher is better, decimals)
METRICS = {"ari": ("ARI", True, 1), "iou": ("IoU", True, 1), "miou": ("IoU", True, 1), "ce": ("CE", False, 4),
           "mse": ("MSE", False, 4), "pixel_acc": ("Acc", True, 1), "rmse": ("RMSE", False, 4),
           "absrel": ("AbsRel", False, 4), "delta1": ("δ1", True, 3)}
TASK_METRICS = {"instances": ("ari",), "boundaries": ("ce", "iou"), "distance": ("mse",),
                "semseg": ("ce", "miou"), "depth": ("mse",)}
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


# -- records --------------------------------------------------------------------------------------
def _norm(r: dict[str, Any], root: str) -> dict[str, Any]:
    r = dict(r)
    r.setdefault("head", "maxa")
    r.setdefault("variant", "base")
    r.setdefault("seed", 0)
    r["weights"] = r.get("weights") or ""
    r["metrics"] = r.get("metrics") or {}
    r["trivial"] = r.get("trivial") or {}
    r["_root"] = root
    return r


#: Record fields that legitimately differ between two runs of the same experiment: what came out
#: (metrics; ``epochs``/``best_epoch`` are where early stopping landed, the cap is
#: ``config.probe.max_epochs``) and where/when it ran. Every other field names the experiment.
NON_IDENTITY_FIELDS = frozenset({
    "metrics", "trivial", "primary_value", "epochs", "best_epoch", "history",
    "timings", "run_dir", "finished", "tool_version", "result_path",
    "device", "in_memory", "host", "hostname", "pid",
})
#: Keys of ``config`` that say where/how a run was executed, not what was run.
NON_IDENTITY_CONFIG = frozenset({"device", "in_memory", "num_workers"})
#: Metrics of two records of one experiment agree when they are this close (float noise).
METRIC_RTOL, METRIC_ATOL = 1e-6, 1e-9


def _canon(v: Any) -> Any:
    """``v`` with ``None`` entries of dicts dropped (absent = ``None``) and integral floats as ints."""
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def record_identity(r: dict[str, Any]) -> dict[str, Any]:
    """The fields of probe record ``r`` that make it this experiment (see the module docstring)."""
    ident = {k: v for k, v in r.items() if k not in NON_IDENTITY_FIELDS and not k.startswith("_")}
    if isinstance(ident.get("config"), dict):
        ident["config"] = {k: v for k, v in ident["config"].items() if k not in NON_IDENTITY_CONFIG}
    return _canon(ident)


def _configuration(ident: dict[str, Any]) -> dict[str, Any]:
    """The identity less the seed: records of one configuration differ in their seed only."""
    conf = {k: v for k, v in ident.items() if k != "seed"}
    probe = (conf.get("config") or {}).get("probe")
    if isinstance(probe, dict) and "seed" in probe:
        conf["config"] = {**conf["config"], "probe": {k: v for k, v in probe.items() if k != "seed"}}
    return conf


def _key(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _short_id(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:6]


def _finished(r: dict[str, Any]) -> datetime | None:
    """When ``r`` finished (naive local time), or ``None`` if it does not say."""
    try:
        t = datetime.fromisoformat(str(r.get("finished")))
    except ValueError:
        return None
    return t.astimezone().replace(tzinfo=None) if t.tzinfo is not None else t


def _metrics_agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if math.isnan(x) and math.isnan(y):
                continue
            if not math.isclose(x, y, rel_tol=METRIC_RTOL, abs_tol=METRIC_ATOL):
                return False
        elif x != y:
            return False
    return True


@dataclass
class DuplicateGroup:
    """Several records of one experiment: ``used`` (the newest) and the ``others``; ``conflicting``
    when some disagree with ``used`` in their metrics beyond float noise."""

    used: dict[str, Any]
    others: list[dict[str, Any]]
    conflicting: bool


def dedupe_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[DuplicateGroup]]:
    """One record per experiment (the newest by ``finished``, then the later in ``records``), and
    the groups of records that repeated an experiment. Each kept record gets ``_config``, the short
    id of its configuration (identity less seed)."""
    by_exp: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for i, r in enumerate(records):
        ident = record_identity(r)
        r["_config"] = _short_id(_key(_configuration(ident)))
        by_exp.setdefault(_key(ident), []).append((i, r))
    kept, dups = [], []
    for recs in by_exp.values():
        recs.sort(key=lambda ir: (_finished(ir[1]) is not None, _finished(ir[1]) or datetime.min, ir[0]))
        used = recs[-1][1]
        kept.append(used)
        if len(recs) > 1:
            others = [r for _, r in reversed(recs[:-1])]
            dups.append(DuplicateGroup(used, others, any(not _metrics_agree(used["metrics"], o["metrics"])
                                                         for o in others)))
    return kept, dups


def _read_all(store_roots: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    probes: list[dict[str, Any]] = []
    speed: list[dict[str, Any]] = []
    for root in store_roots:
        for r in read_results(root):
            r = _norm(r, str(root))
            if r.get("task") == "speed":
                speed.append(r)
            elif r.get("task") in PROBE_TASKS:
                probes.append(r)
    return probes, speed


def collect_records(store_roots: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(probe records, speed records) of all roots, one probe record per experiment (the newest;
    see :func:`dedupe_records`)."""
    probes, speed = _read_all(store_roots)
    return dedupe_records(probes)[0], speed


def _is_random(weights: str) -> bool:
    return weights.startswith("random")


_entry_cache: dict[str, Any] = {}


def backbone_info(name: str) -> dict[str, Any]:
    """paper_row, I, F, P (M) and registry order of a backbone (empty values if unknown)."""
    if name in _entry_cache:
        return _entry_cache[name]
    info: dict[str, Any] = {"paper_row": None, "random_only": False, "I": None, "F": None, "P": None, "order": 10_000}
    try:
        from extract.backbones import get_backbone_entry, list_backbones
        from extract.backbone_registry import entry_geometry

        names = list_backbones(include_test=True)
        e = get_backbone_entry(name)
        info.update(paper_row=e.paper_row, random_only=e.random_only,
                    order=names.index(name) if name in names else 10_000)
        g = entry_geometry(e)
        info.update(I=g.input_size[0], F=max(max(lg.grid) for lg in g.layers), P=g.num_params / 1e6)
    except Exception:  # unknown / unloadable backbone: still report it, without paper match
        pass
    _entry_cache[name] = info
    return info


def paper_row_for(backbone: str, weights: str) -> str | None:
    """The paper row a record compares with: the registry's ``paper_row``, unless the weights are random
    for a backbone the paper ran pretrained."""
    info = backbone_info(backbone)
    if info["paper_row"] is None or (_is_random(weights) and not info["random_only"]):
        return None
    return info["paper_row"]


# -- table model ----------------------------------------------------------------------------------
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
        return METRICS.get(self.metric, ("", None, 4))[1] if self.metric else None

    @property
    def decimals(self) -> int:
        return METRICS.get(self.metric, ("", None, 4))[2] if self.metric else 3


@dataclass
class Table:
    key: str
    title: str
    caption: str
    columns: list[Column]
    rows: list[Row]
    info_header: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. cells that mix configurations


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


def _by_configuration(recs: list[dict]) -> list[list[dict]]:
    """``recs`` split by configuration (identity less seed), the most recently finished first."""
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(r.get("_config", ""), []).append(r)
    newest = {k: max((_finished(r) or datetime.min for r in g), default=datetime.min) for k, g in groups.items()}
    return [groups[k] for k in sorted(groups, key=lambda k: newest[k], reverse=True)]


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(d, dict):
        out: dict[str, str] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(d, default=str) if isinstance(d, (list, str)) else str(d)}


def configuration_differences(recs: list[dict], limit: int = 6) -> str:
    """The identity fields in which the configurations of ``recs`` differ, e.g. ``config.probe.max_epochs 4 / 1``
    (one value per configuration, in :func:`_by_configuration` order; ``absent`` = not recorded)."""
    flats = [_flatten(_configuration(record_identity(g[0]))) for g in _by_configuration(recs)]
    diffs = []
    for path in sorted(set().union(*flats)):
        vals = [f.get(path, "absent") for f in flats]
        if len(set(vals)) > 1:
            short = [v if len(v) <= 28 else v[:25] + "…" for v in vals]
            diffs.append(f"{path} {' / '.join(short)}")
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more if diffs else "no recorded field (only their configuration ids)"


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


def _order_key(bw: tuple[str, str]) -> tuple:
    return (backbone_info(bw[0])["order"], bw[0], bw[1])


def _labels(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    count: dict[str, int] = {}
    for b, _ in keys:
        count[b] = count.get(b, 0) + 1
    return {(b, w): (f"{b} [{w}]" if count[b] > 1 else b) for b, w in keys}


def _info(backbone: str) -> list[str]:
    i = backbone_info(backbone)
    return [str(i["I"] or "–"), str(i["F"] or "–"), _fmt(i["P"], 1) if i["P"] else "–"]


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
        m = recs[0].get("primary_metric") or TASK_METRICS[k[0]][-1]
        dec = METRICS.get(m, ("", None, 4))[2]
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


def speed_table(speed: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    by: dict[str, list[dict]] = {}
    for r in speed:
        by.setdefault(str(r.get("backbone")), []).append(r)
    header = ["backbone", "seconds / batch", "relative to ViT-B/16 224", "records"]
    body = []
    for b in sorted(by, key=lambda b: _order_key((b, ""))):
        s = _stats([r["metrics"].get("seconds_per_batch") for r in by[b]])
        rel = _stats([r["metrics"].get("relative_to_vitb16") for r in by[b]])
        body.append([b, _fmt(s[0], 4) if s else "–", _fmt(rel[0], 2) if rel else "–", str(len(by[b]))])
    return header, body


DUPLICATES_CAPTION = ("Records of the same experiment (every identity field equal, seed included) whose metrics "
                      "disagree: the tables use the newest (used = yes); compare the runs before trusting either.")


def duplicates_table(groups: list[DuplicateGroup]) -> tuple[list[str], list[list[str]]]:
    """One row per record of each conflicting experiment: root, run dir, finished, primary metric, used?"""
    header = ["experiment", "used", "root", "run dir", "finished", "metric", "value"]
    body = []
    for g in groups:
        u = g.used
        exp = " · ".join(str(u.get(k)) for k in ("task", "dataset", "backbone", "weights", "variant", "head"))
        exp += f" · seed {u.get('seed')} [{u.get('_config', '')}]"
        m = u.get("primary_metric") or TASK_METRICS[u["task"]][-1]
        dec = METRICS.get(m, ("", None, 4))[2]
        for r in [u, *g.others]:
            v = r["metrics"].get(m)
            body.append([exp, "yes" if r is u else "no", str(r.get("_root", "")), str(r.get("run_dir") or "–"),
                         str(r.get("finished") or "–"), m, "–" if v is None else _fmt(float(v), dec + 2)])
    return header, body


def _duplicates_html(header: list[str], body: list[list[str]]) -> str:
    rows = ["<tr>" + "".join(f"<th>{html_escape(h)}</th>" for h in header) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{html_escape(str(x))}</td>" for x in r) + "</tr>" for r in body]
    return (f'<h2 id="duplicates">Duplicates</h2>\n<p class="caption">{html_escape(DUPLICATES_CAPTION)}</p>\n'
            '<div class="scroll"><table id="duplicates-table">' + "\n".join(rows) + "</table></div>")


# -- markdown -------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(t: Table) -> str:
    head = ["Backbone" if t.key != "table4" else "Variant", *t.info_header,
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


# -- the report -----------------------------------------------------------------------------------
@dataclass
class ReportPaths:
    out_dir: str
    markdown: str
    html: str
    images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    """One image of the report: ``png`` bytes, saved as ``img/<name>``."""

    name: str
    png: bytes
    caption: str
    section: str  # plots | pca | predictions
    group: str = ""  # figures of one group are shown in one row (predictions of one run)


def write_report(store_roots: list[str], out_dir: str, *, max_feature_images: int = 4) -> ReportPaths:
    """Read the results of ``store_roots`` and write ``results.md``, ``index.html`` and ``img/*.png`` to ``out_dir``.

    ``index.html`` is self-contained (inline CSS, images as data URIs); ``results.md`` links ``img/``.
    """
    from pipelines import plots
    from pipelines.report_html import render_html

    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    roots = [str(r) for r in store_roots]
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
    tables = build_tables(records)
    notes += [n for t in tables for n in t.notes]
    figures: list[Figure] = []
    for make in (plots.score_vs_speed, plots.score_vs_plearn):
        figs, more = make(records, speed)
        figures += figs
        notes += more
    figs, more = plots.feature_pca(roots, records, max_images=max_feature_images)
    figures += figs
    notes += more
    figs, more = plots.prediction_resolutions(records)
    figures += figs
    notes += more
    images = []
    for f in figures:
        path = out / "img" / f.name
        path.write_bytes(f.png)
        images.append(str(path))
    all_header, all_body = all_records_table(records)
    sp_header, sp_body = speed_table(speed)
    meta = {"generated": datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "roots": roots,
            "n_records": len(records), "n_speed": len(speed)}

    md = ["# maxa report", "", f"Generated {meta['generated']} from {', '.join(roots)}: {len(records)} probe "
          f"record(s), {len(speed)} speed record(s). Cells: mean ± std over seeds (n = seeds); **bold** = best in "
          "column; paper rows from the paper's tables, Δ = ours − paper.", ""]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    md += ["## Tables", ""] + [table_markdown(t) for t in tables]
    for section, title in (("plots", "Plots"), ("pca", "Feature PCA (first three components as RGB)"),
                           ("predictions", "Predictions at several output resolutions")):
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
    if sp_body:
        md += ["## Speed", "", simple_markdown(sp_header, sp_body)]
    dup_header, dup_body = duplicates_table(conflicts)
    if dup_body:
        md += ["## Duplicates", "", DUPLICATES_CAPTION, "", simple_markdown(dup_header, dup_body)]
    md += ["## All records", "", simple_markdown(all_header, all_body)]
    md_path = out / "results.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    html_path = out / "index.html"
    page = render_html(meta, notes, tables, figures, (sp_header, sp_body), (all_header, all_body))
    if dup_body:
        # report_html has no Duplicates section: put it before All records (or at the end of the body)
        anchor = "<h2>All records</h2>" if "<h2>All records</h2>" in page else "</body>"
        page = page.replace(anchor, _duplicates_html(dup_header, dup_body) + "\n" + anchor, 1)
    html_path.write_text(page, encoding="utf-8")
    return ReportPaths(str(out), str(md_path), str(html_path), images, notes)
