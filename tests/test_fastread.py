"""The direct shard reader (store.fastread) gives exactly what zarr-python reads, bit for bit.

Stores written by the current writer, compression none and zstd, on a local folder and on an
in-memory fsspec filesystem, and stores written through zarr-python's own writer (as before
store.fastwrite): whole arrays, shard iteration, batches in random order, with
repeats and negative indices, a partial last shard, both ways of reading a shard (whole file or
the wanted chunks' byte ranges), unwritten shards (fill value), and damaged chunks (the same
one-line error as zarr's path, naming the image).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import store.fastread as fastread
from store import StoreError, as_location, open_features
from store.fastread import Damaged, ShardedArray

sys.path.insert(0, str(Path(__file__).parent))
from test_store import fill, make_spec, make_writer  # noqa: E402

N, SHARD = 37, 16  # shards 0..15, 16..31 and a partial 32..36
NAME = "features/last"


def _root(where: str, tmp_path: Path):
    return as_location(tmp_path) if where == "local" else as_location(f"memory://fastread-{uuid.uuid4().hex[:8]}")


def _data(n: int = N) -> np.ndarray:
    # every bit pattern matters: random halves, including NaNs, infinities and negative zeros
    return np.random.default_rng(1).integers(0, 2**16, size=(n, 4, 5, 6), dtype=np.uint16).view(np.float16)


def _zarr_read(path: str) -> np.ndarray:
    """What zarr-python itself reads."""
    return np.asarray(as_location(path).open_group("r")[NAME][...])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


@pytest.fixture(params=[("none", "local"), ("zstd", "local"), ("none", "memory"), ("zstd", "memory"),
                        ("none", "local", "zarr-python"), ("zstd", "local", "zarr-python")],
                ids=lambda p: "-".join(p))
def written(request, tmp_path) -> tuple[str, np.ndarray]:
    """A store, and the values written to it. "zarr-python": every shard written through zarr-python's
    own writer, as stores were written before ``store.fastwrite`` (what older stores on disk hold)."""
    compression, where, *through = request.param
    w = make_writer(_root(where, tmp_path), make_spec(n=N), shard_size=SHARD, compression=compression,
                    direct_writes=not through)
    assert bool(w._shard_writers) == (not through)
    data = _data()
    fill(w, data)
    w.finalize()
    return w.path, data


def test_fast_path_is_taken(written):
    path, _ = written
    fs = open_features(path)
    fast = fs._fast(NAME, fs._array(NAME))
    assert isinstance(fast, ShardedArray) and fast.per_shard == SHARD and fast.num_images == N
    assert ShardedArray.of(fs.location, "bad", fs._array("bad")) is None  # not sharded: zarr reads it


def test_read_all_and_shards_match_zarr(written):
    path, data = written
    ref = _zarr_read(path)
    assert np.array_equal(bits(ref), bits(data))
    fs = open_features(path)
    got = fs.read_all()
    assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(bits(got), bits(ref))
    shards = list(fs.layer_shards())
    assert [s for s, _ in shards] == [0, 16, 32] and [len(v) for _, v in shards] == [16, 16, 5]
    assert np.array_equal(bits(np.concatenate([v for _, v in shards])), bits(ref))


@pytest.mark.parametrize("whole", [None, 0.0, 2.0], ids=["default", "whole-shard", "byte-ranges"])
def test_batches_match_zarr(written, whole, monkeypatch):
    if whole is not None:  # force one way of reading a shard
        monkeypatch.setattr(fastread, "_WHOLE_SHARD_FRACTION", whole)
    path, _ = written
    ref = _zarr_read(path)
    fs = open_features(path)
    rng = np.random.default_rng(0)
    batches = [rng.permutation(N)[:16] for _ in range(4)] + [rng.integers(-N, N, size=12) for _ in range(4)]
    batches += [[3, 3, 36, 0, 36, 3], [-1, -37, 5, -1], [35, 33], [36], [20], [0, 16, 32], list(range(N))[::-1],
                [2, 1], [31, 32]]
    for b in batches:
        got = fs.read_batch(b)
        want = ref[np.asarray(b, dtype=np.int64) % N]
        assert got.dtype == ref.dtype and got.shape == want.shape and np.array_equal(bits(got), bits(want)), b
    for i in (0, 15, 16, 36, -1, -37):
        assert np.array_equal(bits(fs[i]), bits(ref[i]))
    assert fs.read_batch([]).shape == (0, 4, 5, 6)
    with pytest.raises(IndexError):
        fs.read_batch([N])


def test_unwritten_shard_reads_the_fill_value(tmp_path):
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD)
    data = _data()
    fill(w, data, shards=[0, 2])  # shard 1 (images 16..31) never written
    fs = open_features(w.path, allow_incomplete=True)
    ref = _zarr_read(w.path)
    assert np.all(ref[16:32] == 0)
    assert np.array_equal(bits(fs.read_all()), bits(ref))
    for b in ([20], [17, 3, 33, 20], list(range(16, 32))):
        assert np.array_equal(bits(fs.read_batch(b)), bits(ref[b]))


def _flip(path: str, shard: int, position: int | None) -> None:
    """Flip a byte of inner chunk ``position`` of shard ``shard`` (``None``: of the shard index)."""
    f = as_location(path) / f"{NAME}/c/{shard}/0/0/0"
    raw = bytearray(f.read_bytes())
    index_bytes = 16 * SHARD + 4
    if position is None:
        raw[len(raw) - index_bytes + 3] ^= 0xFF
    else:
        index = np.frombuffer(bytes(raw[-index_bytes:-4]), "<u8").reshape(-1, 2)
        offset, nbytes = (int(v) for v in index[position])
        raw[offset + nbytes // 2] ^= 0xFF
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_damaged_chunk_names_the_image(tmp_path, where, compression):
    w = make_writer(_root(where, tmp_path), make_spec(n=N), shard_size=SHARD, compression=compression)
    fill(w, _data())
    w.finalize()
    _flip(w.path, 1, 20 - SHARD)
    fs = open_features(w.path)
    fast = fs._fast(NAME, fs._array(NAME))
    with pytest.raises(Damaged):
        fast.read_range(16, 32)
    with pytest.raises(Damaged):
        fast.read_rows([20])
    assert fast.read_rows([19, 21, 3]).shape == (3, 4, 5, 6)  # the chunks around it are whole
    for read in (fs.read_all, lambda: fs.read_batch([20]), lambda: fs.read_batch([1, 20, 33, 20]),
                 lambda: fs.read_batch(list(range(16, 32))[::-1]), lambda: fs[20], lambda: list(fs.layer_shards())):
        with pytest.raises(StoreError) as err:
            read()
        text = str(err.value)
        assert "\n" not in text and "image 20 (id img20)" in text and "maxa stores verify" in text, text
        assert "crc32c checksum mismatch" in text or compression == "zstd", text
        assert "img19" not in text and "img21" not in text, text


def test_damaged_shard_index_is_a_store_error(tmp_path):
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD)
    fill(w, _data())
    w.finalize()
    _flip(w.path, 2, None)
    fs = open_features(w.path)
    assert np.array_equal(bits(fs.read_batch([0, 17])), bits(_data()[[0, 17]]))  # other shards read
    for read in (fs.read_all, lambda: fs.read_batch([33]), lambda: fs.read_batch([34, 3])):
        with pytest.raises(StoreError) as err:
            read()
        assert "\n" not in str(err.value) and "maxa stores verify" in str(err.value)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_target_arrays_match_zarr(tmp_path, where):
    """Target stores: uint8 / int32 / float32 per-image arrays (zstd) are read directly, a
    per-shard-chunk array through zarr, all as zarr reads them."""
    from store import ArrayDef, StoreWriter, TargetSpec, open_targets

    n, shard = 23, 8
    ids = [f"t{i}" for i in range(n)]
    spec = TargetSpec(dataset="shapes", split="val", size=(6, 7), kinds=("semantic", "depth"), num_images=n,
                      image_ids_hash="abc", num_classes=3)
    rng = np.random.default_rng(2)
    data = {"semantic": rng.integers(0, 255, (n, 6, 7), dtype=np.uint8),
            "instances": rng.integers(-2**31, 2**31 - 1, (n, 6, 7), dtype=np.int32),
            "depth": rng.standard_normal((n, 6, 7)).astype(np.float32),
            "instance_count": rng.integers(0, 9, (n,), dtype=np.int32)}
    arrays = [ArrayDef("semantic", (6, 7), "uint8", ("y", "x")), ArrayDef("instances", (6, 7), "int32", ("y", "x")),
              ArrayDef("depth", (6, 7), "float32", ("y", "x")),
              ArrayDef("instance_count", (), "int32", chunk_per_image=False)]
    root = _root(where, tmp_path)
    w = StoreWriter(root / "targets.zarr", kind="targets", key=spec.key, spec=spec.to_dict(), arrays=arrays,
                    image_ids=ids, shard_size=shard, compression="zstd").open()
    for s in w.missing_shards():
        a, b = w.shard_range(s)
        w.write_shard(s, {k: v[a:b] for k, v in data.items()})
    w.finalize()
    ts = open_targets(w.path)
    group = as_location(w.path).open_group("r")
    for name, values in data.items():
        ref = np.asarray(group[name][...])
        fast = ts._fast(name, ts._array(name))
        assert (fast is None) == (name == "instance_count"), name
        got = ts.read_all(name)
        assert got.dtype == ref.dtype and np.array_equal(got.view(np.uint8), ref.view(np.uint8)), name
        out = np.full_like(ref, 7)
        assert ts.read_all(name, out=out) is out and np.array_equal(out.view(np.uint8), ref.view(np.uint8)), name
        with pytest.raises(ValueError, match=f"out= for {name} must be"):
            ts.read_all(name, out=np.zeros((n + 1, *ref.shape[1:]), ref.dtype))
        assert np.array_equal(ref, values)
        for b in ([22, 0, 9, 9, -1], rng.permutation(n)[:10], [16, 17]):
            got = ts.read(name, b)
            assert np.array_equal(got.view(np.uint8), ref[np.asarray(b) % n].view(np.uint8)), (name, b)


def test_read_batch_into_a_reused_buffer(written):
    """``out=``: the same bits as a fresh read, into the caller's array, whatever it held before."""
    path, _ = written
    ref = _zarr_read(path)
    fs = open_features(path)
    rng = np.random.default_rng(2)
    buf = np.full((16, 4, 5, 6), np.nan, dtype=np.float16)
    for b in [rng.permutation(N)[:16] for _ in range(3)] + [np.r_[5, 5, 36, 0] % N, np.arange(3, 19), np.arange(16)]:
        out = buf[: len(b)]
        got = fs.read_batch(b, out=out)
        assert got is out and np.array_equal(bits(out), bits(ref[np.asarray(b) % N])), b
    whole = np.zeros((N, 4, 5, 6), np.float16)
    assert np.array_equal(bits(fs.read_batch(np.arange(N), out=whole)), bits(ref))


