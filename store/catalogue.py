"""Where stores live under a store root, and what a root holds.

```
<root>/features/<backbone>/<dataset>-<split>-<key>.zarr
<root>/targets/<dataset>-<split>-<H>x<W>-<key>.zarr
```
The key in the name makes the path a function of the spec: asking twice for the same extraction
finds the same store (and, through the store's lease, two people asking at once share one
writer). A root is anything :func:`store.location.as_location` takes: a local folder, an fsspec
URL (``s3://bucket/prefix``), or a :class:`~store.location.Location` carrying its storage options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from store import _layout as L
from store.location import Location, as_location
from store.quantize import LOSSLESS
from store.spec import DEFAULT_TARGET_SIZE, FORMAT_VERSION, FeatureSpec, TargetSpec, store_format

__all__ = [
    "feature_store_path",
    "target_store_path",
    "list_stores",
    "walk_stores",
    "store_summary",
    "store_root_of",
    "find_target_store",
    "find_eval_features",
]

def feature_store_path(root: str | Path | Location, spec: FeatureSpec) -> Location:
    name = f"{L.safe_name(spec.dataset)}-{L.safe_name(spec.split)}-{spec.key}.zarr"
    return as_location(root).join(L.FEATURES_DIR, L.safe_name(spec.backbone), name)


def target_store_path(root: str | Path | Location, spec: TargetSpec) -> Location:
    h, w = spec.size
    name = f"{L.safe_name(spec.dataset)}-{L.safe_name(spec.split)}-{h}x{w}-{spec.key}.zarr"
    return as_location(root).join(L.TARGETS_DIR, name)


def store_summary(path: str | Path | Location, meta: dict[str, Any], *, with_size: bool = True) -> dict[str, Any]:
    """One row describing a store, from its attributes (no array reads)."""
    loc = as_location(path)
    spec = meta.get("spec", {})
    row: dict[str, Any] = {
        "path": str(loc),
        "kind": meta.get("kind"),
        "key": meta.get("key"),
        "dataset": spec.get("dataset"),
        "split": spec.get("split"),
        "images": meta.get("num_images"),
        "complete": bool(meta.get("complete")),
        "bad_images": meta.get("num_bad", 0),
        "format": store_format(meta),
    }
    if meta.get("kind") == "features":
        layers = spec.get("layers", [])
        row["backbone"] = spec.get("backbone")
        row["weights"] = spec.get("weights_id")
        row["input_size"] = spec.get("input_size")
        row["grid"] = ", ".join(f"{l['name']} {l['grid'][0]}x{l['grid'][1]}x{l['channels']}" for l in layers)
        row["quantization"] = spec.get("quantization") or LOSSLESS
    else:
        row["backbone"] = "-"
        row["weights"] = "-"
        row["input_size"] = spec.get("size")
        row["grid"] = ", ".join(spec.get("kinds", []))
    if with_size:
        row["bytes"] = loc.tree_bytes()
    return row


def walk_stores(root: str | Path | Location) -> Iterator[tuple[Location, dict[str, Any]]]:
    """``(location, attributes)`` of every maxa store under ``root``, depth-first in name order,
    not descending into stores."""
    stack = [as_location(root)]
    while stack:
        folder = stack.pop()
        later = []
        for name, is_dir in folder.children():
            if not is_dir:
                continue
            if name.endswith(".zarr"):
                meta = L.read_attrs(folder / name)
                if meta is not None:
                    yield folder / name, meta
            elif not name.startswith("."):
                later.append(folder / name)
        stack.extend(reversed(later))


def list_stores(root: str | Path | Location, *, with_size: bool = True) -> list[dict[str, Any]]:
    """One :func:`store_summary` row per maxa store under ``root``."""
    return [store_summary(loc, meta, with_size=with_size) for loc, meta in walk_stores(root)]


def _complete_current(meta: dict[str, Any]) -> bool:
    return bool(meta.get("complete")) and store_format(meta) == FORMAT_VERSION


def store_root_of(path: str | Path | Location) -> Location:
    """The store root holding the store at ``path`` (``<root>/features/<backbone>/<name>.zarr`` or
    ``<root>/targets/<name>.zarr``)."""
    loc = as_location(path)
    meta = L.read_attrs(loc)
    kind = meta.get("kind") if meta else None
    for _ in range(3 if kind == "features" else 2):
        loc = loc.parent
    return loc


def find_target_store(root: str | Path | Location, spec: FeatureSpec | dict[str, Any],
                      size: tuple[int, int] | None = None, like: TargetSpec | None = None) -> Location | None:
    """The complete target store under ``root`` that indexes the same images of the same dataset
    as a feature store.

    Args:
        root: store root.
        spec: the feature store's spec (or its dict).
        size: output resolution; ``None`` takes :data:`DEFAULT_TARGET_SIZE` if present, else any.
        like: only target stores whose definitions equal this one's (:meth:`TargetSpec.definition`:
            size, target definitions, classes), e.g. the eval targets of a probe's training targets.

    Of several that qualify, one of the default size first, then one holding the resized input
    images (``TargetSpec.image``: the same targets, and what image-guided heads need).
    """
    spec = spec.to_dict() if isinstance(spec, FeatureSpec) else spec
    found = []
    for loc, meta in walk_stores(as_location(root) / L.TARGETS_DIR):
        if not _complete_current(meta):
            continue
        t = meta.get("spec", {})
        if (t.get("dataset_id") == spec.get("dataset_id") and t.get("split") == spec["split"]
                and t.get("image_ids_hash") == spec["image_ids_hash"]
                and (like is None or TargetSpec.from_dict(t).definition() == like.definition())):
            found.append((tuple(t.get("size", ())), not t.get("image", False), str(loc), loc))
    if size is not None:
        found = [f for f in found if f[0] == tuple(size)]
    # Equal definitions hold equal targets; one that also holds the resized images serves every head.
    found.sort(key=lambda f: (f[0] != DEFAULT_TARGET_SIZE, f[1], f[2]))
    return found[0][-1] if found else None


def find_eval_features(root: str | Path | Location, spec: FeatureSpec,
                       splits: tuple[str, ...] = ("val", "test")) -> Location | None:
    """A complete feature store of the same backbone features (:meth:`FeatureSpec.backbone_identity`)
    of the same dataset (``dataset_id``) on an eval split."""
    backbone_dir = as_location(root).join(L.FEATURES_DIR, L.safe_name(spec.backbone))
    # dataset options may legitimately differ per split (e.g. shapes' num_images): prefer equal ones
    mine = spec.identity()
    candidates = []
    for loc, meta in walk_stores(backbone_dir):
        if not _complete_current(meta):
            continue
        other_spec = FeatureSpec.from_dict(meta["spec"]) if meta.get("spec") else None
        if other_spec is None:
            continue
        other = other_spec.identity()
        if (other_spec.backbone_identity() == spec.backbone_identity() and other["dataset_id"] == spec.dataset_id
                and other["split"] in splits and other["split"] != spec.split):
            options_differ = other.get("dataset_options") != mine.get("dataset_options")
            candidates.append((splits.index(other["split"]), options_differ, -int(other["num_images"]), str(loc), loc))
    candidates.sort(key=lambda c: c[:4])
    return candidates[0][-1] if candidates else None
