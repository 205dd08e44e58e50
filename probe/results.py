"""The results table: one parquet file per finished probe under ``<root>/results/``.

One file per record makes appends atomic and safe for several writers (a write goes to a
temporary name, then is renamed); ``read_results`` reads the directory as one table.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["RESULTS_DIR", "append_result", "read_results"]

RESULTS_DIR = "results"
_JSON_FIELDS = ("metrics", "trivial", "config", "timings")


def append_result(root: str | Path, record: dict[str, Any]) -> str:
    """Write ``record`` as one row; nested fields (metrics, config, ...) are stored as JSON text."""
    out_dir = Path(root) / RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    row = {k: (json.dumps(v, sort_keys=True, default=float) if k in _JSON_FIELDS else v) for k, v in record.items()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = out_dir / f"{stamp}-{row.get('task', 'probe')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = out_dir / f".{path.name}.tmp"
    pq.write_table(pa.Table.from_pylist([row]), tmp, compression="zstd")
    os.replace(tmp, path)
    return str(path)


def read_results(root: str | Path) -> list[dict[str, Any]]:
    """Every record under ``root/results`` (JSON fields decoded), oldest first."""
    out_dir = Path(root) / RESULTS_DIR
    if not out_dir.is_dir():
        return []
    rows = []
    for f in sorted(out_dir.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            for k in _JSON_FIELDS:
                if isinstance(row.get(k), str):
                    row[k] = json.loads(row[k])
            rows.append(row)
    return rows
