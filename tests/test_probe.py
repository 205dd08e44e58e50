"""Probing from stores: known answers, determinism, records, no images/backbone needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.jobs import run_extract
from probe.adapter import count_parameters
from probe.predict import load_adapter, predict
from store.results import read_results
from probe.train import ProbeConfig, train_probe
from runtime.errors import MaxaError, StoreError

sys.path.insert(0, str(Path(__file__).parent))
from shared_data import shared_data  # noqa: E402
from synthetic import extract_shapes, make_synthetic_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid_small"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    paths = {split: job.features.path for split, job in extract_shapes(root, {"train": 24, "val": 8}).items()}
    paths["root"] = str(root)
    return paths


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, str]:
    return make_synthetic_root(tmp_path_factory.mktemp("synthetic"), n_train=48, n_val=16)


def test_known_answer_semseg_near_perfect(synthetic):
    r = train_probe(synthetic["train"], ProbeConfig(task="semseg", max_epochs=40, batch_size=8, patience=40),
                    device="cpu", show_progress=False)
    assert r.metrics["miou"] > 90.0, r.metrics
    assert r.metrics["miou"] > r.record["trivial"]["miou"] + 50


def test_known_answer_boundaries_needs_locality(synthetic):
    """Boundaries are decided by each token's own neighbour bits: the masked adapter reads them,
    the variant without σ (no locality prior) does clearly worse within the same budget."""
    cfg = dict(task="boundaries", max_epochs=25, batch_size=8, patience=25)
    base = train_probe(synthetic["train"], ProbeConfig(**cfg), device="cpu", show_progress=False)
    flat = train_probe(synthetic["train"], ProbeConfig(variant="no-sigma", **cfg), device="cpu", show_progress=False)
    assert base.metrics["iou"] > 60.0, base.metrics
    assert base.metrics["iou"] > flat.metrics["iou"] + 20.0, (base.metrics, flat.metrics)


def test_record_run_dir_and_predict_any_size(shapes_root, tmp_path):
    r = train_probe(shapes_root["train"], ProbeConfig(task="semseg", max_epochs=2), device="cpu", show_progress=False)
    rec = r.record
    assert rec["task"] == "semseg" and rec["dataset"] == "shapes" and rec["eval_split"] == "val"
    assert set(rec["metrics"]) >= {"miou", "pixel_acc", "ce"} and rec["train_images"] + rec["val_images"] == 24
    model, meta = load_adapter(r.run_dir)
    assert rec["p_learn"] == count_parameters(model) == meta["p_learn"]
    assert meta["config"]["probe"]["task"] == "semseg" and meta["config"]["adapter"]["out_channels"] == 5
    rows = [x for x in read_results(shapes_root["root"]) if x["run_dir"] == r.run_dir]
    assert len(rows) == 1 and rows[0]["metrics"] == pytest.approx(rec["metrics"])
    from runtime.devices import device_name

    # where it ran: the CPU's model (a GPU's name on a GPU), in the record and the results table
    assert rec["device"] == rows[0]["device"] == device_name(torch.device("cpu")) and rec["device"]
    small, _ = predict(r.run_dir, shapes_root["val"], 1, (224, 224))
    big, _ = predict(r.run_dir, shapes_root["val"], 1, (448, 448))
    assert small.shape == (5, 224, 224) and big.shape == (5, 448, 448)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(big)[None], 2)[0].numpy()
    assert np.corrcoef(pooled.ravel(), small.ravel())[0, 1] > 0.9
    # the command line writes the values as an array (.npy) or an image, and refuses anything else
    from typer.testing import CliRunner

    from pipelines.cli import app
    from probe.predict import output_values

    base = ["predict", "--adapter", r.run_dir, "--store", shapes_root["val"], "--index", "1", "--size", "224"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "pred.npy")])
    assert res.exit_code == 0, res.output
    probs = np.load(tmp_path / "pred.npy")
    assert probs.shape == (5, 224, 224) and probs.dtype == np.float32 and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.allclose(probs, output_values(small, "semseg")) and (probs.argmax(0) == small.argmax(0)).all()
    assert CliRunner().invoke(app, [*base, "--out", str(tmp_path / "pred.png")]).exit_code == 0
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "pred.txt")])
    assert bad.exit_code == 2 and "write .png/.jpg (a picture), .npy (one image's values) or .zarr" in bad.output


def test_deterministic_on_cpu_for_a_seed(shapes_root, tmp_path):
    def run(seed, out):
        return train_probe(shapes_root["train"], ProbeConfig(task="depth", max_epochs=2, seed=seed), device="cpu",
                           results_root=str(tmp_path / out), show_progress=False)

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert a.metrics == b.metrics and a.metrics != c.metrics
    wa = torch.load(Path(a.run_dir) / "adapter.pt", weights_only=True)["model"]
    wb = torch.load(Path(b.run_dir) / "adapter.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("head", ["linear", "cnn"])
def test_baseline_heads_read_the_same_stores(shapes_root, tmp_path, head):
    r = train_probe(shapes_root["train"], ProbeConfig(task="boundaries", head=head, max_epochs=1), device="cpu",
                    results_root=str(tmp_path), show_progress=False)
    assert r.record["head"] == head and r.record["p_learn"] > 0 and np.isfinite(r.metrics["ce"])


def test_instances_task_runs_with_global_ids(shapes_root, tmp_path):
    r = train_probe(shapes_root["train"], ProbeConfig(task="instances", max_epochs=1), device="cpu",
                    results_root=str(tmp_path), show_progress=False)
    assert r.metrics["n_eval_images"] > 0 and -100 <= r.metrics["ari"] <= 100


def test_clear_errors(shapes_root, tmp_path):
    with pytest.raises(MaxaError, match="variant"):
        ProbeConfig(task="semseg", variant="nope")
    with pytest.raises(MaxaError, match="maxa head only"):
        ProbeConfig(task="semseg", head="linear", variant="d16")
    with pytest.raises(MaxaError, match="unknown task"):
        train_probe(shapes_root["train"], ProbeConfig(task="segm"), device="cpu", show_progress=False)
    lonely = tmp_path / "features" / "x"
    lonely.mkdir(parents=True)
    copy = lonely / Path(shapes_root["train"]).name
    shutil.copytree(shapes_root["train"], copy)
    with pytest.raises(StoreError, match="no complete target store"):
        train_probe(str(copy), ProbeConfig(task="semseg"), device="cpu", show_progress=False)


NO_IMAGES_NO_TIMM = textwrap.dedent(
    """
    import sys
    sys.modules["timm"] = None  # any `import timm` now raises ImportError
    from probe.train import ProbeConfig, train_probe
    r = train_probe(sys.argv[1], ProbeConfig(task="semseg", max_epochs=1), device="cpu", show_progress=False)
    assert "timm" not in sys.modules or sys.modules["timm"] is None
    print("MIOU", r.metrics["miou"])
    """
)


def test_probe_needs_neither_images_nor_timm(tmp_path):
    shared_data("camvid_small")
    data = tmp_path / "camvid"
    for sub in ("train", "trainannot", "val", "valannot"):
        (data / sub).mkdir(parents=True)
        for f in sorted((CAMVID / sub).glob("*.png"))[:6]:
            shutil.copy(f, data / sub / f.name)
    root = tmp_path / "stores"
    paths = {}
    for split in ("train", "val"):
        job = run_extract(backbone="test_vit", dataset="segfolder", root=data, split=split, store_root=root,
                          weights="random", device="cpu", dataset_options={"num_classes": 11, "ignore_index": 11},
                          num_workers=0, show_progress=False)
        paths[split] = job.features.path
    shutil.rmtree(data)  # the images are gone
    script = tmp_path / "probe_only.py"
    script.write_text(NO_IMAGES_NO_TIMM)
    proc = subprocess.run([sys.executable, str(script), paths["train"]], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MIOU" in proc.stdout
