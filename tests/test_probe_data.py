"""Batches a probe trains on: the streamed path (background reads into reused buffers) hands over
exactly what the in-memory path does, batch for batch, and no batch changes after it was handed over."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probe.data import ProbeData
from store import open_features, open_targets

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_synthetic_root  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    paths = make_synthetic_root(tmp_path_factory.mktemp("root"), n_train=23, n_val=4)
    fs = open_features(paths["train"])
    root = Path(paths["train"]).parents[2]
    ts = next(t for t in map(open_targets, (root / "targets").rglob("*.zarr")) if t.image_ids == fs.image_ids)
    return fs, ts


@pytest.mark.parametrize("prefetch", [1, 3])
def test_streamed_batches_equal_in_memory_batches(pair, prefetch):
    fs, ts = pair
    indices = [0, 2, 3, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 19, 20, 21, 22]
    ram = ProbeData(fs, ts, ["semantic"], indices=indices, in_memory=True)
    disk = ProbeData(fs, ts, ["semantic"], indices=indices, in_memory=False, prefetch=prefetch)
    assert not disk.in_memory
    want = list(ram.batches(2, shuffle=True, generator=torch.Generator().manual_seed(4)))
    got = list(disk.batches(2, shuffle=True, generator=torch.Generator().manual_seed(4)))  # all held at once
    assert len(got) == len(want) == 9 and len(got[-1][0]) == 1  # more batches than buffers; a partial last one
    for (i0, f0, t0), (i1, f1, t1) in zip(want, got):
        assert np.array_equal(i0, i1)
        assert all(a.dtype == b.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(f0, f1))
        assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)


def test_load_to_device_block_by_block(pair, monkeypatch):
    """In-memory features for a GPU go over a block of images at a time through one reused host
    buffer: the values of a whole read, for every block size (a partial last block, one image per
    block, one block for all) and for a subset of the images in any order."""
    from probe import data

    fs, _ = pair
    shape = fs.layer_shape()
    per_image = int(np.prod(shape)) * 2
    reads = []
    real = type(fs).read_batch
    monkeypatch.setattr(type(fs), "read_batch", lambda self, idx, layer=None, **kw: reads.append(len(idx)) or
                        real(self, idx, layer, **kw))
    for indices in (np.arange(len(fs)), np.array([22, 0, 5, 5, 13, 7, 1])):
        want = torch.from_numpy(real(fs, indices).reshape(len(indices), -1, shape[-1]))
        for block in (per_image * 4 + 1, 1, 1 << 30):
            reads.clear()
            got = data.load_to_device(fs, indices, fs.spec.layer_names[0], torch.device("cpu"), block_bytes=block)
            assert got.dtype == torch.float16 and torch.equal(got, want), (indices, block)
            step = min(len(indices), max(1, block // per_image))
            assert reads == [min(step, len(indices) - s) for s in range(0, len(indices), step)]


def test_targets_to_device_block_by_block(pair, monkeypatch):
    """In-memory targets for a GPU go over a block of images at a time too: the values of a whole
    read, for every block size and for a subset of the images in any order."""
    from probe import data

    _, ts = pair
    name = "semantic"
    whole = ts.read_all(name)
    per_image = whole[0].nbytes
    reads = []
    real = type(ts).read
    monkeypatch.setattr(type(ts), "read", lambda self, n, idx: reads.append(len(idx)) or real(self, n, idx))
    for indices in (np.arange(len(ts)), np.array([22, 0, 5, 5, 13, 7, 1])):
        want = data._to_tensor(whole[indices])
        for block in (per_image * 4 + 1, 1, 1 << 30):
            reads.clear()
            got = data.targets_to_device(ts, name, indices, torch.device("cpu"), block_bytes=block)
            assert got.dtype == want.dtype and torch.equal(got, want), (indices, block)
            step = min(len(indices), max(1, block // per_image))
            assert reads == [1] + [min(step, len(indices) - s) for s in range(1, len(indices), step)]
    assert data.targets_to_device(ts, name, np.arange(0), torch.device("cpu")).shape == (0, *whole.shape[1:])


def test_in_memory_data_off_the_cpu_goes_block_by_block(pair, monkeypatch):
    """Off the CPU, ProbeData's in-memory features come from :func:`load_to_device` (here the
    ``meta`` device stands in for a GPU: shapes without values)."""
    from probe import data

    fs, ts = pair
    calls = []
    real = data.load_to_device
    monkeypatch.setattr(data, "load_to_device", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    targets = []
    real_targets = data.targets_to_device
    monkeypatch.setattr(data, "targets_to_device", lambda *a, **kw: targets.append(a[1]) or real_targets(*a, **kw))
    meta = ProbeData(fs, ts, ["semantic"], device="meta", in_memory=True)
    assert calls == [torch.device("meta")] and meta._feat[0].device.type == "meta"
    assert targets == ["semantic"] and meta._tgt["semantic"].device.type == "meta"
    assert meta._tgt["semantic"].shape == (len(ts), *ts.read("semantic", [0]).shape[1:])
    assert meta._feat[0].shape == (len(fs), int(np.prod(fs.layer_shape()[:2])), fs.layer_shape()[-1])
    cpu = ProbeData(fs, ts, ["semantic"], in_memory=True)
    assert len(calls) == 1 and cpu._feat[0].device.type == "cpu" and len(targets) == 1
    streamed = ProbeData(fs, ts, ["semantic"], device="meta", in_memory=False)
    got = [f[0] for _, f, _ in streamed.batches(8)]
    assert [g.shape[0] for g in got] == [8, 8, 7] and all(g.device.type == "meta" and g.dtype == torch.float32 for g in got)


def test_streamed_batches_of_vit_sized_images_equal_in_memory_batches(tmp_path):
    """Images of 14×14×336 values (263 KB as float32): the compiled copy writes them with streaming
    stores (``probe/csrc/maxa_kernels.cpp``), smaller ones with plain stores; both paths, with and
    without reused buffers, hand over exactly the in-memory values."""
    paths = make_synthetic_root(tmp_path, n_train=9, n_val=2, extra_channels=320)
    fs = open_features(paths["train"])
    assert np.prod(fs.layer_shape()) * 4 >= 256 * 1024
    ts = next(t for t in map(open_targets, (tmp_path / "targets").rglob("*.zarr")) if t.image_ids == fs.image_ids)
    ram = ProbeData(fs, ts, [], in_memory=True)
    want = [f[0].clone() for _, f, _ in ram.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1))]
    for reuse in (False, True):
        disk = ProbeData(fs, ts, [], in_memory=False, prefetch=1)
        got = [f[0].clone() for _, f, _ in disk.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1),
                                                         reuse_buffers=reuse)]
        assert len(got) == len(want) == 3
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_streamed_epoch_stopped_early_then_again(pair):
    fs, ts = pair
    disk = ProbeData(fs, ts, [], in_memory=False, prefetch=1)
    for k, _ in enumerate(disk.batches(4)):
        if k == 1:
            break
    first = [f for _, f, _ in disk.batches(4)]
    assert len(first) == 6 and torch.equal(first[0][0], torch.from_numpy(
        fs.read_batch(range(4)).reshape(4, -1, fs.layer_shape()[-1]).astype(np.float32)))


@pytest.mark.parametrize("prefetch", [1, 3])
def test_reused_buffers_hold_each_batch_until_the_next_is_asked_for(pair, prefetch):
    """With ``reuse_buffers`` (the trainer's call) a batch's features live in a ring of buffers that
    the reading thread refills; a consumer slower than the reader still sees every batch's own
    values while it holds it, and the ring is really reused (fewer buffers than batches)."""
    import time

    fs, ts = pair
    ram = ProbeData(fs, ts, ["semantic"], in_memory=True)
    disk = ProbeData(fs, ts, ["semantic"], in_memory=False, prefetch=prefetch)
    want = list(ram.batches(2, shuffle=True, generator=torch.Generator().manual_seed(9)))
    seen = set()
    count = 0
    for (i0, f0, t0), (i1, f1, t1) in zip(want, disk.batches(2, shuffle=True, generator=torch.Generator().manual_seed(9),
                                                           reuse_buffers=True)):
        time.sleep(0.02)  # the reader fills the queue and the next buffer meanwhile
        assert np.array_equal(i0, i1)
        assert all(torch.equal(a, b) for a, b in zip(f0, f1))
        assert all(torch.equal(t0[k], t1[k]) for k in t0)
        seen.add(f1[0].untyped_storage().data_ptr())
        count += 1
    assert count == len(want) == 12
    assert len(seen) == prefetch + 2 < count


def test_compiled_half_to_float_equals_torch_for_every_float16():
    """The streamed probe's compiled float16 → float32 copy gives torch's values for all 65,536
    float16 bit patterns (subnormals, infinities, both zeros; NaN stays NaN); where it cannot be
    built (no compiler, no F16C) torch's copy is used and there is nothing to compare."""
    from probe import fused

    copy = fused.half_to_float()
    if copy is None:
        pytest.skip("no compiled F16C copy here: the streamed probe uses torch's copy")
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = torch.cat([every, every[:5]])  # a length that is not a multiple of 8: the scalar tail too
    # the whole set (streaming stores: 256 KB of output and more), into a destination 1..3 values off
    # a 32-byte boundary (the scalar head), and a small copy (plain stores)
    for src, offset in ((every, 0), (every, 1), (every, 3), (every[1000:1203], 0), (every[-77:], 2)):
        space = torch.full((src.numel() + offset + 9,), 7.0)
        dst = space[offset:offset + src.numel()]
        copy(dst, src)
        want = src.float()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(dst), nan)
        assert torch.equal(dst[~nan].view(torch.int32), want[~nan].view(torch.int32))
        assert torch.all(space[:offset] == 7.0) and torch.all(space[offset + src.numel():] == 7.0)  # nothing beside
