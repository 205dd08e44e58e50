"""Parse and check a COCO instances JSON once, so that no bad annotation reaches a DataLoader worker.

A bad annotation (unknown category, malformed polygon or RLE, ...) used to end as a ``KeyError``
deep in a worker process. :func:`load_coco_json` checks every annotation with cheap tests (COCO
train has ~860k annotations: a few ``len``/``sum`` calls each) and refuses the first bad one with
a :class:`DatasetError` naming the file, the annotation id, the image id and what is wrong.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import DatasetError

__all__ = ["CocoIndex", "load_coco_json"]

#: Annotation fields the reader keeps per image (everything else is dropped after the checks).
_KEEP = ("segmentation", "iscrowd", "area", "category_id")
_FORMAT = ("expected a COCO instances JSON object with 'images' (id, file_name, height, width), "
           "'annotations' and 'categories' (id, name) lists")
_NUMBER = (int, float)


@dataclass
class CocoIndex:
    """What a reader needs from a COCO JSON, per image, after the checks.

    Attributes:
        info: the JSON's ``info`` object (``None`` when absent).
        categories: category id → category object.
        images: image id → image object.
        sizes: image id → ``(height, width)``.
        image_ids: image ids in numeric (or string) order.
        anns: image id → its annotations (only the fields a reader uses), in file order.
        warnings: one line per oddity that was worked around.
    """

    info: Any
    categories: dict[Any, dict[str, Any]]
    images: dict[Any, dict[str, Any]]
    sizes: dict[Any, tuple[int, int]]
    image_ids: list[Any]
    anns: dict[Any, list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)


def _ids_text(ids: list[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (", …" if len(ids) > limit else "")


def _list(data: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise DatasetError(f"COCO annotation file {path}: '{key}' is a {type(value).__name__}, not a list; {_FORMAT}.")
    return value


def _segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why ``seg`` is not a usable polygon list or RLE for an image of ``height`` x ``width``, or ``None``."""
    if isinstance(seg, list):
        if not seg:
            return "has an empty segmentation (no polygon)"
        for part in seg:
            if not isinstance(part, list):
                return f"has a polygon that is a {type(part).__name__}, not a list of coordinates"
            n = len(part)
            if n < 6 or n % 2:
                return (f"has a polygon with {n} coordinates; a polygon needs an even number of them, at "
                        "least 6 (3 points)")
            try:
                total = sum(part)  # TypeError for a string, None, list, ... anywhere in the polygon
            except TypeError:
                return "has a polygon with a non-numeric coordinate"
            if not math.isfinite(total):
                return "has a polygon with a non-finite coordinate (NaN or infinity)"
        return None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if counts is None or size is None:
            return "has an RLE segmentation without 'counts' and 'size'"
        if not isinstance(size, list) or size != [height, width]:
            return f"has an RLE of size {size!r} but its image is {height}x{width} (height x width)"
        if isinstance(counts, list):
            if not all(type(c) is int and c >= 0 for c in counts):
                return "has RLE counts that are not all non-negative integers"
            if sum(counts) != height * width:
                return f"has RLE counts summing to {sum(counts)}, not height x width = {height * width}"
        elif not isinstance(counts, str):
            return f"has RLE counts of type {type(counts).__name__}; expected a list or a compressed string"
        return None
    if seg is None:
        return "has no segmentation"
    return f"has a segmentation of type {type(seg).__name__}; expected polygons (a list) or an RLE (an object)"


