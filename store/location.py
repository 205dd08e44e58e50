"""Where something lives under a store root, and every I/O operation on it.

A :class:`Location` is a local path or an fsspec URL (``s3://bucket/prefix``, ``memory://lab``,
...) together with the fsspec ``storage_options`` it needs (endpoint, credentials). It is the one
place that knows the difference: stores, targets, results, probe runs and leases all do their
I/O through it, so no other code branches on "is this remote?". The shape follows zarr's own
``Store``/``StorePath`` split: one small interface, two implementations, one contract test suite
(``tests/test_location.py``) run against a local folder, an in-memory filesystem and an S3 server.

* :class:`LocalLocation` uses ``os`` directly: atomic renames, ``O_EXCL`` creation, no fsspec.
* :class:`FsspecLocation` uses any fsspec filesystem. Object stores have no rename, so writers
  rely on a PUT being atomic; exclusive creation is a conditional put (``If-None-Match: *``).

``str(location)`` is the path or URL exactly as the user wrote it (joined with ``/`` for URLs),
and that is what records and messages carry; options never appear in it.
"""

from __future__ import annotations

import contextlib
import posixpath
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import zarr

__all__ = ["Location", "LocalLocation", "FsspecLocation", "as_location", "StorageOptions"]

StorageOptions = dict[str, Any] | None


def as_location(where: "str | Path | Location", storage_options: StorageOptions = None) -> "Location":
    """``where`` as a :class:`Location`: a local path, or a URL read with ``storage_options``.

    A :class:`Location` passes through unchanged (it already carries its options).
    """
    if isinstance(where, Location):
        return where
    from store.location_fsspec import FsspecLocation
    from store.location_local import LocalLocation

    text = str(where)
    if "://" in text:
        return FsspecLocation(text.rstrip("/"), storage_options)
    return LocalLocation(text)


