"""The store format: round trips, resume, identity, checksums, catalogue."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from store import (
    ArrayDef,
    FeatureSpec,
    LayerSpec,
    StoreError,
    StoreMismatchError,
    StoreWriter,
    TargetSpec,
    check_aligned,
    feature_store_path,
    list_stores,
    open_features,
    open_targets,
    verify_store,
)


def make_spec(n: int = 10, grid=(4, 5), channels: int = 6, **kw) -> FeatureSpec:
    base = dict(
        backbone="timm:test_vit", timm_name="test_vit", weights_id="random:seed0", input_size=(64, 80),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
        layers=(LayerSpec(name="last", grid=grid, channels=channels, stride=(16, 16)),),
        dataset="shapes", split="val", num_images=n, image_ids_hash="abc",
    )
    base.update(kw)
    return FeatureSpec(**base)


def make_writer(root: Path, spec: FeatureSpec, shard_size: int = 4, compression: str = "none",
                direct_writes: bool = True) -> StoreWriter:
    layer = spec.layers[0]
    return StoreWriter(
        feature_store_path(root, spec), kind="features", key=spec.key, spec=spec.to_dict(),
        arrays=[ArrayDef("features/last", (*layer.grid, layer.channels), "float16", ("y", "x", "c"))],
        image_ids=[f"img{i}" for i in range(spec.num_images)], shard_size=shard_size, compression=compression,
        direct_writes=direct_writes,
    ).open()


def fill(writer: StoreWriter, data: np.ndarray, shards=None) -> None:
    for s in shards if shards is not None else writer.missing_shards():
        a, b = writer.shard_range(s)
        writer.write_shard(s, {"features/last": data[a:b]})


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((10, 4, 5, 6)).astype(np.float16)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip(tmp_path, data, compression):
    spec = make_spec()
    w = make_writer(tmp_path, spec, compression=compression)
    assert w.num_shards == 3 and w.missing_shards() == [0, 1, 2]
    fill(w, data)
    w.finalize()
    fs = open_features(w.path)
    assert len(fs) == 10 and fs.spec == spec and fs.key == spec.key
    np.testing.assert_array_equal(fs[3], data[3])
    idx = [7, 1, 1, 9]
    np.testing.assert_array_equal(fs.read_batch(idx), data[idx])
    np.testing.assert_array_equal(fs.read_batch(range(2, 8)), data[2:8])
    np.testing.assert_array_equal(fs.read_all(), data)
    assert fs.image_ids == [f"img{i}" for i in range(10)]
    centres = fs.token_centres()
    assert centres.shape == (4, 5, 2)
    np.testing.assert_allclose(centres[0, 0], [0.125, 0.1])
    np.testing.assert_allclose(centres[3, 4], [0.875, 0.9])


def test_plain_zarr_can_read(tmp_path, data):
    w = make_writer(tmp_path, make_spec())
    fill(w, data)
    w.finalize()
    g = zarr.open_group(w.path, mode="r")
    arr = g["features/last"]
    assert arr.shape == (10, 4, 5, 6) and arr.dtype == np.float16
    assert arr.chunks == (1, 4, 5, 6) and arr.shards == (4, 4, 5, 6)
    np.testing.assert_array_equal(arr[5], data[5])
    assert g.attrs["maxa"]["complete"] is True
    assert g.attrs["maxa"]["spec"]["layers"][0]["token_centres"][0][0] == [0.125, 0.1]


def test_incomplete_refused_then_resumed(tmp_path, data):
    spec = make_spec()
    w = make_writer(tmp_path, spec)
    fill(w, data, shards=[0, 2])
    with pytest.raises(StoreError, match="incomplete"):
        open_features(w.path)
    assert open_features(w.path, allow_incomplete=True).shard_done().tolist() == [True, False, True]
    with pytest.raises(StoreError, match="not written"):
        w.finalize()
    w2 = make_writer(tmp_path, spec)  # a new process resuming
    assert not w2.complete and w2.missing_shards() == [1]
    fill(w2, data)
    w2.finalize()
    np.testing.assert_array_equal(open_features(w.path).read_all(), data)
    assert make_writer(tmp_path, spec).complete  # same key → the same, complete store


def test_key_depends_on_identity_not_centres():
    a = make_spec()
    assert make_spec().key == a.key
    assert make_spec(weights_id="random:seed1").key != a.key
    assert make_spec(image_ids_hash="other").key != a.key
    assert make_spec(input_size=(64, 64)).key != a.key
    assert FeatureSpec.from_dict(a.to_dict()) == a


def test_path_holding_something_else(tmp_path, data):
    spec = make_spec()
    path = Path(feature_store_path(tmp_path, spec))
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not a maxa store"):
        make_writer(tmp_path, spec)
    other = make_spec(weights_id="x")
    w = make_writer(tmp_path / "b", other)
    os.rename(w.path, tmp_path / "b" / "moved.zarr")
    with pytest.raises(StoreError, match="holds another store"):
        StoreWriter(tmp_path / "b" / "moved.zarr", kind="features", key=spec.key, spec=spec.to_dict(),
                    arrays=[], image_ids=["a"], shard_size=1).open()


def test_verify_detects_flipped_byte(tmp_path, data):
    w = make_writer(tmp_path, make_spec())
    fill(w, data)
    w.finalize()
    assert verify_store(w.path).ok
    shard_file = Path(w.path) / "features" / "last" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[100] ^= 0xFF  # inside the first image chunk of shard 1
    shard_file.write_bytes(bytes(raw))
    report = verify_store(w.path)
    assert not report.ok
    assert any("images 4..7" in p for p in report.problems)
    with pytest.raises(Exception):
        open_features(w.path)[4]


def test_targets_alignment_check(tmp_path, data):
    fspec = make_spec()
    w = make_writer(tmp_path, fspec)
    fill(w, data)
    w.finalize()
    for ids_hash, expect_ok in (("abc", True), ("zzz", False)):
        tspec = TargetSpec(dataset="shapes", split="val", kinds=("semantic",), num_images=10, image_ids_hash=ids_hash)
        tw = StoreWriter(tmp_path / f"t-{ids_hash}.zarr", kind="targets", key=tspec.key, spec=tspec.to_dict(),
                         arrays=[ArrayDef("semantic", (8, 8), "uint8", ("y", "x"))],
                         image_ids=[str(i) for i in range(10)], shard_size=5, compression="zstd").open()
        for s in tw.missing_shards():
            tw.write_shard(s, {"semantic": np.full((5, 8, 8), s, np.uint8)})
        tw.finalize()
        ts = open_targets(tw.path)
        assert ts.read("semantic", [0, 9])[:, 0, 0].tolist() == [0, 1]
        if expect_ok:
            check_aligned(open_features(w.path), ts)
        else:
            with pytest.raises(StoreMismatchError, match="index different images"):
                check_aligned(open_features(w.path), ts)


def test_catalogue_lists_stores(tmp_path, data):
    w = make_writer(tmp_path, make_spec())
    fill(w, data)
    w.finalize()
    w2 = make_writer(tmp_path, make_spec(split="train"))
    fill(w2, data, shards=[0])
    rows = {r["split"]: r for r in list_stores(tmp_path)}
    assert set(rows) == {"val", "train"}
    assert rows["val"]["complete"] and not rows["train"]["complete"]
    assert rows["val"]["backbone"] == "timm:test_vit" and rows["val"]["images"] == 10
    assert rows["val"]["grid"] == "last 4x5x6" and rows["val"]["bytes"] > data.nbytes


def test_empty_store_refused(tmp_path):
    with pytest.raises(StoreError, match="empty"):
        StoreWriter(tmp_path / "x.zarr", kind="features", key="k", spec={}, arrays=[], image_ids=[], shard_size=1)
