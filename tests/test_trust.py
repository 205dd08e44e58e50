"""No silent wrong result: pairing, format versions, bad images, mismatched adapters, options.

Each test here reproduces an ordinary mistake or odd input that once produced a number with exit
code 0, and checks that it now gives the right number or one clear refusal.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from extract.jobs import run_extract
from pipelines.cli import app
from pipelines.upgrade import upgrade_store
from probe.predict import predict
from probe.train import ProbeConfig, train_probe
from store import read_attrs
from runtime.errors import MaxaError, StoreError, StoreMismatchError
from store.reader import open_features
from store.spec import FORMAT_VERSION, content_key
from store.verify import verify_store

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_instance_root  # noqa: E402

runner = CliRunner()
FAST = dict(weights="random", device="cpu", num_workers=0, show_progress=False)


def _segfolder(root: Path, splits: dict[str, list[str]], seed: int = 0, size: tuple[int, int] = (40, 56)) -> Path:
    """A CamVid-style folder: ``{split}/NAME.png`` RGB images and ``{split}annot/NAME.png`` labels 0..2.

    The pixels of an image are a function of its name and ``seed`` only, so the same name in two
    datasets built with the same seed is the same image (a copy)."""
    for split, names in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for name in names:
            rng = np.random.default_rng([seed, sum(map(ord, name)), len(name)])
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / f"{name}.png")
            labels = np.zeros(size, np.uint8)
            labels[:, size[1] // 3:] = 1
            labels[size[0] // 2:, :] = 2
            Image.fromarray(labels, mode="L").save(root / f"{split}annot" / f"{name}.png")
    return root


def _extract(data: Path, split: str, stores: Path, backbone: str = "test_vit", **kw):
    return run_extract(backbone=backbone, dataset="segfolder", root=data, split=split, store_root=stores,
                       dataset_options={"num_classes": 3}, **{**FAST, **kw})


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


QUICK = dict(task="semseg", max_epochs=1, batch_size=4)


# -- 1. dataset identity and pairing -----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Datasets A and B (both segfolder) in one store root; B's val split holds copies of A's training images."""
    tmp = tmp_path_factory.mktemp("pairing")
    a = _segfolder(tmp / "A", {"train": _names("a", 10), "val": _names("av", 4)})
    b = _segfolder(tmp / "B", {"train": _names("b", 10), "val": _names("a", 5)})  # same names, same seed: copies
    stores = tmp / "stores"
    paths = {}
    for name, data in (("A", a), ("B", b)):
        for split in ("train", "val"):
            paths[f"{name}-{split}"] = _extract(data, split, stores).features.path
    return {"stores": stores, "tmp": tmp, **paths}


def test_eval_store_is_found_on_the_same_dataset_only(two_datasets, tmp_path):
    d = two_datasets
    a_train, a_val = open_features(d["A-train"]), open_features(d["A-val"])
    b_val = open_features(d["B-val"])
    assert a_train.spec.dataset_id == a_val.spec.dataset_id != b_val.spec.dataset_id
    r = train_probe(d["A-train"], ProbeConfig(**QUICK), results_root=str(tmp_path), device="cpu", show_progress=False)
    assert r.record["eval_store"] == a_val.key and r.record["eval_images"] == 4
    assert r.record["eval_dataset_id"] == a_val.spec.dataset_id == r.record["dataset_id"]
    assert r.record["eval_image_ids_hash"] == a_val.spec.image_ids_hash


def test_an_eval_split_given_as_the_training_store_is_named(two_datasets, tmp_path):
    with pytest.raises(StoreError, match=r"is the val split, .* give the train split's store to --store"):
        train_probe(two_datasets["A-val"], ProbeConfig(**QUICK), results_root=str(tmp_path), device="cpu",
                    show_progress=False)


