"""Store I/O against the raw speed of the same files (run by hand).

Builds a ViT-B-shaped feature store (14×14×768 float16 per image, ~301 KB) with ``StoreWriter``
for each compression (``none``, ``zstd``; ``int8`` on request: a quantised spec, int8 values and
scales), with the shard size the extraction runner would choose,
then times, in one process and in alternating rounds:

* ``raw read``: every file of the store read with ``np.fromfile`` (the reference for reads), and
  ``raw read, fresh array``: the same files read one after the other into one fresh array of their
  total size (the raw counterpart of ``read_all`` into a fresh array);
* ``read_all``: ``FeatureStore.read_all()``, into a fresh array, and ``read_all(out=)``: into one
  array kept from round to round (its memory touched once before the first round), with
  ``fresh array`` beside them: allocating an array of the store's size and touching each of its pages
  as ``read_all`` does (on the reader's worker threads), no reading — the part of ``read_all`` that
  is the machine's memory, not the store;
* ``read_batch``: ``FeatureStore.read_batch`` of random batches of 16 (a shuffled permutation),
  each into a fresh array dropped before the next batch is read (as the raw read drops each file's
  array), and ``read_batch(out=)``: the same batches into one reused array (what the streamed probe
  epoch does, one reused array per layer);
* ``probe epoch``: a streamed, shuffled epoch ``ProbeData(..., in_memory=False).batches(16,
  shuffle=True, reuse_buffers=True)`` (as the trainer calls it: float32 batches in a ring of reused
  buffers) over the features alone (the target store holds one small array that the epoch does not read);
* ``write_shard``: ``StoreWriter.write_shard`` of every shard into a fresh store (``via zarr``: the
  same through zarr-python alone, ``direct_writes=False``, the path before ``store.fastwrite``), against
* ``raw write+fsync``: the same bytes (the store's shard files) written to new files and fsynced
  (``raw write`` without fsync beside it; ``write_shard`` itself does not fsync);
* ``write_shard 1 thread`` / ``2 threads``: every shard of a fresh store written by a pool of that
  many threads, each thread a different shard, as the extraction runner's writer pool does (the
  time from the first submit to the last shard written).

Reads are warm: the store was just written (or read in the round before), so the files sit in
the page cache and every read row measures the reader's own cost, not the disk's. That is what
the issue measured. With ``--cold`` each read row (the raw read included) starts with the store's
files evicted from the page cache: the disk's speed, as an epoch over a store larger than memory
sees it.

    python benchmarks/store_io.py                 # ~2 GB per store (7,000 images), 3 rounds
    python benchmarks/store_io.py --images 1024   # a quick run
    python benchmarks/store_io.py --cold --no-writes   # reads from the disk, not the page cache

Prints a table (img/s, GB/s of decoded features, × the raw reference) and writes
``benchmarks/out/store_io.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRID, CHANNELS = (14, 14), 768  # ViT-B/16 at 224²
IMAGE_BYTES = GRID[0] * GRID[1] * CHANNELS * 2


def _specs(n: int, compression: str = "none"):
    from store.quantize import QUANTIZATIONS
    from store.spec import FeatureSpec, LayerSpec, TargetSpec

    ids = [f"img{i:06d}" for i in range(n)]
    layer = LayerSpec(name="last", grid=GRID, channels=CHANNELS, stride=(16, 16))
    fspec = FeatureSpec(backbone="bench:vit_b16", timm_name="vit_base_patch16_224", weights_id="random:seed0",
                        input_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
                        layers=(layer,), dataset="bench", dataset_id="bench", split="train", num_images=n,
                        image_ids_hash=f"bench{n}")
    if compression in QUANTIZATIONS:  # a lossy store: its spec says so, its arrays are int8 + scales
        fspec = dataclasses.replace(fspec, quantization=compression)
    tspec = TargetSpec(dataset="bench", dataset_id="bench", split="train", size=(14, 14), kinds=("semantic",),
                       num_images=n, image_ids_hash=f"bench{n}", num_classes=4)
    return ids, fspec, tspec


def _shard_data(pool: np.ndarray, count: int) -> np.ndarray:
    return pool[:count]


def build_feature_store(path: Path, n: int, shard_size: int, compression: str, pool: np.ndarray, *,
                        direct: bool = True) -> float:
    """Write the store at ``path`` (``direct=False``: through zarr-python alone, the writer's path
    before ``store.fastwrite``); returns the seconds spent in ``write_shard``."""
    from store.writer import StoreWriter, feature_arrays

    ids, fspec, _ = _specs(n, compression)
    w = StoreWriter(path, kind="features", key=fspec.key, spec=fspec.to_dict(), arrays=feature_arrays(fspec),
                    image_ids=ids, shard_size=shard_size, compression=compression, direct_writes=direct).open()
    spent = 0.0
    for s in w.missing_shards():
        a, b = w.shard_range(s)
        data = {"features/last": _shard_data(pool, b - a)}
        t0 = time.perf_counter()
        w.write_shard(s, data)
        spent += time.perf_counter() - t0
    w.finalize()
    return spent


def write_store_threaded(path: Path, n: int, shard_size: int, compression: str, pool: np.ndarray,
                         threads: int) -> float:
    """Write the store at ``path`` with ``threads`` writer threads, one shard each at a time;
    returns the seconds from the first ``write_shard`` call to the last one's end."""
    from concurrent.futures import ThreadPoolExecutor

    from store.writer import StoreWriter, feature_arrays

    ids, fspec, _ = _specs(n, compression)
    w = StoreWriter(path, kind="features", key=fspec.key, spec=fspec.to_dict(), arrays=feature_arrays(fspec),
                    image_ids=ids, shard_size=shard_size, compression=compression).open()

    def one(s: int) -> None:
        a, b = w.shard_range(s)
        w.write_shard(s, {"features/last": _shard_data(pool, b - a)})

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-writer") as ex:
        t0 = time.perf_counter()
        list(ex.map(one, w.missing_shards()))
        spent = time.perf_counter() - t0
    w.finalize()
    return spent


