"""xarray and dask open every store: real stores written by maxa's extract path, opened with real xarray.

Plain ``xr.open_zarr`` (root, ``group="features"``, ``group="feature_scales"``) and
``xr.open_datatree`` give named dimensions, the image-id coordinate and the spec in the attributes,
for a feature store with two layers of different grids, a target store, an int8 store, a store of
the old layout after ``maxa stores upgrade`` (metadata only: no shard file touched) and a store on
S3 (moto). The reader's dask view has one chunk per shard and the reader's values; consolidated
metadata is written at completion and never hides the true state of a store.
"""

from __future__ import annotations

import json
import pickle

import dask
import fsspec
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

xr = pytest.importorskip("xarray")

from extract.jobs import run_extract  # noqa: E402
from pipelines.cli import app  # noqa: E402
from pipelines.upgrade import upgrade_store  # noqa: E402
from runtime.errors import StoreError  # noqa: E402
from store import StoreWriter, feature_arrays, open_features, open_targets, verify_store  # noqa: E402

from conftest import S3_BUCKET  # noqa: E402

runner = CliRunner()
N, SHARD = 10, 4  # shards of 4, 4 and 2 images


def _extract(root, backbone="test_convnext", **kw):
    opts = dict(layers=(2, 3)) if backbone == "test_convnext" else {}
    return run_extract(backbone=backbone, dataset="shapes", split="train", store_root=root, weights="random",
                       device="cpu", dataset_options={"num_images": N}, num_workers=0, show_progress=False,
                       shard_size=SHARD, **{**opts, **kw})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    job = _extract(root)
    lossy = _extract(root, backbone="test_vit", compression="int8", targets=False)
    return {"root": root, "features": job.features.path, "targets": job.targets.path, "int8": lossy.features.path}


def _assert_dims_and_ids(ds, store) -> None:
    assert ds.sizes["image"] == len(store)
    assert [str(i) for i in ds["image_id"].values] == store.image_ids
    assert "image_id" in ds.coords and ds["image_id"].dims == ("image",)


# -- plain xarray ---------------------------------------------------------------------------------
def test_feature_store_opens_with_plain_xarray(stores):
    fs = open_features(stores["features"])
    assert [l.grid for l in fs.spec.layers] == [(10, 10), (5, 5)]  # two grids in one group
    root = xr.open_zarr(stores["features"])
    _assert_dims_and_ids(root, fs)
    assert root["bad"].dims == ("image",) and root["shard_done"].dims == ("shard",)
    assert root["shard_done"].values.tolist() == [1, 1, 1]
    assert root.attrs["maxa"]["spec"] == fs.meta["spec"] and root.attrs["maxa"]["complete"]
    feats = xr.open_zarr(stores["features"], group="features")
    _assert_dims_and_ids(feats, fs)
    assert feats.attrs["spec"] == fs.meta["spec"] and feats.attrs["key"] == fs.key
    assert set(feats.data_vars) == set(fs.spec.layer_names)
    for layer in fs.spec.layers:
        var = feats[layer.name]
        assert var.dims == ("image", f"y_{layer.name}", f"x_{layer.name}", f"c_{layer.name}")
        assert var.shape == (N, *layer.grid, layer.channels)
        np.testing.assert_array_equal(var.values, fs.read_all(layer.name))
    # selecting by image id, as xarray users do
    by_id = feats.set_xindex("image_id").sel(image_id=fs.image_ids[7])
    np.testing.assert_array_equal(by_id["stage3"].values, fs.read(7, "stage3"))


def test_feature_store_opens_as_a_datatree(stores):
    fs = open_features(stores["features"])
    tree = xr.open_datatree(stores["features"], engine="zarr")
    assert tree.attrs["maxa"]["key"] == fs.key
    feats = tree["features"].to_dataset()
    assert [str(i) for i in feats["image_id"].values] == fs.image_ids
    np.testing.assert_array_equal(feats["stage2"].values, fs.read_all("stage2"))


def test_target_store_opens_with_plain_xarray(stores):
    ts = open_targets(stores["targets"])
    ds = xr.open_zarr(stores["targets"])
    _assert_dims_and_ids(ds, ts)
    assert ds.attrs["maxa"]["spec"] == ts.meta["spec"]
    assert set(ts.array_names) <= set(ds.data_vars) and "image_id" not in ts.array_names
    for name in ts.array_names:
        assert ds[name].dims[0] == "image", name
        np.testing.assert_array_equal(ds[name].values, ts.read_all(name), err_msg=name)
    assert ds["instance_count"].dims == ("image",)
    assert ds["semantic"].dims == ("image", "y", "x") and ds["instance_area"].dims == ("image", "instance")


