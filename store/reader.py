"""Read feature and target stores: ``open_features(path)`` and ``open_targets(path)``.

Only this module and the writer know the layout. Readers refuse incomplete stores unless asked
(``allow_incomplete=True``). A path may be a :class:`~store.location.Location` or a URL
(``s3://bucket/root/features/…zarr``); reading never writes anything under the store root.

Per-image arrays in the layout the writer makes are read straight from their shard files by
:mod:`store.fastread` (each shard file read once, every checksum verified). Other arrays, and any
read that meets damaged bytes, go through zarr: batched reads through its async API with one
request per image, gathered concurrently (``oindex`` on sharded arrays is an order of magnitude
slower); a damaged chunk is then named by image (:func:`store.damage.find_damaged`).
"""

from __future__ import annotations

import threading
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from store import _layout as L
from store.location import Location, as_location
from runtime.errors import StoreError
from store.damage import describe_damage, find_damaged, gather, is_damage, read_failures, reason
from store.fastread import Damaged, ShardedArray
from store.quantize import dequantize
from store.spec import FeatureSpec, TargetSpec
from store.views import ImageRows, dask_array, xarray_dataset
from store.xarray_meta import expected_dims, subgroup_attrs

__all__ = ["FeatureStore", "TargetStore", "open_features", "open_targets", "open_store"]


