"""Create, resume and complete a store, one whole shard at a time.

The writer is crash-safe by construction (docs/store-format.md):
a shard is assigned whole (no read-modify-write), then its flag in ``shard_done`` is set; a run
killed at any point leaves flags only for shards that are fully on disk, and a re-run writes the
rest. The store is marked complete only when every shard is flagged.

Creation: on a local disk the group is built in a temporary directory and renamed into place, so
a reader never sees a half-created store. On object storage (``s3://…``, no atomic rename) the
arrays are created first and the ``maxa`` attributes (the mark readers look for) are written
last; until then the path is "not a maxa store", never a half-made one.

One writer at a time: :meth:`StoreWriter.open` takes the store's lease (``store.lease``). A second
writer of the same store waits while the first is alive, then reuses the complete store, or takes
over a stale lease and writes only the missing shards. Release it with :meth:`StoreWriter.close`
(or use the writer as a context manager); :meth:`StoreWriter.finalize` releases it too.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from runtime import settings
from store import _layout as L
from runtime.errors import StoreError
from store.fastwrite import ShardWriter
from store.lease import StoreLease, acquire_lease, read_lease, remove_lease
from store.location import Location, as_location
from store.quantize import QUANTIZATIONS, quantize
from store.spec import FORMAT_VERSION, FeatureSpec
from store.xarray_meta import add_xarray_metadata, consolidate, subgroup_attrs, write_image_ids

__all__ = ["ArrayDef", "StoreWriter", "feature_array_name", "feature_arrays", "remove_store"]

feature_array_name = L.feature_array


@dataclass(frozen=True)
class ArrayDef:
    """A per-image array: ``(N, *shape)`` of ``dtype``.

    Attributes:
        name: path inside the group (``"features/last"``, ``"boundaries"``).
        shape: per-image shape.
        dtype: numpy dtype name.
        dims: dimension names after the leading ``"image"`` (empty: ``<leaf>_<axis>``, see
            ``store._layout.array_dims``).
        chunk_per_image: one inner chunk per image (large arrays); otherwise one chunk per shard.
        attrs: attributes of the array (e.g. a layer's token centres).
        scales: for an int8 array quantised by the writer (``store.quantize``), the array that
            takes its per-image, per-channel scales; :meth:`StoreWriter.write_shard` is given the
            values under ``name`` and writes both.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...] = ()
    chunk_per_image: bool = True
    attrs: Mapping[str, Any] | None = None
    scales: str | None = None


def feature_arrays(spec: FeatureSpec) -> list[ArrayDef]:
    """The per-image arrays of a feature store: one float16 ``(h, w, C)`` array per layer, its
    token centres in the array's attributes (positional encodings are built from them later).
    A quantised store (``spec.quantization``) holds each layer as int8, its ``(C,)`` float32 scales
    per image beside it (``feature_scales/<layer>``)."""
    out = []
    for l in spec.layers:
        scales = L.feature_scale_array(l.name) if spec.lossy else None
        dims = L.feature_dims(l.name)  # the layer's own: layers of other grids share the group
        out.append(ArrayDef(L.feature_array(l.name), (*l.grid, l.channels), "int8" if scales else "float16",
                            dims, attrs={"token_centres": [list(map(list, row)) for row in l.token_centres]},
                            scales=scales))
        if scales:
            out.append(ArrayDef(scales, (l.channels,), "float32", dims[2:], attrs={"quantization": spec.quantization}))
    return out


