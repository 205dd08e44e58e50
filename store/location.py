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

import os
import posixpath
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import zarr

__all__ = ["Location", "LocalLocation", "FsspecLocation", "as_location", "StorageOptions"]

StorageOptions = dict[str, Any] | None


def as_location(where: "str | Path | Location", storage_options: StorageOptions = None) -> "Location":
    """``where`` as a :class:`Location`: a local path, or a URL read with ``storage_options``.

    A :class:`Location` passes through unchanged (it already carries its options).
    """
    if isinstance(where, Location):
        return where
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
    def mtime(self) -> float:
        """Modification time (0.0 where the filesystem cannot tell)."""

    @abstractmethod
    def write_bytes(self, data: bytes) -> None:
        """Replace the file's contents atomically (no reader sees half a file); creates folders."""

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
    def open_group(self, mode: str = "r") -> zarr.Group: ...

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


class LocalLocation(Location):
    """A path on a local (or network-mounted) disk, handled with ``os``."""

    def __init__(self, path: str | Path) -> None:
        self.url = str(path)

    def __fspath__(self) -> str:
        return self.url

    def __truediv__(self, part: str) -> "LocalLocation":
        return LocalLocation(Path(self.url, *part.split("/")))

    @property
    def parent(self) -> "LocalLocation":
        return LocalLocation(Path(self.url).parent)

    @property
    def name(self) -> str:
        return Path(self.url).name

    def relative_to(self, root: Location) -> str:
        return os.path.relpath(self.url, str(root))

    def exists(self) -> bool:
        return Path(self.url).exists()

    def isdir(self) -> bool:
        return Path(self.url).is_dir()

    def isfile(self) -> bool:
        return Path(self.url).is_file()

    def children(self) -> list[tuple[str, bool]]:
        try:
            entries = list(os.scandir(self.url))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted((e.name, e.is_dir()) for e in entries)

    def glob(self, pattern: str) -> list["Location"]:
        return [LocalLocation(p) for p in sorted(Path(self.url).glob(pattern)) if p.is_file()]

    def tree_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.url):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:  # removed while we counted
                    pass
        return total

    def files(self) -> Iterator["Location"]:
        for dirpath, _dirs, names in os.walk(self.url):
            for f in names:
                yield LocalLocation(os.path.join(dirpath, f))

    def read_bytes(self) -> bytes | None:
        try:
            with open(self.url, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def mtime(self) -> float:
        try:
            return os.path.getmtime(self.url)
        except OSError:
            return 0.0

    def write_bytes(self, data: bytes) -> None:
        folder = os.path.dirname(self.url) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(self.url)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.url)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise

    def create(self, data: bytes) -> bool:
        os.makedirs(os.path.dirname(self.url) or ".", exist_ok=True)
        try:
            fd = os.open(self.url, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def delete(self) -> None:
        try:
            os.remove(self.url)
        except FileNotFoundError:
            pass

    def remove_tree(self) -> None:
        # rename first: the folder vanishes at once for every reader; the bytes go next
        gone = os.path.join(os.path.dirname(self.url), f".{os.path.basename(self.url)}.removing-{uuid.uuid4().hex[:8]}")
        os.rename(self.url, gone)
        shutil.rmtree(gone)

    def move_to(self, target: Location) -> None:
        os.rename(self.url, str(target))

    def partial_files(self) -> list[Location]:
        return [f for f in self.files() if f.name.endswith(".partial")]

    def open_group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.url, mode=mode)

    def create_group(self, populate: Any, *, replace: bool = False) -> bool:
        # build in a hidden sibling, then rename into place: a reader sees nothing or all of it
        parent = Path(self.url).parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{Path(self.url).name}.creating-{uuid.uuid4().hex[:8]}"
        populate(zarr.open_group(str(tmp), mode="w-"))
        try:
            os.rename(tmp, self.url)
        except OSError:  # another writer created the same group first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True


