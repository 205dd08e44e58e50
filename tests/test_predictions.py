"""Predictions: a whole store's values in a Zarr store (equal to one image's ``predict``), its refusals,
and the pictures of ``maxa predict`` (input | ground truth | prediction, colour bar or legend)."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

import maxa
from extract.jobs import run_extract
from pipelines.cli import app
from pipelines.prediction_view import NO_IMAGE_NOTE, ViewInputs, prediction_figure, view_inputs
from probe import predict_store as ps
from probe.pairing import find_targets
from probe.predict import output_values, predict
from probe.predict_store import predict_store
from probe.train import ProbeConfig, train_probe
from runtime.errors import MaxaError
from store.predictions import open_predictions
from store.writer import StoreWriter

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import extract_shapes  # noqa: E402

runner = CliRunner()
SIZE = (48, 48)


def _add_image(features_path: str) -> np.ndarray:
    """Give the target store of ``features_path`` an ``input_image`` array (N, H, W, 3) uint8, as target stores
    built by this maxa have; returns it."""
    ts = find_targets(features_path)
    if "input_image" in ts.array_names:
        return ts.read_all("input_image")
    n, (h, w) = len(ts), ts.spec.size
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.stack([np.stack([(xx * 255 // w + 40 * i) % 256, yy * 255 // h, np.full_like(xx, 60 * i % 256)], -1)
                       for i in range(n)]).astype(np.uint8)
    group = zarr.open_group(ts.path, mode="r+")
    arr = group.create_array("input_image", shape=images.shape, chunks=(1, h, w, 3), dtype="uint8",
                             dimension_names=("image", "y", "x", "rgb"))
    arr[:] = images
    return images


def _drop_image(features_path: str) -> None:
    ts = find_targets(features_path)
    if "input_image" in ts.array_names:
        del zarr.open_group(ts.path, mode="r+")["input_image"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    paths = {split: job.features.path for split, job in extract_shapes(root, {"train": 16, "val": 6}).items()}
    for task in ("semseg", "boundaries"):
        paths[task] = train_probe(paths["train"], ProbeConfig(task=task, max_epochs=1), device="cpu",
                                  show_progress=False).run_dir
    # the same stores once more, their val target store without the input image
    plain = tmp_path_factory.mktemp("plain")
    shutil.copytree(root, plain, dirs_exist_ok=True)
    paths["plain_val"] = paths["val"].replace(str(root), str(plain))
    _drop_image(paths["plain_val"])
    paths["images"] = _add_image(paths["val"])
    paths["root"] = str(root)
    return paths


# -- the prediction store ----------------------------------------------------------------------------
def test_store_values_equal_predict_per_image(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(ps, "SHARD_BYTES", 100_000)  # 2 semseg images of 5 x 48 x 48 float32 per shard: 3 shards
    out = tmp_path / "preds.zarr"
    res = predict_store(runs["semseg"], runs["val"], out, size=SIZE, batch_size=16, show_progress=False)
    assert res.images_written == 6 and res.values == "probabilities" and not res.resumed
    store = open_predictions(out)
    fs = maxa.open_features(runs["val"])
    assert store.image_ids == fs.image_ids and store.task == "semseg" and store.shard_size == 2
    values = store.read_all()
    assert values.shape == (6, 5, *SIZE) and values.dtype == np.float32
    for i in range(6):
        raw, _ = predict(runs["semseg"], runs["val"], i, SIZE)
        np.testing.assert_allclose(values[i], output_values(raw, "semseg"), rtol=1e-5, atol=1e-6)
    assert np.allclose(values.sum(1), 1, atol=1e-5)
    # plain zarr reads it: per-image chunks, named dimensions, the run's identity in the attributes
    group = zarr.open_group(str(out), mode="r")
    arr = group["probabilities"]
    assert arr.chunks == (1, 5, *SIZE) and arr.metadata.dimension_names == ("image", "class", "y", "x")
    np.testing.assert_array_equal(arr[:], values)
    spec = group.attrs["maxa"]["spec"]
    assert spec["task"] == "semseg" and spec["run"]["run_dir"] == runs["semseg"] and len(spec["run"]["adapter_sha256"]) == 64
    assert spec["features"]["key"] == fs.key and spec["size"] == list(SIZE)
    assert group["index"].attrs["image_ids"] == fs.image_ids and group.attrs["maxa"]["complete"]
    assert maxa.open_predictions(out).read([3, 1]).shape == (2, 5, *SIZE)


def test_labels_float16_and_boundaries(runs, tmp_path):
    probs = open_predictions(predict_store(runs["semseg"], runs["val"], tmp_path / "p.zarr", size=SIZE,
                                           show_progress=False).location).read_all()
    labels = open_predictions(predict_store(runs["semseg"], runs["val"], tmp_path / "l.zarr", size=SIZE, labels=True,
                                            show_progress=False).location)
    assert labels.values_name == "labels" and labels.read_all().dtype == np.uint8
    np.testing.assert_array_equal(labels.read_all(), probs.argmax(1))
    half = open_predictions(predict_store(runs["semseg"], runs["val"], tmp_path / "h.zarr", size=SIZE, dtype="float16",
                                          show_progress=False).location).read_all()
    assert half.dtype == np.float16 and np.allclose(half, probs, atol=1e-3)
    b = open_predictions(predict_store(runs["boundaries"], runs["val"], tmp_path / "b.zarr", size=(40, 56),
                                       show_progress=False).location)
    assert b.values_name == "boundary_probability"
    raw, _ = predict(runs["boundaries"], runs["val"], 2, (40, 56))
    np.testing.assert_allclose(b.read([2])[0], output_values(raw, "boundaries"), rtol=1e-5, atol=1e-6)
    assert b.read_all().shape == (6, 40, 56)
    with pytest.raises(MaxaError, match="--labels writes a semseg label map"):
        predict_store(runs["boundaries"], runs["val"], tmp_path / "x.zarr", size=SIZE, labels=True,
                      show_progress=False)


def test_an_interrupted_store_is_finished_by_the_same_call(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(ps, "SHARD_BYTES", 100_000)
    out = tmp_path / "preds.zarr"
    write = StoreWriter.write_shard

    def crash_after_first(self, shard, data, bad=None):
        if shard > 0:
            raise KeyboardInterrupt
        write(self, shard, data, bad)

    monkeypatch.setattr(StoreWriter, "write_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        predict_store(runs["semseg"], runs["val"], out, size=SIZE, show_progress=False)
    monkeypatch.setattr(StoreWriter, "write_shard", write)
    with pytest.raises(Exception, match="incomplete"):
        open_predictions(out)
    res = predict_store(runs["semseg"], runs["val"], out, size=SIZE, show_progress=False)
    assert res.resumed and res.images_written == 4  # the two shards left
    whole = predict_store(runs["semseg"], runs["val"], tmp_path / "whole.zarr", size=SIZE, show_progress=False)
    np.testing.assert_array_equal(open_predictions(out).read_all(), open_predictions(whole.location).read_all())


def test_refusals(runs, tmp_path):
    out = tmp_path / "preds.zarr"
    predict_store(runs["boundaries"], runs["val"], out, size=SIZE, show_progress=False)
    with pytest.raises(MaxaError, match="already holds these predictions"):
        predict_store(runs["boundaries"], runs["val"], out, size=SIZE, show_progress=False)
    with pytest.raises(MaxaError, match="holds other predictions"):
        predict_store(runs["boundaries"], runs["val"], out, size=(32, 32), show_progress=False)
    (tmp_path / "mine.zarr").mkdir()
    with pytest.raises(MaxaError, match="already exists and is not a prediction store"):
        predict_store(runs["boundaries"], runs["val"], tmp_path / "mine.zarr", size=SIZE, show_progress=False)
    with pytest.raises(MaxaError, match="Zarr store"):
        predict_store(runs["boundaries"], runs["val"], tmp_path / "preds.h5", size=SIZE, show_progress=False)
    other = run_extract(backbone="test_convnext", dataset="shapes", split="val", store_root=tmp_path / "other",
                        weights="random", device="cpu", dataset_options={"num_images": 6}, num_workers=0,
                        show_progress=False, targets=False)
    with pytest.raises(MaxaError, match="is not what the adapter"):
        predict_store(runs["boundaries"], other.features.path, tmp_path / "o.zarr", size=SIZE, show_progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_cli_writes_a_store_and_refuses_in_one_line(runs, tmp_path):
    base = ["predict", "--adapter", runs["boundaries"], "--store", runs["val"], "--size", "32", "--no-progress"]
    ok = runner.invoke(app, [*base, "--out", str(tmp_path / "p.zarr")])
    assert ok.exit_code == 0, ok.output
    assert "boundary_probability" in ok.output and open_predictions(tmp_path / "p.zarr").read_all().shape == (6, 32, 32)
    for args, message in (
        (["--out", str(tmp_path / "p.zarr")], "already holds these predictions"),
        (["--out", str(tmp_path / "p.txt")], "write .png/.jpg (a picture), .npy"),
        (["--all", "--out", str(tmp_path / "p.npy")], "--all writes every image's values into a Zarr store"),
        (["--index", "2", "--out", str(tmp_path / "q.zarr")], "drop --index"),
        (["--labels", "--out", str(tmp_path / "q.npy")], "--labels applies to --out NAME.zarr"),
        (["--dtype", "int8", "--out", str(tmp_path / "q.zarr")], "--dtype int8: choose float32 or float16"),
    ):
        r = runner.invoke(app, [*base, *args])
        text = " ".join(r.output.split())
        assert r.exit_code != 0 and message in text and "Traceback" not in r.output and "bug in maxa" not in text, \
            (args, r.output)
    assert not (tmp_path / "q.zarr").exists()
    # the store commands know a prediction store
    info = runner.invoke(app, ["stores", "info", str(tmp_path / "p.zarr"), "--json"])
    assert info.exit_code == 0, info.output
    assert '"kind": "predictions"' in info.output and '"boundary_probability"' in info.output
    names = open_predictions(tmp_path / "p.zarr").array_names
    assert "boundary_probability" in names and not {"bad", "shard_done", "image_id"} & set(names), names
    check = runner.invoke(app, ["stores", "verify", str(tmp_path / "p.zarr")])
    assert check.exit_code == 0 and "Traceback" not in check.output, check.output


# -- pictures ----------------------------------------------------------------------------------------
def _panels(fig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    img = np.asarray(Image.open(io.BytesIO(fig.png)).convert("RGB")).astype(np.int16)
    return img, {t: img[y0 + 2:y1 - 2, x0 + 2:x1 - 2] for t, (x0, y0, x1, y1) in fig.panels}


def test_semseg_figure_shows_input_truth_prediction_and_a_legend(runs):
    raw, meta = predict(runs["semseg"], runs["val"], 1, (224, 224))
    view = view_inputs(runs["val"], 1, "semseg")
    assert view.image is not None and view.truth is not None and view.class_names
    np.testing.assert_array_equal(view.image, runs["images"][1])
    fig = prediction_figure("semseg", [("prediction 224×224", output_values(raw, "semseg"))], view, "semseg")
    img, panels = _panels(fig)
    assert [t for t, _ in fig.panels] == ["input", "ground truth", "prediction 224×224"] and fig.scale == "legend"
    assert img.shape[1] > 3 * 200
    # the input panel is the stored image (resized by matplotlib to the panel)
    shown = np.asarray(Image.fromarray(panels["input"].astype(np.uint8)).resize((224, 224), Image.BILINEAR), np.float64)
    assert np.corrcoef(shown[..., 0].ravel(), runs["images"][1][..., 0].astype(np.float64).ravel())[0, 1] > 0.9
    a, b, c = (panels[t] for t in ("input", "ground truth", "prediction 224×224"))
    assert np.abs(a - b).mean() > 10 and np.abs(b - c).mean() > 1
    # the legend lies right of the last panel and names the classes shown
    right = img[:, fig.panels[-1][1][2] + 4:]
    assert (right < 200).any()


def test_boundaries_figure_has_a_colour_bar_and_is_not_a_grey_square(runs):
    raw, _ = predict(runs["boundaries"], runs["val"], 0, (224, 224))
    values = output_values(raw, "boundaries")
    fig = prediction_figure("boundaries", [("prediction", values)], view_inputs(runs["val"], 0, "boundaries"))
    img, panels = _panels(fig)
    assert fig.scale == "colour bar"
    pred = panels["prediction"]
    assert np.abs(pred[..., 0] - pred[..., 2]).mean() > 5  # a colour map, not grey
    if values.std() > 1e-4:  # the prediction varies: so does its picture
        assert len(np.unique(pred.reshape(-1, 3), axis=0)) > 20
    truth = panels["ground truth"]
    assert len(np.unique(truth.reshape(-1, 3), axis=0)) >= 2
    # the colour bar lies right of the last panel: a column of many colours
    bar = img[:, fig.panels[-1][1][2] + 4:]
    assert len(np.unique(bar.reshape(-1, 3), axis=0)) > 50


def test_ground_truth_in_other_classes_is_not_drawn_as_comparable(runs):
    """An adapter shown on a store labelled in other classes (another dataset, another --num-classes)
    gets no ground-truth panel but a note; a label beyond the adapter's classes never breaks the legend."""
    raw, meta = predict(runs["semseg"], runs["val"], 1, (32, 32))
    same = view_inputs(runs["val"], 1, "semseg", trained_on=meta["info"])
    assert same.truth is not None  # the adapter's own classes: drawn
    n = meta["info"]["num_classes"]
    other = view_inputs(runs["val"], 1, "semseg", trained_on={**meta["info"], "num_classes": n - 1})
    assert other.truth is None and f"have {n} classes" in other.truth_note and f"adapter's {n - 1}" in other.truth_note
    renamed = view_inputs(runs["val"], 1, "semseg", trained_on={**meta["info"], "class_names": ["x"] * n})
    assert renamed.truth is None and "other names" in renamed.truth_note
    # a truth label the adapter has no output for (its top class beyond the palette): drawn, in the legend
    values = output_values(raw, "semseg")[:2]
    view = view_inputs(runs["val"], 1, "semseg")
    view.class_names = None
    view.truth = np.full(view.truth.shape, 5, dtype=np.uint8)
    fig = prediction_figure("semseg", [("prediction", values)], view)
    assert fig.scale == "legend"


