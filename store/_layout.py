"""The on-disk layout shared by the writer, the reader, the catalogue and verification.

Nothing outside ``store/`` names these paths or codecs. A store is one Zarr v3 group:

```
<name>.zarr/
  zarr.json             attributes["maxa"]: kind, key, spec, provenance, shard_size, complete, ...
  index/zarr.json       attributes["image_ids"]: the ordered image ids
  image_id              (N,) string: the same ids, the coordinate xarray reads (also in features/, feature_scales/)
  shard_done            (num_shards,) uint8, one chunk per flag: 1 once a shard is written whole
  bad                   (N,) uint8: 1 for images that could not be decoded (--skip-bad)
  features/<layer>      (N, h, w, C) float16                  feature stores (int8 when quantised)
  feature_scales/<layer> (N, C) float32                      quantised feature stores only
  <target arrays>       (N, H, W) ... / (N,) / (N, K)          target stores
```
Every array names its dimensions (:func:`array_dims`): ``image`` first, ``shard`` for
``shard_done``; a feature layer's own ``y_<layer>``, ``x_<layer>``, ``c_<layer>`` (layers of
different grids share a group, so they cannot share dimension names).
Per-image arrays are sharded along the image axis with ``shard_size`` images per shard and one
image per inner chunk, each chunk checksummed with crc32c.

Beside each store, while someone writes it, lies its lease ``<name>.zarr.lease`` (see
``store.lease``). All I/O goes through :class:`store.location.Location` (a local folder or an
fsspec URL); this module only names things.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from zarr.codecs import Crc32cCodec, ZstdCodec

from runtime.errors import StoreError
from store.location import Location, as_location
from store.quantize import QUANTIZATIONS
from store.spec import FORMAT_VERSION, store_format

ATTR = "maxa"
INDEX_GROUP = "index"
SHARD_DONE = "shard_done"
BAD = "bad"
FEATURES = "features"
FEATURE_SCALES = "feature_scales"
#: the string array of image ids along ``image`` (a copy of ``index/``'s list, for xarray)
IMAGE_ID = "image_id"
IMAGE_DIM = "image"
SHARD_DIM = "shard"
#: the groups below the root that hold per-image arrays (and so an ``image_id`` of their own)
ARRAY_GROUPS = (FEATURES, FEATURE_SCALES)
#: arrays of a store that are not its content (listings of targets leave them out)
BOOKKEEPING = (SHARD_DONE, BAD, IMAGE_ID)
#: ``--compression`` choices: lossless (``none``, ``zstd``), then the lossy encodings of
#: ``store.quantize`` (stored with the codecs of ``zstd``).
COMPRESSIONS = ("none", "zstd", *QUANTIZATIONS)


def compressors(compression: str) -> list[Any]:
    """Codecs after the bytes codec: optional zstd, then always a crc32c checksum."""
    if compression == "none":
        return [Crc32cCodec()]
    if compression == "zstd" or compression in QUANTIZATIONS:
        return [ZstdCodec(level=1), Crc32cCodec()]
    raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


LEASE_SUFFIX = ".lease"
RESULTS_DIR = "results"
RUNS_DIR = "runs"
FEATURES_DIR = "features"
TARGETS_DIR = "targets"


def feature_array(layer: str) -> str:
    """The array of a feature store that holds layer ``layer``."""
    return f"{FEATURES}/{layer}"


def feature_scale_array(layer: str) -> str:
    """The array of a quantised feature store that holds layer ``layer``'s per-image, per-channel scales."""
    return f"{FEATURE_SCALES}/{layer}"


def feature_dims(layer: str) -> tuple[str, str, str]:
    """The dimensions of layer ``layer`` after ``image``: ``y_<layer>``, ``x_<layer>``, ``c_<layer>``."""
    return f"y_{layer}", f"x_{layer}", f"c_{layer}"


def array_dims(name: str, dims: tuple[str, ...], ndim: int) -> tuple[str, ...]:
    """The dimension names of the per-image array ``name`` with ``ndim`` axes after ``image``:
    ``image`` then ``dims``; where ``dims`` is empty, ``<leaf>_<axis>`` (``(N,)`` arrays need none)."""
    if dims and len(dims) != ndim:
        raise ValueError(f"array {name!r} has {ndim} axes after 'image' but names {len(dims)}: {dims}")
    if dims:
        return (IMAGE_DIM, *dims)
    leaf = name.rsplit("/", 1)[-1]
    return (IMAGE_DIM, *(f"{leaf}_{k}" for k in range(1, ndim + 1)))


def safe_name(text: str) -> str:
    """A path component from a registry name (``timm:vit_small`` → ``timm-vit_small``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "unnamed"


def read_attrs(where: str | Path | Location) -> dict[str, Any] | None:
    """The ``maxa`` attributes of the group at ``where``, or ``None`` if it is not a maxa store."""
    try:
        group = as_location(where).open_group("r")
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
