"""``maxa bench speed`` / ``pipelines.bench.speed_benchmark`` (paper §4.5): tiny random backbones on the CPU."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines.bench import speed_benchmark, speed_record
from pipelines.cli import app
from pipelines.report import collect_records, speed_table
from store.results import read_results

runner = CliRunner()


def test_speed_benchmark_rows():
    rows = speed_benchmark(["test_vit", "timm:test_convnext"], reference="test_vit", batches=2, batch_size=2,
                           device="cpu", weights="random")
    assert [r["backbone"] for r in rows] == ["test_vit", "timm:test_convnext"]
    ref, other = rows
    assert ref["is_reference"] and not other["is_reference"]
    assert ref["relative_to_vitb16"] == 1.0  # exactly: the reference divided by itself
    for r in rows:
        assert r["seconds_per_batch"] > 0 and r["adapter_seconds_per_batch"] > 0
        assert r["relative_to_vitb16"] > 0 and r["adapter_relative"] > 0
        assert r["reference_drift"] > 0
        assert r["images_per_second"] == 2 / r["seconds_per_batch"]
        assert r["p_learn"] > 0 and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["weights"].startswith("random")
    assert other["relative_to_vitb16"] == other["seconds_per_batch"] / ref["seconds_per_batch"]
    # the reference is timed first and again last: both passes pooled
    assert len(ref["batch_s"]) == 4 and len(other["batch_s"]) == 2 and len(other["adapter_batch_s"]) == 2
    rec = speed_record(other)
    assert rec["task"] == "speed" and rec["primary_metric"] == "relative_to_vitb16"
    assert rec["higher_is_better"] is False and rec["primary_value"] == other["relative_to_vitb16"]
    assert {"seconds_per_batch", "images_per_second", "relative_to_vitb16", "adapter_seconds_per_batch",
            "adapter_relative", "batch_size", "batches", "input_size"} <= set(rec["metrics"])


def test_reference_added_when_not_listed():
    rows = speed_benchmark(["timm:test_convnext"], reference="test_vit", batches=1, batch_size=1, device="cpu",
                           weights="random")
    assert [r["backbone"] for r in rows] == ["test_vit", "timm:test_convnext"]
    assert rows[0]["relative_to_vitb16"] == 1.0


def test_cli_writes_speed_records(tmp_path):
    result = runner.invoke(app, ["bench", "speed", "--backbones", "timm:test_convnext", "--reference", "test_vit",
                                 "--batches", "1", "--batch-size", "1", "--device", "cpu", "--weights", "random",
                                 "--store-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "rel. test_vit" in result.output and "rel. ViT-B/16" not in result.output  # the reference it ran against
    records = read_results(tmp_path)
    assert sorted(r["backbone"] for r in records) == ["test_vit", "timm:test_convnext"]
    assert all(r["task"] == "speed" and r["metrics"]["seconds_per_batch"] > 0 for r in records)
    assert [r for r in records if r["backbone"] == "test_vit"][0]["metrics"]["relative_to_vitb16"] == 1.0
    _, speed = collect_records([str(tmp_path)])  # the report sees them as speed records
    header, body = speed_table(speed)
    assert len(body) == 2 and "relative to ViT-B/16 224" in header
    # timed against test_vit, not ViT-B/16: never shown as relative to ViT-B/16, and the report says so
    assert [row[2] for row in body] == ["–", "–"] and all(float(row[1]) > 0 for row in body)
    from pipelines.plots import score_vs_speed

    _, notes = score_vs_speed([], speed)
    assert any("another reference (test_vit" in n for n in notes), notes


def test_cli_unknown_backbone_one_line_error(tmp_path):
    result = runner.invoke(app, ["bench", "speed", "--backbones", "no_such_backbone", "--device", "cpu",
                                 "--store-root", str(tmp_path)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no_such_backbone" in lines[0], result.output
    assert read_results(tmp_path) == []


def test_cli_weights_default_to_pretrained_as_extract(tmp_path, monkeypatch):
    """`bench speed` loads the pretrained weights unless told `--weights random`, as `extract` does;
    offline with no cached copy that is one line naming the way out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    result = runner.invoke(app, ["bench", "speed", "--backbones", "test_vit", "--reference", "test_vit",
                                 "--batches", "1", "--batch-size", "1", "--device", "cpu"])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "test_vit" in errors[0] and "--weights random" in errors[0], result.output
    assert "Traceback" not in result.output
