"""The storage contract: every operation maxa does on a store root behaves the same on a local
folder, an in-memory fsspec filesystem and an S3 server (moto). A new kind of root passes this
suite before anything else uses it."""

from __future__ import annotations

import pickle
import uuid

import numpy as np
import pytest

from store import ArrayDef, StoreWriter, as_location, list_stores, open_store, remove_store, verify_store
from store.catalogue import store_root_of
from store.lease import StoreLease, lease_location, read_lease
from store.location import FsspecLocation, LocalLocation, Location
from store.results import append_result, read_results, read_run_file, run_location, write_run_files

ROOTS = ["local", "memory", "s3"]


@pytest.fixture(params=ROOTS)
def root(request, tmp_path) -> Location:
    tag = uuid.uuid4().hex[:8]
    if request.param == "local":
        return as_location(tmp_path / "root")
    if request.param == "memory":
        return as_location(f"memory://maxa-{tag}")
    request.getfixturevalue("s3")
    return as_location(f"s3://lab/contract-{tag}")


def test_kind_and_naming(root):
    assert isinstance(root, LocalLocation if not str(root).count("://") else FsspecLocation)
    child = root / "a/b.zarr"
    assert str(child) == str(root.join("a", "b.zarr")) and child.name == "b.zarr"
    assert child.parent.parent == root and child.relative_to(root).replace("\\", "/") == "a/b.zarr"
    assert str(child.with_suffix_added(".lease")) == str(child) + ".lease"
    assert child == str(child) and hash(child) == hash(str(child))
    assert pickle.loads(pickle.dumps(child)) == child


def test_bytes(root):
    f = root / "d/x.bin"
    assert f.read_bytes() is None and not f.exists() and not f.isfile()
    f.write_bytes(b"one")
    assert f.read_bytes() == b"one" and f.exists() and f.isfile() and not f.isdir()
    assert root.join("d").isdir()
    f.write_bytes(b"two")  # replaced whole
    assert f.read_bytes() == b"two"
    f.delete()
    f.delete()  # absent: nothing to do
    assert f.read_bytes() is None


def test_write_buffers(root):
    f = root / "d/w.bin"
    pieces = [bytes([k % 251]) * (k % 7) for k in range(2500)]  # more than one writev's worth, some empty
    pieces.append(np.arange(1000, dtype="<u4"))
    f.write_buffers(pieces)
    assert f.read_bytes() == b"".join(pieces)
    f.write_buffers([b"two"])  # replaced whole
    assert f.read_bytes() == b"two" and root.partial_files() == []


def test_read_ranges(root):
    f = root / "d/r.bin"
    assert f.read_ranges([(0, 4)]) is None
    data = bytes(range(200))
    f.write_bytes(data)
    got = f.read_ranges([(0, 10), (150, 20), (-16, 16), (-30, 5), (190, 50), (5, 0)])
    assert got == [data[:10], data[150:170], data[-16:], data[-30:-25], data[190:], b""]
    assert f.read_ranges([]) == []
    bufs = [bytearray(7), np.zeros(3, np.uint8), bytearray(0), np.zeros((2, 5), np.uint8)]
    assert f.read_into(100, bufs) == 20
    assert b"".join(bytes(b) for b in bufs) == data[100:120]
    tail = [bytearray(8), bytearray(8)]
    assert f.read_into(192, tail) == 8 and bytes(tail[0]) == data[192:]
    assert (root / "d/none.bin").read_into(0, [bytearray(1)]) is None


def test_reader_serves_several_threads(root):
    from concurrent.futures import ThreadPoolExecutor

    f = root / "d/p.bin"
    with f.reader() as read:
        assert read is None
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
    f.write_bytes(data.tobytes())
    with f.reader() as read:
        def one(k: int) -> bool:
            a, b = np.zeros(k % 13, np.uint8), bytearray(40)
            return read(k * 50, [a, b]) == min(len(a) + 40, 5000 - k * 50) and \
                bytes(a) + bytes(b)[:max(0, 5000 - k * 50 - len(a))] == data[k * 50:k * 50 + len(a) + 40].tobytes()
        with ThreadPoolExecutor(4) as ex:
            assert all(ex.map(one, range(100)))