def test_eval_store_of_another_dataset_is_refused(two_datasets, tmp_path):
    with pytest.raises(StoreMismatchError, match="another dataset"):
        train_probe(two_datasets["A-train"], ProbeConfig(**QUICK), eval_features=two_datasets["B-val"],
                    results_root=str(tmp_path), device="cpu", show_progress=False)


def test_training_images_in_the_eval_store_are_refused(two_datasets, tmp_path):
    with pytest.raises(StoreMismatchError, match="share 10 image"):
        train_probe(two_datasets["A-train"], ProbeConfig(**QUICK), eval_features=two_datasets["A-train"],
                    results_root=str(tmp_path), device="cpu", show_progress=False)


def test_eval_on_another_backbone_is_refused(two_datasets, tmp_path):
    data = two_datasets["tmp"] / "A"
    other = _extract(data, "val", two_datasets["stores"], backbone="test_convnext").features.path
    with pytest.raises(StoreMismatchError, match="different backbones"):
        train_probe(two_datasets["A-train"], ProbeConfig(**QUICK), eval_features=other,
                    results_root=str(tmp_path), device="cpu", show_progress=False)


def test_same_data_at_another_path_is_the_same_store(two_datasets):
    copy = two_datasets["tmp"] / "elsewhere" / "A-copy"
    shutil.copytree(two_datasets["tmp"] / "A", copy)
    again = _extract(copy, "train", two_datasets["stores"])
    assert again.features.reused and again.features.path == two_datasets["A-train"]
    assert again.targets is not None and again.targets.reused


# -- 2. format version ---------------------------------------------------------------------------------
def _set_meta(path: str, **changes) -> dict:
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["maxa"])
    meta.update(changes)
    group.attrs["maxa"] = meta
    return meta


def _as_format_1(path: str) -> None:
    """Rewrite a store's attributes as maxa format 1 wrote them (no dataset identity, no top-level format)."""
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["maxa"])
    spec = dict(meta["spec"])
    spec.pop("dataset_id")
    spec["format_version"] = 1
    meta.pop("format_version")
    if meta["kind"] == "features":
        ident = json.loads(json.dumps(spec))
        for layer in ident["layers"]:
            layer.pop("token_centres")
        meta["key"] = content_key({"kind": "features", **ident})
    else:
        meta["key"] = content_key({"kind": "targets", **spec})
    meta["spec"] = spec
    group.attrs["maxa"] = meta


@pytest.fixture()
def small_pair(tmp_path):
    data = _segfolder(tmp_path / "data", {"train": _names("t", 6), "val": _names("v", 3)})
    stores = tmp_path / "stores"
    jobs = {split: _extract(data, split, stores) for split in ("train", "val")}
    return {"data": data, "stores": stores, "jobs": jobs}


@pytest.mark.parametrize("version, message", [(99, "newer maxa"), (2.5, "unreadable store format"),
                                              (1, "maxa stores upgrade")])
def test_format_version_is_checked_on_every_open(small_pair, version, message):
    path = small_pair["jobs"]["train"].features.path
    _set_meta(path, format_version=version)
    with pytest.raises(StoreError, match=message):
        open_features(path)
    with pytest.raises(StoreError, match=message):  # extract would have reused it
        _extract(small_pair["data"], "train", small_pair["stores"])
    with pytest.raises(StoreError, match=message):
        train_probe(path, ProbeConfig(**QUICK), device="cpu", show_progress=False)
    assert any(message in p for p in verify_store(path).problems)
    listing = runner.invoke(app, ["stores", "ls", str(small_pair["stores"]), "--json"])
    assert listing.exit_code == 0
    assert {r["path"]: r["format"] for r in json.loads(listing.stdout)}[path] == version


