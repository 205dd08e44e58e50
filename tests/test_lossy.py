"""The lossy store option (``--compression int8``): error bound, key, plain zarr, readers, CLI, size."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from store import (COMPRESSIONS, StoreMismatchError, StoreWriter, feature_arrays, feature_store_path, list_stores,
                   open_features, verify_store)
from store.checks import check_eval_pair
from store.quantize import QMAX, dequantize, quantize
from test_cli import extract_args, ok
from test_store import make_spec


def _scale(s: np.ndarray, ndim: int) -> np.ndarray:
    return s.reshape(s.shape[0], *([1] * (ndim - 2)), s.shape[-1])


def test_round_trip_error_bound_and_zero_channels():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5, 7, 12)) * rng.uniform(0.01, 50, 12)).astype(np.float16)
    x[:, :, :, 3] = 0  # a channel that is 0 everywhere
    x[2, :, :, 5] = 0  # ... or only in one image
    x[4] = 0  # an all-zero image (an undecodable one is stored as zeros)
    q, s = quantize(x)
    assert q.dtype == np.int8 and q.shape == x.shape and s.dtype == np.float32 and s.shape == (6, 12)
    assert np.abs(q.astype(np.int32)).max() == QMAX
    x32, scale = x.astype(np.float32), _scale(s, x.ndim)
    assert np.all(np.abs(x32 - q.astype(np.float32) * scale) <= scale / 2 * (1 + 1e-5))
    assert np.all(s[:, 3] == 0) and s[2, 5] == 0 and np.all(s[4] == 0)
    deq = dequantize(q, s)
    assert deq.dtype == np.float16 and not np.isnan(deq).any()
    assert np.all(deq[:, :, :, 3] == 0) and np.all(deq[4] == 0)
    # what readers return: the float16 rounding of the float32 product, within half a step and float16's rounding
    assert np.array_equal(deq, (q.astype(np.float32) * scale).astype(np.float16))
    assert np.all(np.abs(x32 - deq.astype(np.float32)) <= scale / 2 * (1 + 1e-5) + np.abs(x32) * 2.0**-10)


@pytest.mark.parametrize("torch_too", [True, False], ids=["torch", "numpy-alone"])
@pytest.mark.parametrize("block", [None, 100], ids=["default-blocks", "blocks-inside-an-image"])
def test_quantize_equals_the_whole_array_formula(block, torch_too, monkeypatch):
    """The writer's image-by-image quantisation gives the bits of the whole-array NumPy formula:
    float16 and float32 input, zero channels (+0 and -0), subnormal values, one token per image."""
    import store.quantize

    if block is not None:
        monkeypatch.setattr(store.quantize, "_BLOCK_VALUES", block)
    if not torch_too:  # the store needs only NumPy
        monkeypatch.setattr(store.quantize, "_torch", lambda: None)

    def formula(x):
        x32 = np.asarray(x, dtype=np.float32)
        tokens = tuple(range(1, x32.ndim - 1))
        absmax = np.abs(x32).max(axis=tokens) if tokens else np.abs(x32)
        s = (absmax / np.float32(QMAX)).astype(np.float32)
        per = s.reshape(s.shape[0], *([1] * (x32.ndim - 2)), s.shape[-1])
        q = np.rint(np.divide(x32, np.broadcast_to(per, x32.shape), out=np.zeros_like(x32), where=per > 0))
        return np.clip(q, -QMAX, QMAX).astype(np.int8), s

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 3, 7, 40)) * rng.uniform(1e-3, 300, 40)).astype(np.float16)
    x[:, :, :, 2] = 0
    x[1, :, :, 4] = -0.0
    x[2, :, :, 6] = np.float16(6e-8)  # float16's smallest subnormal
    for values in (x, x.astype(np.float32) * 7, x[:, 0, 0, :], x[:2, :1]):
        q, s = quantize(values)
        want_q, want_s = formula(values)
        assert q.shape == values.shape and np.array_equal(q, want_q) and np.array_equal(s.view(np.uint32),
                                                                                          want_s.view(np.uint32))


def test_key_differs_only_when_lossy():
    spec = make_spec()
    assert spec.quantization == "none" and "quantization" not in spec.identity()
    # the key of a lossless spec, computed before the option existed (same fields as make_spec)
    assert spec.key == "e9bdfca32f4082ca"
    lossy = dataclasses.replace(spec, quantization="int8")
    assert lossy.key != spec.key and lossy.identity()["quantization"] == "int8"
    assert lossy.backbone_identity() != spec.backbone_identity()
    assert "quantization" not in spec.backbone_identity()
    with pytest.raises(ValueError, match="quantization"):
        dataclasses.replace(spec, quantization="int4")
    assert "int8" in COMPRESSIONS


def _write(root: Path, spec, data: np.ndarray, shard_size: int = 4) -> str:
    w = StoreWriter(feature_store_path(root, spec), kind="features", key=spec.key, spec=spec.to_dict(),
                    arrays=feature_arrays(spec), image_ids=[f"img{i}" for i in range(spec.num_images)],
                    shard_size=shard_size, compression="int8" if spec.lossy else "none").open()
    for shard in w.missing_shards():
        a, b = w.shard_range(shard)
        w.write_shard(shard, {"features/last": data[a:b]})
    w.finalize()
    return w.path


def test_writer_refuses_a_lossy_compression_without_quantised_arrays(tmp_path):
    """compression='int8' on arrays that hold float16 (or int8 arrays under a lossless
    compression) would label a store as something it is not: refused before anything is written."""
    spec = make_spec()
    lossy = dataclasses.replace(spec, quantization="int8")
    for s, comp in ((spec, "int8"), (lossy, "none"), (lossy, "zstd")):
        with pytest.raises(ValueError, match="lossy compression needs the arrays of feature_arrays"):
            StoreWriter(feature_store_path(tmp_path, s), kind="features", key=s.key, spec=s.to_dict(),
                        arrays=feature_arrays(s), image_ids=[f"img{i}" for i in range(s.num_images)],
                        shard_size=4, compression=comp)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def stores(tmp_path):
    data = (np.random.default_rng(1).standard_normal((10, 4, 5, 6)) * [1, 2, 0.1, 0, 5, 3]).astype(np.float16)
    spec = make_spec()
    lossy = dataclasses.replace(spec, quantization="int8")
    return data, open_features(_write(tmp_path, spec, data)), open_features(_write(tmp_path, lossy, data))


@pytest.mark.parametrize("torch_too", [True, False], ids=["torch", "numpy-alone"])
@pytest.mark.parametrize("block", [None, 200], ids=["default-blocks", "blocks-inside-an-image"])
def test_dequantize_equals_the_numpy_formula_bit_for_bit(block, torch_too, monkeypatch):
    """The reader's blocked dequantisation (torch's float16 rounding) gives the plain NumPy
    formula's bits: every int8 value against scales from float16's subnormals to past its
    largest value (overflow to inf), zero scales, and blocks that end inside an image."""
    import store.quantize

    if block is not None:
        monkeypatch.setattr(store.quantize, "_BLOCK_VALUES", block)
    if not torch_too:  # the store needs only NumPy
        monkeypatch.setattr(store.quantize, "_torch", lambda: None)
    q = np.resize(np.arange(-128, 128, dtype=np.int8), (6, 3, 7, 64))  # every int8 value, in every channel
    exps = np.linspace(-40, 12, 6 * 64).astype(np.float32)
    s = (np.float32(1.7) ** exps).astype(np.float32).reshape(6, 64)
    s[0, :5] = 0
    s[1, :3] = np.float32(65504 / 100)  # q * s at and past float16's largest
    with np.errstate(over="ignore"):  # the overflow to inf is meant
        want = (q.astype(np.float32) * s[:, None, None, :]).astype(np.float16)
    got = dequantize(q, s)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert np.isinf(got).any() and (got.view(np.uint16) & 0x7C00 == 0).any()  # overflow and subnormals seen
    out = np.full(q.shape, np.nan, np.float16)
    assert dequantize(q, s, out=out) is out and np.array_equal(out.view(np.uint16), want.view(np.uint16))
    with pytest.raises(ValueError, match="out= for dequantize"):
        dequantize(q, s, out=np.zeros(q.shape, np.float32))


def test_plain_zarr_reads_int8_store_as_the_reader(stores):
    data, _, fs = stores
    g = zarr.open_group(fs.path, mode="r")
    q, s = g["features/last"], g["feature_scales/last"]
    assert q.dtype == np.int8 and q.shape == data.shape and s.dtype == np.float32 and s.shape == (10, 6)
    by_hand = (q[:].astype(np.float32) * s[:][:, None, None, :]).astype(np.float16)
    assert np.array_equal(by_hand, fs.read_all())
    assert fs.read_all().dtype == np.float16
    assert g.attrs["maxa"]["spec"]["quantization"] == "int8" and g.attrs["maxa"]["compression"] == "int8"
    assert np.all(np.abs(fs.read_all().astype(np.float32) - data) <= np.abs(data).max(axis=(1, 2), keepdims=True) / QMAX)


def test_fast_reader_and_zarr_agree_bitwise(stores):
    _, _, fs = stores
    for name in ("features/last", "feature_scales/last"):
        assert fs._fast(name, fs._array(name)) is not None, f"{name} is not read by the fast reader"
    rows = [7, 0, 3, 3, 9, 1]
    fast = fs.read_batch(rows)
    g = zarr.open_group(fs.path, mode="r")
    q, s = g["features/last"].oindex[rows], g["feature_scales/last"].oindex[rows]
    assert np.array_equal(fast, dequantize(q, s))
    assert np.array_equal(fs.read(5), fs.read_all()[5])
    assert fs.layer_dtype() == np.float16 and fs.layer_shape() == (4, 5, 6)
    buf = np.empty((len(rows), *fs.layer_shape()), dtype=fs.layer_dtype())
    assert fs.read_batch(rows, out=buf) is buf and np.array_equal(buf, fast)
    whole = np.full((len(fs), *fs.layer_shape()), np.nan, dtype=fs.layer_dtype())
    assert fs.read_all(out=whole) is whole and np.array_equal(whole, dequantize(g["features/last"][...],
                                                                               g["feature_scales/last"][...]))
    each = np.zeros_like(buf)
    fs.read_batch_each(rows, lambda k, v: each.__setitem__(k, v))  # the streamed probe's reader: dequantised too
    assert np.array_equal(each, fast)
    by_hand = (q.astype(np.float32) * s[:, None, None, :]).astype(np.float16)
    assert np.array_equal(fast.view(np.uint16), by_hand.view(np.uint16))
    assert np.array_equal(fs.to_dask().compute(), fs.read_all())
    shards = list(fs.layer_shards())
    assert [start for start, _ in shards] == [0, 4, 8]
    assert np.array_equal(np.concatenate([v for _, v in shards]), fs.read_all())


def test_damaged_int8_chunk_is_named(stores):
    from store import StoreError, as_location

    _, _, fs = stores
    f = as_location(fs.path) / "features/last/c/1/0/0/0"  # images 4..7
    raw = bytearray(f.read_bytes())
    index = np.frombuffer(bytes(raw[-(16 * 4 + 4):-4]), "<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in index[2])  # image 6
    raw[offset + nbytes // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    fs = open_features(fs.path)
    for read in (lambda: fs.read_batch([1, 6, 9]), fs.read_all, lambda: fs.read(6),
                 lambda: fs.read_batch_each([6, 2], lambda k, v: None)):
        with pytest.raises(StoreError) as err:
            read()
        assert "image 6 (id img6)" in str(err.value) and "\n" not in str(err.value)
    assert fs.read_batch([5, 7]).shape == (2, 4, 5, 6)  # its neighbours are whole


def test_lossy_store_never_stands_in_for_lossless(stores, tmp_path):
    _, lossless, lossy = stores
    assert lossless.key != lossy.key and lossless.path != lossy.path
    with pytest.raises(StoreMismatchError, match="quantization"):
        check_eval_pair(lossless, lossy)
    assert verify_store(lossy.path).ok
    rows = {r["key"]: r for r in list_stores(tmp_path)}
    assert rows[lossy.key]["quantization"] == "int8" and rows[lossless.key]["quantization"] == "none"


def _lossy_benchmark():
    """``benchmarks/lossy.py`` as a module (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lossy_benchmark", Path(__file__).parents[1] / "benchmarks" / "lossy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_verdict_against_the_bar():
    """benchmarks/lossy.py: within the bar by two standard errors, outside it by two, or unresolved."""
    verdict = _lossy_benchmark()._verdict
    assert verdict([0.1, -0.1, 0.05, -0.05], 0.5)[2] == "yes"
    assert verdict([3.0, 3.2, 2.9], 0.5)[2] == "**no**"
    assert verdict([4.0, -4.0, 3.0, -3.0], 0.5)[2] == "unresolved"
    assert verdict([0.45, 0.55], 0.5)[2] == "unresolved"  # mean 0.5, s.e. 0.05: not within by two s.e.
    mean, stderr, _ = verdict([1.0, 3.0], 0.5)
    assert mean == 2.0 and stderr == pytest.approx(1.0)


def test_benchmark_seed_ranges():
    """The seeds a summary names, as runs of consecutive numbers (a 300-seed list is one line)."""
    ranges = _lossy_benchmark().seed_ranges
    assert ranges(list(range(300))) == "0-299"
    assert ranges([9, 0, 1, 2, 11, 12, 5, 1]) == "0-2, 5, 9, 11-12"
    assert ranges([]) == ""


def test_benchmark_same_adapter_store_holds_what_the_int8_store_reads(stores, tmp_path):
    """The same-adapter arm's store: the float16 store's spec (so it pairs with the float16 training
    store) and, bitwise, the values the int8 store reads."""
    _, lossless, lossy = stores
    copy = open_features(_lossy_benchmark().dequantized_copy(lossy.path, lossless.path, str(tmp_path / "copy"),
                                                              str(tmp_path)))
    assert copy.key == lossless.key and copy.path != lossless.path and not copy.spec.lossy
    assert copy.spec.backbone_identity() == lossless.spec.backbone_identity()
    assert np.array_equal(copy.read_all(), lossy.read_all())
    assert not np.array_equal(copy.read_all(), lossless.read_all())


def test_size_ratio_at_least_two(tmp_path):
    """At a 14 × 14 grid (ViT-S/16 at 224) of Gaussian-like features, shard files ≥ 2× smaller."""
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((8, 14, 14, 96)) * rng.uniform(0.1, 3, 96)).astype(np.float16)
    spec = make_spec(n=8, grid=(14, 14), channels=96)
    paths = [_write(tmp_path, s, data, shard_size=8) for s in (spec, dataclasses.replace(spec, quantization="int8"))]

    def shard_bytes(path: str) -> int:
        return sum(f.stat().st_size for sub in ("features", "feature_scales")
                   for f in (Path(path) / sub).rglob("c/*/*/*/*") if f.is_file())

    assert shard_bytes(paths[0]) / shard_bytes(paths[1]) >= 2.0


