"""Where stores live under a store root, and what a root holds.

```
<root>/features/<backbone>/<dataset>-<split>-<key>.zarr
<root>/targets/<dataset>-<split>-<H>x<W>-<key>.zarr
```
The key in the name makes the path a function of the spec: asking twice for the same extraction
finds the same store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from store import _layout as L
from store.spec import FeatureSpec, TargetSpec

__all__ = ["feature_store_path", "target_store_path", "list_stores", "store_summary"]


def feature_store_path(root: str | Path, spec: FeatureSpec) -> str:
    name = f"{L.safe_name(spec.dataset)}-{L.safe_name(spec.split)}-{spec.key}.zarr"
    return str(Path(root) / "features" / L.safe_name(spec.backbone) / name)


def target_store_path(root: str | Path, spec: TargetSpec) -> str:
    h, w = spec.size
    name = f"{L.safe_name(spec.dataset)}-{L.safe_name(spec.split)}-{h}x{w}-{spec.key}.zarr"
    return str(Path(root) / "targets" / name)


def _du(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def store_summary(path: str, meta: dict[str, Any], *, with_size: bool = True) -> dict[str, Any]:
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
    if with_size and not L.is_remote(path):
        row["bytes"] = _du(path)
    return row


def list_stores(root: str | Path, *, with_size: bool = True) -> list[dict[str, Any]]:
    """Every maxa store under ``root`` (depth-first, not descending into stores)."""
    root = str(root)
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
