"""Upgrade a store written by an older maxa to the current store format, in place.

Format 1 → 2: stores gained a dataset identity (``dataset_id``, from the dataset reader's
fingerprint), on which train and eval stores pair. It cannot be derived from the store alone, so
the caller supplies ``identify(spec, image_ids)``: it reads the dataset the store was extracted
from, checks that it lists exactly the store's images, and returns the identity. The arrays are not
touched. The attributes are rewritten first and the store moved to the path of its new key second,
so an upgrade interrupted in between is finished by running it again.

Any format: a store written before stores carried what xarray reads (``store.xarray_meta``:
dimension names, an ``image_id`` coordinate, the spec in each group's attributes, consolidated
metadata) gets it, in metadata documents and the small ``image_id`` arrays only: no shard of data
is read or rewritten. The metadata is consolidated again last, on every run, so a run interrupted
before then is finished by the next.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from store import _layout as L
from store.catalogue import feature_store_path, target_store_path
from runtime.errors import StoreError
from store.location import Location, as_location
from store.spec import FORMAT_VERSION, FeatureSpec, TargetSpec, store_format
from store.xarray_meta import add_xarray_metadata, consolidate

__all__ = ["upgrade_store"]

#: ``identify(spec_dict, stored_image_ids) -> dataset_id``; raises StoreError when the data differs.
Identify = Callable[[dict[str, Any], list[str]], str]


def upgrade_store(path: str | Path | Location, identify: Identify,
                  report: Callable[[str], None] | None = None) -> Location:
    """Bring the store at ``path`` to :data:`FORMAT_VERSION` and today's metadata; returns its (new)
    location. ``report`` is told each thing changed, in words (never called: it was current).

    Raises:
        StoreError: not a store, incomplete, newer, or ``identify`` refused the data.
    """
    loc = as_location(path)
    meta = L.read_attrs(loc)
    if meta is None:
        raise StoreError(f"{loc} is not a maxa store (no 'maxa' attributes in its zarr.json).")
    version = store_format(meta)
    if version not in (1, FORMAT_VERSION):
        L.check_format(meta, loc)  # one line: newer than this maxa, or not a version at all
    if not meta.get("complete"):
        raise StoreError(f"{loc} is incomplete: there is nothing worth upgrading; remove it (`maxa stores rm {loc}`) "
                         "and extract it again with this maxa.")
    tell = report or (lambda _: None)
    kind = meta.get("kind")
    spec_dict = dict(meta["spec"])
    if version < FORMAT_VERSION:
        stored_ids = [str(i) for i in loc.open_group("r")[L.INDEX_GROUP].attrs["image_ids"]]
        spec_dict.update(dataset_id=identify(spec_dict, stored_ids), format_version=FORMAT_VERSION)
    spec = (FeatureSpec if kind == "features" else TargetSpec).from_dict(spec_dict)
    if version < FORMAT_VERSION:
        upgraded = {"from_format": version, "from_key": meta["key"],
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        new_meta = {**meta, "key": spec.key, "spec": spec.to_dict(), "format_version": FORMAT_VERSION,
                    "upgraded": upgraded}
        loc.open_group("r+").attrs[L.ATTR] = new_meta
        meta = new_meta
        tell(f"store format {version} → {FORMAT_VERSION} (dataset identity {spec.dataset_id})")
    changes = add_xarray_metadata(loc, meta)
    if loc.open_group("r").metadata.consolidated_metadata is None:
        changes.append("consolidated metadata")
    for change in changes:
        tell(f"added for xarray: {change}")
    consolidate(loc)  # on every run: the last step of an earlier, interrupted one
    # the name the catalogue gives the new key, in the store's own folder
    named = feature_store_path("root", spec) if kind == "features" else target_store_path("root", spec)
    target = loc.parent / named.name
    if target != loc:
        if target.exists():
            raise StoreError(f"cannot move the upgraded store {loc} to {target}: something is already there; compare "
                             "the two (`maxa stores info`) and remove one.")
        loc.move_to(target)
        tell(f"moved to {target}")
    return target
