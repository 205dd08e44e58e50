"""Logs a cluster job can read: plain progress lines when stderr is not a terminal, each run's
curves in ``curves.jsonl``, and TensorBoard with the real library."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.progress import ProgressReporter, format_duration

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_synthetic_root  # noqa: E402


def test_plain_lines_off_a_terminal():
    stream = io.StringIO()
    with ProgressReporter("extract vit coco/train", 40, stream=stream, interval_s=0) as p:
        for _ in range(4):
            p.advance(10, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].startswith("extract vit coco/train: 10/40 img (25%), ")
    assert all(" img/s, loss 0.5000, elapsed " in line for line in lines)
    assert "eta " in lines[0] and lines[-1].startswith("extract vit coco/train: 40/40 img (100%)")
    assert lines[-1].endswith(", done")


def test_lines_at_the_interval_and_silent_when_disabled(monkeypatch):
    monkeypatch.setenv("MAXA_PROGRESS_S", "3600")
    stream = io.StringIO()
    with ProgressReporter("targets", 5, stream=stream) as p:
        p.advance(5)
    assert stream.getvalue() == ""  # shorter than the interval: no line at all
    with ProgressReporter("x", 5, stream=stream, enabled=False, interval_s=0) as p:
        p.advance(5)
    assert stream.getvalue() == ""
    assert [format_duration(s) for s in (4.4, 75, 3725)] == ["4s", "1m15s", "1h02m05s"]


def test_extract_prints_whole_lines_into_a_pipe(tmp_path):
    env = {**os.environ, "MAXA_PROGRESS_S": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "extract", "--backbone", "test_vit", "--dataset",
                           "shapes", "--split", "val", "--num-images", "12", "--weights", "random",
                           "--store-root", str(tmp_path / "root")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("extract test_vit shapes/val: ")]
    assert lines and re.search(r": 12/12 img \(100%\), [\d.,]+ img/s, elapsed \d+s, done$", lines[-1]), proc.stderr
    assert "\x1b" not in proc.stderr  # plain text, no terminal codes


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_root(tmp_path_factory.mktemp("root"), n_train=24, n_val=8)


def test_probe_lines_curves_and_tensorboard(synthetic, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from probe.curves import read_curves
    from probe.train import ProbeConfig, train_probe
    from store import as_location

    monkeypatch.setenv("MAXA_PROGRESS_S", "0")
    r = train_probe(synthetic["train"], ProbeConfig(task="semseg", max_epochs=3, patience=3, batch_size=8),
                    device="cpu", results_root=tmp_path / "results", tensorboard=tmp_path / "tb")
    err = capsys.readouterr().err
    assert re.search(r"semseg epoch 1/3 train: 8/\d+ img \(\d+%\), [\d.,]+ img/s, loss [\d.]+, steps/s [\d.]+", err), err
    assert "semseg eval: 8/8 img (100%)" in err and "data: fit " in err
    rows = read_curves(as_location(r.run_dir))
    assert [row["epoch"] for row in rows] == [1, 2, 3, r.record["best_epoch"]]
    assert all(isinstance(row["train_loss"], float) and "val_loss" in row for row in rows[:3])
    assert rows[-1]["eval"] == pytest.approx(r.metrics)
    assert json.loads((Path(r.run_dir) / "curves.jsonl").read_text().splitlines()[0])["epoch"] == 1
    runs = list((tmp_path / "tb").iterdir())
    assert [p.name for p in runs] == [Path(r.run_dir).name]
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/train_loss", "select/val_loss", "eval/miou"} <= set(tags), tags
    assert [e.step for e in acc.Scalars("train/train_loss")] == [1, 2, 3]
    assert acc.Scalars("eval/miou")[0].value == pytest.approx(r.metrics["miou"])