def test_exclusive_create(root):
    f = root / "lease"
    assert f.create(b"first")
    assert not f.create(b"second")
    assert f.read_bytes() == b"first"


def test_listing_size_and_removal(root):
    for name, data in [("s/b.parquet", b"bb"), ("s/a.parquet", b"a"), ("s/c.txt", b"ccc"), ("s/sub/d.parquet", b"dddd")]:
        (root / name).write_bytes(data)
    s = root / "s"
    assert s.children() == [("a.parquet", False), ("b.parquet", False), ("c.txt", False), ("sub", True)]
    assert [g.name for g in s.glob("*.parquet")] == ["a.parquet", "b.parquet"]
    assert s.tree_bytes() == 10
    assert sorted(f.relative_to(s).replace("\\", "/") for f in s.files()) == ["a.parquet", "b.parquet", "c.txt",
                                                                                "sub/d.parquet"]
    assert (root / "nothing").children() == [] and (root / "nothing").glob("*") == []
    moved = root / "t"
    s.move_to(moved)
    assert not s.exists() and (moved / "sub/d.parquet").read_bytes() == b"dddd"
    moved.remove_tree()
    assert not moved.exists()


def test_zarr_group(root):
    def populate(g):
        g.create_array("x", shape=(3,), dtype="uint8", fill_value=0)
        g.attrs["mark"] = 1

    loc = root / "g.zarr"
    assert loc.create_group(populate)
    g = loc.open_group("r+")
    g["x"][:] = np.arange(3, dtype="uint8")
    again = loc.open_group("r")
    assert again.attrs["mark"] == 1 and again["x"][:].tolist() == [0, 1, 2]
    assert loc.partial_files() == []


def _write_store(path, ids=("a", "b", "c")):
    w = StoreWriter(path, kind="targets", key="k1", spec={"dataset": "d", "split": "train"},
                    arrays=[ArrayDef("y", (2,), "float32", ("c",))], image_ids=list(ids), shard_size=2).open()
    for shard in w.missing_shards():
        start, stop = w.shard_range(shard)
        w.write_shard(shard, {"y": np.arange(start * 2, stop * 2, dtype="float32").reshape(-1, 2)})
    w.finalize()
    return w


def test_store_lifecycle(root):
    path = root.join("targets", "d-train-k1.zarr")
    _write_store(path)
    assert not lease_location(path).exists()  # released when complete
    s = open_store(path)
    assert s.complete and s.image_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(s.read_all("y"), np.arange(6, dtype="float32").reshape(3, 2))
    assert s.nbytes_stored() > 0
    assert verify_store(path).ok
    rows = list_stores(root)
    assert [r["path"] for r in rows] == [str(path)] and rows[0]["bytes"] > 0
    assert store_root_of(path) == root
    remove_store(path)
    assert list_stores(root) == [] and not path.exists()


def test_lease_is_exclusive(root):
    path = root / "s.zarr"
    first, second = StoreLease(path), StoreLease(path)
    assert first.try_claim() and not second.try_claim()
    assert read_lease(path).uuid == first.info.uuid
    assert first.refresh()
    first.release()
    assert read_lease(path) is None and second.try_claim()
    second.release()


def test_results_and_runs(root):
    assert read_results(root) == []
    append_result(root, {"task": "depth", "metrics": {"rmse": 0.5}, "seed": 0})
    append_result(root, {"task": "boundaries", "metrics": {"iou": 40.0}, "seed": 1})
    got = read_results(root)
    assert sorted(r["task"] for r in got) == ["boundaries", "depth"]
    assert {r["task"]: r["metrics"] for r in got}["depth"] == {"rmse": 0.5}
    run = run_location(root, "timm:vit", "run-1")
    assert str(run).replace("\\", "/").endswith("runs/timm-vit/run-1")
    write_run_files(run, {"meta.json": b"{}", "adapter.pt": b"w"})
    assert read_run_file(run, "meta.json") == b"{}" and read_run_file(run, "missing") is None