class Location(ABC):
    """A file or folder: a path plus the means to read and write it."""

    url: str

    # -- naming ------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other: object) -> bool:
        # equal to the same path written as text, so code and tests may compare with strings
        if isinstance(other, Location):
            return type(other) is type(self) and other.url == self.url
        if isinstance(other, (str, Path)):
            return self.url == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.url)

    @abstractmethod
    def __truediv__(self, part: str) -> "Location":
        """The child ``part`` (may contain ``/``)."""

    def join(self, *parts: str) -> "Location":
        loc = self
        for p in parts:
            loc = loc / p
        return loc

    @property
    @abstractmethod
    def parent(self) -> "Location": ...

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.replace("\\", "/").rstrip("/"))

    def with_suffix_added(self, suffix: str) -> "Location":
        """A sibling named ``<name><suffix>`` (a lease beside its store)."""
        return self.parent / f"{self.name}{suffix}"

    @abstractmethod
    def relative_to(self, root: "Location") -> str:
        """This path relative to ``root``, for display."""

    # -- queries -----------------------------------------------------------------------------------
    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def isdir(self) -> bool: ...

    @abstractmethod
    def isfile(self) -> bool: ...

    @abstractmethod
    def children(self) -> list[tuple[str, bool]]:
        """``(name, is_folder)`` of each entry, in name order; empty if this is not a folder."""

    @abstractmethod
    def glob(self, pattern: str) -> list["Location"]:
        """Files in this folder whose names match ``pattern`` (one level), in name order."""

    @abstractmethod
    def tree_bytes(self) -> int:
        """Bytes of every file below this folder."""

    @abstractmethod
    def files(self) -> Iterator["Location"]:
        """Every file below this folder (any depth)."""

    # -- bytes -------------------------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self) -> bytes | None:
        """The file's contents, or ``None`` if it is not there."""

    @abstractmethod
    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        """The bytes at each ``(offset, length)`` of the file, in order (fewer at its end), or ``None``
        if it is not there. A negative offset counts from the end: ``(-n, n)`` is the last ``n`` bytes.
        On object storage each range is one ranged GET, issued concurrently."""

    def read_into(self, offset: int, buffers: Sequence[Any]) -> int | None:
        """Fill ``buffers`` (writable bytes-like objects), in order, with the file's bytes from
        ``offset`` on; the number of bytes read (fewer at the file's end), or ``None`` if it is not there."""
        got = self.read_pieces([(offset, buffers)])
        return None if got is None else got[0]

    def read_pieces(self, pieces: Sequence[tuple[int, Sequence[Any]]]) -> list[int] | None:
        """:meth:`read_into` for each ``(offset, buffers)`` piece, the file opened once (one round of
        concurrent ranged GETs on object storage); the bytes read per piece, or ``None`` if the file
        is not there."""
        views = [[memoryview(b).cast("B") for b in buffers] for _, buffers in pieces]
        got = self.read_ranges([(offset, sum(len(v) for v in vs)) for (offset, _), vs in zip(pieces, views)])
        if got is None:
            return None
        counts = []
        for vs, data in zip(views, got):
            data, pos = memoryview(data), 0
            for v in vs:
                n = min(len(v), len(data) - pos)
                v[:n] = data[pos:pos + n]
                pos += n
            counts.append(pos)
        return counts

    def read_pieces_each(self, pieces: Sequence[tuple[int, Sequence[Any]]],
                         each: Callable[[int, int], None]) -> bool:
        """:meth:`read_pieces`, calling ``each(k, bytes read)`` as soon as piece ``k`` is read, before
        the next one is: the pieces may share their buffers (one small buffer that stays in the
        CPU's cache, used once per piece). ``False`` if the file is not there."""
        for k, piece in enumerate(pieces):
            got = self.read_pieces([piece])
            if got is None:
                return False
            each(k, got[0])
        return True

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[int, Sequence[Any]], int] | None]:
        """``read(offset, buffers)``: :meth:`read_into` on the file opened once for the ``with``
        block, safe to call from several threads at once (``None`` if the file is not there)."""
        if not self.exists():
            yield None
            return

        def read(offset: int, buffers: Sequence[Any]) -> int:
            got = self.read_pieces([(offset, buffers)])
            return 0 if got is None else got[0]

        yield read

    #: Whether many small reads cost about what their bytes cost (a local disk), rather than a
    #: request each (object storage): readers then read byte ranges rather than whole files.
    random_access = False

    @abstractmethod
    def mtime(self) -> float:
        """Modification time (0.0 where the filesystem cannot tell)."""

    @abstractmethod
    def write_bytes(self, data: bytes) -> None:
        """Replace the file's contents atomically (no reader sees half a file); creates folders."""

    def write_buffers(self, buffers: Sequence[Any]) -> None:
        """Replace the file's contents with ``buffers`` (bytes-like objects) one after another,
        atomically, as :meth:`write_bytes` does; where the filesystem allows, without joining
        them first (a shard's images are written from where they lie)."""
        self.write_bytes(b"".join(buffers))  # one PUT on object storage

    @abstractmethod
    def create(self, data: bytes) -> bool:
        """Write ``data`` only if nothing is there, atomically; ``False`` if the name is taken."""

    @abstractmethod
    def delete(self) -> None:
        """Remove this file (nothing if it is not there)."""

    @abstractmethod
    def remove_tree(self) -> None:
        """Remove this folder and everything below it."""

    @abstractmethod
    def move_to(self, target: "Location") -> None:
        """Move this folder to ``target`` (same filesystem)."""

    def partial_files(self) -> list["Location"]:
        """Temporary files a killed writer left below this folder (zarr's local store writes
        ``*.partial``, then renames); object stores write whole objects and have none."""
        return []

    def discard_partial_files(self) -> None:
        for f in self.partial_files():
            try:
                f.delete()
            except OSError:  # in use or already gone: a later run tries again
                pass

    # -- zarr --------------------------------------------------------------------------------------
    @abstractmethod
    def open_group(self, mode: str = "r", *, consolidated: bool | None = None) -> zarr.Group:
        """The Zarr group here. ``consolidated``: use the root's consolidated metadata when present
        (``None``), always (``True``), or read every node's own ``zarr.json`` (``False``)."""

    @abstractmethod
    def create_group(self, populate: Any, *, replace: bool = False) -> bool:
        """Build a new Zarr group here with ``populate(group)``; ``False`` if one appeared here
        meanwhile (another writer's: use it). ``replace`` clears a half-made group first (only
        where :attr:`partial_creations` says one can exist)."""

    #: Whether a creator killed midway can leave a half-made group behind (no atomic rename):
    #: writers then mark a store as one last, and a takeover may clear the leftovers.
    partial_creations = False

    @property
    def remote(self) -> bool:
        """Whether this lives on an fsspec filesystem (for messages and bookkeeping only)."""
        return False


# the two implementations, importable from here (they import Location above)
from store.location_fsspec import FsspecLocation  # noqa: E402
from store.location_local import LocalLocation  # noqa: E402
