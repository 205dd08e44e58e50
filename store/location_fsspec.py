"""A store Location on any fsspec filesystem (``s3://``, ``gs://``, ``memory://``, ...): object stores
have no rename, so writers rely on one PUT being atomic (see :mod:`store.location`)."""

from __future__ import annotations

import posixpath
from typing import Any, Iterator, Sequence

import zarr

from store.location import Location, StorageOptions


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
        # one listing with the entries' types, not a request per match
        fs, p = self._fresh()
        found = fs.glob(p.rstrip("/") + "/" + pattern, detail=True)
        return [self / name.rstrip("/").rsplit("/", 1)[-1] for name, info in sorted(found.items())
                if info.get("type") == "file"]

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

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        wanted = [(i, o, n) for i, (o, n) in enumerate(ranges) if n > 0]  # an empty range is no request
        if not wanted:
            return [b"" for _ in ranges] if self.isfile() else None
        fs, p = self._fs_path()
        starts = [o for _, o, _ in wanted]
        ends = [o + n if o >= 0 or o + n < 0 else None for _, o, n in wanted]
        try:
            got = fs.cat_ranges([p] * len(wanted), starts, ends, on_error="raise")
        except (FileNotFoundError, IsADirectoryError):
            return None
        out = [b""] * len(ranges)
        for (i, _, _), b in zip(wanted, got):
            out[i] = bytes(b)
        return out

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

    def open_group(self, mode: str = "r", *, consolidated: bool | None = None) -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, storage_options=dict(self.options), use_consolidated=consolidated)

    partial_creations = True

    def create_group(self, populate: Any, *, replace: bool = False) -> bool:
        # no rename on object stores: the caller's populate writes the mark readers look for last
        populate(self.open_group("w" if replace else "w-"))
        return True
