"""What lets xarray (and any Zarr tool that reads dimension names) open a store as it is.

* Every array names its dimensions (``store._layout.array_dims``): ``image`` first, ``shard`` for
  ``shard_done``, a layer's own ``y_<layer>``, ``x_<layer>``, ``c_<layer>``.
* Every group that holds per-image arrays (the root, ``features/``, ``feature_scales/``) has an
  ``image_id`` string array along ``image``, the ids of ``index/`` in their order, declared a
  coordinate by the group's ``coordinates`` attribute (xarray's convention for a coordinate that no
  variable names). ``index/`` stays what maxa reads; ``image_id`` is written from the same list when
  the group is created, so the two never differ (``maxa stores verify`` checks it).
* The sub-groups carry the store's kind, key and spec in their attributes (``spec``); the root
  carries them in ``maxa``.
* A complete store's metadata is consolidated into its root ``zarr.json`` (zarr 3
  ``consolidate_metadata``): one read opens every array (on object storage one GET). Only a
  complete store is consolidated, and nothing under the root changes after that but the root's
  own attributes, which consolidation does not copy: the completion mark read is always the true one.

The writer creates all of it with the store and consolidates at finalisation. :func:`add_xarray_metadata`
adds it to a store written before (``maxa stores upgrade``): it rewrites metadata documents
(``zarr.json``) and adds the small ``image_id`` arrays, never a chunk or shard of the data.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from store import _layout as L
from store.location import Location

__all__ = ["add_xarray_metadata", "consolidate", "expected_dims", "subgroup_attrs", "write_image_ids"]


def subgroup_attrs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of ``features/`` and ``feature_scales/``: the image-id coordinate, the store's
    kind, key and spec (what ``xr.open_zarr(store, group=...)`` shows as ``attrs``)."""
    return {"coordinates": L.IMAGE_ID, "kind": meta["kind"], "key": meta["key"], "spec": meta["spec"]}


def write_image_ids(group: zarr.Group, name: str, image_ids: Sequence[str]) -> None:
    """Create (or replace) the ``(N,)`` string array ``name`` of ``group`` holding ``image_ids``: one
    chunk, zstd and crc32c like the stores' other arrays."""
    n = len(image_ids)
    arr = group.create_array(name, shape=(n,), chunks=(max(n, 1),), dtype=str, fill_value="",
                             compressors=L.compressors("zstd"), dimension_names=(L.IMAGE_DIM,), overwrite=True)
    values = np.empty(n, dtype=object)
    values[:] = [str(i) for i in image_ids]
    arr[:] = values


def expected_dims(name: str, ndim: int, current: Sequence[str] | None) -> tuple[str, ...]:
    """The dimension names array ``name`` (``ndim`` axes) has in a store of today's layout, given
    those it has (``current``, ``None`` for none): what the writer gives it."""
    parent, _, leaf = name.rpartition("/")
    if name == L.SHARD_DONE:
        return (L.SHARD_DIM,)
    if parent == L.FEATURES and ndim == 4:
        return (L.IMAGE_DIM, *L.feature_dims(leaf))
    if parent == L.FEATURE_SCALES and ndim == 2:
        return (L.IMAGE_DIM, L.feature_dims(leaf)[2])
    if current is not None and len(current) == ndim and current[0] == L.IMAGE_DIM:
        return tuple(current)
    return L.array_dims(name, (), ndim - 1)


def consolidate(location: Location) -> None:
    """Consolidate the metadata of every node of the store at ``location`` into its root ``zarr.json``."""
    group = location.open_group("r+", consolidated=False)
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification" (yet): xarray reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(group.store, path=group.path)


def add_xarray_metadata(location: Location, meta: Mapping[str, Any]) -> list[str]:
    """Give the store at ``location`` (attributes ``meta``) every piece of the module docstring but
    the consolidation (the caller consolidates last); returns what was added or changed, in words
    (empty: nothing was missing). Reads every node's own metadata, not a consolidated copy."""
    group = location.open_group("r+", consolidated=False)
    ids = [str(i) for i in group[L.INDEX_GROUP].attrs["image_ids"]]
    changes: list[str] = []
    renamed: list[str] = []
    subgroups = [name for name in L.ARRAY_GROUPS if name in group]
    for prefix, node in [("", group), *((f"{name}/", group[name]) for name in subgroups)]:
        for leaf, arr in node.arrays():
            name = prefix + leaf
            current = arr.metadata.dimension_names
            want = expected_dims(name, arr.ndim, current)
            if current is None or tuple(current) != want:
                _set_dimension_names(location, name, want)
                renamed.append(name)
    if renamed:
        changes.append(f"dimension names of {', '.join(renamed)}")
    for prefix, node in [("", group), *((f"{name}/", group[name]) for name in subgroups)]:
        have = None
        if L.IMAGE_ID in node:
            try:
                have = [str(i) for i in np.asarray(node[L.IMAGE_ID][:]).tolist()]
            except Exception:  # noqa: BLE001 - unreadable: written again below
                have = None
        if have != ids:
            write_image_ids(node, L.IMAGE_ID, ids)
            changes.append(f"{prefix}{L.IMAGE_ID}")
    for name in subgroups:
        want_attrs = subgroup_attrs(meta)
        got = dict(group[name].attrs)
        if any(got.get(k) != v for k, v in want_attrs.items()):
            group[name].attrs.update(want_attrs)
            changes.append(f"{name}/ attributes (spec)")
    if group.attrs.get("coordinates") != L.IMAGE_ID:
        group.attrs["coordinates"] = L.IMAGE_ID
        changes.append("the root's coordinates attribute")
    return changes


def _set_dimension_names(location: Location, name: str, dims: Sequence[str]) -> None:
    """Rewrite array ``name``'s ``zarr.json`` with ``dims`` as its dimension names; nothing else in
    it (codecs, chunking, attributes) or beside it changes."""
    doc_at = location / name / "zarr.json"
    blob = doc_at.read_bytes()
    if blob is None:
        raise FileNotFoundError(str(doc_at))
    doc = json.loads(blob.decode())
    doc["dimension_names"] = list(dims)
    doc_at.write_bytes(json.dumps(doc, indent=2).encode())
