"""The built-in default job, shrunk: extract shapes, probe every task, print the table."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.quickstart import run_quickstart


def test_quickstart_runs_every_shapes_task(tmp_path):
    result = run_quickstart(tmp_path, max_epochs=1, device="cpu", num_images={"train": 16, "val": 8},
                            show_progress=False, log=lambda m: None)
    tasks = [r["task"] for r in result.records]
    assert tasks == ["boundaries", "distance", "instances", "semseg", "depth"]
    for r in result.records:
        assert r["dataset"] == "shapes" and r["eval_split"] == "val" and r["p_learn"] > 0
        assert r["primary_metric"] in r["metrics"] and r["primary_metric"] in r["trivial"]


def test_quickstart_command_prints_results_table(tmp_path, monkeypatch):
    import pipelines.quickstart as q

    real = q.run_quickstart
    monkeypatch.setattr(q, "run_quickstart", lambda root, **kw: real(
        root, **{**kw, "max_epochs": 1, "num_images": {"train": 12, "val": 6}, "tasks": ("semseg", "depth")}))
    res = CliRunner().invoke(app, ["quickstart", "--store-root", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "MAXA on shapes" in res.output and "semseg" in res.output and "depth" in res.output
    assert "features" in res.output and "targets" in res.output  # the store listing