def test_upgrade_brings_a_format_1_store_to_the_current_key(small_pair, tmp_path):
    job = small_pair["jobs"]["train"]
    old_features, old_targets = job.features.path, job.targets.path
    for p in (old_features, old_targets):
        _as_format_1(p)
    # format 1 named the store after its format-1 key
    key1 = read_attrs(old_features)["key"]
    named_1 = str(Path(old_features).with_name(f"segfolder-train-{key1}.zarr"))
    shutil.move(old_features, named_1)
    result = runner.invoke(app, ["stores", "upgrade", named_1, "--root", str(small_pair["data"])])
    assert result.exit_code == 0, result.output
    assert not Path(named_1).exists() and Path(old_features).is_dir()  # moved to the current key's name
    assert upgrade_store(old_targets, small_pair["data"]) == old_targets
    assert upgrade_store(old_targets, small_pair["data"]) == old_targets  # once current, nothing to do
    fs = open_features(old_features)
    assert fs.spec.format_version == FORMAT_VERSION and fs.meta["upgraded"]["from_format"] == 1
    again = _extract(small_pair["data"], "train", small_pair["stores"])
    assert again.features.reused and again.targets.reused


def test_upgrade_refuses_another_dataset(small_pair, tmp_path):
    path = small_pair["jobs"]["train"].features.path
    _as_format_1(path)
    other = _segfolder(tmp_path / "other", {"train": _names("x", 6)})
    with pytest.raises(StoreError, match="does not list the 6 images"):
        upgrade_store(path, other)


# -- 3. images recorded as bad -------------------------------------------------------------------------
def _garble(path: Path) -> None:
    """Make the file undecodable without changing its size (a size change is another dataset)."""
    path.write_bytes(bytes(len(path.read_bytes())))


def test_bad_images_are_excluded_counted_and_not_silently_reused(small_pair, tmp_path):
    data, stores = small_pair["data"], small_pair["stores"]
    bad_file = data / "train" / "t002.png"
    good = bad_file.read_bytes()
    _garble(bad_file)
    with pytest.raises(MaxaError, match="t002"):  # the strict run refuses the file
        run_extract(backbone="test_vit", dataset="segfolder", root=data, split="train", store_root=tmp_path / "s2",
                    dataset_options={"num_classes": 3}, **FAST)
    job = run_extract(backbone="test_vit", dataset="segfolder", root=data, split="train", store_root=tmp_path / "s2",
                      dataset_options={"num_classes": 3}, skip_bad=True, **FAST)
    shutil.copytree(small_pair["jobs"]["val"].features.path,
                    tmp_path / "s2" / Path(small_pair["jobs"]["val"].features.path).relative_to(stores))
    shutil.copytree(small_pair["jobs"]["val"].targets.path,
                    tmp_path / "s2" / Path(small_pair["jobs"]["val"].targets.path).relative_to(stores))
    fs = open_features(job.features.path)
    assert fs.bad.tolist() == [2] and fs.meta["num_bad"] == 1
    r = train_probe(job.features.path, ProbeConfig(**QUICK), device="cpu", show_progress=False)
    assert r.record["train_bad_excluded"] == 1 and r.record["eval_bad_excluded"] == 0
    assert r.record["train_images"] + r.record["val_images"] == 5
    # shown where stores are listed, inspected and verified
    ls = runner.invoke(app, ["stores", "ls", str(tmp_path / "s2"), "--json"])
    assert {row["path"]: row["bad_images"] for row in json.loads(ls.stdout)}[job.features.path] == 1
    info = runner.invoke(app, ["stores", "info", job.features.path, "--json"])
    assert json.loads(info.stdout)["bad_images"] == 1
    report = verify_store(job.features.path)
    assert report.ok and report.bad_images == 1 and report.bad_image_ids == ["t002"]
    shown = runner.invoke(app, ["stores", "verify", job.features.path])
    text = " ".join(shown.stdout.split())
    assert shown.exit_code == 0 and "1 image(s) recorded as bad" in text and "t002" in text
    # without --skip-bad the store is not reused as if it were whole
    with pytest.raises(StoreError, match="--skip-bad"):
        run_extract(backbone="test_vit", dataset="segfolder", root=data, split="train", store_root=tmp_path / "s2",
                    dataset_options={"num_classes": 3}, **FAST)
    again = run_extract(backbone="test_vit", dataset="segfolder", root=data, split="train", store_root=tmp_path / "s2",
                        dataset_options={"num_classes": 3}, skip_bad=True, **FAST)
    assert again.features.reused  # the file is still bad: the store is still right
    bad_file.write_bytes(good)  # repaired: the zeros in the store are now stale
    with pytest.raises(StoreError, match="decodes now"):
        run_extract(backbone="test_vit", dataset="segfolder", root=data, split="train", store_root=tmp_path / "s2",
                    dataset_options={"num_classes": 3}, skip_bad=True, **FAST)