def build_target_store(path: Path, n: int, shard_size: int) -> None:
    from store.writer import ArrayDef, StoreWriter

    ids, _, tspec = _specs(n)
    w = StoreWriter(path, kind="targets", key=tspec.key, spec=tspec.to_dict(),
                    arrays=[ArrayDef("semantic", (14, 14), "uint8", ("y", "x"))], image_ids=ids,
                    shard_size=shard_size, compression="zstd").open()
    for s in w.missing_shards():
        a, b = w.shard_range(s)
        w.write_shard(s, {"semantic": np.zeros((b - a, 14, 14), np.uint8)})
    w.finalize()


def store_files(path: Path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def raw_read(files: list[str]) -> int:
    total = 0
    for f in files:
        total += np.fromfile(f, dtype=np.uint8).nbytes
    return total


def raw_read_fresh(files: list[str]) -> int:
    """Every file read, one after the other, into one fresh array of their total size."""
    sizes = [os.path.getsize(f) for f in files]
    buf = np.empty(sum(sizes), dtype=np.uint8)
    view, pos = memoryview(buf), 0
    for f, size in zip(files, sizes):
        with open(f, "rb", buffering=0) as fh:
            got = 0
            while got < size:
                k = fh.readinto(view[pos + got:pos + size])
                if not k:
                    raise RuntimeError(f"{f}: shorter than {size} bytes")
                got += k
        pos += size
    return pos


def raw_write(files: list[str], out: Path, fsync: bool) -> float:
    """Seconds to write the bytes of ``files`` into new files under ``out`` (reading them is not timed)."""
    out.mkdir(parents=True, exist_ok=True)
    spent = 0.0
    for k, f in enumerate(files):
        data = np.fromfile(f, dtype=np.uint8)
        t0 = time.perf_counter()
        with open(out / f"{k}.bin", "wb") as g:
            g.write(memoryview(data))
            if fsync:
                g.flush()
                os.fsync(g.fileno())
        spent += time.perf_counter() - t0
    shutil.rmtree(out)
    return spent


_KEPT: dict[str, np.ndarray] = {}  # read_all(out=)'s array per compression, kept across rounds


def touch_fresh(shape: tuple[int, ...]) -> None:
    """A new float16 array of ``shape`` with one value written per 4 KB page, on the reader's worker
    threads as ``read_all`` does it (the page faults the array ``read_all`` returns costs before a
    byte is read into it)."""
    from store import fastread

    a = np.empty(shape, np.float16)
    if fastread._pool() is None or a.nbytes < fastread._TOUCH_BYTES:  # read_all leaves it to its one thread
        a.reshape(-1)[::2048] = 0
    else:
        fastread._touched(a)


def evict(files: list[str]) -> None:
    """Drop ``files`` from the page cache (written back first), so that the next read comes from
    the disk (``posix_fadvise(DONTNEED)``: no root needed; Linux)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_round(stores: dict, args, rng: np.random.Generator, pool: np.ndarray, tmp: Path, rnd: int) -> dict:
    """Seconds and images of every row, for each compression."""
    import torch

    from probe.data import ProbeData
    from store.reader import open_features, open_targets

    out: dict[str, dict[str, tuple[float, int]]] = {}
    for comp, (fpath, tpath) in stores.items():
        rows: dict[str, tuple[float, int]] = {}
        files = store_files(fpath)
        n = args.images
        def timed(fn) -> float:  # a read row: from the disk itself with --cold
            if args.cold:
                evict(files)
            return _timed(fn)

        rows["raw read"] = (timed(lambda: raw_read(files)), n)
        rows["raw read, fresh array"] = (timed(lambda: raw_read_fresh(files)), n)
        fs = open_features(fpath)
        rows["read_all"] = (timed(lambda: fs.read_all()), n)
        rows["fresh array"] = (_timed(lambda: touch_fresh((n, *GRID, CHANNELS))), n)
        if comp not in _KEPT:
            _KEPT[comp] = np.ones((n, *GRID, CHANNELS), np.float16)  # every page touched once
        rows["read_all(out=)"] = (timed(lambda: fs.read_all(out=_KEPT[comp])), n)
        nb = min(n, args.batch_images)
        order = rng.permutation(n)[:nb]
        batches = [order[i:i + 16] for i in range(0, nb, 16)]
        def each(read) -> None:  # every batch dropped before the next is read, as the raw read drops each file
            for b in batches:
                read(b)

        rows["read_batch(16)"] = (timed(lambda: each(fs.read_batch)), nb)
        buf = np.empty((16, *GRID, CHANNELS), np.float16)
        rows["read_batch(16,out=)"] = (timed(lambda: each(lambda b: fs.read_batch(b, out=buf[:len(b)]))), nb)
        ne = min(n, args.epoch_images)
        data = ProbeData(fs, open_targets(tpath), [], indices=np.arange(ne), in_memory=False)
        gen = torch.Generator().manual_seed(rnd)
        rows["probe epoch(16)"] = (timed(lambda: sum(1 for _ in data.batches(16, shuffle=True, generator=gen, reuse_buffers=True))), ne)
        if not args.no_writes:
            for direct in (True, False) if rnd % 2 == 0 else (False, True):  # alternate which goes first
                zpath = tmp / f"write-{comp}-{rnd}-{direct}.zarr"
                secs = build_feature_store(zpath, n, args.shard_size, comp, pool, direct=direct)
                rows["write_shard" if direct else "write_shard via zarr"] = (secs, n)
                if not direct:
                    shutil.rmtree(zpath)
            wpath = tmp / f"write-{comp}-{rnd}-True.zarr"
            wfiles = store_files(wpath)
            rows["raw write+fsync"] = (raw_write(wfiles, tmp / "raw-fsync", fsync=True), n)
            rows["raw write"] = (raw_write(wfiles, tmp / "raw", fsync=False), n)
            shutil.rmtree(wpath)
            order = (1, 2) if rnd % 2 == 0 else (2, 1)  # alternate which goes first
            for threads in order:
                tpath = tmp / f"write-{comp}-{rnd}-t{threads}.zarr"
                secs = write_store_threaded(tpath, n, args.shard_size, comp, pool, threads)
                rows[f"write_shard {threads} thread{'s' if threads > 1 else ''}"] = (secs, n)
                shutil.rmtree(tpath)
        out[comp] = rows
    return out


REFERENCE = {"read": "raw read", "write": "raw write+fsync"}
ROWS = [("raw read", "read"), ("raw read, fresh array", "read"), ("read_all", "read"), ("fresh array", "read"), ("read_all(out=)", "read"), ("read_batch(16)", "read"), ("read_batch(16,out=)", "read"),
        ("probe epoch(16)", "read"),
        ("write_shard", "write"), ("write_shard via zarr", "write"), ("raw write+fsync", "write"), ("raw write", "write"),
        ("write_shard 1 thread", "write"), ("write_shard 2 threads", "write")]


def summarise(rounds: list[dict]) -> dict:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for comp in rounds[0]:
        table[comp] = {}
        for row, _kind in ROWS:
            if row not in rounds[0][comp]:
                continue
            secs = [r[comp][row][0] for r in rounds]
            imgs = rounds[0][comp][row][1]
            med = statistics.median(secs)
            table[comp][row] = {"seconds_median": med, "seconds": secs, "images": imgs,
                                "img_per_s": imgs / med, "gb_per_s": imgs * IMAGE_BYTES / med / 1e9}
        for row, kind in ROWS:
            if row in table[comp]:
                ref = table[comp][REFERENCE[kind]]["img_per_s"]
                table[comp][row]["x_raw"] = table[comp][row]["img_per_s"] / ref
                if kind == "write" and "raw write" in table[comp]:
                    table[comp][row]["x_raw_nofsync"] = table[comp][row]["img_per_s"] / table[comp]["raw write"]["img_per_s"]
    return table


def print_table(table: dict, meta: dict) -> None:
    print(f"\nstore I/O, {meta['images']} images of {GRID[0]}x{GRID[1]}x{CHANNELS} float16 "
          f"({IMAGE_BYTES / 1e3:.0f} KB), shard size {meta['shard_size']}, median of {meta['rounds']} rounds; "
          f"{meta['cpus']} CPUs (an extraction here starts {meta['runner_writer_threads']} writer thread(s)), {meta['date']}")
    print("reads are COLD (each read row starts with the store's files evicted from the page cache)" if meta["cold"] else
          "reads are WARM (page cache): the store's files were just written or read; GB/s counts decoded features")
    print(f"{'compression':<12}{'row':<23}{'img/s':>10}{'GB/s':>8}{'x raw':>8}{'x nofsync':>10}")
    for comp, rows in table.items():
        for row, r in rows.items():
            nofsync = f"{r['x_raw_nofsync']:>10.3f}" if "x_raw_nofsync" in r else ""
            print(f"{comp:<12}{row:<23}{r['img_per_s']:>10.0f}{r['gb_per_s']:>8.2f}{r['x_raw']:>8.3f}{nofsync}")
        if "write_shard 2 threads" in rows:
            print(f"{comp:<12}{'2 threads / 1 thread':<23}"
                  f"{rows['write_shard 2 threads']['img_per_s'] / rows['write_shard 1 thread']['img_per_s']:>10.2f}x")
    print("x raw: reads against 'raw read' of the same store's files, writes against 'raw write+fsync'; "
          "x nofsync: writes against 'raw write'")


def _runner_writer_threads() -> int:
    """The writer threads an extraction would start on this machine (default decode workers)."""
    from extract.images import default_decode_workers
    from extract.runner import default_writer_threads

    return default_writer_threads(default_decode_workers(at_least=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=7000, help="images per store (7,000 ≈ 2 GB)")
    p.add_argument("--shard-size", type=int, default=0, help="images per shard (default: the runner's choice)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-images", type=int, default=2048, help="images read by random read_batch calls")
    p.add_argument("--epoch-images", type=int, default=7000, help="images in the streamed probe epoch")
    p.add_argument("--compression", nargs="+", default=["none", "zstd"], help="none, zstd, int8 (default: none zstd)")
    p.add_argument("--no-writes", action="store_true", help="skip the write rows")
    p.add_argument("--cold", action="store_true",
                   help="evict the store's files from the page cache before each read row: the disk's speed, "
                        "as an epoch over a store larger than memory sees it (Linux)")
    p.add_argument("--tmp", default=None, help="folder for the stores (default: a temporary folder)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "store_io.json"))
    args = p.parse_args(argv)

    if not args.shard_size:
        from extract.runner import default_shard_size

        args.shard_size = default_shard_size(_specs(1)[1].layers)
    tmp = Path(tempfile.mkdtemp(prefix="maxa-store-io-", dir=args.tmp))
    try:
        rng = np.random.default_rng(0)
        pool = rng.standard_normal((min(args.shard_size, args.images), *GRID, CHANNELS), np.float32).astype(np.float16)
        stores = {}
        for comp in args.compression:
            fpath, tpath = tmp / f"features-{comp}.zarr", tmp / f"targets-{comp}.zarr"
            t = build_feature_store(fpath, args.images, args.shard_size, comp, pool)
            build_target_store(tpath, args.images, args.shard_size)
            print(f"built {comp}: {args.images} images in {t:.1f} s, "
                  f"{sum(os.path.getsize(f) for f in store_files(fpath)) / 1e9:.2f} GB on disk", flush=True)
            stores[comp] = (fpath, tpath)
        rounds = []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            rounds.append(one_round(stores, args, rng, pool, tmp, r))
            print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - t0:.0f} s", flush=True)
        import zarr

        meta = {"images": args.images, "shard_size": args.shard_size, "rounds": args.rounds,
                "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "zarr": zarr.__version__, "numpy": np.__version__,
                "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True).stdout.strip(),
                "runner_writer_threads": _runner_writer_threads(), "warm": not args.cold, "cold": args.cold, "batch_images": min(args.images, args.batch_images),
                "epoch_images": min(args.images, args.epoch_images)}
        table = summarise(rounds)
        print_table(table, meta)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "table": table}, indent=1))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
