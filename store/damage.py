"""Damaged chunks: finding them image by image, and naming them in one line.

A read of a store that meets bytes which fail their checksum or their codec (``store.fastread``
raises :class:`~store.fastread.Damaged`) is read again through zarr, chunk by chunk, only after
the failure: :func:`find_damaged` gives the damaged images and :func:`describe_damage` names them
(``store.reader`` and ``store.verify`` turn that into one line that says what to run).
"""

from __future__ import annotations

from typing import Any, Sequence

import zarr
from zarr.core.sync import sync

from runtime.errors import MaxaError

__all__ = ["describe_damage", "find_damaged", "gather", "is_damage", "read_failures", "reason"]


async def gather(arr: zarr.Array, idx: list[int]) -> list[Any]:
    """Image ``i`` of ``arr`` for each ``i`` in ``idx``, read concurrently. Every request runs to
    its end: a failed one yields its exception in its place (none is left pending when the loop
    goes away, which asyncio would report as "Task was destroyed but it is pending!")."""
    import asyncio

    aarr = arr._async_array  # the public sync API serialises per call; gather overlaps requests
    return await asyncio.gather(*(aarr.getitem((i,)) for i in idx), return_exceptions=True)


def read_failures(idx: Sequence[int], rows: Sequence[Any]) -> list[tuple[int, BaseException]]:
    """``(index, exception)`` of the failed reads of a :func:`gather`; re-raises what is not damage
    (an ``OSError``, a cancellation, ...) as it came."""
    failed = [(i, r) for i, r in zip(idx, rows) if isinstance(r, BaseException)]
    for _, e in failed:
        if not is_damage(e):
            raise e
    return failed


def is_damage(err: BaseException) -> bool:
    """Whether a read error comes from the bytes of a chunk (a checksum mismatch, a codec that
    cannot decode them) rather than from the storage itself (``OSError``: permissions, network),
    memory, or maxa's own checks."""
    return isinstance(err, Exception) and not isinstance(err, (OSError, MemoryError, MaxaError))


def reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if "checksum" in text.lower():
        return "crc32c checksum mismatch: the bytes on disk changed after they were written"
    return f"{type(err).__name__}: {text[:200]}"


def _units(arr: zarr.Array) -> tuple[int, int]:
    """``(images per shard, images per inner chunk)`` of a per-image array."""
    chunk = int(arr.chunks[0])
    shards = getattr(arr, "shards", None)
    return (int(shards[0]) if shards else chunk), chunk


def find_damaged(arr: zarr.Array, start: int, stop: int) -> list[tuple[int, BaseException]]:
    """``(first image, error)`` of every inner chunk of ``arr`` in images ``start:stop`` that cannot be
    read, each chunk read alone (only after a read of the range failed: this costs one more read of
    the range). An array with one chunk per shard reports the shard's first image (the shard is the
    unit). Errors that are not damage (see :func:`is_damage`) are raised as they came."""
    per_shard, per_chunk = _units(arr)
    stop = min(stop, arr.shape[0])
    failed: list[tuple[int, BaseException]] = []
    shard_starts = range(start - start % per_shard, stop, per_shard)
    for s0 in shard_starts:
        a, b = max(s0, start), min(s0 + per_shard, stop)
        if len(shard_starts) > 1:  # find the failing shards first, then their chunks
            try:
                arr[a:b]
                continue
            except Exception as err:
                if not is_damage(err):
                    raise
        firsts = [max(c, a) for c in range(a - a % per_chunk, b, per_chunk)]
        failed += read_failures(firsts, sync(gather(arr, firsts)))
    return failed


def describe_damage(arr: zarr.Array, first_images: Sequence[int], ids: Sequence[str] | None) -> str:
    """``"image 5 (id img5)"``, ``"3 images: 5 (id a), 9 (id b), …"`` or, for an array with one chunk per
    shard, ``"images 0..7 (ids a..h; this array keeps a whole shard in one chunk)"``."""
    n = arr.shape[0]
    _, per_chunk = _units(arr)

    def name(i: int) -> str:
        return str(ids[i]) if ids is not None and 0 <= i < len(ids) else "?"

    firsts = sorted({int(i) - int(i) % per_chunk for i in first_images})
    if per_chunk > 1:
        spans = [(c, min(c + per_chunk, n) - 1) for c in firsts]
        text = ", ".join(f"{a}..{b} (ids {name(a)}..{name(b)})" for a, b in spans[:5])
        more = f" and {len(spans) - 5} more chunks" if len(spans) > 5 else ""
        return f"images {text}{more} (this array keeps a whole shard in one chunk, so the shard is the unit)"
    if len(firsts) == 1:
        return f"image {firsts[0]} (id {name(firsts[0])})"
    text = ", ".join(f"{i} (id {name(i)})" for i in firsts[:5])
    more = f", and {len(firsts) - 5} more" if len(firsts) > 5 else ""
    return f"{len(firsts)} images: {text}{more}"
