"""The built-in default job, shrunk: extract shapes, probe every task, print the table."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.quickstart import against_trivial, run_quickstart


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
    assert "at random initialisation: MAXA is clearly above the trivial predictor on" in " ".join(res.output.split())


def test_quickstart_says_where_maxa_beats_the_trivial_predictor():
    """The line under the table is computed from the records: percent metrics by a point, errors by 5 %."""
    def rec(task, value, trivial, higher=True, metric="m"):
        return {"task": task, "backbone": "test_vit", "primary_metric": metric, "primary_value": value,
                "higher_is_better": higher, "trivial": {metric: trivial}}

    line = against_trivial([rec("boundaries", 0.0, 0.0), rec("distance", 0.036, 0.047, higher=False),
                            rec("instances", 62.1, 0.0), rec("semseg", 14.38, 14.34), rec("depth", 3.1, 3.17, False)])
    assert line.startswith("test_vit at random initialisation: MAXA is clearly above the trivial predictor on "
                           "distance, instances; not on boundaries, semseg, depth (")
    assert "not on" not in against_trivial([rec("semseg", 20.0, 14.3)])
