"""Re-read every chunk of a store: checksums, completeness and shard flags.

A flipped byte in a chunk makes its crc32c check fail on decode; this turns that into a report
naming the array and the images affected, instead of a silently wrong value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from store import _layout as L
from store.location import Location, as_location
from runtime.errors import StoreError
from store.damage import describe_damage, find_damaged, reason
from store.fastread import Damaged, ShardedArray

__all__ = ["VerifyReport", "verify_store"]


@dataclass
class VerifyReport:
    path: str
    kind: str
    complete: bool
    num_images: int
    shards_done: int
    num_shards: int
    arrays_checked: int = 0
    chunks_read: int = 0
    bad_images: int = 0
    bad_image_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def verify_store(path: str | Path | Location, progress: Any = None) -> VerifyReport:
    """Read every chunk of every array of the store at ``path``.

    Args:
        path: the store.
        progress: optional callable ``progress(done, total)`` called per shard read.
    """
    loc = as_location(path)
    path = str(loc)
    meta = L.read_attrs(loc)
    if meta is None:
        raise StoreError(f"{path} is not a maxa store.")
    group = loc.open_group("r")
    n, s = int(meta["num_images"]), int(meta["shard_size"])
    num_shards = int(meta["num_shards"])
    report = VerifyReport(path=path, kind=meta.get("kind", "?"), complete=bool(meta.get("complete")),
                          num_images=n, shards_done=0, num_shards=num_shards)
    try:
        L.check_format(meta, path)
    except StoreError as err:  # still read every chunk: the bytes may be worth upgrading
        report.problems.append(str(err))
    try:
        done = np.asarray(group[L.SHARD_DONE][:]).astype(bool)
    except Exception as err:  # noqa: BLE001 - report, don't crash
        report.problems.append(f"shard_done unreadable: {err}")
        done = np.zeros(num_shards, bool)
    report.shards_done = int(done.sum())
    try:
        bad = np.flatnonzero(np.asarray(group[L.BAD][:]))
        ids = list(group[L.INDEX_GROUP].attrs["image_ids"])
        report.bad_images = int(bad.size)
        report.bad_image_ids = [str(ids[i]) for i in bad[:100]]
    except Exception as err:  # noqa: BLE001 - report, don't crash
        report.problems.append(f"bad-image flags unreadable: {err}")
    if not report.complete:
        report.problems.append("store is not marked complete")
    if report.complete and not done.all():
        report.problems.append(f"marked complete but shards {np.flatnonzero(~done).tolist()} are not flagged done")
    arrays = [name for name, _ in group.arrays() if name != L.SHARD_DONE]
    for sub in (L.FEATURES, L.FEATURE_SCALES):
        arrays += [f"{sub}/{name}" for name, _ in group[sub].arrays()] if sub in group else []
    total = len(arrays) * num_shards
    step = 0
    ids: list[str] | None = None
    try:
        ids = list(group[L.INDEX_GROUP].attrs["image_ids"])
    except Exception:  # noqa: BLE001 - already reported above; name images by index only
        pass
    if ids is not None:
        for name in [a for a in arrays if a.rpartition("/")[2] == L.IMAGE_ID]:
            try:
                same = [str(i) for i in np.asarray(group[name][:]).tolist()] == [str(i) for i in ids]
            except Exception:  # noqa: BLE001 - reported by the chunk check below
                continue
            if not same:
                report.problems.append(f"{name}: the image ids xarray reads differ from index/'s; "
                                       f"`maxa stores upgrade {path}` writes them again")
    for name in arrays:
        arr = group[name]
        report.arrays_checked += 1
        per_image = arr.chunks[0] == 1
        fast = ShardedArray.of(loc, name, arr)  # the store's own reader, faster than zarr-python's
        buf = None if fast is None else np.empty((min(s, n), *fast.item_shape), dtype=fast.dtype)  # one per array
        for shard in range(num_shards):
            start, stop = shard * s, min((shard + 1) * s, n)
            try:
                values = _read(arr, fast, start, stop, None if buf is None else buf[:stop - start])
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    report.problems.append(f"{name}: non-finite values in images {start}..{stop - 1}")
            except Exception as err:  # noqa: BLE001 - a checksum failure raises from the codec
                report.problems.append(_damage_problem(name, arr, start, stop, ids, err))
            report.chunks_read += stop - start if per_image else 1
            step += 1
            if progress is not None:
                progress(step, total)
    partial = loc.partial_files()
    if partial and report.complete:
        report.problems.append(f"{len(partial)} orphan *.partial file(s) (harmless; re-run extract to clean)")
    return report


def _read(arr: Any, fast: ShardedArray | None, start: int, stop: int, out: np.ndarray | None) -> np.ndarray:
    """Images ``start:stop`` of ``arr``, every checksum checked: by the direct shard reader (into
    ``out``) where the array has its layout; through zarr-python elsewhere and on damage (its error
    names the damage)."""
    if fast is not None:
        try:
            return fast.read_range(start, stop, out)
        except Damaged:
            pass
    return np.asarray(arr[start:stop])


def _damage_problem(name: str, arr: Any, start: int, stop: int, ids: list[str] | None, err: Exception) -> str:
    """The problem line of a shard whose read failed: each image (inner chunk) re-read alone, so the
    line names exactly the damaged ones; an array with one chunk per shard names the shard."""
    whole = f"{name}: images {start}..{stop - 1} unreadable ({type(err).__name__}: {' '.join(str(err).split())})"
    try:
        failed = find_damaged(arr, start, stop)
    except Exception:  # noqa: BLE001 - not a damaged chunk (storage error, ...): report the shard as it failed
        return whole
    if not failed:
        return whole
    what = describe_damage(arr, [i for i, _ in failed], ids)
    fine = stop - start - len(failed) if arr.chunks[0] == 1 else 0
    rest = f"; the other {fine} image(s) of images {start}..{stop - 1} read fine" if fine else ""
    return f"{name}: {what} unreadable ({reason(failed[0][1])}){rest}"
