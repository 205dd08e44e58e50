"""Dask and xarray views of a store, every chunk read by maxa's own reader.

``FeatureStore.to_dask(layer)`` and ``TargetStore.to_dask(name)`` give a lazy dask array with one
chunk per shard along ``image`` and whole along every other axis: the unit a shard file is read in
(``store.fastread``: one read per shard, every checksum verified). One chunk per image, what
``dask.array.from_zarr`` or ``xarray.open_zarr`` take from the inner chunks, makes one task per
image: ~118,000 for COCO train. A lossy layer reads dequantised, as from the reader.

The store is one object in the graph: it pickles as its location and opens again where a chunk is
computed (a dask worker), so a graph never carries arrays or open files.

``to_xarray()`` puts these arrays in an ``xarray.Dataset`` with the dimension names, the image-id
coordinate and the attributes that ``xr.open_zarr`` reads from the store (``store.xarray_meta``),
so either way of opening gives the same dataset; this one also for stores written before those were
(xarray is needed only here: ``pip install xarray``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from runtime.errors import MaxaError
from store import _layout as L

__all__ = ["ImageRows", "dask_array", "xarray_dataset"]


class ImageRows:
    """A read-only array over a store's per-image values, indexed as numpy is: what
    ``dask.array.from_array`` wraps. A contiguous run of images is one range read, anything else a
    batch read.

    Args:
        shape: ``(N, *per_image)``.
        dtype: the values' dtype.
        read_range: ``read_range(start, stop)`` → images ``start:stop``.
        read_rows: ``read_rows(indices)`` → those images.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, read_range: Callable[[int, int], np.ndarray],
                 read_rows: Callable[[Sequence[int]], np.ndarray]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.read_range = read_range
        self.read_rows = read_rows

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        n = self.shape[0]
        if isinstance(first, slice) and first.step in (None, 1):
            start, stop, _ = first.indices(n)
            values = self.read_range(start, max(start, stop))
        else:
            picked = np.arange(n)[first]
            values = self.read_rows(np.atleast_1d(picked).tolist())
            if picked.ndim == 0:
                return values[0][rest] if rest else values[0]
        return values[(slice(None), *rest)] if rest else values


def dask_array(rows: ImageRows, shard_size: int, token: Sequence[Any]) -> Any:
    """``rows`` as a dask array of one chunk per shard of ``shard_size`` images; ``token``: what
    names the values (the same store, array and encoding give the same graph keys)."""
    import dask.array as da
    from dask.base import tokenize

    n = rows.shape[0]
    chunks = (tuple(min(shard_size, n - s) for s in range(0, n, shard_size)), *((d,) for d in rows.shape[1:]))
    return da.from_array(rows, chunks=chunks, name=f"maxa-{tokenize(*token)}", lock=False, asarray=False,
                         inline_array=False, meta=np.empty((0,) * rows.ndim, dtype=rows.dtype))


def xarray_dataset(variables: dict[str, tuple[tuple[str, ...], Any]], image_ids: Sequence[str],
                   attrs: dict[str, Any]) -> Any:
    """An ``xarray.Dataset`` of ``variables`` (name → (dims, array)), ``image_id`` as the coordinate
    along ``image`` and ``attrs``."""
    try:
        import xarray as xr
    except ImportError as err:  # an optional dependency: only this view needs it
        raise MaxaError("to_xarray() needs xarray, which is not installed: `pip install xarray` "
                        "(or read the dask arrays of to_dask()).") from err
    ids = np.empty(len(image_ids), dtype=object)
    ids[:] = [str(i) for i in image_ids]
    return xr.Dataset({name: (dims, data) for name, (dims, data) in variables.items()},
                      coords={L.IMAGE_ID: (L.IMAGE_DIM, ids)}, attrs=attrs)
