"""The records ``maxa report`` reads: every root's results, normalised, one per experiment.

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
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipelines.report_shared import PROBE_TASKS
from store.results import read_results

__all__ = ["collect_records", "dedupe_records", "record_identity", "DuplicateGroup", "NON_IDENTITY_FIELDS",
           "backbone_info", "configuration_differences"]


def _norm(r: dict[str, Any], root: str) -> dict[str, Any]:
    r = dict(r)
    r.setdefault("head", "maxa")
    r.setdefault("variant", "base")
    r.setdefault("seed", 0)
    r["weights"] = r.get("weights") or ""
    if r.get("quantization") not in (None, "", "none"):  # a lossy store's run is never shown as a lossless one's
        r["weights"] = f"{r['weights']} ({r['quantization']} store)"
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
NON_IDENTITY_CONFIG = frozenset({"device", "in_memory", "memory_plan", "threads", "num_workers"})
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
    t = r.get("finished")
    if not isinstance(t, datetime):  # records read back carry a datetime; records in memory may carry text
        try:
            t = datetime.fromisoformat(str(t))
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


_entry_cache: dict[str, Any] = {}
#: Where a backbone the registry does not list sorts: after every listed one.
_UNKNOWN_ORDER = 10_000


def backbone_info(name: str) -> dict[str, Any]:
    """paper_row, I, F, P (M) and registry order of a backbone (empty values if unknown)."""
    if name in _entry_cache:
        return _entry_cache[name]
    info: dict[str, Any] = {"paper_row": None, "random_only": False, "I": None, "F": None, "P": None,
                            "order": _UNKNOWN_ORDER}
    try:
        from extract.backbones import get_backbone_entry, list_backbones
        from extract.backbone_registry import entry_geometry

        names = list_backbones(include_test=True)
        e = get_backbone_entry(name)
        info.update(paper_row=e.paper_row, random_only=e.random_only,
                    order=names.index(name) if name in names else _UNKNOWN_ORDER)
        g = entry_geometry(e)
        info.update(I=g.input_size[0], F=max(max(lg.grid) for lg in g.layers), P=g.num_params / 1e6)
    except Exception:  # unknown / unloadable backbone: still report it, without paper match
        pass
    _entry_cache[name] = info
    return info


# -- configurations -------------------------------------------------------------------------------
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


def _order_key(bw: tuple[str, str]) -> tuple:
    return (backbone_info(bw[0])["order"], bw[0], bw[1])
