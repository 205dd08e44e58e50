"""The results table: one typed schema for every record file, so pandas, polars and DuckDB read the
folder in one call with numbers as numbers; old JSON-text files still read and upgrade; appends from
several writers all land, on local folders, fsspec memory and S3; ``maxa results`` filters and exports."""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from store.location import as_location
from store.results import append_result, read_results, results_table, upgrade_results
from store.results_schema import SCHEMA, SCHEMA_KEY, SCHEMA_VERSION, decode_row, encode_record

runner = CliRunner()

DEPTH = {"task": "depth", "variant": "base", "head": "maxa", "seed": 0, "backbone": "dinov2_b14", "dataset": "nyuv2",
         "primary_metric": "mse", "primary_value": 0.25, "higher_is_better": False, "p_learn": 190_000,
         "metrics": {"mse": 0.25, "rmse": 0.5, "absrel": 0.1, "delta1": 0.9}, "trivial": {"mse": 1.0},
         "timings": {"total_s": 3.5}, "config": {"probe": {"max_epochs": 4, "task_options": {}}, "lr": 0.002},
         "finished": "2026-12-01T10:00:00+00:00", "train_store": "k-train", "eval_store": "k-val"}
BOUNDARIES = {**DEPTH, "task": "boundaries", "backbone": "siglip_384", "dataset": "coco", "variant": "no-sigma",
              "primary_metric": "iou", "primary_value": 30.0, "higher_is_better": True,
              "metrics": {"iou": 30.0, "ce": 0.15}, "trivial": {"iou": 5.0, "ce": 0.7},
              "finished": "2026-12-02T11:30:00+00:00"}


def _folder(tmp_path):
    for rec in (DEPTH, BOUNDARIES):
        append_result(tmp_path, rec)
    return tmp_path / "results"


def _old_file(root, record, name="20250301T100000-depth-0000aaaa.parquet"):
    """A record file as maxa wrote it before the typed schema: JSON-text fields, naive ``finished``."""
    row = {k: (json.dumps(v, sort_keys=True) if k in ("metrics", "trivial", "config", "timings") else v)
           for k, v in record.items()}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row]), buf, compression="zstd")
    as_location(root).join("results", name).write_bytes(buf.getvalue())


# -- the schema -----------------------------------------------------------------------------------
def test_every_file_has_the_fixed_schema_and_version(tmp_path):
    folder = _folder(tmp_path)
    schemas = [pq.read_schema(f) for f in sorted(folder.glob("*.parquet"))]
    assert len(schemas) == 2 and all(s.equals(SCHEMA) for s in schemas)
    assert all(s.metadata[SCHEMA_KEY] == str(SCHEMA_VERSION).encode() for s in schemas)
    assert SCHEMA.field("metrics").type == pa.map_(pa.string(), pa.float64())
    assert SCHEMA.field("finished").type == pa.timestamp("us", tz="UTC")


def test_a_record_comes_back_as_written():
    rec = {**DEPTH, "seed": 3, "metrics": {"mse": 0.25, "n_images": 7, "per_class": [1.0, 2.0]},
           "timings": {"total_s": 1.0, "batch_s": [0.1, 0.2]}, "new_field": {"a": 1}, "train_images": "many",
           "higher_is_better": False, "finished": datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)}
    row = encode_record(rec)
    assert row["metrics"] == {"mse": 0.25, "n_images": 7.0} and row["train_images"] is None
    assert set(json.loads(row["extra"])) == {"metrics", "timings", "new_field", "train_images"}
    back = decode_row(pa.Table.from_pylist([row], schema=SCHEMA).to_pylist()[0])
    assert back == {**rec, "metrics": {"mse": 0.25, "n_images": 7.0, "per_class": [1.0, 2.0]}}
    assert isinstance(back["finished"], datetime) and back["finished"].utcoffset().total_seconds() == 0


def test_naive_finish_time_is_local_time():
    local = datetime(2026, 12, 3, 9, 15, 0)
    row = encode_record({"task": "depth", "finished": local.isoformat()})
    assert row["finished"] == local.astimezone().astimezone(timezone.utc)


