"""Read feature and target stores: ``open_features(path)`` and ``open_targets(path)``.

Only this module and the writer know the layout. Readers refuse incomplete stores unless asked
(``allow_incomplete=True``). A path may be a URL (``s3://bucket/root/features/…zarr``) with fsspec
``storage_options``; reading never writes anything under the store root. Batched reads go through zarr's async API with one request per image,
gathered concurrently: ``oindex`` on sharded arrays is an order of magnitude slower
(TECH_NOTES "Batch reads").
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from store import _layout as L
from store.errors import StoreError, StoreMismatchError
from store.spec import FeatureSpec, TargetSpec

__all__ = ["FeatureStore", "TargetStore", "open_features", "open_targets", "open_store", "check_aligned"]


class _Store:
    kind = ""

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.storage_options = dict(storage_options) if storage_options else None
        meta = L.read_attrs(self.path, self.storage_options)
        if meta is None:
            if not L.is_remote(self.path) and not Path(self.path).exists():
                raise StoreError(f"no store at {self.path}; list stores with `maxa stores ls ROOT`.")
            raise StoreError(f"{self.path} is not a maxa store (no 'maxa' attributes in its zarr.json).")
        if meta.get("kind") != self.kind:
            raise StoreError(f"{self.path} is a {meta.get('kind')} store, not a {self.kind} store.")
        if not meta.get("complete") and not allow_incomplete:
            raise StoreError(
                f"{self.path} is incomplete (extraction interrupted?); re-run the same `maxa extract` to finish it."
            )
        self.meta = meta
        self.group = L.open_group(self.path, "r", self.storage_options)

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("provenance", {}))

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    def __len__(self) -> int:
        return int(self.meta["num_images"])

    @cached_property
    def image_ids(self) -> list[str]:
        return list(self.group[L.INDEX_GROUP].attrs["image_ids"])

    @cached_property
    def bad(self) -> np.ndarray:
        """Indices of images recorded as undecodable (their values are zeros)."""
        return np.flatnonzero(np.asarray(self.group[L.BAD][:]))

    def shard_done(self) -> np.ndarray:
        return np.asarray(self.group[L.SHARD_DONE][:]).astype(bool)

    def _array(self, name: str) -> zarr.Array:
        return self.group[name]

    def _read_rows(self, name: str, indices: Sequence[int]) -> np.ndarray:
        """Rows ``indices`` of array ``name``, one concurrent request per image."""
        arr = self._array(name)
        idx = [int(i) for i in indices]
        if not idx:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        n = arr.shape[0]
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"image index {i} out of range for a store of {n} images")
        if _is_run(idx):  # a contiguous range reads whole shards in one call
            return np.asarray(arr[idx[0] : idx[-1] + 1])
        rows = sync(_gather(arr, idx))
        return np.stack([np.asarray(r) for r in rows])

    def iter_shards(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, values)`` for each shard of array ``name``, in order."""
        arr = self._array(name)
        step = self.shard_size
        for start in range(0, arr.shape[0], step):
            yield start, np.asarray(arr[start : start + step])

    def nbytes_stored(self) -> int:
        """Bytes stored (local disk or object storage)."""
        if L.is_remote(self.path):
            fs, p = L.fs_path(self.path, self.storage_options)
            return int(fs.du(p, total=True))
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())


def _is_run(idx: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(idx, idx[1:]))


async def _gather(arr: zarr.Array, idx: list[int]) -> list[Any]:
    import asyncio

    aarr = arr._async_array  # the public sync API serialises per call; gather overlaps requests
    return await asyncio.gather(*(aarr.getitem((i,)) for i in idx))


