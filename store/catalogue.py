"""Where stores live under a store root, and what a root holds.

```
<root>/features/<backbone>/<dataset>-<split>-<key>.zarr
<root>/targets/<dataset>-<split>-<H>x<W>-<key>.zarr
```
The key in the name makes the path a function of the spec: asking twice for the same extraction
finds the same store (and, through the store's lease, two people asking at once share one
writer). A root is a local folder or an fsspec URL (``s3://bucket/prefix``); every function takes
``storage_options`` for URLs. Local roots are walked with ``os`` as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from store import _layout as L
from store.spec import FORMAT_VERSION, FeatureSpec, TargetSpec, store_format

__all__ = [
    "feature_store_path",
    "target_store_path",
    "list_stores",
    "store_summary",
    "store_root_of",
    "find_target_store",
    "find_eval_features",
]

SO = dict[str, Any] | None


def feature_store_path(root: str | Path, spec: FeatureSpec) -> str:
    name = f"{L.safe_name(spec.dataset)}-{L.safe_name(spec.split)}-{spec.key}.zarr"
    return L.join(root, "features", L.safe_name(spec.backbone), name)


def target_store_path(root: str | Path, spec: TargetSpec) -> str:
    h, w = spec.size
    name = f"{L.safe_name(spec.dataset)}-{L.safe_name(spec.split)}-{h}x{w}-{spec.key}.zarr"
    return L.join(root, "targets", name)


def _du(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def store_summary(path: str, meta: dict[str, Any], *, with_size: bool = True,
                  storage_options: SO = None) -> dict[str, Any]:
    """One row describing a store, from its attributes (no array reads)."""
    spec = meta.get("spec", {})
    row: dict[str, Any] = {
        "path": path,
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
    else:
        row["backbone"] = "-"
        row["weights"] = "-"
        row["input_size"] = spec.get("size")
        row["grid"] = ", ".join(spec.get("kinds", []))
    if with_size:
        if L.is_remote(path):
            fs, p = L.fs_path(path, storage_options)
            row["bytes"] = int(fs.du(p, total=True))
        else:
            row["bytes"] = _du(path)
    return row


def list_stores(root: str | Path, *, with_size: bool = True, storage_options: SO = None) -> list[dict[str, Any]]:
    """Every maxa store under ``root`` (depth-first, not descending into stores)."""
    root = str(root)
    if L.is_remote(root):
        return _list_remote(root, with_size, storage_options)
    rows: list[dict[str, Any]] = []
    if not os.path.isdir(root):
        return rows
    for dirpath, dirs, _files in os.walk(root):
        dirs.sort()
        keep = []
        for d in dirs:
            full = os.path.join(dirpath, d)
            if d.endswith(".zarr"):
                meta = L.read_attrs(full)
                if meta is not None:
                    rows.append(store_summary(full, meta, with_size=with_size))
            elif not d.startswith("."):
                keep.append(d)
        dirs[:] = keep
    return rows


def _list_remote(root: str, with_size: bool, storage_options: SO) -> list[dict[str, Any]]:
    fs, top = L.fs_path(root, storage_options)
    fs.invalidate_cache(top)
    rows: list[dict[str, Any]] = []
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            entries = fs.ls(d, detail=True)
        except FileNotFoundError:
            continue
        subdirs = sorted(e["name"].rstrip("/") for e in entries if e.get("type") == "directory")
        later = []
        for sub in subdirs:
            name = sub.rsplit("/", 1)[-1]
            if name.endswith(".zarr"):
                url = fs.unstrip_protocol(sub)
                meta = L.read_attrs(url, storage_options)
                if meta is not None:
                    rows.append(store_summary(url, meta, with_size=with_size, storage_options=storage_options))
            elif not name.startswith("."):
                later.append(sub)
        stack.extend(reversed(later))  # depth-first, in name order like the local walk
    return rows


def store_root_of(path: str | Path, storage_options: SO = None) -> str:
    """The store root holding the store at ``path`` (``<root>/features/<backbone>/<name>.zarr`` or
    ``<root>/targets/<name>.zarr``)."""
    meta = L.read_attrs(path, storage_options)
    kind = meta.get("kind") if meta else None
    return L.parent(path, 3 if kind == "features" else 2)


def find_target_store(root: str | Path, spec: FeatureSpec | dict[str, Any],
                      size: tuple[int, int] | None = None, storage_options: SO = None,
                      like: TargetSpec | None = None) -> str | None:
    """The complete target store under ``root`` that indexes the same images of the same dataset
    as a feature store.

    Args:
        root: store root.
        spec: the feature store's spec (or its dict).
        size: output resolution; ``None`` takes 224 × 224 if present, else any.
        storage_options: fsspec options for a URL root.
        like: only target stores whose definitions equal this one's (:meth:`TargetSpec.definition`:
            size, target definitions, classes), e.g. the eval targets of a probe's training targets.
    """
    spec = spec.to_dict() if isinstance(spec, FeatureSpec) else spec
    found = []
    targets_dir = L.join(root, "targets")
    rows = list_stores(targets_dir, with_size=False, storage_options=storage_options) \
        if L.isdir(targets_dir, storage_options) else []
    for row in rows:
        if not row["complete"] or row["format"] != FORMAT_VERSION:
            continue
        meta = L.read_attrs(row["path"], storage_options) or {}
        t = meta.get("spec", {})
        if (t.get("dataset_id") == spec.get("dataset_id") and t.get("split") == spec["split"]
                and t.get("image_ids_hash") == spec["image_ids_hash"]
                and (like is None or TargetSpec.from_dict(t).definition() == like.definition())):
            found.append((tuple(t.get("size", ())), row["path"]))
    if size is not None:
        found = [f for f in found if f[0] == tuple(size)]
    found.sort(key=lambda f: (f[0] != (224, 224), f[1]))
    return found[0][1] if found else None


def find_eval_features(root: str | Path, spec: FeatureSpec, splits: tuple[str, ...] = ("val", "test"),
                       storage_options: SO = None) -> str | None:
    """A complete feature store of the same backbone features (:meth:`FeatureSpec.backbone_identity`)
    of the same dataset (``dataset_id``) on an eval split."""
    backbone_dir = L.join(root, "features", L.safe_name(spec.backbone))
    if not L.isdir(backbone_dir, storage_options):
        return None
    # dataset options may legitimately differ per split (e.g. shapes' num_images): prefer equal ones
    mine = spec.identity()
    candidates = []
    for row in list_stores(backbone_dir, with_size=False, storage_options=storage_options):
        if not row["complete"] or row["format"] != FORMAT_VERSION:
            continue
        meta = L.read_attrs(row["path"], storage_options) or {}
        other_spec = FeatureSpec.from_dict(meta["spec"]) if meta.get("spec") else None
        if other_spec is None:
            continue
        other = other_spec.identity()
        if (other_spec.backbone_identity() == spec.backbone_identity() and other["dataset_id"] == spec.dataset_id
                and other["split"] in splits and other["split"] != spec.split):
            options_differ = other.get("dataset_options") != mine.get("dataset_options")
            candidates.append((splits.index(other["split"]), options_differ, -int(other["num_images"]), row["path"]))
    candidates.sort()
    return candidates[0][-1] if candidates else None
