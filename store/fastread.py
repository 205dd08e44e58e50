"""Read sharded per-image arrays straight from their shard files, at close to the speed of the files.

zarr-python decodes every inner chunk of a shard as its own asynchronous task; with one image per
inner chunk that bookkeeping, not the bytes, sets the pace. A per-image array of a maxa store has
one fixed layout (``store._layout``, ``store.writer``), and that layout is simple to read directly:

* a shard file ``c/<shard>/0/.../0`` holds ``shard_size`` inner chunks, one image each, then the
  shard index: one ``(offset, nbytes)`` pair of little-endian uint64 per inner chunk, followed by
  the crc32c of the index (``index_location = end``); an absent chunk is ``(2**64-1, 2**64-1)``;
* an inner chunk is the image's bytes (little-endian, C order), optionally zstd-compressed, then
  the crc32c of those bytes (little-endian uint32).

:class:`ShardedArray` reads a whole shard file with one call (one GET on object storage) or, for
a few images of a shard, the index and those chunks' byte ranges; it verifies every checksum it
passes, and decodes into the output array. On a local disk, uncompressed runs of chunks are read
straight into the output by the calling thread (their checksums checked on the worker threads), and
zstd chunks are each read, checked and decoded by a worker thread (zstd, not the disk, is their limit). Anything it does not recognise exactly (another codec,
another chunking, an array that is not sharded) gets no :class:`ShardedArray` and is read by zarr.
Bytes that fail a checksum or cannot be decoded raise :class:`Damaged`; the reader then reads the
same images through zarr, which names the damaged images (``store.reader``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from store.location import Location

__all__ = ["Damaged", "ShardedArray"]

_ABSENT = 2**64 - 1
#: On object storage, read a whole shard file once this fraction of its images is wanted (fewer:
#: their byte ranges).
_WHOLE_SHARD_FRACTION = 0.25
#: Chunks read per call on a local disk: the worker threads check one piece while the next is read.
_PIECE = 64
#: Decoded bytes from which zstd chunks are decoded on the worker threads.
_PARALLEL_BYTES = 256 * 1024
#: Shard files a worker-thread read keeps open at once (a whole store's read goes in groups of them).
_OPEN_FILES = 64
#: A fresh output array from this size on has its pages faulted in by the worker threads before an
#: uncompressed read fills it on the calling thread (see :func:`_touched`).
_TOUCH_BYTES = 64 << 20
_PAGE = 4096


class Damaged(Exception):
    """A chunk's bytes fail their checksum or their codec (or a shard index is unreadable)."""


def _crc_ok(data: memoryview, stored: memoryview) -> bool:
    return crc32c.crc32c(data) == int.from_bytes(stored, "little")


