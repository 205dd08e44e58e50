"""Create, resume and complete a store, one whole shard at a time.

The writer is crash-safe by construction (DESIGN contract 5, TECH_NOTES "Zarr 3 feature arrays"):
a shard is assigned whole (no read-modify-write), then its flag in ``shard_done`` is set; a run
killed at any point leaves flags only for shards that are fully on disk, and a re-run writes the
rest. The group is created in a temporary directory and renamed into place, so a reader never
sees a half-created store; the store is marked complete only when every shard is flagged.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from store import _layout as L
from store.errors import StoreError

__all__ = ["ArrayDef", "StoreWriter"]


@dataclass(frozen=True)
class ArrayDef:
    """A per-image array: ``(N, *shape)`` of ``dtype``.

    Attributes:
        name: path inside the group (``"features/last"``, ``"boundaries"``).
        shape: per-image shape.
        dtype: numpy dtype name.
        dims: dimension names after the leading ``"image"``.
        chunk_per_image: one inner chunk per image (large arrays); otherwise one chunk per shard.
        attrs: attributes of the array (e.g. a layer's token centres).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...] = ()
    chunk_per_image: bool = True
    attrs: Mapping[str, Any] | None = None


class StoreWriter:
    """Writes one store: call :meth:`open`, then :meth:`write_shard` for each missing shard, then
    :meth:`finalize`.

    Args:
        path: the store's directory (``….zarr``).
        kind: ``"features"`` or ``"targets"``.
        key: the spec's content key; an existing store with another key at ``path`` is refused.
        spec: the spec as a dict (saved in the attributes).
        arrays: the per-image arrays.
        image_ids: the ordered image ids (N = their number).
        shard_size: images per shard.
        compression: ``"none"`` or ``"zstd"``.
        provenance: tool/library versions, host, date, command.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        kind: str,
        key: str,
        spec: dict[str, Any],
        arrays: Sequence[ArrayDef],
        image_ids: Sequence[str],
        shard_size: int,
        compression: str = "none",
        provenance: dict[str, Any] | None = None,
    ) -> None:
        if not image_ids:
            raise StoreError(f"refusing to create an empty store at {path}: the dataset split has no images.")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.path = str(path)
        self.kind = kind
        self.key = key
        self.spec = spec
        self.arrays = list(arrays)
        self.image_ids = list(image_ids)
        self.num_images = len(self.image_ids)
        self.shard_size = int(shard_size)
        self.num_shards = -(-self.num_images // self.shard_size)
        self.compression = compression
        self.provenance = provenance or {}
        self._group: zarr.Group | None = None
        self.complete = False

    # -- creation -------------------------------------------------------------------------------
    def open(self) -> "StoreWriter":
        """Create the store, or open an existing one with the same key to resume or reuse it."""
        meta = L.read_attrs(self.path)
        if meta is None:
            if L.is_remote(self.path):
                raise StoreError(f"creating stores on {self.path} is not supported yet; use a local store root.")
            if os.path.exists(self.path):
                raise StoreError(
                    f"{self.path} exists but is not a maxa store; remove it or choose another --store-root."
                )
            self._create_atomically()
            meta = L.read_attrs(self.path)
            assert meta is not None
        self._check_same(meta)
        self.shard_size = int(meta["shard_size"])
        self.num_shards = int(meta["num_shards"])
        self.complete = bool(meta.get("complete"))
        self._group = L.open_group(self.path, "r+")
        return self

    def _check_same(self, meta: dict[str, Any]) -> None:
        if meta.get("kind") != self.kind or meta.get("key") != self.key:
            raise StoreError(
                f"{self.path} holds another store (kind {meta.get('kind')!r}, key {meta.get('key')!r}, "
                f"expected {self.kind!r} {self.key!r}); remove it or choose another --store-root."
            )

    def _create_atomically(self) -> None:
        parent = Path(self.path).parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{Path(self.path).name}.creating-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(str(tmp), mode="w-")
        n, s = self.num_images, self.shard_size
        for a in self.arrays:
            per_image = tuple(int(v) for v in a.shape)
            inner = (1, *per_image) if a.chunk_per_image else (s, *per_image)
            arr = group.create_array(
                a.name,
                shape=(n, *per_image),
                chunks=inner,
                shards=(s, *per_image) if a.chunk_per_image else None,
                dtype=a.dtype,
                compressors=L.compressors(self.compression),
                fill_value=0,
                dimension_names=("image", *a.dims) if a.dims else None,
            )
            if a.attrs:
                arr.attrs.update(dict(a.attrs))
        group.create_array(L.SHARD_DONE, shape=(self.num_shards,), chunks=(1,), dtype="uint8", fill_value=0)
        group.create_array(L.BAD, shape=(n,), chunks=(s,), dtype="uint8", fill_value=0,
                           compressors=L.compressors("none"))
        index = group.create_group(L.INDEX_GROUP)
        index.attrs["image_ids"] = self.image_ids
        group.attrs[L.ATTR] = {
            "kind": self.kind,
            "key": self.key,
            "spec": self.spec,
            "provenance": self.provenance,
            "num_images": n,
            "shard_size": s,
            "num_shards": self.num_shards,
            "compression": self.compression,
            "complete": False,
            "created": _now(),
        }
        try:
            os.rename(tmp, self.path)
        except OSError:  # another writer created the same store first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if L.read_attrs(self.path) is None:
                raise

    # -- shards ---------------------------------------------------------------------------------
    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            raise RuntimeError("call open() first")
        return self._group

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def missing_shards(self) -> list[int]:
        done = np.asarray(self.group[L.SHARD_DONE][:])
        return [int(s) for s in np.flatnonzero(done == 0)]

    def write_shard(self, shard: int, data: Mapping[str, np.ndarray], bad: np.ndarray | None = None) -> None:
        """Assign shard ``shard`` of every array at once, then flag it done.

        Args:
            shard: shard index.
            data: array name → ``(stop - start, *shape)`` values for every array of the store.
            bad: ``(stop - start,)`` 1 for images that could not be decoded.
        """
        start, stop = self.shard_range(shard)
        missing = {a.name for a in self.arrays} - set(data)
        if missing:
            raise ValueError(f"write_shard({shard}) lacks arrays {sorted(missing)}")
        for a in self.arrays:
            values = data[a.name]
            if values.shape[0] != stop - start:
                raise ValueError(f"{a.name}: shard {shard} needs {stop - start} images, got {values.shape[0]}")
            self.group[a.name][start:stop] = values
        if bad is not None and np.any(bad):
            self.group[L.BAD][start:stop] = np.asarray(bad, dtype="uint8")
        self.group[L.SHARD_DONE][shard] = 1  # only after every array of the shard is on disk

    def finalize(self, **extra: Any) -> None:
        """Mark the store complete, after checking that every shard is flagged done."""
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} shard(s) not written yet; re-run to finish them.")
        meta = dict(self.group.attrs[L.ATTR])
        meta.update(extra)
        meta["complete"] = True
        meta["completed"] = _now()
        meta["num_bad"] = int(np.count_nonzero(self.group[L.BAD][:]))
        self.group.attrs[L.ATTR] = meta
        self.complete = True
        _clean_partials(self.path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean_partials(path: str) -> None:
    """Remove orphan temporary files a kill -9 may leave behind (``*.partial``)."""
    if L.is_remote(path):
        return
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            if f.endswith(".partial"):
                try:
                    os.remove(os.path.join(dirpath, f))
                except OSError:
                    pass