class _Store:
    kind = ""

    def __init__(self, where: str | Path | Location, *, allow_incomplete: bool = False) -> None:
        self.location = as_location(where)
        self.path = str(self.location)
        meta = L.read_attrs(self.location)
        if meta is None:
            if not self.location.exists():
                raise StoreError(f"no store at {self.path}; list stores with `maxa stores ls ROOT`.")
            raise StoreError(f"{self.path} is not a maxa store (no 'maxa' attributes in its zarr.json).")
        if meta.get("kind") != self.kind:
            raise StoreError(f"{self.path} is a {meta.get('kind')} store, not a {self.kind} store.")
        L.check_format(meta, self.path)
        if not meta.get("complete") and not allow_incomplete:
            raise StoreError(
                f"{self.path} is incomplete (extraction interrupted?); re-run the same `maxa extract` to finish it."
            )
        self.meta = meta
        self._allow_incomplete = allow_incomplete
        self._arrays: dict[str, zarr.Array] = {}  # opening an array reads and parses its metadata
        self._fast_readers: dict[str, ShardedArray | None] = {}
        self.group = self.location.open_group("r")

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as where it is (a dask graph sent to workers): opened again, and checked again, there
        return _reopen, (type(self), self.location, self._allow_incomplete)

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
        return np.flatnonzero(self._read_flags(L.BAD))

    def shard_done(self) -> np.ndarray:
        return self._read_flags(L.SHARD_DONE).astype(bool)

    def _read_flags(self, name: str) -> np.ndarray:
        """A whole bookkeeping array (``bad``, ``shard_done``); a damaged one is a :class:`StoreError`."""
        try:
            return np.asarray(self.group[name][:])
        except Exception as err:
            if not is_damage(err):
                raise
            raise StoreError(
                f"{self.kind} store {self.path} is damaged: its bookkeeping array {name!r} cannot be read "
                f"({reason(err)}). Run `maxa stores verify {self.path}`, then re-extract the store: remove it "
                "(`maxa stores rm`) and run the same `maxa extract` again."
            ) from err

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _fast(self, name: str, arr: zarr.Array) -> ShardedArray | None:
        """The direct reader of array ``name`` (:mod:`store.fastread`), or ``None`` where zarr reads it."""
        if name not in self._fast_readers:
            self._fast_readers[name] = ShardedArray.of(self.location, name, arr, immutable=self.complete)
        return self._fast_readers[name]

    def _read_rows(self, name: str, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``indices`` of array ``name``: from the shard files (:mod:`store.fastread`), else one
        concurrent zarr request per image; into ``out`` if given (its shape and dtype checked).

        Raises:
            StoreError: an image's chunk is damaged (checksum mismatch): names the images and the fix.
        """
        arr = self._array(name)
        idx = [int(i) for i in indices]
        _check_out(out, (len(idx), *arr.shape[1:]), arr.dtype, name)
        if not idx:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype) if out is None else out
        idx = _checked_indices(idx, arr.shape[0])
        if _is_run(idx):  # a contiguous range reads whole shards in one call
            return self._read_range(name, arr, idx[0], idx[-1] + 1, out)
        fast = self._fast(name, arr)
        if fast is not None:
            try:
                return fast.read_rows(idx, out)
            except Damaged:
                pass  # read again through zarr, which names the damaged images
        rows = sync(gather(arr, idx))
        failed = read_failures(idx, rows)
        if failed:
            raise self._damaged_error(name, arr, failed) from failed[0][1]
        return _into(out, np.stack([np.asarray(r) for r in rows]))

    def _read_range(self, name: str, arr: zarr.Array, start: int, stop: int,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Images ``start:stop`` of ``arr`` in one call (into ``out`` if given); on a damaged chunk,
        a :class:`StoreError` naming the damaged images (found by re-reading only after the failure)."""
        fast = self._fast(name, arr)
        if fast is not None:
            try:
                return fast.read_range(start, stop, out)
            except Damaged:
                pass  # read again through zarr, which names the damaged images
        try:
            return _into(out, np.asarray(arr[start:stop]))
        except Exception as err:
            if not is_damage(err):
                raise
            failed = find_damaged(arr, start, stop)
            if not failed:  # every chunk reads alone: not damage we can pin down, keep zarr's error
                raise
            raise self._damaged_error(name, arr, failed) from err

    def _damaged_error(self, name: str, arr: zarr.Array, failed: list[tuple[int, BaseException]]) -> StoreError:
        """One line: the store, the array, the damaged images (index and id) and the fix."""
        try:
            ids: list[str] | None = self.image_ids
        except Exception:  # noqa: BLE001 - the message still names the indices
            ids = None
        where = describe_damage(arr, [i for i, _ in failed], ids)
        return StoreError(
            f"{self.kind} store {self.path} is damaged: array {name!r}, {where} cannot be read "
            f"({reason(failed[0][1])}). Run `maxa stores verify {self.path}` to list every damaged image, then "
            "re-extract the store: remove it (`maxa stores rm`) and run the same `maxa extract` again."
        )

    def iter_shards(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, values)`` for each shard of array ``name``, in order."""
        arr = self._array(name)
        step = self.shard_size
        n = arr.shape[0]
        for start in range(0, n, step):
            yield start, self._read_range(name, arr, start, min(start + step, n))

    def nbytes_stored(self) -> int:
        """Bytes stored (local disk or object storage)."""
        return self.location.tree_bytes()


def _reopen(cls: type, location: Location, allow_incomplete: bool) -> "_Store":
    return cls(location, allow_incomplete=allow_incomplete)


def _check_out(out: np.ndarray | None, shape: tuple[int, ...], dtype: Any, name: str) -> None:
    """Refuse an ``out`` array the rows cannot be read into as they are."""
    if out is None:
        return
    if not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != np.dtype(dtype):
        got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out= for {name} must be a {tuple(shape)} {np.dtype(dtype)} array, not {got}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out= for {name} must be a writeable C-contiguous array")


def _into(out: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    if out is None:
        return rows
    out[...] = rows
    return out


def _checked_indices(idx: list[int], n: int) -> list[int]:
    """``idx`` as indices in ``0..n-1``: a negative index counts from the end (and a run of them
    stays a run); one outside the store is an ``IndexError``."""
    for i in idx:
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for a store of {n} images")
    return [i % n for i in idx]


def _is_run(idx: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(idx, idx[1:]))


class FeatureStore(_Store):
    """A feature store: ``len(store)`` images, ``store[i]`` → ``(h, w, C)`` float16 of the first
    layer, ``store.read_batch(indices, layer)`` → ``(B, h, w, C)``. A quantised store
    (``spec.quantization``) returns its values dequantised (``store.quantize.dequantize``), float16
    as from any other store."""

    kind = "features"

    @cached_property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.meta["spec"])

    def _layer_array_name(self, layer: str | None) -> str:
        return L.feature_array(self.spec.layer(layer).name)

    def _dequantized(self, layer: str | None, idx: list[int], out: np.ndarray | None = None) -> np.ndarray:
        """A quantised layer's float16 values of images ``idx`` (checked, in ``0..N-1``), into ``out``
        if given. From a local disk each image's int8 chunk is decoded and dequantised by a worker
        thread while in the CPU's cache; elsewhere, or on damage, the int8 rows are read, then
        dequantised (which names the damaged images)."""
        name = self.spec.layer(layer).name
        values, scales_name = L.feature_array(name), L.feature_scale_array(name)
        scales = self._read_rows(scales_name, idx)
        out = np.empty((len(idx), *self.layer_shape(layer)), dtype=np.float16) if out is None else out
        fast = self._fast(values, self._array(values)) if idx else None
        if fast is not None:
            def put(k: int, q: np.ndarray) -> None:
                dequantize(q[None], scales[k:k + 1], out=out[k:k + 1])

            try:
                if fast.read_rows_each(idx, put):
                    return out
            except Damaged:
                pass  # read again below, which names the damaged images
        return dequantize(self._read_rows(values, idx), scales, out=out)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(index)

    def read(self, index: int, layer: str | None = None) -> np.ndarray:
        if self.spec.lossy:
            return self._dequantized(layer, _checked_indices([int(index)], len(self)))[0]
        return self._read_rows(self._layer_array_name(layer), [index])[0]

    def read_batch(self, indices: Sequence[int], layer: str | None = None, *,
                   out: np.ndarray | None = None) -> np.ndarray:
        """``(B, h, w, C)`` features of ``indices`` (any order, repeats allowed).

        ``out``: a C-contiguous ``(B, h, w, C)`` array of :meth:`layer_dtype` to read into (a loader
        that reuses one buffer per batch saves the cost of fresh memory, about half a read's time).
        """
        if not self.spec.lossy:
            return self._read_rows(self._layer_array_name(layer), indices, out)
        _check_out(out, (len(indices), *self.layer_shape(layer)), self.layer_dtype(layer), self._layer_array_name(layer))
        return self._dequantized(layer, _checked_indices([int(i) for i in indices], len(self)), out)

    def read_batch_each(self, indices: Sequence[int], put: Callable[[int, np.ndarray], None],
                        layer: str | None = None) -> None:
        """Call ``put(k, values)`` with the ``(h, w, C)`` features (:meth:`layer_dtype`) of the
        ``k``-th image of ``indices``, for every ``k`` (in no set order); ``values`` is valid only
        during the call. ``put`` may be called from several threads at once (for different ``k``).

        For a loader that converts as it goes (float16 into a float32 batch): on a local disk each
        image is read (and decoded, on the worker threads, where zstd-compressed) into one small
        buffer and handed on while still in the CPU's cache
        (:meth:`store.fastread.ShardedArray.read_rows_each`); otherwise the batch is read with
        :meth:`read_batch` and handed on image by image. Damage raises :class:`StoreError` naming
        the images, as :meth:`read_batch` does (some images may have been handed on before).
        """
        name = self._layer_array_name(layer)
        arr = self._array(name)
        idx = _checked_indices([int(i) for i in indices], arr.shape[0])
        fast = self._fast(name, arr)
        if fast is not None:
            each = put
            if self.spec.lossy:  # dequantised into a float16 buffer per thread, then handed on
                scales = self._read_rows(L.feature_scale_array(self.spec.layer(layer).name), idx)
                mine = threading.local()

                def each(k: int, q: np.ndarray) -> None:
                    buf = getattr(mine, "values", None)
                    if buf is None:
                        buf = mine.values = np.empty((1, *q.shape), dtype=np.float16)
                    dequantize(q[None], scales[k:k + 1], out=buf)
                    put(k, buf[0])
            try:
                if fast.read_rows_each(idx, each):
                    return
            except Damaged:
                pass  # read again below, which names the damaged images
        values = self.read_batch(idx, layer)
        for k in range(len(idx)):
            put(k, values[k])

    def layer_shape(self, layer: str | None = None) -> tuple[int, int, int]:
        """``(h, w, C)`` of one image's features of ``layer``."""
        spec = self.spec.layer(layer)
        return (*spec.grid, spec.channels)

    def layer_dtype(self, layer: str | None = None) -> np.dtype:
        """The dtype :meth:`read_batch` returns for ``layer`` (float16 from a quantised store)."""
        if self.spec.lossy:
            return np.dtype(self.spec.dtype)
        return np.dtype(self._array(self._layer_array_name(layer)).dtype)

    def read_all(self, layer: str | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """The whole ``(N, h, w, C)`` layer, read shard by shard.

        ``out``: a C-contiguous ``(N, h, w, C)`` array of :meth:`layer_dtype` to read into (one
        reused across reads saves the cost of fresh memory: the kernel hands out and zeroes every
        page of a new array on first touch, which on a virtual machine can cost more than the read).
        """
        name = self._layer_array_name(layer)
        _check_out(out, (len(self), *self.layer_shape(layer)), self.layer_dtype(layer), name)
        if not self.spec.lossy:
            return self._read_range(name, self._array(name), 0, len(self), out)
        return self._dequantized(layer, list(range(len(self))), out)

    def token_centres(self, layer: str | None = None) -> np.ndarray:
        """``(h, w, 2)`` normalised ``(y, x)`` token centres of ``layer``."""
        return np.asarray(self.spec.layer(layer).token_centres, dtype=np.float32)

    def _layer_range(self, layer: str, start: int, stop: int) -> np.ndarray:
        if self.spec.lossy:
            return self._dequantized(layer, list(range(start, stop)))
        name = self._layer_array_name(layer)
        return self._read_range(name, self._array(name), start, stop)

    def to_dask(self, layer: str | None = None) -> Any:
        """Layer ``layer`` as a lazy ``(N, h, w, C)`` dask array, one chunk per shard (``store.views``),
        values as :meth:`read_all` returns them."""
        name = self.spec.layer(layer).name
        rows = ImageRows((len(self), *self.layer_shape(name)), self.layer_dtype(name),
                         partial(self._layer_range, name), partial(self.read_batch, layer=name))
        return dask_array(rows, self.shard_size, ("features", self.path, self.key, name))

    def to_xarray(self, layers: Sequence[str] | None = None) -> Any:
        """The layers (default: all) as an ``xarray.Dataset`` of :meth:`to_dask` arrays: what
        ``xr.open_zarr(store, group="features")`` gives, with a lossy store's values dequantised and
        one chunk per shard; dimensions ``image``, ``y_<layer>``, ``x_<layer>``, ``c_<layer>``."""
        names = [self.spec.layer(l).name for l in layers] if layers is not None else list(self.spec.layer_names)
        variables = {l: ((L.IMAGE_DIM, *L.feature_dims(l)), self.to_dask(l)) for l in names}
        attrs = {k: v for k, v in subgroup_attrs(self.meta).items() if k != "coordinates"}
        return xarray_dataset(variables, self.image_ids, attrs)

    def layer_shards(self, layer: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
        values = self.iter_shards(self._layer_array_name(layer))
        if not self.spec.lossy:
            return values
        scales = self.iter_shards(L.feature_scale_array(self.spec.layer(layer).name))
        return ((start, dequantize(q, s)) for (start, q), (_, s) in zip(values, scales))


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
        return sorted(name for name, _ in self.group.arrays() if name not in L.BOOKKEEPING)

    def read(self, name: str, indices: Sequence[int]) -> np.ndarray:
        self._check_name(name)
        return self._read_rows(name, indices)

    def read_all(self, name: str, *, out: np.ndarray | None = None) -> np.ndarray:
        """Every image's ``name`` targets (into ``out`` if given: a C-contiguous array of the
        array's shape and dtype)."""
        self._check_name(name)
        arr = self._array(name)
        _check_out(out, arr.shape, arr.dtype, name)
        return self._read_range(name, arr, 0, arr.shape[0], out)

    def to_dask(self, name: str) -> Any:
        """Targets ``name`` as a lazy dask array, one chunk per shard (``store.views``)."""
        self._check_name(name)
        arr = self._array(name)
        rows = ImageRows(arr.shape, arr.dtype, partial(self._name_range, name), partial(self.read, name))
        return dask_array(rows, self.shard_size, ("targets", self.path, self.key, name))

    def _name_range(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._read_range(name, self._array(name), start, stop)

    def to_xarray(self, names: Sequence[str] | None = None) -> Any:
        """The targets (default: all) as an ``xarray.Dataset`` of :meth:`to_dask` arrays: what
        ``xr.open_zarr(store)`` gives, less the bookkeeping arrays (``bad``: :attr:`bad`), one chunk per shard."""
        variables = {}
        for name in names if names is not None else self.array_names:
            dask = self.to_dask(name)
            variables[name] = (expected_dims(name, dask.ndim, self._array(name).metadata.dimension_names), dask)
        return xarray_dataset(variables, self.image_ids, {L.ATTR: self.meta})

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


def open_features(path: str | Path | Location, *, allow_incomplete: bool = False) -> FeatureStore:
    """Open a feature store for reading (refuses incomplete stores unless asked)."""
    return FeatureStore(path, allow_incomplete=allow_incomplete)


def open_targets(path: str | Path | Location, *, allow_incomplete: bool = False) -> TargetStore:
    """Open a target store for reading (refuses incomplete stores unless asked)."""
    return TargetStore(path, allow_incomplete=allow_incomplete)


def open_store(path: str | Path | Location, *, allow_incomplete: bool = True) -> _Store:
    """Open a store of any kind: features, targets, or predictions (``maxa predict --out x.zarr``)."""
    meta = L.read_attrs(path)
    kind = meta.get("kind") if meta is not None else None
    if kind == "targets":
        return TargetStore(path, allow_incomplete=allow_incomplete)
    if kind == "predictions":
        from store.predictions import PredictionStore

        return PredictionStore(path, allow_incomplete=allow_incomplete)
    return FeatureStore(path, allow_incomplete=allow_incomplete)
