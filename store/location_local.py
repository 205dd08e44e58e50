"""A store Location on a local (or network-mounted) disk: plain ``os`` calls, atomic renames and
``O_EXCL`` creation; fsspec is never involved (see :mod:`store.location`)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import zarr

from store.location import Location

_IOV_MAX = 1024  # buffers per preadv/writev call (POSIX guarantees at least 16; Linux allows 1024)


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

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        try:
            fd = os.open(self.url, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        try:
            size = os.fstat(fd).st_size
            return [os.pread(fd, length, offset if offset >= 0 else max(0, size + offset))
                    for offset, length in ranges]
        finally:
            os.close(fd)

    random_access = True

    def read_pieces(self, pieces: Sequence[tuple[int, Sequence[Any]]]) -> list[int] | None:
        if not hasattr(os, "preadv"):  # one read per piece, then copies (Windows)
            return super().read_pieces(pieces)
        try:
            fd = os.open(self.url, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        try:
            return [_preadv_all(fd, offset, [memoryview(b).cast("B") for b in buffers]) for offset, buffers in pieces]
        finally:
            os.close(fd)

    def read_pieces_each(self, pieces: Sequence[tuple[int, Sequence[Any]]],
                         each: Callable[[int, int], None]) -> bool:
        if not hasattr(os, "preadv"):
            return super().read_pieces_each(pieces, each)
        try:
            fd = os.open(self.url, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        try:
            for k, (offset, buffers) in enumerate(pieces):
                each(k, _preadv_all(fd, offset, [memoryview(b).cast("B") for b in buffers]))
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[int, Sequence[Any]], int] | None]:
        if not hasattr(os, "preadv"):  # Windows: the base class's reads
            with super().reader() as read:
                yield read
            return
        try:
            fd = os.open(self.url, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            yield None
            return
        try:  # pread does not move the file's position: one descriptor serves every thread
            yield lambda offset, buffers: _preadv_all(fd, offset, [memoryview(b).cast("B") for b in buffers])
        finally:
            os.close(fd)

    def mtime(self) -> float:
        try:
            return os.path.getmtime(self.url)
        except OSError:
            return 0.0

    def write_bytes(self, data: bytes) -> None:
        folder = os.path.dirname(self.url) or "."
        tmp = os.path.join(folder, f".{os.path.basename(self.url)}.{uuid.uuid4().hex[:8]}.tmp")

        def write(fd: int) -> None:
            _write_all(fd, [memoryview(data).cast("B")])

        _replace(self.url, tmp, write, 0o666)  # as open(tmp, "wb"): 0o666 less the umask

    def write_buffers(self, buffers: Sequence[Any]) -> None:
        # as zarr's local store: a ``<name>.<hex>.partial`` file renamed into place, so a killed
        # writer leaves no torn file (``partial_files`` finds the leftover); no buffer is copied
        tmp = f"{self.url}.{uuid.uuid4().hex}.partial"
        # mode 0o666 less the umask, as open(..., "wb") in zarr gives: a shared root keeps its group bits
        _replace(self.url, tmp, lambda fd: _write_all(fd, [memoryview(b).cast("B") for b in buffers]), 0o666)

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

    def open_group(self, mode: str = "r", *, consolidated: bool | None = None) -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, use_consolidated=consolidated)

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


def _replace(path: str, tmp: str, write: Any, mode: int) -> None:
    """Write a file at ``tmp`` with ``write(fd)``, then rename it over ``path`` (readers never see
    half a file); the temporary file is removed if anything fails."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), mode)
        try:
            write(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _preadv_all(fd: int, offset: int, views: list[memoryview]) -> int:
    """Fill ``views`` from ``offset`` on (at most IOV_MAX buffers per call; a short read goes on
    where it stopped); the bytes read, fewer at the file's end."""
    total, first = 0, 0
    while first < len(views):
        got = os.preadv(fd, views[first:first + _IOV_MAX], offset + total)
        if got == 0:
            break
        total += got
        while first < len(views) and got >= len(views[first]):
            got -= len(views[first])
            first += 1
        if got:
            views[first] = views[first][got:]
    return total


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` one after another at ``fd``'s position: scattered writes of at most
    IOV_MAX buffers each, a short write going on where it stopped."""
    if not hasattr(os, "writev"):  # Windows
        for v in views:
            while len(v):
                v = v[os.write(fd, v):]
        return
    first = 0
    while first < len(views):
        got = os.writev(fd, views[first:first + _IOV_MAX])
        if got == 0 and any(len(v) for v in views[first:first + _IOV_MAX]):
            raise OSError(errno.EIO, "a write made no progress")
        while first < len(views) and got >= len(views[first]):
            got -= len(views[first])
            first += 1
        if got:
            views[first] = views[first][got:]