def test_without_an_image_the_input_panel_says_so(runs):
    view = view_inputs(runs["plain_val"], 0, "semseg")
    assert view.image is None and view.truth is not None and view.image_note == NO_IMAGE_NOTE
    raw, _ = predict(runs["semseg"], runs["plain_val"], 0, (64, 64))
    fig = prediction_figure("semseg", [("prediction", output_values(raw, "semseg"))], view)
    _, panels = _panels(fig)
    note = panels["input"]
    assert (note > 200).mean() > 0.8 and (note < 150).any()  # light panel with text on it
    blank = prediction_figure("depth", [("prediction", np.random.default_rng(0).random((16, 16)))], ViewInputs())
    assert [t for t, _ in blank.panels] == ["input", "ground truth", "prediction"] and blank.scale == "colour bar"


def test_cli_picture_and_bare_prediction(runs, tmp_path):
    base = ["predict", "--adapter", runs["semseg"], "--store", runs["val"], "--index", "2", "--size", "64"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "fig.png")])
    assert r.exit_code == 0, r.output
    assert "input | ground truth | prediction 64×64" in r.output
    fig = Image.open(tmp_path / "fig.png")
    assert fig.width > 3 * fig.height // 2
    r = runner.invoke(app, [*base, "--bare", "--out", str(tmp_path / "bare.png")])
    assert r.exit_code == 0, r.output
    bare = np.asarray(Image.open(tmp_path / "bare.png"))
    assert bare.shape == (64, 64, 3)
    raw, _ = predict(runs["semseg"], runs["val"], 2, (64, 64))
    assert len(np.unique(bare.reshape(-1, 3), axis=0)) == len(np.unique(raw.argmax(0)))