class FsspecLocation(Location):
    """A path on an fsspec filesystem (``s3://``, ``gs://``, ``memory://``, ...).

    The filesystem is made on first use from the URL and ``storage_options`` and is not pickled
    (a location sent to a dask worker makes its own). Listings are never cached: several writers
    share a root, so every query asks the filesystem again.
    """

    def __init__(self, url: str, storage_options: StorageOptions = None) -> None:
        self.url = url
        self.options = dict(storage_options or {})
        self._fs: Any = None
        self._path = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["options"])

    @property
    def remote(self) -> bool:
        return True

    def _fs_path(self) -> tuple[Any, str]:
        if self._fs is None:
            import fsspec.core

            self._fs, self._path = fsspec.core.url_to_fs(self.url, **self.options)
        return self._fs, self._path

    @property
    def fs(self) -> Any:
        return self._fs_path()[0]

    @property
    def fs_path(self) -> str:
        return self._fs_path()[1]

    def _fresh(self) -> tuple[Any, str]:
        fs, p = self._fs_path()
        fs.invalidate_cache(p)
        return fs, p

    def __truediv__(self, part: str) -> "FsspecLocation":
        base = self.url if self.url.endswith("://") else self.url.rstrip("/") + "/"
        return FsspecLocation(base + part.strip("/"), self.options)

    @property
    def parent(self) -> "FsspecLocation":
        scheme, _, rest = self.url.rstrip("/").partition("://")
        return FsspecLocation(f"{scheme}://{posixpath.dirname(rest)}", self.options)

    def relative_to(self, root: Location) -> str:
        r = str(root).rstrip("/") + "/"
        return self.url[len(r):] if self.url.startswith(r) else self.url

    def exists(self) -> bool:
        fs, p = self._fresh()
        return bool(fs.exists(p))

    def isdir(self) -> bool:
        fs, p = self._fresh()
        return bool(fs.isdir(p))

    def isfile(self) -> bool:
        fs, p = self._fresh()
        return bool(fs.isfile(p))

    def children(self) -> list[tuple[str, bool]]:
        fs, p = self._fresh()
        try:
            entries = fs.ls(p, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e["name"].rstrip("/") != p.rstrip("/"):  # some filesystems list a file as itself
                out.append((name, e.get("type") == "directory"))
        return sorted(out)

    def glob(self, pattern: str) -> list["Location"]:
        fs, p = self._fresh()
        if not fs.isdir(p):
            return []
        return [self / f.rstrip("/").rsplit("/", 1)[-1] for f in sorted(fs.glob(p.rstrip("/") + "/" + pattern))
                if fs.isfile(f)]

    def tree_bytes(self) -> int:
        fs, p = self._fresh()
        return int(fs.du(p, total=True))

    def files(self) -> Iterator["Location"]:
        fs, p = self._fresh()
        top = p.rstrip("/")
        for f in sorted(fs.find(p)):
            yield self / f[len(top) + 1:]

    def read_bytes(self) -> bytes | None:
        fs, p = self._fresh()
        try:
            return fs.cat_file(p)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def mtime(self) -> float:
        return 0.0  # a PUT is atomic: an unreadable object is garbage, not half-written

    def write_bytes(self, data: bytes) -> None:
        fs, p = self._fs_path()
        fs.pipe_file(p, data)  # one PUT: atomic on object stores
        fs.invalidate_cache(p)

    def create(self, data: bytes) -> bool:
        fs, p = self._fs_path()
        try:
            fs.pipe_file(p, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without exclusive create: weaker, check-then-put
            if fs.exists(p):
                return False
            fs.pipe_file(p, data)
        finally:
            fs.invalidate_cache(p)
        return True

    def delete(self) -> None:
        fs, p = self._fs_path()
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(p)

    def remove_tree(self) -> None:
        fs, p = self._fs_path()
        fs.rm(p, recursive=True)
        fs.invalidate_cache(p)

    def move_to(self, target: Location) -> None:
        # object stores have no rename: copy each object, then delete the originals
        assert isinstance(target, FsspecLocation)
        fs, p = self._fresh()
        top, dst = p.rstrip("/"), target.fs_path.rstrip("/")
        for f in sorted(fs.find(p)):
            fs.copy(f, dst + f[len(top):])
        fs.rm(p, recursive=True)
        fs.invalidate_cache(p)
        fs.invalidate_cache(dst)

    def open_group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, storage_options=dict(self.options))

    partial_creations = True

    def create_group(self, populate: Any, *, replace: bool = False) -> bool:
        # no rename on object stores: the caller's populate writes the mark readers look for last
        populate(self.open_group("w" if replace else "w-"))
        return True