def test_read_all_into_a_reused_buffer(written):
    path, _ = written
    ref = _zarr_read(path)
    fs = open_features(path)
    out = np.full((N, 4, 5, 6), np.nan, dtype=np.float16)
    for _ in range(2):
        assert fs.read_all(out=out) is out and np.array_equal(bits(out), bits(ref))
    for bad in (np.zeros((N, 4, 5, 6), np.float32), np.zeros((N - 1, 4, 5, 6), np.float16),
                np.zeros((N, 4, 5, 12), np.float16)[..., ::2]):
        with pytest.raises(ValueError, match="out= for features/last must be"):
            fs.read_all(out=bad)


def test_fresh_outputs_touched_on_the_workers(written, monkeypatch):
    """A large fresh output of an uncompressed read has every page written on the worker threads
    first (``_touched``); the values are zarr-python's either way, and an ``out=`` is not touched."""
    path, _ = written
    ref = _zarr_read(path)
    fs = open_features(path)
    touched, real = [], fastread._touched

    def spy(out):
        got = real(out)
        touched.append(out.nbytes)
        return got

    monkeypatch.setattr(fastread, "_touched", spy)
    monkeypatch.setattr(fastread, "_TOUCH_BYTES", 1)
    monkeypatch.setattr(fastread, "_PAGE", 8)  # several pages per worker even in this small array
    assert np.array_equal(bits(fs.read_all()), bits(ref))
    assert np.array_equal(bits(fs.read_batch([36, 0, 17, 17])), bits(ref[[36, 0, 17, 17]]))
    zstd = fs._fast(NAME, fs._array(NAME)).zstd  # decoded into the output on the workers: no touch first
    assert touched == ([] if zstd else [ref.nbytes, 4 * ref[0].nbytes])
    out = np.full_like(ref, np.nan)
    assert fs.read_all(out=out) is out and np.array_equal(bits(out), bits(ref)) and len(touched) in (0, 2)