def test_int8_store_opens_and_dequantises(stores):
    fs = open_features(stores["int8"])
    assert fs.spec.lossy
    q = xr.open_zarr(stores["int8"], group="features")["last"]
    s = xr.open_zarr(stores["int8"], group="feature_scales")
    _assert_dims_and_ids(s, fs)
    assert q.dtype == np.int8 and s["last"].dims == ("image", "c_last")
    assert s.attrs["spec"]["quantization"] == "int8"
    # named dimensions broadcast the per-image, per-channel scales over the grid
    values = (q.astype("float32") * s["last"]).astype("float16")
    assert values.dims == q.dims
    np.testing.assert_array_equal(values.values, fs.read_all())
    np.testing.assert_array_equal(fs.to_xarray()["last"].values, fs.read_all())


# -- the reader's dask view -------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["features", "int8"])
def test_to_dask_has_one_chunk_per_shard(stores, which):
    fs = open_features(stores[which])
    num_shards = fs.meta["num_shards"]
    for layer in fs.spec.layer_names:
        d = fs.to_dask(layer)
        assert d.numblocks[0] == num_shards == 3 and d.chunks[0] == (4, 4, 2)
        assert d.numblocks[1:] == (1, 1, 1) and d.dtype == fs.layer_dtype(layer)
        want = fs.read_all(layer)
        np.testing.assert_array_equal(d.compute(scheduler="sync"), want)
        np.testing.assert_array_equal(d[3:7].compute(), want[3:7])  # across a shard boundary
        np.testing.assert_array_equal(d[[9, 1, 5]].compute(), want[[9, 1, 5]])
        np.testing.assert_array_equal(d[5, 1].compute(), want[5, 1])
        # the graph pickles (for dask workers) as the store's location, not its arrays
        blob = pickle.dumps(d)
        assert len(blob) < want.nbytes
        np.testing.assert_array_equal(pickle.loads(blob).compute(scheduler="sync"), want)


def test_dask_view_of_targets_and_xarray_views(stores):
    ts = open_targets(stores["targets"])
    d = ts.to_dask("distance")
    assert d.numblocks == (1, 1, 1)  # 10 images in a target shard of 256
    np.testing.assert_array_equal(d.compute(), ts.read_all("distance"))
    with pytest.raises(StoreError, match="no 'depthx' targets"):
        ts.to_dask("depthx")
    view, plain = ts.to_xarray(), xr.open_zarr(stores["targets"])
    assert set(view.data_vars) == set(ts.array_names)
    for name in ts.array_names:
        assert view[name].dims == plain[name].dims
        np.testing.assert_array_equal(view[name].values, plain[name].values)
    assert view.attrs["maxa"]["key"] == ts.key
    fs = open_features(stores["features"])
    view, plain = fs.to_xarray(), xr.open_zarr(stores["features"], group="features")
    assert view.attrs == plain.attrs
    for name in fs.spec.layer_names:
        assert view[name].dims == plain[name].dims and view[name].chunks[0] == (4, 4, 2)
    with dask.config.set(scheduler="sync"):
        assert float(abs(view["stage3"] - plain["stage3"]).max()) == 0.0


# -- consolidated metadata --------------------------------------------------------------------------
def _root_doc(path) -> dict:
    fs, p = fsspec.core.url_to_fs(str(path))
    return json.loads(fs.cat_file(f"{p}/zarr.json"))