class FeatureStore(_Store):
    """A feature store: ``len(store)`` images, ``store[i]`` → ``(h, w, C)`` float16 of the first
    layer, ``store.read_batch(indices, layer)`` → ``(B, h, w, C)``."""

    kind = "features"

    @cached_property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.meta["spec"])

    def _layer_array_name(self, layer: str | None) -> str:
        return f"{L.FEATURES}/{self.spec.layer(layer).name}"

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(index)

    def read(self, index: int, layer: str | None = None) -> np.ndarray:
        return np.asarray(self._array(self._layer_array_name(layer))[int(index)])

    def read_batch(self, indices: Sequence[int], layer: str | None = None) -> np.ndarray:
        """``(B, h, w, C)`` features of ``indices`` (any order, repeats allowed)."""
        return self._read_rows(self._layer_array_name(layer), indices)

    def read_all(self, layer: str | None = None) -> np.ndarray:
        """The whole ``(N, h, w, C)`` layer, read shard by shard."""
        return np.asarray(self._array(self._layer_array_name(layer))[:])

    def token_centres(self, layer: str | None = None) -> np.ndarray:
        """``(h, w, 2)`` normalised ``(y, x)`` token centres of ``layer``."""
        return np.asarray(self.spec.layer(layer).token_centres, dtype=np.float32)

    def layer_shards(self, layer: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
        return self.iter_shards(self._layer_array_name(layer))


class TargetStore(_Store):
    """A target store: arrays named by target (``boundaries``, ``distance``, ``instances``,
    ``instance_count``, ``instance_area``, ``foreground``, ``instance_ignore``, ``semantic``,
    ``depth``), each ``(N, ...)``."""

    kind = "targets"

    @cached_property
    def spec(self) -> TargetSpec:
        return TargetSpec.from_dict(self.meta["spec"])

    @cached_property
    def array_names(self) -> list[str]:
        return sorted(name for name, _ in self.group.arrays() if name not in (L.SHARD_DONE, L.BAD))

    def read(self, name: str, indices: Sequence[int]) -> np.ndarray:
        self._check_name(name)
        return self._read_rows(name, indices)

    def read_all(self, name: str) -> np.ndarray:
        self._check_name(name)
        return np.asarray(self._array(name)[:])

    def _check_name(self, name: str) -> None:
        if name not in self.array_names:
            raise StoreError(
                f"target store {self.path} has no {name!r} targets (it has {', '.join(self.array_names)}); "
                f"dataset {self.spec.dataset!r} does not support this task."
            )

    @cached_property
    def instance_offsets(self) -> np.ndarray:
        """Global index of each image's first instance: instance ``k`` (1-based) of image ``i`` is
        global instance ``offsets[i] + k - 1`` over the whole store."""
        counts = np.asarray(self.read_all("instance_count"), dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)[:-1]])


def open_features(path: str | Path, *, allow_incomplete: bool = False,
                  storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a feature store for reading (refuses incomplete stores unless asked)."""
    return FeatureStore(path, allow_incomplete=allow_incomplete, storage_options=storage_options)


def open_targets(path: str | Path, *, allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None) -> TargetStore:
    """Open a target store for reading (refuses incomplete stores unless asked)."""
    return TargetStore(path, allow_incomplete=allow_incomplete, storage_options=storage_options)


def open_store(path: str | Path, *, allow_incomplete: bool = True,
               storage_options: dict[str, Any] | None = None) -> FeatureStore | TargetStore:
    """Open a store of either kind."""
    meta = L.read_attrs(path, storage_options)
    if meta is not None and meta.get("kind") == "targets":
        return TargetStore(path, allow_incomplete=allow_incomplete, storage_options=storage_options)
    return FeatureStore(path, allow_incomplete=allow_incomplete, storage_options=storage_options)


def check_aligned(features: FeatureStore, targets: TargetStore) -> None:
    """Refuse a feature and a target store that do not index the same images in the same order."""
    f, t = features.spec, targets.spec
    if f.image_ids_hash != t.image_ids_hash or len(features) != len(targets):
        raise StoreMismatchError(
            f"feature store {features.path} ({f.dataset}/{f.split}, {len(features)} images, ids {f.image_ids_hash}) "
            f"and target store {targets.path} ({t.dataset}/{t.split}, {len(targets)} images, ids {t.image_ids_hash}) "
            "index different images; extract both from the same dataset split (and --limit)."
        )
