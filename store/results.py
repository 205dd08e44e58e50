"""The results table and probe runs of a store root: ``<root>/results/`` and ``<root>/runs/``.

One parquet file per finished probe makes appends atomic and safe for several writers (a write
goes to a temporary name, then is renamed; on object storage one PUT is atomic by itself). Every
file has the same typed schema (:mod:`store.results_schema`), so the folder is one table to
pandas, polars, DuckDB and pyarrow alike; ``read_results`` reads it as records, files of the
older JSON-text schema included (``upgrade_results`` rewrites those). A root is anything
:func:`store.location.as_location` takes. A reader with read-only access to a shared store root
keeps results in a root of their own (``maxa probe --results-root MINE``).
"""

from __future__ import annotations

import io
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store import _layout as L
from runtime.errors import MaxaError, StoreError
from store.location import Location, as_location
from store.results_schema import (SCHEMA, SCHEMA_VERSION, decode_row, encode_record, old_table_rows,
                                  record_table, schema_version)

__all__ = ["append_result", "check_results_root", "read_results", "results_table", "results_location",
           "upgrade_results", "result_counts", "run_location", "read_run_file", "write_run_files"]

#: Record fields that name the stores a probe used.
STORE_KEY_FIELDS = ("train_store", "eval_store", "train_targets", "eval_targets")
Root = str | Path | Location


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def append_result(root: Root, record: dict[str, Any]) -> str:
    """Write ``record`` as one file of the typed schema (a ``finished`` without a zone is local time)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    name = f"{stamp}-{record.get('task', 'probe')}-{uuid.uuid4().hex[:8]}.parquet"
    out = as_location(root).join(L.RESULTS_DIR, name)
    out.write_bytes(_parquet_bytes(record_table(record)))
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


def results_location(root: Root) -> Location:
    """The results table's folder under a root: ``<root>/results``."""
    return as_location(root).join(L.RESULTS_DIR)


def _result_files(root: Root) -> list[Location]:
    return results_location(root).glob("*.parquet")


def _read_file(f: Location) -> tuple[int, pa.Table]:
    """(schema version, table) of one record file; a file of a newer schema is refused."""
    table = pq.read_table(io.BytesIO(f.read_bytes() or b""))
    version = schema_version(table.schema)
    if version > SCHEMA_VERSION:
        raise StoreError(f"results file {f} has results schema {version}, newer than this maxa's "
                         f"({SCHEMA_VERSION}); read it with a newer maxa.")
    return version, table


def _file_records(f: Location) -> list[dict[str, Any]]:
    version, table = _read_file(f)
    if version == 1:  # through the new schema, so old and new records read alike
        return [decode_row(encode_record(r)) for r in old_table_rows(table)]
    return [decode_row(r) for r in table.to_pylist()]


def read_results(root: Root) -> list[dict[str, Any]]:
    """Every record under ``root/results``, oldest first: nested fields as dicts, ``finished`` an
    aware UTC ``datetime``, fields the record does not hold left out (old-schema files too)."""
    return [r for f in _result_files(root) for r in _file_records(f)]


def results_table(root: Root) -> pa.Table:
    """Every record under ``root/results`` as one table of the typed schema (old-schema files
    converted), oldest first."""
    rows = [encode_record(r) for r in read_results(root)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def upgrade_results(root: Root) -> list[str]:
    """Rewrite every old-schema record file under ``root/results`` in the typed schema, each under
    its own name in one atomic write (a reader sees the old file or the new, never neither); returns
    the rewritten paths. Files already in the typed schema are left alone, so it can run again."""
    done = []
    for f in _result_files(root):
        version, table = _read_file(f)
        if version == SCHEMA_VERSION:
            continue
        rows = [encode_record(r) for r in old_table_rows(table)]
        f.write_bytes(_parquet_bytes(pa.Table.from_pylist(rows, schema=SCHEMA)))
        done.append(str(f))
    return done


def result_counts(root: Root) -> dict[str, int]:
    """How many result records under ``root`` used each store: content key → count (a record
    counts once for each store it names as train/eval features or targets)."""
    counts: Counter[str] = Counter()
    for r in read_results(root):
        for key in {r.get(f) for f in STORE_KEY_FIELDS} - {None, ""}:
            counts[str(key)] += 1
    return dict(counts)


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
