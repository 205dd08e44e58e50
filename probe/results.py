"""The results table: one parquet file per finished probe under ``<root>/results/``.

One file per record makes appends atomic and safe for several writers (a write goes to a
temporary name, then is renamed; on object storage one PUT is atomic by itself);
``read_results`` reads the directory as one table. ``root`` may be a local folder or a URL
(``s3://bucket/prefix``) with fsspec ``storage_options``. A reader with read-only access to a
shared store root keeps results in a root of their own (``maxa probe --results-root MINE``).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store import _layout as L
from runtime.errors import MaxaError

__all__ = ["RESULTS_DIR", "append_result", "check_results_root", "read_results", "result_counts", "write_run_files", "finished_runs",
           "run_identity"]

RESULTS_DIR = "results"
_JSON_FIELDS = ("metrics", "trivial", "config", "timings")
#: Record fields that name the stores a probe used.
STORE_KEY_FIELDS = ("train_store", "eval_store", "train_targets", "eval_targets")


def append_result(root: str | Path, record: dict[str, Any], *, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``record`` as one row; nested fields (metrics, config, ...) are stored as JSON text."""
    row = {k: (json.dumps(v, sort_keys=True, default=float) if k in _JSON_FIELDS else v) for k, v in record.items()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{row.get('task', 'probe')}-{uuid.uuid4().hex[:8]}.parquet"
    table = pa.Table.from_pylist([row])
    if L.is_remote(root):
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        url = L.join(root, RESULTS_DIR, name)
        fs, p = L.fs_path(url, storage_options)
        fs.pipe_file(p, buf.getvalue())
        return url
    out_dir = Path(root) / RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = out_dir / f".{path.name}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return str(path)


def check_results_root(root: str | Path, *, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse, before any training, a results root this process cannot write to.

    Writes and removes a small file in ``root/results`` and ``root/runs`` (creating them), so a
    read-only shared root is found at once, not after an hour of training.
    """
    probe_name = f".write-check-{uuid.uuid4().hex[:8]}"
    try:
        for sub in (RESULTS_DIR, "runs"):
            if L.is_remote(root):
                fs, p = L.fs_path(L.join(root, sub, probe_name), storage_options)
                fs.pipe_file(p, b"")
                fs.rm(p)
            else:
                folder = Path(root) / sub
                folder.mkdir(parents=True, exist_ok=True)
                (folder / probe_name).write_bytes(b"")
                (folder / probe_name).unlink()
    except (OSError, PermissionError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise MaxaError(f"cannot write results under {root} ({reason}); pass --results-root with a folder (or "
                        "bucket prefix) you can write to: probing reads the stores and writes only there.") from None


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for k in _JSON_FIELDS:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


def read_results(root: str | Path, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every record under ``root/results`` (JSON fields decoded), oldest first."""
    rows = []
    if L.is_remote(root):
        fs, p = L.fs_path(L.join(root, RESULTS_DIR), storage_options)
        fs.invalidate_cache(p)
        if not fs.isdir(p):
            return []
        for f in sorted(fs.glob(p.rstrip("/") + "/*.parquet")):
            with fs.open(f, "rb") as fh:
                rows.extend(_decode(r) for r in pq.read_table(fh).to_pylist())
        return rows
    out_dir = Path(root) / RESULTS_DIR
    if not out_dir.is_dir():
        return []
    for f in sorted(out_dir.glob("*.parquet")):
        rows.extend(_decode(r) for r in pq.read_table(f).to_pylist())
    return rows


def result_counts(root: str | Path, *, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """How many result records under ``root`` used each store: content key → count (a record
    counts once for each store it names as train/eval features or targets)."""
    counts: Counter[str] = Counter()
    for r in read_results(root, storage_options=storage_options):
        for key in {r.get(f) for f in STORE_KEY_FIELDS} - {None, ""}:
            counts[str(key)] += 1
    return dict(counts)


def run_identity(record: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two probe records the same run: train store key, eval store key, task, variant,
    head, seed (``maxa sweep`` skips a probe whose identity is already in the results table)."""
    return (record.get("train_store"), record.get("eval_store"), record.get("task"), record.get("variant"),
            record.get("head"), int(record["seed"]) if record.get("seed") is not None else None)


def finished_runs(root: str | Path, *, storage_options: dict[str, Any] | None = None) -> set[tuple[Any, ...]]:
    """:func:`run_identity` of every finished probe recorded under ``root`` (speed records excluded)."""
    return {run_identity(r) for r in read_results(root, storage_options=storage_options)
            if r.get("train_store") and r.get("task") != "speed"}


def read_run_file(run_dir: str | Path, name: str, *, storage_options: dict[str, Any] | None = None) -> bytes | None:
    """The bytes of one file of a probe run (folder or URL), or ``None`` when it is not there."""
    if L.is_remote(run_dir):
        fs, p = L.fs_path(run_dir, storage_options)
        path = f"{p.rstrip('/')}/{name}"
        return fs.cat_file(path) if fs.isfile(path) else None
    path = Path(run_dir) / name
    return path.read_bytes() if path.is_file() else None


def write_run_files(run_dir: str, files: dict[str, bytes], *, storage_options: dict[str, Any] | None = None) -> None:
    """Write a probe run's files (adapter weights, meta JSON) into ``run_dir`` (folder or URL)."""
    if L.is_remote(run_dir):
        fs, p = L.fs_path(run_dir, storage_options)
        for name, data in files.items():
            fs.pipe_file(f"{p.rstrip('/')}/{name}", data)
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = Path(run_dir) / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, Path(run_dir) / name)
