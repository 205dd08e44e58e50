"""What ``maxa results`` shows of a results table: records filtered by backbone, task, dataset and
variant, and flat rows for CSV and JSON (every metric its own column, ``metric.<name>``)."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime
from typing import Any

from runtime.errors import MaxaError
from store.results_schema import NUMBER_MAPS, encode_record

__all__ = ["FILTER_FIELDS", "filter_records", "flat_rows", "to_csv", "to_json"]

#: The fields ``maxa results`` filters by (its options of the same names).
FILTER_FIELDS = ("backbone", "task", "dataset", "variant")
#: The column prefix of each number map's entries in the flat rows.
_PREFIX = {"metrics": "metric", "trivial": "trivial", "timings": "timing"}


def filter_records(records: list[dict[str, Any]], where: dict[str, list[str] | None], root: str) -> list[dict[str, Any]]:
    """The records whose field is one of the given values, for every field given; a value that no
    record under ``root`` holds is an error naming the values there are."""
    for field, wanted in where.items():
        if not wanted:
            continue
        present = {str(r[field]) for r in records if r.get(field) is not None}
        missing = [w for w in wanted if w not in present]
        if missing:
            there = ", ".join(sorted(present)) or "none"
            raise MaxaError(f"no record under {root} has {field} {', '.join(map(repr, missing))}; "
                            f"{field} values there: {there}.")
        records = [r for r in records if str(r.get(field)) in wanted]
    return records


def _cell(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def flat_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat dict per record, all with the same keys: the typed schema's plain columns (``config``
    and ``extra`` as JSON text, ``finished`` ISO 8601 in UTC), then ``metric.<name>``,
    ``trivial.<name>`` and ``timing.<name>`` for every name any record has (empty where a record
    has none); NaN is left empty."""
    encoded = [encode_record(r) for r in records]
    names = {m: sorted({k for e in encoded for k in (e[m] or {})}) for m in NUMBER_MAPS}
    rows = []
    for e in encoded:
        row = {k: _cell(v) for k, v in e.items() if k not in NUMBER_MAPS}
        for m in NUMBER_MAPS:
            values = e[m] or {}
            row.update({f"{_PREFIX[m]}.{n}": _cell(values.get(n)) for n in names[m]})
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV with a header line (empty text when there are none)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a JSON array of objects (what ``pandas.read_json`` reads as records)."""
    return json.dumps(rows, indent=1) + "\n"