def test_cli_extract_int8_end_to_end(tmp_path):
    root = tmp_path / "root"
    text = ok(*extract_args(root, "--compression", "int8", "--no-targets", n=6))
    assert "int8, lossy" in text
    plain = ok(*extract_args(root, "--no-targets", n=6))
    assert "lossy" not in plain
    (lossy_row,) = [r for r in list_stores(root) if r["quantization"] == "int8"]
    (lossless_row,) = [r for r in list_stores(root) if r["quantization"] == "none"]
    a, b = open_features(lossless_row["path"]), open_features(lossy_row["path"])
    assert b.spec.quantization == "int8" and a.spec.quantization == "none"
    x, y = a.read_all().astype(np.float32), b.read_all().astype(np.float32)
    assert y.dtype == np.float32 and np.all(np.abs(x - y) <= np.abs(x).max(axis=(1, 2), keepdims=True) / QMAX + 1e-2)
    listing = ok("stores", "ls", root)
    assert "int8, lossy" in listing
    info = ok("stores", "info", lossy_row["path"])
    assert "quantization: int8" in info


def test_probe_trains_and_scores_on_int8_stores(tmp_path):
    """A probe from int8 stores: the eval store found is the int8 one, the record says so."""
    from extract.jobs import run_extract
    from probe.train import ProbeConfig, train_probe

    paths = {}
    for split, n in (("train", 12), ("val", 6)):
        for comp in ("none", "int8"):
            job = run_extract(backbone="test_vit", dataset="shapes", split=split, store_root=tmp_path, weights="random",
                              device="cpu", dataset_options={"num_images": n}, num_workers=0, show_progress=False,
                              compression=comp)
            paths[split, comp] = job.features.path
    r = train_probe(paths["train", "int8"], ProbeConfig(task="semseg", max_epochs=1, batch_size=4), device="cpu",
                    show_progress=False)
    assert r.record["quantization"] == "int8"
    assert r.record["eval_store"] == open_features(paths["val", "int8"]).key
    plain = train_probe(paths["train", "none"], ProbeConfig(task="semseg", max_epochs=1, batch_size=4), device="cpu",
                        show_progress=False)
    assert "quantization" not in plain.record and plain.record["eval_store"] == open_features(paths["val", "none"]).key