def _annotation_problem(ann: dict[str, Any], categories: dict[Any, Any], size: tuple[int, int]) -> str | None:
    category = ann.get("category_id")
    if type(category) is not int or category not in categories:
        return f"has category_id {category!r}, which is not one of the file's categories ({_ids_text(sorted(categories), 8)})"
    crowd = ann.get("iscrowd", 0)
    if type(crowd) not in (int, bool, float) or crowd not in (0, 1):
        return f"has iscrowd {crowd!r}; expected 0 or 1"
    area = ann.get("area", 0.0)
    if type(area) not in _NUMBER or not math.isfinite(area) or area < 0:
        return f"has area {area!r}; expected a non-negative number"
    return _segmentation_problem(ann.get("segmentation"), *size)


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DatasetError(f"COCO annotation file {path} cannot be parsed ({err}); {_FORMAT}.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"COCO annotation file {path} holds a {type(data).__name__}, not an object; {_FORMAT}.")
    return data


def _categories(data: dict[str, Any], path: Path) -> dict[int, dict[str, Any]]:
    categories: dict[int, dict[str, Any]] = {}
    for cat in _list(data, "categories", path):
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        if type(cat_id) is not int or not isinstance(cat.get("name"), str):
            raise DatasetError(f"COCO annotation file {path}: category {cat!r} has no integer id and name; {_FORMAT}.")
        if cat_id in categories:
            raise DatasetError(f"COCO annotation file {path}: category id {cat_id} is listed twice; keep one.")
        categories[cat_id] = cat
    return categories


def _images(data: dict[str, Any], path: Path) -> tuple[dict[Any, dict[str, Any]], dict[Any, tuple[int, int]]]:
    images: dict[Any, dict[str, Any]] = {}
    sizes: dict[Any, tuple[int, int]] = {}
    for image in _list(data, "images", path):
        image_id = image.get("id") if isinstance(image, dict) else None
        if type(image_id) not in (int, str):
            raise DatasetError(f"COCO annotation file {path}: image {image!r} has no integer or string id; {_FORMAT}.")
        h, w = image.get("height"), image.get("width")
        if type(h) is not int or type(w) is not int or h <= 0 or w <= 0 or not isinstance(image.get("file_name"), str):
            raise DatasetError(
                f"COCO annotation file {path}: image id {image_id} needs a file_name and positive integer "
                f"height and width (has {image.get('file_name')!r}, {h!r}, {w!r}); fix that image entry."
            )
        if image_id in images:
            raise DatasetError(f"COCO annotation file {path}: image id {image_id} is listed twice; keep one.")
        images[image_id] = image
        sizes[image_id] = (h, w)
    if len({type(i) for i in images}) > 1:
        raise DatasetError(f"COCO annotation file {path} mixes integer and string image ids; use one kind.")
    return images, sizes


def load_coco_json(path: str | Path) -> CocoIndex:
    """Parse ``path``, check every annotation and group the annotations by image.

    Args:
        path: a COCO instances JSON (``instances_{split}2017.json`` or any file in that format).

    Returns:
        The per-image index; annotations of images the file does not list are left out and
        counted in ``warnings``.

    Raises:
        DatasetError: the file is not COCO JSON, or an image, category or annotation is malformed
            (the message names the file, the annotation id and the image id).
    """
    path = Path(path)
    with _gc_paused():
        return _index(path, _read(path))


@contextlib.contextmanager
def _gc_paused():
    """Millions of new dicts and lists trigger the cyclic GC over and over (a third of the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _index(path: Path, data: dict[str, Any]) -> CocoIndex:
    categories = _categories(data, path)
    images, sizes = _images(data, path)
    anns: dict[Any, list[dict[str, Any]]] = {i: [] for i in images}
    orphans: list[Any] = []
    for position, ann in enumerate(_list(data, "annotations", path)):
        ann_id = ann.get("id", f"#{position}") if isinstance(ann, dict) else f"#{position}"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        try:
            kept = anns.get(image_id)
        except TypeError:  # an unhashable image_id (a list, an object)
            kept = None
        if kept is None:
            if image_id is None or type(image_id) not in (int, str):
                raise DatasetError(f"COCO annotation file {path}: annotation id {ann_id} has no valid image_id "
                                   f"(has {image_id!r}); fix or remove that annotation.")
            orphans.append(ann_id)
            continue
        problem = _annotation_problem(ann, categories, sizes[image_id])
        if problem is not None:
            raise DatasetError(f"COCO annotation file {path}: annotation id {ann_id} (image id {image_id}) "
                               f"{problem}; fix or remove that annotation.")
        kept.append({k: ann[k] for k in _KEEP if k in ann})
    warnings = []
    if orphans:
        warnings.append(f"{len(orphans)} annotation(s) in {path} refer to no image in it (annotation ids "
                        f"{_ids_text(orphans)}); they are ignored.")
    return CocoIndex(
        info=data.get("info"), categories=categories, images=images, sizes=sizes,
        image_ids=sorted(images), anns=anns, warnings=warnings,
    )
