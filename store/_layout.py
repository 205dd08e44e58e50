"""The on-disk layout shared by the writer, the reader, the catalogue and verification.

Nothing outside ``store/`` names these paths or codecs. A store is one Zarr v3 group:

```
<name>.zarr/
  zarr.json             attributes["maxa"]: kind, key, spec, provenance, shard_size, complete, ...
  index/zarr.json       attributes["image_ids"]: the ordered image ids
  shard_done            (num_shards,) uint8, one chunk per flag: 1 once a shard is written whole
  bad                   (N,) uint8: 1 for images that could not be decoded (--skip-bad)
  features/<layer>      (N, h, w, C) float16                  feature stores
  <target arrays>       (N, H, W) ... / (N,) / (N, K)          target stores
```
Per-image arrays are sharded along the image axis with ``shard_size`` images per shard and one
image per inner chunk, each chunk checksummed with crc32c.

Beside each store, while someone writes it, lies its lease ``<name>.zarr.lease`` (see
``store.lease``). A store root may be a local folder or an fsspec URL (``s3://bucket/prefix``);
``storage_options`` (endpoint, credentials, ...) go to fsspec, and the standard ``AWS_*``
environment variables are honoured by s3fs. Local paths never touch fsspec.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from runtime.errors import StoreError
from store.spec import FORMAT_VERSION, store_format

ATTR = "maxa"
INDEX_GROUP = "index"
SHARD_DONE = "shard_done"
BAD = "bad"
FEATURES = "features"
COMPRESSIONS = ("none", "zstd")


def compressors(compression: str) -> list[Any]:
    """Codecs after the bytes codec: optional zstd, then always a crc32c checksum."""
    if compression == "none":
        return [Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


LEASE_SUFFIX = ".lease"

StorageOptions = dict[str, Any] | None


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def fs_path(path: str | Path, storage_options: StorageOptions = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of a URL (or a local path, through fsspec)."""
    import fsspec.core

    return fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))


def join(root: str | Path, *parts: str) -> str:
    """``root/part/...`` for a local path or a URL (``Path`` would fold ``s3://`` into ``s3:/``)."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def parent(path: str | Path, levels: int = 1) -> str:
    """The folder ``levels`` up from ``path`` (local path or URL)."""
    if is_remote(path):
        scheme, _, rest = str(path).rstrip("/").partition("://")
        for _ in range(levels):
            rest = posixpath.dirname(rest)
        return f"{scheme}://{rest}"
    return str(Path(path).parents[levels - 1])


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` for display."""
    if is_remote(path) or is_remote(root):
        r = str(root).rstrip("/") + "/"
        return path[len(r):] if path.startswith(r) else path
    import os

    return os.path.relpath(path, root)


def exists(path: str | Path, storage_options: StorageOptions = None) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, p = fs_path(path, storage_options)
    fs.invalidate_cache(p)
    return bool(fs.exists(p))


def isdir(path: str | Path, storage_options: StorageOptions = None) -> bool:
    if not is_remote(path):
        return Path(path).is_dir()
    fs, p = fs_path(path, storage_options)
    fs.invalidate_cache(p)
    return bool(fs.isdir(p))


def safe_name(text: str) -> str:
    """A path component from a registry name (``timm:vit_small`` → ``timm-vit_small``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "unnamed"


def open_group(path: str | Path, mode: str = "r", storage_options: StorageOptions = None) -> zarr.Group:
    if is_remote(path):
        return zarr.open_group(str(path), mode=mode, storage_options=dict(storage_options or {}))
    return zarr.open_group(str(path), mode=mode)


def read_attrs(path: str | Path, storage_options: StorageOptions = None) -> dict[str, Any] | None:
    """The ``maxa`` attributes of the group at ``path``, or ``None`` if it is not a maxa store."""
    try:
        group = open_group(path, "r", storage_options)
    except Exception:  # not a zarr group at all (FileNotFoundError, GroupNotFoundError, ...)
        return None
    meta = group.attrs.get(ATTR)
    return dict(meta) if isinstance(meta, dict) else None


def check_format(meta: dict[str, Any], path: str | Path) -> None:
    """Refuse a store whose format this maxa does not read, in one line that says what to do.

    Every open (reader, writer, verify) calls this: a store from a newer maxa may mean something
    this one does not know, and one from an older maxa lacks what pairing relies on.
    """
    version = store_format(meta)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError(f"{path} declares an unreadable store format ({version!r}); it was not written by maxa, "
                         "or its zarr.json was edited: re-extract it.")
    if version > FORMAT_VERSION:
        raise StoreError(f"{path} was written by a newer maxa (store format {version}; this maxa reads format "
                         f"{FORMAT_VERSION}); upgrade maxa (`pip install -U maxa-probe`) to read it.")
    if version < FORMAT_VERSION:
        raise StoreError(f"{path} has store format {version}, from an older maxa (this one reads format "
                         f"{FORMAT_VERSION}: stores now carry a dataset identity, so train and eval stores of "
                         f"different datasets never pair up); upgrade it with `maxa stores upgrade {path} --root "
                         "DATASET_ROOT` (the dataset it was extracted from), or extract it again.")