def test_benchmark_runs_file_keeps_seeds_and_trains_only_the_missing(tmp_path, monkeypatch, capsys):
    """``benchmarks/lossy.py --runs FILE``: each finished seed is appended to FILE; a second call with
    the same settings trains only the seeds FILE lacks (or lacks an asked arm for) and summarises
    every seed FILE holds; other settings' runs in FILE are neither skipped nor summarised."""
    lossy = _lossy_benchmark()
    trained = []

    def fake_pairs(root, args):
        arms = {"float16": ("a", "b"), "int8": ("c", "d")}
        if args.same_adapter:
            arms[lossy.SAME_ADAPTER] = ("a", "e")
        return [("known-answer instances", "instances", arms, {})]

    def fake_run(job):
        stores, task, kwargs, seed, root, threads = job
        trained.append((seed, len(stores)))
        got = {arm: {"ari": 50.0 + seed + (1.0 if arm == "int8" else 0.0) + (0.5 if arm == lossy.SAME_ADAPTER else 0.0),
                     "_epochs": 3.0, "_best_epoch": 2.0} for arm in stores}
        return got, 0.1

    monkeypatch.setattr(lossy, "pairs", fake_pairs)
    monkeypatch.setattr(lossy, "run_arms", fake_run)
    monkeypatch.setattr(lossy, "bytes_per_image", lambda path: 100.0)
    monkeypatch.setattr(lossy.torch, "set_num_threads", lambda n: None)  # this process's torch stays as it is
    runs, out = tmp_path / "runs.jsonl", tmp_path / "out.json"

    def main(*argv):
        monkeypatch.setattr(sys, "argv", ["lossy.py", "--only", "instances", "--runs", str(runs), "--out", str(out),
                                          *argv])
        lossy.main()
        return json.loads(out.read_text())["summary"]

    (s,) = main("--seeds", "0", "1")
    assert trained == [(0, 2), (1, 2)] and s["seeds"] == 2 and s["delta"] == pytest.approx(1.0)
    assert [json.loads(l)["seed"] for l in runs.read_text().splitlines()] == [0, 1]
    (s,) = main("--seeds", "1", "2", "3")  # seed 1 kept: only 2 and 3 are trained
    assert trained[2:] == [(2, 2), (3, 2)] and s["seeds"] == 4 and s["float16"] == pytest.approx(51.5)
    (s,) = main("--seeds", "3", "--same-adapter")  # seed 3 lacks the arm: trained again, counted once
    assert trained[4:] == [(3, 3)] and s["seeds"] == 4
    assert s["delta_same_adapter_seeds"] == 1 and s["delta_same_adapter"] == pytest.approx(0.5)
    assert s["delta_same_adapter_int8_per_seed"] == [pytest.approx(1.0)]
    (s,) = main("--seeds", "0", "--threads", "1")  # other settings: a run of its own
    assert trained[5:] == [(0, 2)] and s["seeds"] == 1
    (s,) = main("--seeds", "0")  # nothing to train; seed 3's two runs count once
    assert trained[6:] == [] and s["seeds"] == 4 and s["delta_same_adapter_seeds"] == 1
    with open(runs, "a") as f:
        f.write('{"dataset": "known-answer inst')  # a line cut short by a kill
    with pytest.raises(SystemExit, match="line 7 is not JSON"):
        main("--seeds", "0")