# -- 5. an adapter on another backbone's features --------------------------------------------------------
def test_predict_refuses_another_backbones_store(small_pair, tmp_path):
    r = train_probe(small_pair["jobs"]["train"].features.path, ProbeConfig(**QUICK), device="cpu",
                    show_progress=False)
    convnext = _extract(small_pair["data"], "val", small_pair["stores"], backbone="test_convnext").features.path
    with pytest.raises(MaxaError, match="is not what the adapter"):
        predict(r.run_dir, convnext, 0, (32, 32))
    out, _ = predict(r.run_dir, small_pair["jobs"]["val"].features.path, 0, (32, 32))
    assert out.shape == (3, 32, 32)
    # same shapes and backbone, other weights (a checkpoint file): refused as well
    import timm
    import torch

    model = timm.create_model("test_vit", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "other.pth")
    other = _extract(small_pair["data"], "val", small_pair["stores"], weights=str(tmp_path / "other.pth"))
    assert open_features(other.features.path).spec.layers == open_features(
        small_pair["jobs"]["val"].features.path).spec.layers
    with pytest.raises(MaxaError, match="is not what the adapter"):
        predict(r.run_dir, other.features.path, 0, (32, 32))


# -- 6. instance discrimination selects an epoch that generalises ------------------------------------------
def test_instances_select_on_held_out_images_and_improve(tmp_path):
    paths = make_instance_root(tmp_path, n_train=64, n_val=16)
    cfg = dict(task="instances", batch_size=8, patience=30, lr=3e-3, task_options={"min_large": 2, "kmeans_runs": 8})
    one = train_probe(paths["train"], ProbeConfig(max_epochs=1, **cfg), device="cpu", show_progress=False)
    many = train_probe(paths["train"], ProbeConfig(max_epochs=20, **cfg), device="cpu", show_progress=False)
    assert many.record["selection"] == "val_ari"
    assert many.record["best_epoch"] > 5, many.record["best_epoch"]
    assert many.metrics["ari"] > one.metrics["ari"] + 10, (one.metrics, many.metrics)


# -- 11. options and the results root are checked before training ------------------------------------------
@pytest.mark.parametrize("lr", [-1.0, 0.0, math.nan, math.inf, 5.0])
def test_learning_rate_is_validated(lr):
    with pytest.raises(MaxaError, match="--lr"):
        ProbeConfig(task="semseg", lr=lr)


def test_unwritable_results_root_is_refused_before_training(small_pair, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the results root should be")
    lines: list[str] = []
    with pytest.raises(MaxaError, match="--results-root"):
        train_probe(small_pair["jobs"]["train"].features.path, ProbeConfig(**QUICK), results_root=str(blocked),
                    device="cpu", log=lines.append)
    assert not any("epoch" in line for line in lines)


def test_cli_lr_nan_is_one_line(small_pair):
    result = runner.invoke(app, ["probe", "--store", small_pair["jobs"]["train"].features.path, "--task", "semseg",
                                 "--lr", "nan"])
    assert result.exit_code == 2 and "bug in maxa" not in result.output and "--lr" in result.output