def test_touched_writes_one_byte_per_page(monkeypatch):
    if fastread._pool() is None:
        pytest.skip("one core: no worker threads, nothing is touched (the array is returned as is)")
    monkeypatch.setattr(fastread, "_TOUCH_BYTES", 1)
    monkeypatch.setattr(fastread, "_PAGE", 16)
    a = np.full(1000, 7, dtype=np.uint8)
    assert fastread._touched(a) is a
    assert np.array_equal(np.flatnonzero(a == 0), np.arange(0, 1000, 16)) and (np.delete(a, np.arange(0, 1000, 16)) == 7).all()


def test_worker_reads_open_a_few_files_at_a_time(tmp_path, monkeypatch):
    """zstd on a local disk: the worker-thread reads open at most ``_OPEN_FILES`` shard files at
    once (a whole store's read goes in groups); the values are zarr-python's either way."""
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD, compression="zstd")
    fill(w, _data())
    w.finalize()
    ref = _zarr_read(w.path)
    fs = open_features(w.path)
    import contextlib

    opened, now, most, real = [], [0], [0], type(as_location(tmp_path)).reader

    @contextlib.contextmanager
    def counting(self):
        opened.append(str(self))
        now[0] += 1
        most[0] = max(most[0], now[0])
        try:
            with real(self) as read:
                yield read
        finally:
            now[0] -= 1

    monkeypatch.setattr(fastread, "_OPEN_FILES", 1)
    monkeypatch.setattr(type(as_location(tmp_path)), "reader", counting)
    assert np.array_equal(bits(fs.read_all()), bits(ref))
    batch = [36, 0, 17, 3, 33, 16]
    assert np.array_equal(bits(fs.read_batch(batch)), bits(ref[batch]))
    got, _ = _each(fs, batch)
    assert np.array_equal(bits(got), bits(ref[batch]))
    assert len(opened) == 3 + 3 + 3 and most[0] == 1  # each call: one file per shard, one at a time
    monkeypatch.setattr(fastread, "_OPEN_FILES", 64)
    assert np.array_equal(bits(fs.read_batch(batch)), bits(ref[batch])) and most[0] == 3  # all three at once


