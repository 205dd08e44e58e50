"""Write sharded per-image arrays straight into their shard files, byte for byte what zarr writes.

The mirror of :mod:`store.fastread`. zarr-python encodes every inner chunk of a shard as its own
asynchronous task, then joins chunks and index into one new buffer before the file is written;
with one image per inner chunk that bookkeeping and the copy, not the disk, set the pace (about a
fifth of a raw write of the same bytes). A per-image array of a maxa store has one fixed layout
(described in :mod:`store.fastread`), and :class:`ShardWriter` encodes a shard of it the way
zarr's sharding codec does, so the files are the same bytes and any zarr reader reads them:

* each image is its bytes (little-endian, C order), zstd-compressed with the array's own level
  where the array has zstd (``numcodecs.zstd.Zstd``, the compressor zarr's codec calls), then
  their crc32c (little-endian uint32);
* an image whose bytes are all zero equals the fill value 0 (zarr compares floats by their bit
  pattern, so ``-0.0`` is not empty) and is not written: its index entry is the absent pair
  ``(2**64-1, 2**64-1)``, as are the entries past the end of a partial last shard;
* the chunks follow each other in image order from offset 0 (zarr's Morton order over an
  ``(S, 1, ..., 1)`` chunk grid is image order), then the index and its crc32c; a shard with no
  chunk at all is no file (zarr deletes it).

The file is written by :meth:`store.location.Location.write_buffers`: on a local disk the pieces
go to a temporary ``*.partial`` file with scattered writes (uncompressed images are never copied)
that is then renamed over the shard file, as zarr's local store does, so a killed writer leaves
no torn shard file, at most a ``*.partial`` file that finalisation removes; on object storage the
shard is one PUT. Arrays of any other layout get no :class:`ShardWriter` and are written by zarr.
``tests/test_fastwrite.py`` checks the bytes against zarr-python's own writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from store.fastread import ShardedArray, _pool
from store.location import Location

__all__ = ["ShardWriter"]

_ABSENT = 2**64 - 1
#: Leading bytes of each image checked first for a non-zero byte: almost every image has one
#: there, so only the rest are scanned whole to find the images that equal the fill value.
_PROBE_BYTES = 64
#: Images per block compressed on one worker thread (zstd stores).
_ZSTD_BLOCK = 16


@dataclass(frozen=True)
class ShardWriter:
    """Encodes and writes whole shards of one per-image array (see the module's docstring)."""

    layout: ShardedArray  # the array's layout, as the fast reader recognises it
    zstd_level: int
    zstd_checksum: bool

    @classmethod
    def of(cls, store: Location, name: str, arr: zarr.Array) -> "ShardWriter | None":
        """The shard writer of array ``name`` (``arr``) of the store at ``store``, or ``None`` if
        its layout is not exactly the one this module writes (zarr writes it then)."""
        layout = ShardedArray.of(store, name, arr)
        if layout is None or layout.dtype.kind not in "biuf":
            return None
        try:  # "empty" is "all bytes zero" only for a fill value whose bytes are zero
            fill = np.asarray(layout.fill_value, dtype=layout.dtype)
            if fill.shape != () or fill.tobytes() != bytes(layout.dtype.itemsize):
                return None
            level, checksum = 0, False
            if layout.zstd:
                codec = arr.metadata.codecs[0].codecs[1]
                if not isinstance(codec, ZstdCodec):
                    return None
                level, checksum = int(codec.level), bool(codec.checksum)
        except Exception:  # noqa: BLE001 - metadata of another shape: zarr writes it
            return None
        return cls(layout=layout, zstd_level=level, zstd_checksum=checksum)

    @property
    def name(self) -> str:
        return self.layout.name

    def _shard_file(self, shard: int) -> Location:
        return self.layout.folder / self.layout.shard_keys[shard]

    def count(self, shard: int) -> int:
        """Images in shard ``shard`` (fewer in a partial last shard)."""
        return min(self.layout.per_shard, self.layout.num_images - shard * self.layout.per_shard)

    def fits(self, shard: int, data: Any) -> bool:
        """Whether ``data`` is exactly the values of shard ``shard`` (else zarr assigns it, and
        broadcasts or refuses it as zarr does)."""
        return (isinstance(data, np.ndarray) and 0 <= shard < len(self.layout.shard_keys)
                and data.shape == (self.count(shard), *self.layout.item_shape))

    def encode(self, shard: int, data: np.ndarray) -> list[Any] | None:
        """The pieces of shard ``shard``'s file, in order, for ``data`` (its images); ``None`` if
        every image equals the fill value (zarr writes no file then)."""
        lay = self.layout
        values = np.ascontiguousarray(data, dtype=lay.dtype)
        rows = values.reshape(len(values), -1).view(np.uint8)
        present = _nonzero_rows(rows)
        if not present.any():
            return None
        index = np.full((lay.per_shard, 2), _ABSENT, dtype="<u8")
        images = np.flatnonzero(present).tolist()
        payloads = self._compressed(rows, images) if lay.zstd else [rows[i] for i in images]
        pieces: list[Any] = []
        pos = 0
        for i, payload in zip(images, payloads):
            nbytes = memoryview(payload).nbytes
            pieces.append(payload)
            pieces.append(crc32c.crc32c(payload).to_bytes(4, "little"))
            index[i] = (pos, nbytes + 4)
            pos += nbytes + 4
        tail = index.tobytes()
        pieces.append(tail + crc32c.crc32c(tail).to_bytes(4, "little"))
        return pieces

    def _compressed(self, rows: np.ndarray, images: list[int]) -> list[Any]:
        """The zstd bytes of ``rows[i]`` for each ``i`` of ``images``, in order: in blocks on the
        reader's worker threads (one per core; zstd releases the GIL), so one shard's encoding uses
        every core a big host has, not one."""
        compress = _zstd(self.zstd_level, self.zstd_checksum)
        pool = _pool() if len(images) >= 2 * _ZSTD_BLOCK else None
        if pool is None:
            return [compress.encode(rows[i]) for i in images]
        blocks = [images[k:k + _ZSTD_BLOCK] for k in range(0, len(images), _ZSTD_BLOCK)]
        done = pool.map(lambda block: [compress.encode(rows[i]) for i in block], blocks)
        return [payload for block in done for payload in block]

    def write(self, shard: int, data: np.ndarray) -> None:
        """Write shard ``shard`` whole (``data``: its images, as :meth:`fits` checks), replacing
        any file there; with no image to write, remove the file, as zarr does."""
        pieces = self.encode(shard, data)
        loc = self._shard_file(shard)
        if pieces is None:
            loc.delete()
        else:
            loc.write_buffers(pieces)


def _nonzero_rows(rows: np.ndarray) -> np.ndarray:
    """Per row of ``rows`` (``(n, bytes)`` uint8), whether any of its bytes is not zero."""
    present = rows[:, :_PROBE_BYTES].any(axis=1)
    for i in np.flatnonzero(~present).tolist():
        present[i] = rows[i].any()
    return present


def _zstd(level: int, checksum: bool) -> Any:
    from numcodecs.zstd import Zstd

    return Zstd(level=level, checksum=checksum)
