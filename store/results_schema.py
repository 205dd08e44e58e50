"""The typed schema of a results record file (``<root>/results/*.parquet``), and the old one.

Every record file since schema 2 holds one row with exactly :data:`SCHEMA`, so pandas, polars,
DuckDB and pyarrow read the whole folder in one call with no schema unification: identity fields
as strings and int64, ``primary_value`` as float64, ``metrics``, ``trivial`` and ``timings`` as
``map<string, double>``, ``finished`` as ``timestamp[us, tz=UTC]``. ``config`` (deeply nested, its
keys differ between tasks and versions) stays JSON text. Whatever a record holds that the schema
has no typed place for (a field a newer maxa adds, a metric or timing that is not a number, a value
of another type than its column) goes to ``extra``, JSON text (a map field's entries that are not
numbers under the field's name), and comes back where it was on reading: :func:`decode_row` of :func:`encode_record` gives back the record.

Schema 1 (files without ``maxa.results.schema`` in their metadata) stored only the record's own
fields, ``metrics``, ``trivial``, ``timings`` and ``config`` as JSON text and ``finished`` as naive
local time; :func:`old_table_rows` reads it.
"""

from __future__ import annotations

import json
import numbers
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

__all__ = ["SCHEMA", "SCHEMA_VERSION", "SCHEMA_KEY", "NUMBER_MAPS", "encode_record", "decode_row",
           "record_table", "schema_version", "old_table_rows", "as_utc"]

#: The version of :data:`SCHEMA`; file metadata ``maxa.results.schema`` holds it (absent: 1).
SCHEMA_VERSION = 2
SCHEMA_KEY = b"maxa.results.schema"
_STR, _INT, _FLOAT = pa.string(), pa.int64(), pa.float64()
_NUMBERS = pa.map_(pa.string(), pa.float64())
#: Record fields stored as ``map<string, double>``.
NUMBER_MAPS = ("metrics", "trivial", "timings")
_JSON_TEXT = "config"
_EXTRA = "extra"
_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("task", _STR), ("variant", _STR), ("head", _STR), ("seed", _INT),
    ("backbone", _STR), ("weights", _STR), ("dataset", _STR), ("train_split", _STR), ("eval_split", _STR),
    ("primary_metric", _STR), ("primary_value", _FLOAT), ("higher_is_better", pa.bool_()),
    ("metrics", _NUMBERS), ("trivial", _NUMBERS),
    ("p_learn", _INT), ("train_images", _INT), ("val_images", _INT), ("eval_images", _INT),
    ("train_bad_excluded", _INT), ("eval_bad_excluded", _INT),
    ("epochs", _INT), ("best_epoch", _INT), ("selection", _STR),
    ("dataset_id", _STR), ("eval_dataset_id", _STR), ("eval_image_ids_hash", _STR),
    ("train_store", _STR), ("eval_store", _STR), ("train_targets", _STR), ("eval_targets", _STR),
    ("timings", _NUMBERS), ("config", _STR), ("run_dir", _STR), ("device", _STR), ("tool_version", _STR),
    ("finished", pa.timestamp("us", tz="UTC")), ("extra", _STR),
)
SCHEMA = pa.schema([pa.field(name, kind) for name, kind in _FIELDS],
                   metadata={SCHEMA_KEY: str(SCHEMA_VERSION).encode()})
_KINDS = dict(_FIELDS)


def as_utc(value: Any) -> datetime | None:
    """A finish time as an aware UTC ``datetime``: a ``datetime`` or ISO text; naive times are local
    time (what ``time.strftime`` wrote), unreadable text ``None``."""
    if value is None or isinstance(value, datetime):
        t = value
    else:
        try:
            t = datetime.fromisoformat(str(value))
        except ValueError:
            return None
    if t is None:
        return None
    return (t.astimezone() if t.tzinfo is None else t).astimezone(timezone.utc)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fits(kind: pa.DataType, v: Any) -> bool:
    """Whether ``v`` goes into a column of ``kind`` and comes back equal."""
    if kind == _STR:
        return isinstance(v, str)
    if kind == _INT:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and -2**63 <= int(v) < 2**63
    if kind == _FLOAT:
        return _is_number(v)
    if kind == pa.bool_():
        return isinstance(v, bool)
    return False


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=float)


def encode_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as one row of :data:`SCHEMA` (what does not fit goes to ``extra``)."""
    row: dict[str, Any] = dict.fromkeys(_KINDS)
    extra: dict[str, Any] = {}
    for key, v in record.items():
        kind = _KINDS.get(key)
        if kind is None or key == _EXTRA:
            extra[key] = v
        elif v is None:
            continue
        elif key in NUMBER_MAPS:
            if not isinstance(v, dict):
                extra[key] = v
                continue
            row[key] = {str(k): float(x) for k, x in v.items() if _is_number(x)}
            rest = {str(k): x for k, x in v.items() if not _is_number(x)}
            if rest:
                extra[key] = rest
        elif key == _JSON_TEXT:
            row[key] = _json(v)
        elif key == "finished":
            row[key] = as_utc(v)
            if row[key] is None:
                extra[key] = v
        elif _fits(kind, v):
            row[key] = float(v) if kind == _FLOAT else int(v) if kind == _INT else v
        else:
            extra[key] = v
    row[_EXTRA] = _json(extra) if extra else None
    return row


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """The record a :data:`SCHEMA` row holds: fields that are null left out, maps as dicts,
    ``config`` and ``extra`` decoded, ``finished`` an aware UTC ``datetime``."""
    extra = json.loads(row[_EXTRA]) if row.get(_EXTRA) else {}
    record: dict[str, Any] = {}
    for key, v in row.items():
        if v is None or key == _EXTRA:
            continue
        if key in NUMBER_MAPS:
            v = {**dict(v), **extra.pop(key, {})}  # pyarrow gives a map as (key, value) pairs
        elif key == _JSON_TEXT:
            v = json.loads(v)
        elif key == "finished":
            v = v.astimezone(timezone.utc)
        record[key] = v
    record.update(extra)
    return record


def record_table(record: dict[str, Any]) -> pa.Table:
    """``record`` as a one-row table of :data:`SCHEMA`."""
    return pa.Table.from_pylist([encode_record(record)], schema=SCHEMA)


def schema_version(schema: pa.Schema) -> int:
    """The results schema a file was written with (1: before the version was recorded)."""
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    return int(raw) if raw else 1


def old_table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The records of a schema 1 file: JSON text fields decoded, as the record was appended."""
    rows = table.to_pylist()
    for row in rows:
        for key in (*NUMBER_MAPS, _JSON_TEXT):
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
    return rows

