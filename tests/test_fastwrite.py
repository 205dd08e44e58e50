"""The direct shard writer (store.fastwrite) writes exactly the files zarr-python writes, byte for byte.

Two stores with the same arrays and values, one written by ``StoreWriter`` as it is (per-image
arrays through ``store.fastwrite``), one with the direct path switched off (every array assigned
through zarr-python): every data file is compared, for compression none and zstd, the dtypes that
stores hold, full and partial last shards, images equal to the fill value, a shard with no image
at all, on a local folder and an in-memory fsspec filesystem. Then: the stores open with plain
``zarr.open_group``, a rewritten shard replaces the old file, and a failed write leaves the shard
unflagged with no file changed.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from store import ArrayDef, StoreError, StoreWriter, as_location, open_store, verify_store
from store.fastwrite import ShardWriter
from store.location import Location
from store.spec import TargetSpec

N, SHARD = 21, 8  # shards 0..7, 8..15 and a partial 16..20
ARRAYS = [
    ArrayDef("features/last", (3, 4, 5), "float16", ("y", "x", "c")),
    ArrayDef("instances", (6, 7), "uint16", ("y", "x")),
    ArrayDef("semantic", (6, 7), "uint8", ("y", "x")),
    ArrayDef("depth", (6, 7), "float32", ("y", "x")),
    ArrayDef("instance_count", (), "int32", chunk_per_image=False),  # one chunk per shard: zarr's
]
DIRECT = {a.name for a in ARRAYS if a.chunk_per_image}


def _root(where: str, tmp_path: Path) -> Location:
    return as_location(tmp_path / "root") if where == "local" else as_location(f"memory://fastwrite-{uuid.uuid4().hex[:8]}")


def _values(n: int = N, *, empty_shard: bool = False) -> dict[str, np.ndarray]:
    """Every bit pattern of each dtype, with images equal to the fill value (all zero bytes), a
    float image of negative zeros (not the fill value for zarr), optionally a shard of zeros."""
    rng = np.random.default_rng(3)
    out = {}
    for a in ARRAYS:
        dtype = np.dtype(a.dtype)
        raw = rng.integers(0, 256, size=(n, *a.shape, dtype.itemsize), dtype=np.uint8)
        v = raw.view(dtype).reshape(n, *a.shape).copy()
        v[2] = 0
        v[N - 1] = 0
        if dtype.kind == "f":
            v[5] = -0.0
        if empty_shard:
            v[SHARD:2 * SHARD] = 0
        out[a.name] = v
    return out


def _writer(path: Location, compression: str, *, direct: bool = True) -> StoreWriter:
    spec = TargetSpec(dataset="d", dataset_id="d", split="train", size=(6, 7), kinds=("semantic",), num_images=N,
                      image_ids_hash="h", num_classes=4)
    w = StoreWriter(path, kind="targets", key=spec.key, spec=spec.to_dict(), arrays=ARRAYS,
                    image_ids=[f"i{k}" for k in range(N)], shard_size=SHARD, compression=compression,
                    direct_writes=direct).open()  # direct=False: every array through zarr-python
    assert set(w._shard_writers) == (DIRECT if direct else set())
    return w


def _write(w: StoreWriter, values: dict[str, np.ndarray], shards=None) -> None:
    for s in shards if shards is not None else w.missing_shards():
        a, b = w.shard_range(s)
        w.write_shard(s, {k: v[a:b] for k, v in values.items()})


def _data_files(path: Location) -> dict[str, bytes]:
    """Every file of the store but its metadata (whose attributes carry creation times)."""
    return {f.relative_to(path).replace("\\", "/"): f.read_bytes() for f in path.files()
            if f.name != "zarr.json"}


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("empty_shard", [False, True], ids=["", "empty-shard"])
def test_files_equal_zarr_python(tmp_path, where, compression, empty_shard):
    root = _root(where, tmp_path)
    values = _values(empty_shard=empty_shard)
    fast, slow = _writer(root / "fast.zarr", compression), _writer(root / "zarr.zarr", compression, direct=False)
    _write(fast, values)
    _write(slow, values)
    got, want = _data_files(fast.location), _data_files(slow.location)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key
    if where == "local":  # the same permissions too (a shared root keeps its group bits)
        for key in want:
            assert os.stat(fast.location / key).st_mode == os.stat(slow.location / key).st_mode, key
    shard_files = [k for k in want if k.startswith("semantic/c/")]
    assert len(shard_files) == (2 if empty_shard else 3)  # a shard with no image is no file
    for w in (fast, slow):
        w.finalize()
    assert fast.location.partial_files() == []


def test_zstd_shard_encoded_in_blocks_on_worker_threads_equals_zarr_python(tmp_path, monkeypatch):
    """A zstd shard big enough is compressed in blocks on the worker threads: still zarr's bytes, in order."""
    import store.fastwrite as fw
    from store.fastread import _pool

    if _pool() is None:
        pytest.skip("one core: shards are compressed on the writing thread only")
    monkeypatch.setattr(fw, "_ZSTD_BLOCK", 2)  # 8-image shards: 4 blocks each
    calls = []
    real = fw.ShardWriter._compressed
    monkeypatch.setattr(fw.ShardWriter, "_compressed", lambda self, rows, images: calls.append(len(images)) or real(self, rows, images))
    values = _values()
    fast, slow = _writer(as_location(tmp_path / "fast.zarr"), "zstd"), _writer(as_location(tmp_path / "zarr.zarr"), "zstd", direct=False)
    _write(fast, values)
    _write(slow, values)
    assert max(calls) >= 4  # the block path ran
    assert _data_files(fast.location) == _data_files(slow.location)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_plain_zarr_reads_it(tmp_path, compression):
    values = _values()
    w = _writer(as_location(tmp_path / "s.zarr"), compression)
    _write(w, values)
    w.finalize()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    store = open_store(tmp_path / "s.zarr")
    for name, v in values.items():
        np.testing.assert_array_equal(np.asarray(group[name][...]).view(np.uint8), v.view(np.uint8))
        if "/" not in name:  # a target store names its top-level arrays only
            np.testing.assert_array_equal(store.read_all(name).view(np.uint8), v.view(np.uint8))
    report = verify_store(tmp_path / "s.zarr")  # every chunk's checksum; the random bits hold NaNs
    assert report.shards_done == 3 and all("non-finite" in p for p in report.problems)


