"""``maxa stores upgrade``: the dataset side of upgrading an old store (see :mod:`store.upgrade`).

The store format cannot tell which data a format-1 store came from; this reads the dataset at the
root the user names and refuses one that does not list the store's images in their order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from runtime.errors import StoreError
from store.location import Location
from store.upgrade import upgrade_store as _upgrade

__all__ = ["upgrade_store"]


def upgrade_store(path: str | Path | Location, dataset_root: str | Path | None,
                  report: Callable[[str], None] | None = None) -> Location:
    """Bring the store at ``path`` to the current format; returns its (new) location.

    Args:
        path: a feature or target store.
        dataset_root: the root of the dataset it was extracted from (``None`` for built-in data;
            read only for a store of an older format).
        report: told each thing changed, in words.
    """
    from extract.datasets.base import create_dataset

    def identify(spec: dict[str, Any], stored_ids: list[str]) -> str:
        reader = create_dataset(spec["dataset"], dataset_root, spec["split"], **dict(spec.get("dataset_options") or {}))
        if list(reader.image_ids[: len(stored_ids)]) != stored_ids:
            raise StoreError(
                f"the {spec['dataset']} dataset at {dataset_root} ({spec['split']} split, "
                f"{len(reader.image_ids)} images) does not list the {len(stored_ids)} images of {path} in its order; "
                "give --root the dataset this store was extracted from."
            )
        return reader.dataset_id()

    return _upgrade(path, identify, report)
