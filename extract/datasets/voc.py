"""Pascal VOC 2012 semantic segmentation (and its instance masks where they are present).

Layout (``ROOT`` is the ``VOC2012`` folder, or a folder holding ``VOC2012`` or
``VOCdevkit/VOC2012``)::

    JPEGImages/{id}.jpg
    SegmentationClass/{id}.png          palette PNG: indices 0..20, 255 = border/ignore
    SegmentationObject/{id}.png         optional: indices 1..K = instances, 255 = border/ignore
    ImageSets/Segmentation/{train,val,trainval}.txt

Labels are the palette *indices* (``np.array(Image.open(p))``); converting to RGB would give colours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from extract.datasets.base import Annotation, DatasetReader, names_digest, register_dataset
from extract.datasets.decode import header_size
from extract.datasets.segfolder import read_index_png
from runtime.errors import BadImageError, DatasetError

__all__ = ["VOC_CLASSES", "VOCDataset"]

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

_LAYOUT = (
    "expected the Pascal VOC 2012 layout: ROOT (VOC2012, or a folder with VOCdevkit/VOC2012) holding "
    "JPEGImages/{id}.jpg, SegmentationClass/{id}.png and ImageSets/Segmentation/{split}.txt"
)


def _find_voc_root(root: Path) -> Path:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    if not root.is_dir():
        raise DatasetError(f"VOC root {root} does not exist or is not a folder: pass --root with the VOC folder; {_LAYOUT}.")
    raise DatasetError(f"VOC root {root} has no ImageSets/Segmentation (nor VOCdevkit/VOC2012/...); {_LAYOUT}.")


@register_dataset
class VOCDataset(DatasetReader):
    """Pascal VOC 2012 segmentation: 21 classes (0 = background), 255 ignored.

    When ``SegmentationObject/{id}.png`` exists for every image of the split, the reader also
    provides instances (``targets`` then include ``instances``, ``boundaries`` and ``distance``):
    each object index becomes one mask, its class the majority ``SegmentationClass`` label under
    it, its area the pixel count; the 255 border band becomes ``ignore_mask``.

    Fingerprint: the names and image ids of every ``ImageSets/Segmentation/*.txt`` and the class
    list. Limit: a copy with the same split lists but other pixels or labels counts as the same
    dataset.
    """

    name = "voc"
    targets = frozenset({"semantic"})
    splits = ("train", "val", "trainval")
    num_classes = 21
    class_names = VOC_CLASSES

    def __init__(self, root: str | Path | None, split: str, **options: Any) -> None:
        super().__init__(root, split, **options)
        if self.root is None:
            raise DatasetError(f"VOC needs a root folder: pass --root ROOT; {_LAYOUT}.")
        self._base = _find_voc_root(self.root)
        split_file = self._base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"VOC root {self._base} has no ImageSets/Segmentation/{split}.txt; {_LAYOUT}.")
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"VOC split file {split_file} lists no images.")
        for sub in ("JPEGImages", "SegmentationClass"):
            if not (self._base / sub).is_dir():
                raise DatasetError(f"VOC root {self._base} has no {sub}/; {_LAYOUT}.")
        self.image_ids = ids
        object_dir = self._base / "SegmentationObject"
        self._has_instances = object_dir.is_dir() and all((object_dir / f"{i}.png").is_file() for i in ids)
        if self._has_instances:
            # Instance-level class attribute override: this split supports instance targets too.
            self.targets = frozenset({"semantic", "instances", "boundaries", "distance"})

    def image_path(self, index: int) -> Path:
        return self._base / "JPEGImages" / f"{self.image_ids[index]}.jpg"

    def annotation_path(self, index: int) -> Path:
        return self._base / "SegmentationClass" / f"{self.image_ids[index]}.png"

    def annotation_size(self, index: int) -> tuple[int, int]:
        return header_size(self.annotation_path(index))

    def fingerprint(self) -> dict[str, Any]:
        lists = {}
        for path in sorted((self._base / "ImageSets" / "Segmentation").glob("*.txt")):
            ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
            lists[path.name] = names_digest(ids)
        return {"split_lists": lists, "classes": list(VOC_CLASSES)}

    def read_annotation(self, index: int) -> Annotation:
        """Semantic labels (and instances where present) of image ``index`` at its original size."""
        path = self.annotation_path(index)
        semantic = read_index_png(path)
        bad = (semantic >= self.num_classes) & (semantic != 255)
        if bad.any():
            raise BadImageError(str(path), f"label {int(semantic[bad][0])} is not a VOC class index (0..20, 255)")
        semantic = semantic.astype(np.uint8)
        ann = Annotation(size=(int(semantic.shape[0]), int(semantic.shape[1])), semantic=semantic)
        if self._has_instances:
            self._add_instances(ann, index)
        return ann

    def _add_instances(self, ann: Annotation, index: int) -> None:
        path = self._base / "SegmentationObject" / f"{self.image_ids[index]}.png"
        objects = read_index_png(path)
        if objects.shape != ann.semantic.shape:
            reason = f"object mask shape {objects.shape} differs from the class mask's {ann.semantic.shape}"
            raise BadImageError(str(path), reason)
        ids = [int(v) for v in np.unique(objects) if 0 < v < 255]
        masks = np.stack([objects == v for v in ids]) if ids else np.zeros((0, *objects.shape), dtype=bool)
        classes = []
        for mask in masks:
            labels = ann.semantic[mask]
            labels = labels[(labels > 0) & (labels < 255)]
            classes.append(int(np.bincount(labels).argmax()) if labels.size else 0)
        ann.instance_masks = masks
        ann.instance_classes = np.asarray(classes, dtype=np.int64)
        ann.instance_areas = masks.reshape(len(ids), -1).sum(axis=1).astype(np.float64)
        ann.ignore_mask = objects == 255
