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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

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


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def safe_name(text: str) -> str:
    """A path component from a registry name (``timm:vit_small`` → ``timm-vit_small``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "unnamed"


def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode)


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """The ``maxa`` attributes of the group at ``path``, or ``None`` if it is not a maxa store."""
    try:
        group = open_group(path, "r")
    except Exception:  # not a zarr group at all (FileNotFoundError, GroupNotFoundError, ...)
        return None
    meta = group.attrs.get(ATTR)
    return dict(meta) if isinstance(meta, dict) else None