def test_rewrite_replaces_the_shard(tmp_path):
    """A re-run over an unflagged shard (a writer killed after its file, before its flag) replaces
    the file whole, including with no file where every image is now the fill value."""
    path = as_location(tmp_path / "s.zarr")
    w = _writer(path, "zstd")
    old = _values()
    _write(w, old, shards=[0, 1])
    new = {k: v.copy() for k, v in old.items()}
    for v in new.values():
        v[:SHARD] = v[SHARD:2 * SHARD][::-1]
        v[SHARD:2 * SHARD] = 0
    _write(w, new, shards=[0, 1, 2])
    ref = _writer(as_location(tmp_path / "ref.zarr"), "zstd", direct=False)
    _write(ref, new)
    assert _data_files(path) == _data_files(ref.location)
    assert not (path / "semantic/c/1/0/0").exists()


def test_failed_write_leaves_shard_unflagged(tmp_path, monkeypatch):
    path = as_location(tmp_path / "s.zarr")
    w = _writer(path, "none")
    values = _values()
    _write(w, values, shards=[0])
    before = _data_files(path)
    calls = []

    def full(fd, buffers):
        calls.append(len(buffers))
        if len(calls) > 1:  # the shard's second write: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, buffers[0])  # a short write first: the rest goes on where it stopped

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(StoreError, match="cannot write .*array features/last, shard 1.*No space left"):
        _write(w, values, shards=[1])
    monkeypatch.undo()
    assert w.missing_shards() == [1, 2]
    assert _data_files(path) == before and path.partial_files() == []
    _write(w, values)  # the re-run
    ref = _writer(as_location(tmp_path / "ref.zarr"), "none", direct=False)
    _write(ref, values)
    assert _data_files(path) == _data_files(ref.location)


def test_other_layouts_go_through_zarr(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    loc = as_location(tmp_path / "g.zarr")
    kw = dict(shape=(4, 3), chunks=(1, 3), dtype="uint8", compressors=[ZstdCodec(level=1), Crc32cCodec()])
    unsharded = g.create_array("a", fill_value=0, **kw)
    filled = g.create_array("b", shards=(2, 3), fill_value=7, **kw)
    default_codecs = g.create_array("d", shape=(4, 3), chunks=(1, 3), shards=(2, 3), dtype="uint8", fill_value=0)
    ours = g.create_array("c", shards=(2, 3), fill_value=0, **kw)
    for name, arr in [("a", unsharded), ("b", filled), ("d", default_codecs)]:
        assert ShardWriter.of(loc, name, arr) is None, name
    w = ShardWriter.of(loc, "c", ours)
    assert w is not None and w.fits(1, np.zeros((2, 3), np.uint8))
    assert not w.fits(1, np.zeros((1, 3), np.uint8)) and not w.fits(2, np.zeros((2, 3), np.uint8))