# -- one call in each library ---------------------------------------------------------------------
def test_pandas_reads_the_folder_in_one_call(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(_folder(tmp_path)).sort_values("task").reset_index(drop=True)
    assert list(df["task"]) == ["boundaries", "depth"]
    assert str(df["finished"].dtype) == "datetime64[us, UTC]"
    assert df["finished"][0] == pd.Timestamp("2026-12-02T11:30:00Z")
    assert df["primary_value"].dtype == "float64" and list(df["primary_value"]) == [30.0, 0.25]
    metrics = [dict(m) for m in df["metrics"]]  # a map column: (name, value) pairs
    assert metrics[0] == {"iou": 30.0, "ce": 0.15} and metrics[1]["rmse"] == 0.5
    assert all(isinstance(v, float) for m in metrics for v in m.values())


def test_polars_reads_the_folder_in_one_call(tmp_path):
    pl = pytest.importorskip("polars")
    df = pl.read_parquet(str(_folder(tmp_path) / "*.parquet")).sort("task")
    assert df["task"].to_list() == ["boundaries", "depth"]
    assert df.schema["finished"] == pl.Datetime("us", "UTC")
    assert df.schema["primary_value"] == pl.Float64 and df.schema["seed"] == pl.Int64
    assert "Float64" in str(df.schema["metrics"])
    assert dict(df["metrics"][0]) == {"iou": 30.0, "ce": 0.15}
    assert df.select(pl.col("metrics").map.get("iou"))["metrics"].to_list() == [30.0, None]


def test_duckdb_reads_the_folder_in_one_call(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pattern = str(_folder(tmp_path) / "*.parquet").replace("'", "''")
    con = duckdb.connect()
    try:
        rows = con.execute(f"SELECT task, metrics['iou'], metrics['rmse'], typeof(metrics), typeof(finished), "
                           f"epoch(finished) FROM read_parquet('{pattern}') ORDER BY task").fetchall()
    finally:
        con.close()
    assert rows[0][:3] == ("boundaries", 30.0, None) and rows[1][:3] == ("depth", None, 0.5)
    assert rows[0][3] == "MAP(VARCHAR, DOUBLE)" and rows[0][4] == "TIMESTAMP WITH TIME ZONE"
    assert rows[0][5] == datetime(2026, 12, 2, 11, 30, tzinfo=timezone.utc).timestamp()


def test_results_table_is_typed(tmp_path):
    _folder(tmp_path)
    table = results_table(tmp_path)
    assert table.schema.equals(SCHEMA) and table.num_rows == 2


# -- old records ----------------------------------------------------------------------------------
OLD = {"task": "depth", "backbone": "dinov2_b14", "seed": 0, "metrics": {"rmse": 0.5, "mse": 0.25},
       "trivial": {"rmse": 1}, "timings": {"total_s": 2}, "config": {"probe": {"max_epochs": 1}},
       "finished": "2025-03-01T10:00:00", "run_dir": "runs/a"}


def test_old_files_read_through_read_results(tmp_path):
    _old_file(tmp_path, OLD)
    append_result(tmp_path, BOUNDARIES)
    old, new = read_results(tmp_path)
    assert old["metrics"] == {"rmse": 0.5, "mse": 0.25} and old["config"] == {"probe": {"max_epochs": 1}}
    assert old["finished"] == datetime(2025, 3, 1, 10, 0).astimezone().astimezone(timezone.utc)
    assert old["trivial"] == {"rmse": 1.0} and new["task"] == "boundaries"
    assert results_table(tmp_path).num_rows == 2


def test_upgrade_rewrites_old_files_once(tmp_path):
    _old_file(tmp_path, OLD)
    append_result(tmp_path, BOUNDARIES)
    before = read_results(tmp_path)
    done = upgrade_results(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in done] == ["20250301T100000-depth-0000aaaa.parquet"]
    assert all(pq.read_schema(f).equals(SCHEMA) for f in (tmp_path / "results").glob("*.parquet"))
    assert read_results(tmp_path) == before and upgrade_results(tmp_path) == []
    pd = pytest.importorskip("pandas")
    assert len(pd.read_parquet(tmp_path / "results")) == 2


def test_a_folder_mixing_old_and_new_files_needs_the_upgrade_for_pandas(tmp_path):
    """Plain pandas takes one file's schema for the folder: an old JSON-text file beside typed ones
    fails (``maxa results upgrade`` is the fix); ``read_results`` reads both."""
    pd = pytest.importorskip("pandas")
    _old_file(tmp_path, OLD)
    append_result(tmp_path, BOUNDARIES)
    with pytest.raises(Exception, match="cast"):
        pd.read_parquet(tmp_path / "results")
    result = runner.invoke(app, ["results", "upgrade", str(tmp_path)])
    assert result.exit_code == 0 and "1 record file(s) rewritten" in result.output, result.output
    assert len(pd.read_parquet(tmp_path / "results")) == 2


def test_a_newer_schema_is_refused(tmp_path):
    table = pa.Table.from_pylist([encode_record(DEPTH)], schema=SCHEMA.with_metadata({SCHEMA_KEY: b"99"}))
    (tmp_path / "results").mkdir()
    pq.write_table(table, tmp_path / "results" / "x.parquet")
    result = runner.invoke(app, ["results", str(tmp_path)])
    assert result.exit_code == 2 and "results schema 99" in result.output


# -- writers --------------------------------------------------------------------------------------
def test_concurrent_appends_all_land(tmp_path):
    errors = []

    def write(i):
        try:
            append_result(tmp_path, {**DEPTH, "seed": i, "metrics": {"mse": float(i)}})
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    records = read_results(tmp_path)
    assert sorted(r["seed"] for r in records) == list(range(24))
    assert all(r["metrics"] == {"mse": float(r["seed"])} for r in records)


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_object_storage_roots(kind, request):
    if kind == "s3":
        request.getfixturevalue("s3")
    tag = uuid.uuid4().hex[:8]
    root = as_location(f"memory://maxa-results-{tag}" if kind == "memory" else f"s3://lab/results-{tag}")
    _old_file(root, OLD)
    append_result(root, DEPTH)
    append_result(root, BOUNDARIES)
    assert sorted(r["task"] for r in read_results(root)) == ["boundaries", "depth", "depth"]
    assert len(upgrade_results(root)) == 1 and results_table(root).num_rows == 3
    result = runner.invoke(app, ["results", str(root), "--task", "boundaries", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert [r["task"] for r in csv.DictReader(io.StringIO(result.output))] == ["boundaries"]


# -- maxa results ---------------------------------------------------------------------------------
@pytest.fixture
def filled(tmp_path):
    _folder(tmp_path)
    append_result(tmp_path, {"task": "speed", "backbone": "dinov2_b14", "dataset": "-",
                             "primary_metric": "relative_to_vitb16", "primary_value": 5.1,
                             "metrics": {"relative_to_vitb16": 5.1, "seconds_per_batch": 0.5},
                             "timings": {"build_s": 1.0, "batch_s": [0.5, 0.5]}})
    return tmp_path


def test_cli_table_one_line_per_record(filled):
    result = runner.invoke(app, ["results", str(filled)])
    assert result.exit_code == 0, result.output
    assert "(3 records)" in result.output
    assert all(name in result.output for name in ("dinov2_b14", "siglip_384", "relative_to_vitb16", "0.25"))
    result = runner.invoke(app, ["results", "ls", str(filled), "--task", "depth"])
    assert result.exit_code == 0 and "(1 record)" in result.output and "siglip_384" not in result.output


def test_cli_filters_and_csv_export(filled, tmp_path):
    out = tmp_path / "out" / "r.csv"
    result = runner.invoke(app, ["results", str(filled), "--backbone", "dinov2_b14", "--dataset", "nyuv2",
                                 "--format", "csv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["task"] for r in rows] == ["depth"]
    assert float(rows[0]["metric.rmse"]) == 0.5 and rows[0]["trivial.mse"] == "1.0"
    assert rows[0]["finished"] == "2026-12-01T10:00:00+00:00" and json.loads(rows[0]["config"])["lr"] == 0.002
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(out)
    assert df["metric.mse"].dtype == "float64" and "metric.iou" not in df  # only the selected records' metrics


def test_cli_json_export(filled):
    result = runner.invoke(app, ["results", str(filled), "--variant", "base", "--variant", "no-sigma",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert sorted(r["task"] for r in rows) == ["boundaries", "depth"]
    assert all(set(rows[0]) == set(r) for r in rows)  # every row has every column
    by_task = {r["task"]: r for r in rows}
    assert by_task["boundaries"]["metric.iou"] == 30.0 and by_task["depth"]["metric.iou"] is None
    assert not any(k.startswith("metric.relative") for k in rows[0])  # only the selected records' metrics


@pytest.mark.parametrize("args, words", [
    (["--backbone", "nope"], ["backbone 'nope'", "dinov2_b14, siglip_384"]),
    (["--task", "semseg"], ["task 'semseg'", "boundaries, depth, speed"]),
    (["--format", "table", "--out", "x.csv"], ["--format csv"]),
])
def test_cli_errors_are_one_line(filled, args, words):
    result = runner.invoke(app, ["results", str(filled), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert all(w in lines[0] for w in words), lines[0]


def test_cli_no_results_folder(tmp_path):
    for root, words in ((tmp_path / "missing", "does not exist"), (tmp_path, "no results under")):
        result = runner.invoke(app, ["results", str(root)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and words in lines[0], result.output


def test_nan_metrics_stay_numbers(tmp_path):
    append_result(tmp_path, {**DEPTH, "metrics": {"mse": math.nan}})
    (record,) = read_results(tmp_path)
    assert math.isnan(record["metrics"]["mse"])
