"""Upgrade a store written by an older maxa to the current store format, in place.

Format 1 → 2: stores gained a dataset identity (``dataset_id``, from the dataset reader's
fingerprint), on which train and eval stores pair. It cannot be derived from the store alone, so
the upgrade reads the dataset the store was extracted from (its root on this machine), checks that
it lists exactly the store's images, records the identity, and moves the store to the path of its
new key. The arrays are not touched. The attributes are rewritten first and the store moved second,
so an upgrade interrupted in between is finished by running it again.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from store import _layout as L
from store.catalogue import feature_store_path, target_store_path
from runtime.errors import StoreError
from store.spec import FORMAT_VERSION, FeatureSpec, TargetSpec, store_format

__all__ = ["upgrade_store"]


def upgrade_store(path: str | Path, dataset_root: str | Path | None, *,
                  storage_options: dict[str, Any] | None = None) -> str:
    """Bring the store at ``path`` to :data:`FORMAT_VERSION`; returns its (new) path.

    Args:
        path: a feature or target store.
        dataset_root: the root of the dataset it was extracted from (``None`` for built-in data).
        storage_options: fsspec options for a URL ``path``.

    Raises:
        StoreError: not a store, incomplete, newer, or the dataset does not hold the store's images.
    """
    from extract.datasets.base import create_dataset

    path = str(path).rstrip("/") if L.is_remote(path) else str(path)
    meta = L.read_attrs(path, storage_options)
    if meta is None:
        raise StoreError(f"{path} is not a maxa store (no 'maxa' attributes in its zarr.json).")
    version = store_format(meta)
    if version not in (1, FORMAT_VERSION):
        L.check_format(meta, path)  # one line: newer than this maxa, or not a version at all
    if not meta.get("complete"):
        raise StoreError(f"{path} is incomplete: there is nothing worth upgrading; remove it (`maxa stores rm {path}`) "
                         "and extract it again with this maxa.")
    kind = meta.get("kind")
    spec_dict = dict(meta["spec"])
    if version < FORMAT_VERSION:
        group = L.open_group(path, "r", storage_options)
        stored_ids = [str(i) for i in group[L.INDEX_GROUP].attrs["image_ids"]]
        reader = create_dataset(spec_dict["dataset"], dataset_root, spec_dict["split"],
                                **dict(spec_dict.get("dataset_options") or {}))
        if list(reader.image_ids[: len(stored_ids)]) != stored_ids:
            raise StoreError(
                f"the {spec_dict['dataset']} dataset at {dataset_root} ({spec_dict['split']} split, "
                f"{len(reader.image_ids)} images) does not list the {len(stored_ids)} images of {path} in its order; "
                "give --root the dataset this store was extracted from."
            )
        spec_dict.update(dataset_id=reader.dataset_id(), format_version=FORMAT_VERSION)
    spec = (FeatureSpec if kind == "features" else TargetSpec).from_dict(spec_dict)
    if version < FORMAT_VERSION:
        upgraded = {"from_format": version, "from_key": meta["key"],
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        new_meta = {**meta, "key": spec.key, "spec": spec.to_dict(), "format_version": FORMAT_VERSION,
                    "upgraded": upgraded}
        L.open_group(path, "r+", storage_options).attrs[L.ATTR] = new_meta
    # the name the catalogue gives the new key, in the store's own folder
    named = feature_store_path("root", spec) if kind == "features" else target_store_path("root", spec)
    target = L.join(L.parent(path), named.replace("\\", "/").rsplit("/", 1)[-1])
    if target != path:
        _move(path, target, storage_options)
    return target


def _move(src: str, dst: str, storage_options: dict[str, Any] | None) -> None:
    if L.exists(dst, storage_options):
        raise StoreError(f"cannot move the upgraded store {src} to {dst}: something is already there; compare the two "
                         f"(`maxa stores info`) and remove one.")
    if L.is_remote(src):
        fs, p = L.fs_path(src, storage_options)
        fs.mv(p, L.fs_path(dst, storage_options)[1], recursive=True)
        fs.invalidate_cache()
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)