def test_consolidated_at_completion_and_never_hiding_the_state(stores, tmp_path):
    consolidated = _root_doc(stores["features"])["consolidated_metadata"]["metadata"]
    assert consolidated["features/stage2"]["dimension_names"] == ["image", "y_stage2", "x_stage2", "c_stage2"]
    assert consolidated["image_id"]["dimension_names"] == ["image"]
    # an unfinished store: not consolidated, opens with xarray as it is, refused by the readers
    fs = open_features(stores["features"])
    arrays = feature_arrays(fs.spec)
    w = StoreWriter(tmp_path / "part.zarr", kind="features", key=fs.key, spec=fs.spec.to_dict(), arrays=arrays,
                    image_ids=fs.image_ids, shard_size=SHARD).open()
    w.write_shard(0, {a.name: fs.read_batch(range(0, 4), a.name.split("/")[1]) for a in arrays})
    w.close()
    assert "consolidated_metadata" not in _root_doc(tmp_path / "part.zarr")
    part = xr.open_zarr(tmp_path / "part.zarr", consolidated=False)
    assert part.attrs["maxa"]["complete"] is False and part["shard_done"].values.tolist() == [1, 0, 0]
    assert [str(i) for i in part["image_id"].values] == fs.image_ids
    part_features = xr.open_zarr(tmp_path / "part.zarr", group="features", consolidated=False)  # named at creation
    assert part_features["stage3"].dims == ("image", "y_stage3", "x_stage3", "c_stage3")
    np.testing.assert_array_equal(part_features["stage3"][:4].values, fs.read_batch(range(4), "stage3"))
    with pytest.raises(StoreError, match="incomplete"):
        open_features(tmp_path / "part.zarr")
    # finished by a re-run: consolidated; the completion mark is the root's own attribute, so
    # marking a consolidated store incomplete (what `maxa stores rm` does first) is seen at once
    w = StoreWriter(tmp_path / "part.zarr", kind="features", key=fs.key, spec=fs.spec.to_dict(), arrays=arrays,
                    image_ids=fs.image_ids, shard_size=SHARD).open()
    for shard in w.missing_shards():
        a, b = w.shard_range(shard)
        w.write_shard(shard, {x.name: fs.read_batch(range(a, b), x.name.split("/")[1]) for x in arrays})
    w.finalize()
    assert "consolidated_metadata" in _root_doc(tmp_path / "part.zarr")
    np.testing.assert_array_equal(open_features(tmp_path / "part.zarr").read_all("stage3"), fs.read_all("stage3"))
    group = zarr.open_group(str(tmp_path / "part.zarr"), mode="r+")
    group.attrs["maxa"] = {**group.attrs["maxa"], "complete": False}
    with pytest.raises(StoreError, match="incomplete"):
        open_features(tmp_path / "part.zarr")
    assert xr.open_zarr(tmp_path / "part.zarr").attrs["maxa"]["complete"] is False


def test_verify_checks_the_image_id_coordinate(stores, tmp_path):
    import shutil

    path = tmp_path / "copy.zarr"
    shutil.copytree(stores["features"], path)
    assert verify_store(path).ok
    arr = zarr.open_group(str(path), mode="r+", use_consolidated=False)["features/image_id"]
    ids = np.asarray(arr[:]).astype(object)
    arr[:] = ids[::-1].copy()
    report = verify_store(path)
    assert any("features/image_id" in p and "differ" in p for p in report.problems), report.problems


# -- stores of the old layout -------------------------------------------------------------------------
def _as_old_layout(url: str) -> None:
    """Rewrite a store's metadata as maxa wrote it before stores carried xarray's: features named
    ``y``/``x``/``c`` (``c`` for scales), no names on ``bad``, ``shard_done``, ``instance_count``, no
    ``image_id`` arrays, no sub-group attributes, no ``coordinates`` attribute, no consolidated metadata."""
    fs, root = fsspec.core.url_to_fs(url)

    def edit(key: str, change) -> None:
        doc = json.loads(fs.cat_file(f"{root}/{key}"))
        change(doc)
        fs.pipe_file(f"{root}/{key}", json.dumps(doc).encode())

    def old_dims(doc: dict, name: str) -> None:
        parent = name.rpartition("/")[0]
        if parent == "features":
            doc["dimension_names"] = ["image", "y", "x", "c"]
        elif parent == "feature_scales":
            doc["dimension_names"] = ["image", "c"]
        elif name in ("bad", "shard_done", "instance_count"):
            doc.pop("dimension_names", None)

    for path in fs.find(root):
        key = path[len(root.rstrip("/")) + 1:]
        if key.endswith("/zarr.json") and json.loads(fs.cat_file(path))["node_type"] == "array":
            name = key[: -len("/zarr.json")]
            if name.rpartition("/")[2] == "image_id":
                continue
            edit(key, lambda doc, name=name: old_dims(doc, name))
    for sub in ("image_id", "features/image_id", "feature_scales/image_id"):
        if fs.exists(f"{root}/{sub}"):
            fs.rm(f"{root}/{sub}", recursive=True)
    for sub in ("features", "feature_scales"):
        if fs.exists(f"{root}/{sub}/zarr.json"):
            edit(f"{sub}/zarr.json", lambda doc: doc.update(attributes={}))
    edit("zarr.json", lambda doc: (doc.pop("consolidated_metadata", None),
                                   doc["attributes"].pop("coordinates", None)))
    fs.invalidate_cache()
    type(fs).clear_instance_cache()  # zarr's own (asynchronous) filesystem of the URL lists afresh