def _quantized(arrays: Sequence[ArrayDef], data: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``data`` with the values of every array the writer quantises (``ArrayDef.scales``) as int8 and
    their scales beside them; values already given as int8 with their scales are kept."""
    todo = [a for a in arrays if a.scales and a.name in data and data[a.name].dtype != np.int8]
    if not todo:
        return data
    data = dict(data)
    for a in todo:
        data[a.name], data[a.scales] = quantize(data[a.name])
    return data


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
        compression: one of ``store.COMPRESSIONS`` (a lossy one is stored with the codecs of ``"zstd"``;
            its arrays come from the spec, :func:`feature_arrays`).
        provenance: tool/library versions, host, date, command.
        wait_timeout: seconds to wait for another live writer of the same store (``None``: as
            long as its lease is live; ``$MAXA_LEASE_WAIT_S``).
        log: where "waiting for ..." messages go (default: stderr).
        direct_writes: encode and write the shards of per-image arrays here (``store.fastwrite``,
            the same bytes); ``False``: every array through zarr-python (the reference it is
            measured and tested against).
    """

    def __init__(
        self,
        path: str | Path | Location,
        *,
        kind: str,
        key: str,
        spec: dict[str, Any],
        arrays: Sequence[ArrayDef],
        image_ids: Sequence[str],
        shard_size: int,
        compression: str = "none",
        provenance: dict[str, Any] | None = None,
        wait_timeout: float | None = None,
        log: Any = None,
        direct_writes: bool = True,
    ) -> None:
        if not image_ids:
            raise StoreError(f"refusing to create an empty store at {path}: the dataset split has no images.")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.location = as_location(path)
        self.path = str(self.location)
        self.kind = kind
        self.key = key
        self.spec = spec
        self.arrays = list(arrays)
        self.image_ids = list(image_ids)
        self.num_images = len(self.image_ids)
        self.shard_size = int(shard_size)
        self.num_shards = -(-self.num_images // self.shard_size)
        self.compression = compression
        quantised = [a.name for a in self.arrays if a.scales]
        if (compression in QUANTIZATIONS) != bool(quantised):
            raise ValueError(
                f"compression {compression!r} with {'quantised arrays ' + ', '.join(quantised) if quantised else 'no quantised array'}: "
                f"a lossy compression needs the arrays of feature_arrays(spec) for a spec with that quantization, "
                f"and quantised arrays need that compression")
        self.provenance = provenance or {}
        self.wait_timeout = wait_timeout
        self.log = log
        self.direct_writes = direct_writes
        self._group: zarr.Group | None = None
        self._lease: StoreLease | None = None
        self._shard_writers: dict[str, ShardWriter] = {}
        self.complete = False

    # -- creation -------------------------------------------------------------------------------
    def open(self) -> "StoreWriter":
        """Create the store, or open an existing one with the same key to resume or reuse it.

        A complete store is opened read-only, with no lease (so this works on a read-only root).
        Otherwise the store's lease is taken first, waiting while another live writer holds it.
        """
        meta = L.read_attrs(self.location)
        if meta is not None:
            L.check_format(meta, self.path)
            self._check_same(meta)
            if meta.get("complete"):
                return self._adopt(meta, "r")

        def done() -> bool:
            m = L.read_attrs(self.location)
            return bool(m and m.get("complete") and m.get("key") == self.key and m.get("kind") == self.kind)

        self._lease = acquire_lease(self.location, is_done=done,
                                    wait_timeout=self.wait_timeout, log=self.log)
        if self._lease is None:  # another writer finished it while we waited
            meta = L.read_attrs(self.location)
            assert meta is not None
            self._check_same(meta)
            return self._adopt(meta, "r")
        try:
            meta = L.read_attrs(self.location)
            if meta is None:
                self._create()
                meta = L.read_attrs(self.location)
                assert meta is not None
            self._check_same(meta)
            self._adopt(meta, "r+")
            if self.complete:
                self.close()
            else:
                self._lease.start_heartbeat()
        except BaseException:
            self.close()
            raise
        return self

    def attach(self) -> "StoreWriter":
        """Open an existing store to write shards *without* claiming its lease: the worker side of a
        coordinated extraction, whose coordinator created the store with :meth:`open` and holds the lease."""
        meta = L.read_attrs(self.location)
        if meta is None:
            raise StoreError(f"{self.path} does not exist: a coordinated shard worker writes only into a store its "
                             "coordinator created (open_feature_store).")
        L.check_format(meta, self.path)
        self._check_same(meta)
        return self._adopt(meta, "r" if meta.get("complete") else "r+")

    def _adopt(self, meta: dict[str, Any], mode: str) -> "StoreWriter":
        self.shard_size = int(meta["shard_size"])
        self.num_shards = int(meta["num_shards"])
        self.complete = bool(meta.get("complete"))
        self._group = self.location.open_group(mode)
        self._shard_writers = {}
        if mode != "r" and self.direct_writes:  # the arrays whose shards are encoded here rather than by zarr (store.fastwrite)
            for a in self.arrays:
                fast = ShardWriter.of(self.location, a.name, self._group[a.name]) if a.chunk_per_image else None
                if fast is not None:
                    self._shard_writers[a.name] = fast
        return self

    def close(self) -> None:
        """Release the lease (idempotent); a store left incomplete is resumed by the next writer."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_same(self, meta: dict[str, Any]) -> None:
        if meta.get("kind") != self.kind or meta.get("key") != self.key:
            raise StoreError(
                f"{self.path} holds another store (kind {meta.get('kind')!r}, key {meta.get('key')!r}, "
                f"expected {self.kind!r} {self.key!r}); remove it or choose another --store-root."
            )

    def _create(self) -> None:
        """Create the group (under the lease): the arrays first, the ``maxa`` attributes last.

        Where a killed creator can leave a half-made group (object storage), a writer that took
        over a stale lease clears such leftovers; anything else already at the path is not ours.
        """
        replace = False
        if self.location.exists():
            took_over = self._lease is not None and self._lease.took_over
            if not (self.location.partial_creations and took_over):
                raise StoreError(
                    f"{self.path} exists but is not a maxa store; remove it or choose another --store-root."
                )
            replace = True
        if not self.location.create_group(self._populate, replace=replace) and L.read_attrs(self.location) is None:
            raise StoreError(f"{self.path} appeared while this writer created it, and is not a maxa store; "
                             "remove it or choose another --store-root.")

    def _populate(self, group: zarr.Group) -> None:
        """Create every array, then write the ``maxa`` attributes (the mark readers look for) last."""
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
                dimension_names=L.array_dims(a.name, tuple(a.dims), len(per_image)),
            )
            if a.attrs:
                arr.attrs.update(dict(a.attrs))
        group.create_array(L.SHARD_DONE, shape=(self.num_shards,), chunks=(1,), dtype="uint8", fill_value=0,
                           dimension_names=(L.SHARD_DIM,))
        group.create_array(L.BAD, shape=(n,), chunks=(s,), dtype="uint8", fill_value=0,
                           compressors=L.compressors("none"), dimension_names=(L.IMAGE_DIM,))
        index = group.create_group(L.INDEX_GROUP)
        index.attrs["image_ids"] = self.image_ids
        # what xarray reads (store.xarray_meta): the ids as a coordinate of each group of per-image
        # arrays, written from the same list as index/ and with it, the spec in the sub-groups
        identity = {"kind": self.kind, "key": self.key, "spec": self.spec}
        for sub in [""] + [name for name in L.ARRAY_GROUPS if name in group]:
            node = group[sub] if sub else group
            write_image_ids(node, L.IMAGE_ID, self.image_ids)
            if sub:
                node.attrs.update(subgroup_attrs(identity))
        group.attrs.update({"coordinates": L.IMAGE_ID, L.ATTR: {  # one write: the mark readers look for, last
            "kind": self.kind,
            "key": self.key,
            "spec": self.spec,
            "provenance": self.provenance,
            "num_images": n,
            "shard_size": s,
            "num_shards": self.num_shards,
            "compression": self.compression,
            "format_version": int(self.spec.get("format_version", FORMAT_VERSION)),
            "complete": False,
            "created": _now(),
        }})

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
        data = _quantized(self.arrays, data)
        missing = {a.name for a in self.arrays} - set(data)
        if missing:
            raise ValueError(f"write_shard({shard}) lacks arrays {sorted(missing)}")
        for a in self.arrays:
            if data[a.name].shape[0] != stop - start:
                raise ValueError(f"{a.name}: shard {shard} needs {stop - start} images, got {data[a.name].shape[0]}")
        name = ""
        try:
            for a in self.arrays:
                name = a.name
                fast = self._shard_writers.get(a.name)
                if fast is not None and fast.fits(shard, data[a.name]):
                    fast.write(shard, data[a.name])  # the same bytes as zarr's, without its per-chunk tasks
                else:
                    self.group[a.name][start:stop] = data[a.name]
            if bad is not None and np.any(bad):
                name = L.BAD
                self.group[L.BAD][start:stop] = np.asarray(bad, dtype="uint8")
            name = L.SHARD_DONE
            self.group[L.SHARD_DONE][shard] = 1  # only after every array of the shard is on disk
        except OSError as e:  # disk full, ...: the flag is not set, so a re-run writes this shard again
            raise StoreError(_write_failed(e, f"{self.path} (array {name}, shard {shard}, images {start}-{stop - 1})",
                                           "the shards written so far are kept")) from e
        if self._lease is not None:
            try:
                self._lease.refresh()
            except Exception:  # noqa: BLE001 - the heartbeat thread tries again
                pass

    def finalize(self, **extra: Any) -> None:
        """Mark the store complete, after checking that every shard is flagged done."""
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} shard(s) not written yet; re-run to finish them.")
        meta = dict(self.group.attrs[L.ATTR])
        try:  # a store begun by an earlier maxa gets what xarray reads too (a new one has it all)
            add_xarray_metadata(self.location, meta)
        except OSError as e:
            raise StoreError(_write_failed(e, f"{self.path} (its metadata for xarray)",
                                           "every shard is written; the re-run only finishes its metadata")) from e
        meta.update(extra)
        meta["complete"] = True
        meta["completed"] = _now()
        meta["num_bad"] = int(np.count_nonzero(self.group[L.BAD][:]))
        try:  # zarr.json is replaced whole: a failed write leaves the store marked incomplete
            self.group.attrs[L.ATTR] = meta
        except OSError as e:
            raise StoreError(_write_failed(e, f"{self.path} (its completion mark, zarr.json)",
                                           "every shard is written; the re-run only marks it complete")) from e
        self.complete = True
        self.close()
        self.location.discard_partial_files()
        # after the mark: a store is consolidated only once complete, when nothing under its root
        # changes any more (a kill in between leaves a complete store, read node by node)
        try:
            consolidate(self.location)
        except OSError as e:
            raise StoreError(f"{self.path} is complete, but its consolidated metadata could not be written "
                             f"({e.strerror or e}); it reads as it is, node by node; `maxa stores upgrade "
                             f"{self.path}` writes it again.") from e


def _write_failed(e: OSError, where: str, kept: str) -> str:
    """One line for a failed write into a store: what failed, where, and the fix."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        fix = "free space on that disk or choose another --store-root"
    else:
        fix = "check that path and its permissions, or choose another --store-root"
    return f"cannot write {where}: {reason}; {fix}, then re-run the same command ({kept})."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def remove_store(path: str | Path | Location, *, force: bool = False) -> None:
    """Delete the store at ``path`` safely.

    Refuses a path that is not a maxa store, and a store whose lease is live (someone is writing
    it) unless ``force``. The completion mark goes first (a concurrent reader then sees an
    incomplete store, never a half-deleted "complete" one), then the data, then the lease.
    """
    loc = as_location(path)
    meta = check_removable(loc, force=force)
    loc.open_group("r+").attrs[L.ATTR] = {**meta, "complete": False, "removing": _now()}
    loc.remove_tree()
    remove_lease(loc)


def check_removable(path: str | Path | Location, *, force: bool = False) -> dict[str, Any]:
    """The store's attributes if :func:`remove_store` may delete it; else a one-line :class:`StoreError`."""
    meta = L.read_attrs(path)
    if meta is None:
        raise StoreError(f"{path} is not a maxa store (no 'maxa' attributes in its zarr.json); refusing to remove it.")
    lease = read_lease(path)
    if lease is not None and not force and lease.stale_reason(settings.lease_stale_s()) is None:
        raise StoreError(f"{path} is being written by {lease.describe()}; wait for it, or pass --force.")
    return meta
