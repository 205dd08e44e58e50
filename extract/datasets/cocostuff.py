"""COCO-Stuff 164k semantic segmentation: 171 thing and stuff classes.

Layout (either folder name of each pair is accepted)::

    ROOT/images/{split}2017/*.jpg                       or ROOT/{split}2017/*.jpg
    ROOT/stuffthingmaps_trainval2017/{split}2017/*.png  or ROOT/annotations/{split}2017/*.png

A label PNG is single channel: pixel value ``v`` is label id ``v + 1`` (``0..181``), 255 is unlabeled.
Eleven COCO thing ids never occur, so the 182 ids map contiguously onto 171 classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from extract.datasets.base import Annotation, DatasetReader, files_digest, register_dataset
from extract.datasets.decode import header_size
from extract.datasets.segfolder import read_index_png
from runtime.errors import DatasetError

__all__ = ["COCOSTUFF_CLASSES", "COCOSTUFF_UNUSED_IDS", "CocoStuffDataset", "label_lut"]

#: The 1-based label ids of COCO thing categories that were never annotated.
COCOSTUFF_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)

#: Names of the 171 classes in contiguous order (80 things by COCO id, then 91 stuff classes).
COCOSTUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain",
    "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
]  # fmt: skip

_LAYOUT = (
    "expected the COCO-Stuff 164k layout: ROOT/images/{split}2017/*.jpg (or ROOT/{split}2017) and "
    "ROOT/stuffthingmaps_trainval2017/{split}2017/*.png (or ROOT/annotations/{split}2017)"
)


def label_lut() -> np.ndarray:
    """Lookup table from label-PNG pixel value (0..255) to contiguous class (0..170) or 255.

    Returns:
        ``(256,)`` uint8 array; unused thing ids, 255 and values above 181 map to 255.
    """
    lut = np.full(256, 255, dtype=np.uint8)
    used = [v for v in range(182) if v + 1 not in COCOSTUFF_UNUSED_IDS]
    lut[used] = np.arange(len(used), dtype=np.uint8)
    return lut


def _image_files(image_dir: Path) -> list[str]:
    return sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


@register_dataset
class CocoStuffDataset(DatasetReader):
    """COCO-Stuff 164k: ``semantic`` holds classes ``0..170``, 255 for unlabeled pixels.

    Image ids are the image file stems (12-digit COCO ids), sorted. Every image must have a label.

    Fingerprint: the sorted image stems of every split folder present and the class list. Limit:
    a copy with the same file names but other pixels or labels counts as the same dataset.
    """

    name = "cocostuff"
    targets = frozenset({"semantic"})
    splits = ("train", "val")
    num_classes = len(COCOSTUFF_CLASSES)
    class_names = COCOSTUFF_CLASSES

    def __init__(self, root: str | Path | None, split: str, **options: Any) -> None:
        super().__init__(root, split, **options)
        if self.root is None or not self.root.is_dir():
            raise DatasetError(f"COCO-Stuff root {self.root} does not exist or is not a folder: pass --root with the COCO-Stuff folder; {_LAYOUT}.")
        folder = f"{split}2017"
        image_dir = _first_dir(self.root / "images" / folder, self.root / folder)
        if image_dir is None:
            raise DatasetError(f"COCO-Stuff root {self.root} has no images/{folder}/ (nor {folder}/); {_LAYOUT}.")
        label_dir = _first_dir(self.root / "stuffthingmaps_trainval2017" / folder, self.root / "annotations" / folder)
        if label_dir is None:
            raise DatasetError(
                f"COCO-Stuff root {self.root} has no stuffthingmaps_trainval2017/{folder}/ "
                f"(nor annotations/{folder}/); {_LAYOUT}."
            )
        self._image_dir, self._label_dir = image_dir, label_dir
        files = _image_files(image_dir)
        if not files:
            raise DatasetError(f"COCO-Stuff image folder {image_dir} holds no images; {_LAYOUT}.")
        stems = [Path(f).stem for f in files]
        labels = {p.name for p in label_dir.iterdir()}
        missing = next((s for s in stems if f"{s}.png" not in labels), None)
        if missing is not None:
            raise DatasetError(f"COCO-Stuff image {missing} has no label {label_dir / (missing + '.png')}; {_LAYOUT}.")
        self.image_ids = stems
        self._image_files = files
        self._lut = label_lut()

    def image_path(self, index: int) -> Path:
        return self._image_dir / self._image_files[index]

    def annotation_path(self, index: int) -> Path:
        return self._label_dir / f"{self.image_ids[index]}.png"

    def annotation_size(self, index: int) -> tuple[int, int]:
        return header_size(self.annotation_path(index))

    def fingerprint(self) -> dict[str, Any]:
        splits = {}
        for split in self.splits:
            image_dir = _first_dir(self.root / "images" / f"{split}2017", self.root / f"{split}2017")
            if image_dir is not None:
                names = _image_files(image_dir)
                splits[split] = {"count": len(names), "files": files_digest(image_dir, names)}
        return {"splits": splits, "classes": list(COCOSTUFF_CLASSES)}

    def read_annotation(self, index: int) -> Annotation:
        """Contiguous 171-class labels of image ``index`` at its original size."""
        raw = read_index_png(self.annotation_path(index))
        semantic = self._lut[np.clip(raw, 0, 255)]
        return Annotation(size=(int(raw.shape[0]), int(raw.shape[1])), semantic=semantic)