def _data_files(url: str) -> dict[str, tuple[bytes, float]]:
    """Every file but metadata and image ids: bytes and modification time (local) or ETag."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    out = {}
    for path in fs.find(root):
        key = path[len(root.rstrip("/")) + 1:]
        if key.endswith("zarr.json") or key.split("/")[-3:-2] == ["image_id"] or "image_id/" in key:
            continue
        info = fs.info(path)
        out[key] = (fs.cat_file(path), info.get("mtime", info.get("ETag")))
    return out


@pytest.mark.parametrize("which", ["features", "targets", "int8"])
def test_old_layout_is_upgraded_in_metadata_only(stores, tmp_path, which):
    import shutil

    path = str(tmp_path / stores[which].rpartition("/")[2])  # its own name: the upgrade keeps it there
    shutil.copytree(stores[which], path)
    _as_old_layout(path)
    reader = open_features(path) if which != "targets" else open_targets(path)  # old stores read as before
    names = reader.spec.layer_names if which != "targets" else reader.array_names
    read = (lambda n: reader.read_all(n))
    before_values = {n: read(n) for n in names}
    with pytest.raises(KeyError, match="dimension_names"):  # `bad` has none: the issue this fixes
        xr.open_zarr(path, consolidated=False)
    view = reader.to_xarray()  # the reader's views need none of the new metadata
    for n in names:
        assert view[n].dims[0] == "image" and view[n].chunks[0] == reader.to_dask(n).chunks[0]
        np.testing.assert_array_equal(view[n].values, before_values[n])
    if which == "targets":
        assert view["instance_count"].dims == ("image",)
    before = _data_files(path)
    result = runner.invoke(app, ["stores", "upgrade", path])
    assert result.exit_code == 0, result.output
    assert "added for xarray" in result.output and "already current" not in result.output
    assert _data_files(path) == before  # no shard file rewritten (bytes and modification times)
    again = runner.invoke(app, ["stores", "upgrade", path])
    assert again.exit_code == 0 and "already current" in again.output, again.output
    # a store complete but never consolidated (killed between the mark and consolidation): consolidated
    doc = _root_doc(path)
    doc.pop("consolidated_metadata")
    (tmp_path / stores[which].rpartition("/")[2] / "zarr.json").write_text(json.dumps(doc))
    again = runner.invoke(app, ["stores", "upgrade", path])
    assert again.exit_code == 0 and "added for xarray: consolidated metadata" in again.output, again.output
    reader = open_features(path) if which != "targets" else open_targets(path)
    ds = xr.open_zarr(path, group="features" if which != "targets" else None)
    _assert_dims_and_ids(ds, reader)
    for n in names:
        np.testing.assert_array_equal(read(n), before_values[n])
        if which == "features":
            np.testing.assert_array_equal(ds[n].values, before_values[n])
    if which == "targets":
        assert ds["instance_count"].dims == ("image",)
    if which == "int8":
        assert xr.open_zarr(path, group="feature_scales")["last"].dims == ("image", "c_last")
    assert verify_store(path).ok
    assert "consolidated_metadata" in _root_doc(path)


# -- object storage --------------------------------------------------------------------------------
def test_s3_store_opens_with_xarray_and_upgrades(s3):
    url = f"s3://{S3_BUCKET}/xarray"
    job = _extract(url)
    fs_path = job.features.path
    assert fs_path.startswith("s3://")
    fs = open_features(fs_path)
    feats = xr.open_zarr(fs_path, group="features")
    _assert_dims_and_ids(feats, fs)
    assert feats.attrs["spec"] == fs.meta["spec"]
    np.testing.assert_array_equal(feats["stage3"].values, fs.read_all("stage3"))
    d = fs.to_dask("stage2")
    assert d.numblocks[0] == 3
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(d)).compute(scheduler="sync"), fs.read_all("stage2"))
    targets = xr.open_zarr(job.targets.path)
    np.testing.assert_array_equal(targets["semantic"].values, open_targets(job.targets.path).read_all("semantic"))
    # the old layout on S3, upgraded there
    _as_old_layout(fs_path)
    before = _data_files(fs_path)
    changes: list[str] = []
    assert upgrade_store(fs_path, None, changes.append) == fs_path and changes
    assert _data_files(fs_path) == before
    feats = xr.open_zarr(fs_path, group="features")
    assert feats["stage2"].dims == ("image", "y_stage2", "x_stage2", "c_stage2")
    assert "consolidated_metadata" in _root_doc(fs_path)