def test_read_batch_refuses_a_wrong_out(written):
    path, _ = written
    fs = open_features(path)
    for bad in (np.zeros((2, 4, 5, 6), np.float32), np.zeros((3, 4, 5, 6), np.float16),
                np.zeros((2, 4, 5, 12), np.float16)[..., ::2], [[0]]):
        with pytest.raises(ValueError, match="out= for features/last must be"):
            fs.read_batch([0, 1], out=bad)


def test_shard_indexes_are_kept_only_for_complete_stores(tmp_path):
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD)
    data = _data()
    fill(w, data, shards=[0])
    incomplete = open_features(w.path, allow_incomplete=True)
    assert np.array_equal(bits(incomplete.read_batch([1, 2])), bits(data[[1, 2]]))
    assert not incomplete._fast(NAME, incomplete._array(NAME))._indexes  # may still change: read each time
    fill(w, data, shards=[1, 2])
    w.finalize()
    fs = open_features(w.path)
    assert np.array_equal(bits(fs.read_batch([1, 20, 33])), bits(data[[1, 20, 33]]))
    assert sorted(fs._fast(NAME, fs._array(NAME))._indexes) == [0, 1, 2]


def _each(fs, b) -> tuple[np.ndarray, list[int]]:
    """What ``read_batch_each`` hands on, as a batch (each image copied as it comes), and the order."""
    out = np.full((len(b), *fs.layer_shape()), np.nan, dtype=np.float16)
    order: list[int] = []

    def put(k: int, values: np.ndarray) -> None:
        out[k] = values
        order.append(k)

    fs.read_batch_each(b, put)
    return out, order


def test_read_batch_each_hands_on_every_image(written, monkeypatch):
    """``read_batch_each``: every image once, the same bits as zarr-python reads, whichever path
    (the one-buffer path on a local uncompressed store, the batch path elsewhere)."""
    path, _ = written
    ref = _zarr_read(path)
    fs = open_features(path)
    fast = fs._fast(NAME, fs._array(NAME))
    calls = []
    real = type(fast).read_rows_each
    monkeypatch.setattr(type(fast), "read_rows_each", lambda self, idx, put: calls.append(real(self, idx, put)) or calls[-1])
    rng = np.random.default_rng(3)
    for b in [rng.permutation(N)[:16], [3, 3, 36, 0, 36, 3], [-1, -37, 5], [20], list(range(N))[::-1], []]:
        got, order = _each(fs, b)
        assert sorted(order) == list(range(len(b))), b
        assert np.array_equal(bits(got), bits(ref[np.asarray(b, dtype=np.int64) % N])), b
    one_buffer = fast.folder.random_access
    assert calls and all(c is one_buffer for c in calls)
    with pytest.raises(IndexError):
        fs.read_batch_each([N], lambda k, v: None)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_read_batch_each_unwritten_and_damaged(tmp_path, compression):
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD, compression=compression)
    data = _data()
    fill(w, data, shards=[0, 2])  # shard 1 never written: the fill value
    fs = open_features(w.path, allow_incomplete=True)
    ref = _zarr_read(w.path)
    for b in ([20, 3, 33, 17], [20, 17]):  # the second: every image in the unwritten shard
        got, _ = _each(fs, b)
        assert np.array_equal(bits(got), bits(ref[b])), b
    fill(w, data, shards=[1])
    w.finalize()
    _flip(w.path, 1, 20 - SHARD)
    fs = open_features(w.path)
    with pytest.raises(StoreError) as err:
        _each(fs, [1, 20, 33])
    assert "\n" not in str(err.value) and "image 20 (id img20)" in str(err.value) and "img1)" not in str(err.value)
    got, _ = _each(fs, [19, 21, 3])  # the chunks around it are whole
    assert np.array_equal(bits(got), bits(data[[19, 21, 3]]))