def test_a_bad_image_gets_zeros_and_its_flag(runs, tmp_path):
    copy = tmp_path / "features.zarr"
    shutil.copytree(runs["val"], copy)
    zarr.open_group(str(copy), mode="r+")["bad"][2] = 1  # as `maxa extract --skip-bad` records an undecodable image
    store = open_predictions(predict_store(runs["boundaries"], copy, tmp_path / "p.zarr", size=SIZE,
                                           show_progress=False).location)
    values = store.read_all()
    assert store.bad.tolist() == [2] and store.meta["num_bad"] == 1
    assert not values[2].any() and all(values[i].any() for i in (0, 1, 3, 4, 5))


def test_instances_and_depth_figures():
    """Instances: truth ids, the embedding's PCA colours and k-means with the true count; depth: one
    colour bar for truth and prediction, invalid truth (0) apart."""
    rng = np.random.default_rng(0)
    truth = np.zeros((64, 64), int)
    truth[5:30, 5:30], truth[35:60, 30:60] = 1, 2
    emb = rng.normal(size=(32, 64, 64))
    emb[:, truth == 1] += 3
    emb[0, truth == 2] -= 4
    fig = prediction_figure("instances", [("prediction", emb)], ViewInputs(truth=truth))
    _, panels = _panels(fig)
    assert [t for t, _ in fig.panels] == ["input", "ground truth", "prediction", "k-means, k = 2 (true foreground)"]
    kmeans = panels["k-means, k = 2 (true foreground)"]
    assert len(np.unique(kmeans.reshape(-1, 3), axis=0)) >= 3  # background and two clusters
    depth = np.abs(rng.normal(2, 1, (64, 64)))
    shown = depth.copy()
    shown[:10] = 0
    fig = prediction_figure("depth", [("prediction", depth)], ViewInputs(truth=shown))
    assert fig.scale == "colour bar" and len(fig.panels) == 3
