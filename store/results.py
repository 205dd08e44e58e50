"""The results table and probe runs of a store root: ``<root>/results/`` and ``<root>/runs/``.

One parquet file per finished probe makes appends atomic and safe for several writers (a write
goes to a temporary name, then is renamed; on object storage one PUT is atomic by itself);
``read_results`` reads the folder as one table. A root is anything
:func:`store.location.as_location` takes. A reader with read-only access to a shared store root
keeps results in a root of their own (``maxa probe --results-root MINE``).
"""

from __future__ import annotations

import io
import json
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store import _layout as L
from runtime.errors import MaxaError
from store.location import Location, as_location

__all__ = ["append_result", "check_results_root", "read_results", "result_counts", "run_location",
           "read_run_file", "write_run_files", "finished_runs", "run_identity"]

_JSON_FIELDS = ("metrics", "trivial", "config", "timings")
#: Record fields that name the stores a probe used.
STORE_KEY_FIELDS = ("train_store", "eval_store", "train_targets", "eval_targets")
Root = str | Path | Location


def append_result(root: Root, record: dict[str, Any]) -> str:
    """Write ``record`` as one row; nested fields (metrics, config, ...) are stored as JSON text."""
    row = {k: (json.dumps(v, sort_keys=True, default=float) if k in _JSON_FIELDS else v) for k, v in record.items()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{row.get('task', 'probe')}-{uuid.uuid4().hex[:8]}.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row]), buf, compression="zstd")
    out = as_location(root).join(L.RESULTS_DIR, name)
    out.write_bytes(buf.getvalue())
    return str(out)


def check_results_root(root: Root) -> None:
    """Refuse, before any training, a results root this process cannot write to.

    Writes and removes a small file in ``root/results`` and ``root/runs`` (creating them), so a
    read-only shared root is found at once, not after an hour of training.
    """
    probe_name = f".write-check-{uuid.uuid4().hex[:8]}"
    try:
        for sub in (L.RESULTS_DIR, L.RUNS_DIR):
            check = as_location(root).join(sub, probe_name)
            check.write_bytes(b"")
            check.delete()
    except (OSError, PermissionError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise MaxaError(f"cannot write results under {root} ({reason}); pass --results-root with a folder (or "
                        "bucket prefix) you can write to: probing reads the stores and writes only there.") from None


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for k in _JSON_FIELDS:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


def read_results(root: Root) -> list[dict[str, Any]]:
    """Every record under ``root/results`` (JSON fields decoded), oldest first."""
    rows = []
    for f in as_location(root).join(L.RESULTS_DIR).glob("*.parquet"):
        rows.extend(_decode(r) for r in pq.read_table(io.BytesIO(f.read_bytes() or b"")).to_pylist())
    return rows


def result_counts(root: Root) -> dict[str, int]:
    """How many result records under ``root`` used each store: content key → count (a record
    counts once for each store it names as train/eval features or targets)."""
    counts: Counter[str] = Counter()
    for r in read_results(root):
        for key in {r.get(f) for f in STORE_KEY_FIELDS} - {None, ""}:
            counts[str(key)] += 1
    return dict(counts)


def run_identity(record: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two probe records the same run: train store key, eval store key, task, variant,
    head, seed (``maxa sweep`` skips a probe whose identity is already in the results table)."""
    return (record.get("train_store"), record.get("eval_store"), record.get("task"), record.get("variant"),
            record.get("head"), int(record["seed"]) if record.get("seed") is not None else None)


def finished_runs(root: Root) -> set[tuple[Any, ...]]:
    """:func:`run_identity` of every finished probe recorded under ``root`` (speed records excluded)."""
    return {run_identity(r) for r in read_results(root)
            if r.get("train_store") and r.get("task") != "speed"}


def run_location(root: Root, backbone: str, name: str) -> Location:
    """The folder of one probe run: ``<root>/runs/<backbone>/<name>``."""
    return as_location(root).join(L.RUNS_DIR, L.safe_name(backbone), name)


def read_run_file(run_dir: Root, name: str) -> bytes | None:
    """The bytes of one file of a probe run (folder or URL), or ``None`` when it is not there."""
    return (as_location(run_dir) / name).read_bytes()


def write_run_files(run_dir: Root, files: dict[str, bytes]) -> None:
    """Write a probe run's files (adapter weights, meta JSON) into ``run_dir`` (folder or URL)."""
    for name, data in files.items():
        (as_location(run_dir) / name).write_bytes(data)
