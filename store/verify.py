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
from store.errors import StoreError

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
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def verify_store(path: str | Path, progress: Any = None, *,
                 storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Read every chunk of every array of the store at ``path``.

    Args:
        path: the store.
        progress: optional callable ``progress(done, total)`` called per shard read.
        storage_options: fsspec options for a URL ``path``.
    """
    path = str(path)
    meta = L.read_attrs(path, storage_options)
    if meta is None:
        raise StoreError(f"{path} is not a maxa store.")
    group = L.open_group(path, "r", storage_options)
    n, s = int(meta["num_images"]), int(meta["shard_size"])
    num_shards = int(meta["num_shards"])
    report = VerifyReport(path=path, kind=meta.get("kind", "?"), complete=bool(meta.get("complete")),
                          num_images=n, shards_done=0, num_shards=num_shards)
    try:
        done = np.asarray(group[L.SHARD_DONE][:]).astype(bool)
    except Exception as err:  # noqa: BLE001 - report, don't crash
        report.problems.append(f"shard_done unreadable: {err}")
        done = np.zeros(num_shards, bool)
    report.shards_done = int(done.sum())
    if not report.complete:
        report.problems.append("store is not marked complete")
    if report.complete and not done.all():
        report.problems.append(f"marked complete but shards {np.flatnonzero(~done).tolist()} are not flagged done")
    arrays = [name for name, _ in group.arrays() if name != L.SHARD_DONE]
    arrays += [f"{L.FEATURES}/{name}" for name, _ in group[L.FEATURES].arrays()] if L.FEATURES in group else []
    total = len(arrays) * num_shards
    step = 0
    for name in arrays:
        arr = group[name]
        report.arrays_checked += 1
        for shard in range(num_shards):
            start, stop = shard * s, min((shard + 1) * s, n)
            try:
                values = np.asarray(arr[start:stop])
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    report.problems.append(f"{name}: non-finite values in images {start}..{stop - 1}")
            except Exception as err:  # noqa: BLE001 - a checksum failure raises from the codec
                report.problems.append(f"{name}: images {start}..{stop - 1} unreadable ({type(err).__name__}: {err})")
            report.chunks_read += stop - start if arr.chunks[0] == 1 else 1
            step += 1
            if progress is not None:
                progress(step, total)
    if not L.is_remote(path) and Path(path).exists():
        partial = list(Path(path).rglob("*.partial"))
        if partial and report.complete:
            report.problems.append(f"{len(partial)} orphan *.partial file(s) (harmless; re-run extract to clean)")
    return report