@dataclass(frozen=True)
class ShardedArray:
    """A per-image array read from its shard files (see the module's docstring for the layout)."""

    folder: Location  # the array's folder inside the store
    name: str
    num_images: int
    per_shard: int
    item_shape: tuple[int, ...]
    dtype: np.dtype
    zstd: bool
    fill_value: object
    shard_keys: tuple[str, ...]  # per shard, the shard file's path below ``folder``
    #: the shard files no longer change (a complete store): each index is read and checked once
    immutable: bool = False
    _indexes: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, store: Location, name: str, arr: zarr.Array, *, immutable: bool = False) -> "ShardedArray | None":
        """The fast reader of array ``name`` (``arr``) of the store at ``store``, or ``None`` if the
        array's layout is not exactly the one this module reads. ``immutable``: the store is
        complete, so shard indexes may be kept once read."""
        try:
            meta = arr.metadata
            if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1:
                return None
            sharding = meta.codecs[0]
            if not isinstance(sharding, ShardingCodec):
                return None
            shape = tuple(int(s) for s in arr.shape)
            shard = tuple(int(s) for s in meta.chunk_grid.chunk_shape)
            inner = tuple(int(s) for s in sharding.chunk_shape)
            if len(shape) < 1 or inner != (1, *shape[1:]) or shard != (shard[0], *shape[1:]) or shard[0] < 1:
                return None
            codecs = list(sharding.codecs)
            if not (len(codecs) in (2, 3) and isinstance(codecs[0], BytesCodec)
                    and isinstance(codecs[-1], Crc32cCodec)):
                return None
            zstd = len(codecs) == 3
            if zstd and not isinstance(codecs[1], ZstdCodec):
                return None
            dtype = np.dtype(arr.dtype)
            endian = codecs[0].endian
            if dtype.itemsize > 1 and (endian is None or endian.value != "little"):
                return None
            index = list(sharding.index_codecs)
            if not (len(index) == 2 and isinstance(index[0], BytesCodec) and index[0].endian is not None
                    and index[0].endian.value == "little" and isinstance(index[1], Crc32cCodec)):
                return None
            if sharding.index_location != ShardingCodecIndexLocation.end:
                return None
            zeros = (0,) * (len(shape) - 1)
            num_shards = -(-shape[0] // shard[0])
            keys = tuple(meta.encode_chunk_key((k, *zeros)) for k in range(num_shards))
            return cls(folder=store / name, name=name, num_images=shape[0], per_shard=shard[0],
                       item_shape=shape[1:], dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype,
                       zstd=zstd, fill_value=meta.fill_value, shard_keys=keys, immutable=immutable)
        except Exception:  # noqa: BLE001 - metadata of another shape: zarr reads it
            return None

    # -- layout -------------------------------------------------------------------------------------
    @property
    def item_bytes(self) -> int:
        return int(np.prod(self.item_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def index_bytes(self) -> int:
        return 16 * self.per_shard + 4

    def _parallel(self, count: int) -> bool:
        """Whether decoding ``count`` zstd chunks is worth the worker threads: small chunks (scales,
        small targets) decode faster on the calling thread than they are handed over."""
        return count >= 2 and count * self.item_bytes >= _PARALLEL_BYTES

    def _index(self, tail: bytes | memoryview, shard: int) -> np.ndarray:
        """``(per_shard, 2)`` offsets and sizes from the index bytes, its checksum verified."""
        tail = memoryview(tail)
        if len(tail) != self.index_bytes or not _crc_ok(tail[:-4], tail[-4:]):
            raise Damaged(f"shard {shard}: its index fails its crc32c checksum")
        return np.frombuffer(tail[:-4], dtype="<u8").reshape(self.per_shard, 2)

    def _empty(self, count: int) -> np.ndarray:
        out = np.empty((count, *self.item_shape), dtype=self.dtype)
        # zstd chunks are decoded into the output on the worker threads, which fault its pages in as they go
        return out if self.zstd else _touched(out)

    def _fill(self, out: np.ndarray) -> None:
        out[...] = self.fill_value

    def _fill_all(self, out: Sequence[np.ndarray]) -> None:
        for o in out:
            self._fill(o)

    def _decode(self, chunk: memoryview, out: np.ndarray, image: int) -> None:
        """Decode one inner chunk (its bytes and crc32c) into ``out`` (one image)."""
        if len(chunk) < 4 or not _crc_ok(chunk[:-4], chunk[-4:]):
            raise Damaged(f"image {image}: crc32c checksum mismatch")
        payload = chunk[:-4]
        dest = out.reshape(-1).view(np.uint8)
        if self.zstd:
            from numcodecs.zstd import Zstd

            try:
                got = Zstd().decode(payload, out=dest)
            except Exception as err:  # noqa: BLE001 - undecodable bytes are damage
                raise Damaged(f"image {image}: zstd cannot decode it ({err})") from err
            if np.asarray(got).nbytes != dest.nbytes:
                raise Damaged(f"image {image}: zstd gave {np.asarray(got).nbytes} bytes, not {dest.nbytes}")
        else:
            if len(payload) != dest.nbytes:
                raise Damaged(f"image {image}: {len(payload)} bytes, not {dest.nbytes}")
            dest[:] = np.frombuffer(payload, dtype=np.uint8)

    def _spans(self, index: np.ndarray, images: Sequence[int], shard: int, size: int | None) -> list[tuple[int, int] | None]:
        """``(offset, nbytes)`` of each image's chunk in shard ``shard`` (``None``: absent, the fill
        value); with the file's ``size``, each checked to lie inside it."""
        base = shard * self.per_shard
        out: list[tuple[int, int] | None] = []
        for image in images:
            off, nbytes = int(index[image - base, 0]), int(index[image - base, 1])
            if off == _ABSENT and nbytes == _ABSENT:
                out.append(None)
            elif nbytes < 4 or (size is not None and off + nbytes > size - self.index_bytes):
                raise Damaged(f"image {image}: its chunk lies outside the shard file")
            else:
                out.append((off, nbytes))
        return out

    # -- reading ------------------------------------------------------------------------------------
    def _shard_file(self, shard: int) -> Location:
        return self.folder / self.shard_keys[shard]

    def read_range(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Images ``start:stop``, each shard file read once (into ``out`` if given)."""
        out = self._empty(stop - start) if out is None else out
        if self.zstd and self.folder.random_access and stop > start:  # see read_rows
            self._decoded_each(np.arange(start, stop, dtype=np.int64), None, dest=out)
            return out
        for first, shard, count in self._shard_spans(start, stop):
            self.read_shard_into(shard, list(range(first, first + count)), list(out[first - start:first - start + count]))
        return out

    def _shard_spans(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(first image, shard, count)`` of every shard in images ``start:stop``."""
        spans = []
        i = start
        while i < stop:
            shard = i // self.per_shard
            end = min((shard + 1) * self.per_shard, stop)
            spans.append((i, shard, end - i))
            i = end
        return spans

    def read_rows(self, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Images ``indices`` (each in ``0..N-1``; any order, repeats allowed), the wanted images of
        each shard read once (into ``out`` if given)."""
        idx = np.asarray(indices, dtype=np.int64)
        out = self._empty(len(idx)) if out is None else out
        if not len(idx):
            return out
        if self.zstd and self.folder.random_access:  # the worker threads read and decode each image
            self._decoded_each(idx, None, dest=out)
            return out
        shards = idx // self.per_shard
        repeats = []
        # zstd on object storage: every shard's chunks are decoded on the worker threads together,
        # not shard by shard (a shuffled batch holds one or two images of each shard, too few to fill the cores)
        with _Work(parallel=self._parallel(len(idx))) if self.zstd else contextlib.nullcontext() as work:
            for shard in np.unique(shards):
                where = np.flatnonzero(shards == shard)
                wanted, first = np.unique(idx[where], return_index=True)
                # each wanted image straight into its first place in ``out``, then copied to its repeats
                self.read_shard_into(int(shard), wanted.tolist(), [out[i] for i in where[first]], work)
                if len(wanted) < len(where):
                    repeats.append((where, where[first][np.searchsorted(wanted, idx[where])]))
        for where, source in repeats:  # once every chunk is decoded
            out[where] = out[source]
        return out

    def read_rows_each(self, indices: Sequence[int], put: Callable[[int, np.ndarray], None]) -> bool:
        """Call ``put(k, image)`` for each ``k``-th image of ``indices`` (each in ``0..N-1``), where
        ``image`` is one image's values, valid only during the call; ``False`` (nothing read) where
        this array is not read so: not on a local disk.

        Each chunk is read into one small buffer, its checksum checked and handed on while its bytes
        are still in the CPU's cache: a caller that converts the values (float16 to float32) then
        passes over memory once, not three times (into a batch, out of it, into the copy).
        Uncompressed chunks are read and handed on by the calling thread, in shard order, always in
        the same array object. zstd chunks are read, checked and decoded by the worker threads,
        each into that thread's own buffers, and handed on there: ``put`` is then called from
        several threads at once (never twice for the same ``k``), so that the reads and the
        caller's conversion run on every core beside the decoding.
        """
        if not self.folder.random_access:
            return False
        idx = np.asarray(indices, dtype=np.int64)
        if self.zstd:
            self._decoded_each(idx, put)
            return True
        chunk = np.empty(self.item_bytes + 4, dtype=np.uint8)
        whole, payload, crc = memoryview(chunk), memoryview(chunk[:-4]), chunk[-4:]
        image = chunk[:-4].view(self.dtype).reshape(self.item_shape)
        for shard, loc, present in self._present(idx, put):
            if any(span[1] != len(chunk) for _, span in present):
                raise Damaged(f"shard {shard}: a chunk of another size than an image's")

            def each(j: int, got: int) -> None:
                if got != len(chunk) or crc32c.crc32c(payload) != int.from_bytes(crc, "little"):
                    raise Damaged(f"image {int(idx[present[j][0]])}: crc32c checksum mismatch")
                put(present[j][0], image)

            if not loc.read_pieces_each([(span[0], [whole]) for _, span in present], each):
                raise Damaged(f"shard {shard}: its file disappeared while read")
        return True

    def _present(self, idx: np.ndarray, put: Callable[[int, np.ndarray], None]
                 ) -> Iterator[tuple[int, Location, list[tuple[int, tuple[int, int]]]]]:
        """Per shard of images ``idx``: ``(shard, its file, [(k, (offset, nbytes)) of each written
        chunk])``; the images of unwritten chunks are handed to ``put`` as zarr's fill value."""
        shards = idx // self.per_shard
        for shard in np.unique(shards).tolist():
            where = np.flatnonzero(shards == shard).tolist()
            loc = self._shard_file(shard)
            index = self._shard_index(loc, shard)
            spans = [None] * len(where) if index is None else self._spans(index, idx[where].tolist(), shard, None)
            present = [(k, span) for k, span in zip(where, spans) if span is not None]
            if len(present) < len(where):  # never written: zarr's fill value
                fill = self._empty(1)[0]
                self._fill(fill)
                for k, span in zip(where, spans):
                    if span is None:
                        put(k, fill)
            if present:
                yield shard, loc, present

    def _decoded_each(self, idx: np.ndarray, put: Callable[[int, np.ndarray], None] | None,
                      dest: np.ndarray | None = None) -> None:
        """:meth:`read_rows_each` of zstd chunks: this thread looks up each wanted chunk in its
        shard's index and opens each shard file once; each worker thread takes a share of the
        chunks and reads, checks and decodes each into its own buffers, and hands it on.
        (Uncompressed chunks are faster read and handed on by one thread: two threads reading
        them from the page cache were 0.85x as fast, alternated, 3,000 ViT-B images.)"""
        if dest is not None:  # each image decoded straight into its row; absent ones filled there
            put = dest.__setitem__
        mine = threading.local()  # per worker thread: a chunk buffer and an image buffer

        def each(job: tuple[Callable[[int, Sequence[Any]], int], int, int, int, int]) -> None:
            read, offset, nbytes, k, image = job
            raw = getattr(mine, "raw", None)
            if raw is None or len(raw) < nbytes:
                raw = mine.raw = np.empty(max(nbytes, self.item_bytes + 4), dtype=np.uint8)
            chunk = raw[:nbytes]
            if read(offset, [chunk]) != nbytes:
                raise Damaged(f"image {image}: its chunk is cut short in its shard file")
            if dest is not None:  # straight into the caller's array
                self._decode(memoryview(chunk), dest[k], image)
                return
            out = getattr(mine, "image", None)
            if out is None:
                out = mine.image = self._empty(1)[0]
            self._decode(memoryview(chunk), out, image)
            put(k, out)

        shards = self._present(idx, put)
        while group := list(itertools.islice(shards, _OPEN_FILES)):  # at most _OPEN_FILES files open at once
            with contextlib.ExitStack() as files:
                jobs = []
                for shard, loc, present in group:
                    read = files.enter_context(loc.reader())
                    if read is None:
                        raise Damaged(f"shard {shard}: its file disappeared while read")
                    jobs.extend((read, offset, nbytes, k, int(idx[k])) for k, (offset, nbytes) in present)
                with _Work(parallel=self._parallel(len(jobs))) as work:  # every job ends before the files close
                    step = max(1, -(-len(jobs) // _workers()))  # one job list per worker thread
                    for i in range(0, len(jobs), step):
                        work.add(each, jobs[i:i + step])

    def read_shard_into(self, shard: int, images: list[int], out: Sequence[np.ndarray],
                        work: "_Work | None" = None) -> None:
        """Images ``images`` (sorted, unique, all in shard ``shard``) into ``out`` (one array each).

        On object storage, a shard of which many images are wanted is read whole in one GET; else
        the index is read first (once per shard in a complete store), then only the wanted chunks'
        bytes, one range per run of chunks that lie end to end (concurrent GETs). On a local disk the
        runs are read in calls of up to ``_PIECE`` chunks (one open each) while the worker threads
        check and decode the calls already read; uncompressed chunks are read straight into ``out``
        (their checksums beside it) with one scattered read per run. ``work``: a caller's
        :class:`_Work` that the decoding joins (the caller waits for it); by default this call's own.
        """
        loc = self._shard_file(shard)
        count = min(self.per_shard, self.num_images - shard * self.per_shard)
        if not loc.random_access and len(images) >= _WHOLE_SHARD_FRACTION * count:
            self._read_whole_into(loc, shard, images, out, work)
            return
        index = self._shard_index(loc, shard)
        if index is None:  # never written: zarr's fill value
            self._fill_all(out)
            return
        spans = self._spans(index, images, shard, None)
        pieces: list[list[int]] = []  # positions in ``images`` whose chunks lie end to end
        for k, span in enumerate(spans):
            if span is None:
                self._fill(out[k])
                continue
            prev = spans[pieces[-1][-1]] if pieces else None
            if (prev is not None and pieces[-1][-1] == k - 1 and prev[0] + prev[1] == span[0]
                    and (len(pieces[-1]) < _PIECE or not loc.random_access)):
                pieces[-1].append(k)
            else:
                pieces.append([k])
        wanted = sum(len(p) for p in pieces)
        decode = lambda job: self._decode(job[0], out[job[1]], job[2])  # noqa: E731
        with _joined(work, self._parallel(wanted) if self.zstd else wanted >= _PIECE) as work:
            if not self.zstd and loc.random_access and all(spans[k][1] == self.item_bytes + 4 for p in pieces for k in p):
                flat = [o.reshape(-1).view(np.uint8) for o in out]
                crcs = np.zeros((len(out), 4), dtype=np.uint8)

                def verify(k: int) -> None:
                    if crc32c.crc32c(flat[k]) != int.from_bytes(crcs[k].tobytes(), "little"):
                        raise Damaged(f"image {images[k]}: crc32c checksum mismatch")

                for call in _calls(pieces):  # one open per call; checked while the next call reads
                    got = loc.read_pieces([(spans[p[0]][0], [b for k in p for b in (flat[k], crcs[k])]) for p in call])
                    if got is None:
                        raise Damaged(f"shard {shard}: its file disappeared while read")
                    if got != [sum(spans[k][1] for k in p) for p in call]:
                        raise Damaged(f"shard {shard}: shorter than its index says")
                    work.add(verify, [k for p in call for k in p])
                return
            batches = list(_calls(pieces)) if loc.random_access else [pieces]  # object storage: one round of GETs
            for batch in batches:
                got = loc.read_ranges([(spans[p[0]][0], sum(spans[k][1] for k in p)) for p in batch])
                if got is None:
                    raise Damaged(f"shard {shard}: its file disappeared while read")
                for p, data in zip(batch, got):
                    buf, pos, jobs = memoryview(data), 0, []
                    for k in p:
                        jobs.append((buf[pos:pos + spans[k][1]], k, images[k]))
                        pos += spans[k][1]
                    work.add(decode, jobs)

    def _shard_index(self, loc: Location, shard: int) -> np.ndarray | None:
        """The checked index of shard ``shard`` (kept when the store is immutable), or ``None`` if
        its file was never written."""
        index = self._indexes.get(shard)
        if index is not None:
            return index
        tails = loc.read_ranges([(-self.index_bytes, self.index_bytes)])
        if tails is None:
            return None
        if len(tails[0]) != self.index_bytes:
            raise Damaged(f"shard {shard}: shorter than its index")
        index = self._index(tails[0], shard)
        if self.immutable:
            self._indexes[shard] = index
        return index

    def _read_whole_into(self, loc: Location, shard: int, images: list[int], out: Sequence[np.ndarray],
                         work: "_Work | None" = None) -> None:
        """Images ``images`` of shard ``shard`` from one read of the whole shard file."""
        data = loc.read_bytes()
        if data is None:  # never written: zarr's fill value
            self._fill_all(out)
            return
        buf = memoryview(data)
        if len(buf) < self.index_bytes:
            raise Damaged(f"shard {shard}: {len(buf)} bytes, shorter than its index")
        spans = self._spans(self._index(buf[len(buf) - self.index_bytes:], shard), images, shard, len(buf))
        jobs = []
        for k, span in enumerate(spans):
            if span is None:
                self._fill(out[k])
            else:
                jobs.append((buf[span[0]:span[0] + span[1]], k, images[k]))
        with _joined(work, self._parallel(len(jobs)) if self.zstd else len(jobs) >= _PIECE) as work:
            for i in range(0, len(jobs), _PIECE):
                work.add(lambda job: self._decode(job[0], out[job[1]], job[2]), jobs[i:i + _PIECE])


def _calls(pieces: list[list[int]]) -> Iterator[list[list[int]]]:
    """Consecutive pieces grouped so that each group holds at most ``_PIECE`` chunks (a piece
    longer than that is a group of its own)."""
    group: list[list[int]] = []
    size = 0
    for p in pieces:
        if group and size + len(p) > _PIECE:
            yield group
            group, size = [], 0
        group.append(p)
        size += len(p)
    if group:
        yield group


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def _pool() -> ThreadPoolExecutor | None:
    """The worker threads (one per core, at most 8; none on one core). Checksums and zstd release
    the GIL, so decoding uses every core. Made again in a forked child (a fork keeps no threads)."""
    global _POOL
    workers = _workers()
    if workers < 2:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maxa-read"))
        return _POOL[1]


def _touched(out: np.ndarray) -> np.ndarray:
    """``out`` (fresh from ``np.empty``), its pages first written on the worker threads when it is
    large. A fresh array's first write costs a page fault per page (the kernel zeroes each page; on
    a virtual machine the host may back it first): for a store-sized array, done by the one thread
    that reads into it, that fault alone ran at 0.4-0.7 GB/s on a 2-core VM, against 1.2-1.5 GB/s
    on two threads. One byte per page is written: the pages are the cost, not the bytes. It waits
    for the workers, so a worker thread must never ask for a large array (theirs are one image)."""
    pool = _pool() if out.nbytes >= _TOUCH_BYTES else None
    if pool is None:
        return out
    flat = out.reshape(-1).view(np.uint8)
    step = -(-flat.size // _workers() // _PAGE) * _PAGE

    def touch(start: int) -> None:
        flat[start:start + step:_PAGE] = 0  # NumPy lets go of the GIL for the assignment

    for f in [pool.submit(touch, i) for i in range(0, flat.size, step)]:
        f.result()
    return out


def _each(fn: Callable[[Any], None], jobs: Sequence[Any]) -> None:
    for job in jobs:
        fn(job)


def _joined(work: "_Work | None", parallel: bool) -> Any:
    """``work`` itself (its owner waits for it), or a new :class:`_Work` waited for on leaving."""
    return contextlib.nullcontext(work) if work is not None else _Work(parallel)


class _Work:
    """Jobs run as they are added: on the worker threads when ``parallel``, else at once. Leaving
    the ``with`` block waits for every job, then raises the first failure."""

    def __init__(self, parallel: bool) -> None:
        self.pool = _pool() if parallel else None
        self.futures: list[Future] = []

    def add(self, fn: Callable[[Any], None], jobs: Sequence[Any]) -> None:
        if self.pool is None:
            _each(fn, jobs)
        else:
            self.futures.append(self.pool.submit(_each, fn, jobs))

    def __enter__(self) -> "_Work":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        first: BaseException | None = None
        for f in self.futures:  # every job ends before the output is used or dropped
            try:
                f.result()
            except BaseException as err:  # noqa: BLE001 - the first one is raised below
                first = first or err
        if first is not None and exc_type is None:
            raise first
