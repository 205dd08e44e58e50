"""COCO 2017 instance segmentation (things only): instance masks, crowd regions and 81-class labels.

Layout::

    ROOT/annotations/instances_{split}2017.json
    ROOT/{split}2017/{file_name}

The JSON is parsed and checked once when the reader is built (``extract.datasets.coco_json``); the
reader then keeps only what decoding needs per image, so it pickles into DataLoader workers without
the full index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from extract.datasets.base import Annotation, DatasetReader, register_dataset
from extract.datasets.coco_json import load_coco_json
from runtime.errors import DatasetError

__all__ = ["COCODataset", "segmentation_to_mask"]

_LAYOUT = "expected the COCO 2017 layout: ROOT/annotations/instances_{split}2017.json and ROOT/{split}2017/*.jpg"


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygons, uncompressed or compressed RLE) to a bool mask.

    The same steps as ``COCO.annToMask``, without needing the ``COCO`` index.

    Args:
        segmentation: the annotation's ``segmentation`` field.
        height: image height.
        width: image width.

    Returns:
        ``(height, width)`` bool mask.
    """
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE (crowds)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


@register_dataset
class COCODataset(DatasetReader):
    """COCO 2017 instances: every non-crowd annotation is an instance; crowds are ignored regions.

    Options:
        include_empty: keep images that have no annotation (default ``True``); it selects images of
            a split, so it is not part of :meth:`dataset_options`.

    Image ids are the COCO ids as strings, in numeric order. ``instance_classes`` are COCO
    category ids; ``semantic`` maps them to contiguous indices ``1..80`` (sorted category ids,
    0 = background, 255 = crowd not covered by a non-crowd instance). Overlapping instances are
    painted largest first so small objects stay visible.

    Every annotation is checked when the reader is built (category, segmentation, area, crowd
    flag); the first bad one is refused naming the file, the annotation id and the image id.
    Annotations of images the file does not list are ignored, with a warning.

    Fingerprint: the JSON's ``info`` and its categories (id, name, supercategory), the dataset's
    header, the same in every split's file. Limit: two COCO-format datasets with identical
    ``info`` and categories count as one dataset.
    """

    name = "coco"
    targets = frozenset({"boundaries", "distance", "instances", "semantic"})
    splits = ("train", "val")
    split_options = frozenset({"include_empty"})

    def __init__(self, root: str | Path | None, split: str, **options: Any) -> None:
        super().__init__(root, split, **options)
        if self.root is None:
            raise DatasetError(f"COCO needs a root folder: pass --root ROOT; {_LAYOUT}.")
        if not self.root.is_dir():
            raise DatasetError(f"COCO root {self.root} does not exist or is not a folder: pass --root with the COCO folder; {_LAYOUT}.")
        ann_file = self.root / "annotations" / f"instances_{split}2017.json"
        self._ann_file = ann_file
        self._image_dir = self.root / f"{split}2017"
        if not ann_file.is_file():
            raise DatasetError(f"COCO root {self.root} has no annotations/instances_{split}2017.json; {_LAYOUT}.")
        if not self._image_dir.is_dir():
            raise DatasetError(f"COCO root {self.root} has no {split}2017/ image folder; {_LAYOUT}.")
        index = load_coco_json(ann_file)
        for message in index.warnings:
            self._warn(message)

        cats = index.categories
        cat_ids = sorted(cats)
        self._contiguous = {cat_id: i + 1 for i, cat_id in enumerate(cat_ids)}
        self.num_classes = len(cat_ids) + 1
        self.class_names = ["background"] + [cats[c]["name"] for c in cat_ids]
        self._header = {
            "info": index.info,
            "categories": [{k: cats[c].get(k) for k in ("id", "name", "supercategory")} for c in cat_ids],
        }
        include_empty = bool(options.get("include_empty", True))
        image_ids = [i for i in index.image_ids if include_empty or index.anns[i]]
        if not image_ids:
            raise DatasetError(f"COCO annotation file {ann_file} lists no images.")
        self.image_ids = [str(i) for i in image_ids]
        self._files = [index.images[i]["file_name"] for i in image_ids]
        self._sizes = [index.sizes[i] for i in image_ids]
        self._anns = [index.anns[i] for i in image_ids]

    def image_path(self, index: int) -> Path:
        return self._image_dir / self._files[index]

    def annotation_path(self, index: int) -> Path:
        return self._ann_file

    def annotation_size(self, index: int) -> tuple[int, int]:
        return self._sizes[index]

    def fingerprint(self) -> dict[str, Any]:
        return self._header

    def read_annotation(self, index: int) -> Annotation:
        """Instances, crowd regions and semantic labels of image ``index`` at its original size."""
        height, width = self._sizes[index]
        things = [a for a in self._anns[index] if not a.get("iscrowd", 0)]
        crowds = [a for a in self._anns[index] if a.get("iscrowd", 0)]
        masks = np.zeros((len(things), height, width), dtype=bool)
        for k, ann in enumerate(things):
            masks[k] = segmentation_to_mask(ann["segmentation"], height, width)
        ignore = np.zeros((height, width), dtype=bool)
        for ann in crowds:
            ignore |= segmentation_to_mask(ann["segmentation"], height, width)
        classes = np.array([a["category_id"] for a in things], dtype=np.int64)
        areas = np.array([a.get("area", 0.0) for a in things], dtype=np.float64)

        semantic = np.zeros((height, width), dtype=np.uint8)
        semantic[ignore] = 255
        for k in np.argsort(-areas, kind="stable"):  # largest first: smaller objects end on top
            semantic[masks[k]] = self._contiguous[int(classes[k])]
        return Annotation(
            size=(height, width),
            instance_masks=masks,
            instance_classes=classes,
            instance_areas=areas,
            ignore_mask=ignore,
            semantic=semantic,
        )
