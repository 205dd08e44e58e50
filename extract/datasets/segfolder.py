"""A generic folder of images and class-index PNGs (CamVid/SegNet layout and similar).

Two layouts are recognised under ``ROOT``:

* ``ROOT/{split}/*.png|jpg`` with labels ``ROOT/{split}annot/{stem}.png`` (CamVid as published with
  SegNet);
* ``ROOT/images/{split}/*`` with labels ``ROOT/labels/{split}/{stem}.png`` or
  ``ROOT/annotations/{split}/{stem}.png``.

Labels are single-channel PNGs (mode ``L``, ``P`` or 16-bit) holding class indices. This module also
holds :func:`read_index_png`, which the VOC and COCO-Stuff readers share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from extract.datasets.base import Annotation, DatasetReader, files_digest, register_dataset
from extract.datasets.decode import header_size
from runtime.errors import BadImageError, DatasetError

__all__ = ["LabelValueError", "SegFolderDataset", "read_index_png"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Label files read to infer ``num_classes`` when it is not given.
_INFER_FILES = 8
_LAYOUT = (
    "expected ROOT/{split}/*.png|jpg with ROOT/{split}annot/*.png, or ROOT/images/{split}/* with "
    "ROOT/labels/{split}/*.png or ROOT/annotations/{split}/*.png"
)


class LabelValueError(BadImageError):
    """A label file holds a value that is neither a class nor ``ignore_index``.

    Usually the options are wrong rather than the file, so the message points at ``--num-classes`` and
    ``--ignore-index`` first.
    """

    def __init__(self, path: str, reason: str, value: int | None = None) -> None:
        super().__init__(path, reason)
        self.value = value
        fix = (f"pass --num-classes {value + 1} or --ignore-index {value} if that value is a class or void"
               if value is not None and value >= 0 else "pass the right --num-classes / --ignore-index")
        self.args = (f"label file {self.path}: {reason}; {fix}, or fix the file.",)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.value))


def read_index_png(path: Path) -> np.ndarray:
    """Read a class-index PNG as a 2-D integer array without any colour conversion.

    Palette (``P``) images give their palette indices, which is what VOC stores; ``.convert("RGB")``
    would give colours instead.

    Args:
        path: the label file.

    Returns:
        ``(H, W)`` array of the stored indices (uint8, or uint16/int32 for 16-bit files).

    Raises:
        BadImageError: the file is missing, corrupt, or holds colour rather than indices.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise BadImageError(
                    str(path), f"label image has mode {im.mode}, expected single-channel class indices"
                )
            return np.array(im)
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(str(path), str(err) or type(err).__name__) from None


@register_dataset
class SegFolderDataset(DatasetReader):
    """Images with same-stem class-index PNGs, for any semantic-segmentation folder.

    Options:
        num_classes: number of classes; labels ``0..num_classes-1`` are classes. When omitted it is
            inferred as ``1 + max label`` over the first few label files (ignoring ``ignore_index``)
            and recorded in ``options`` so the reader's identity is the same as if it had been given;
            pass it explicitly when those files may not contain the highest class.
        ignore_index: label value to ignore (default 255); mapped to 255 in ``semantic``.

    Image ids are the image file stems, sorted. A label value that is neither a class nor
    ``ignore_index`` raises :class:`BadImageError` naming the label file.

    Fingerprint: the sorted image stems of every split folder present (train/val/test, in whichever
    layout), ``num_classes`` and ``ignore_index``. Limit: two roots with the same file names and
    class count count as one dataset even if their pixels differ; an inferred ``num_classes`` is
    inferred per split, so pass ``num_classes`` when the splits' first label files disagree.
    """

    name = "segfolder"
    targets = frozenset({"semantic"})
    splits = ("train", "val", "test")

    def __init__(self, root: str | Path | None, split: str, **options: Any) -> None:
        super().__init__(root, split, **options)
        if self.root is None or not self.root.is_dir():
            raise DatasetError(f"segfolder root {self.root} does not exist or is not a folder: pass --root with the dataset folder; {_LAYOUT}.")
        self._image_dir, self._label_dir = self._find_dirs(self.root, split)
        images = sorted(
            p for p in self._image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
        )
        if not images:
            raise DatasetError(f"segfolder image folder {self._image_dir} holds no .png/.jpg files; {_LAYOUT}.")
        label_names = {p.name for p in self._label_dir.iterdir()}
        for p in images:
            if p.stem + ".png" not in label_names:
                missing = self._label_dir / (p.stem + ".png")
                raise DatasetError(f"segfolder image {p} has no label {missing}; {_LAYOUT}.")
        self._image_files = [p.name for p in images]
        self.image_ids = [p.stem for p in images]
        if len(set(self.image_ids)) != len(self.image_ids):
            raise DatasetError(f"segfolder directory {self._image_dir} has several images with the same stem.")

        self._source_ignore = int(options.get("ignore_index", 255))
        num_classes = options.get("num_classes")
        if num_classes is None:
            num_classes = self._infer_num_classes()
            self.options["num_classes"] = num_classes
            self._warn(
                f"segfolder {split}: no --num-classes given, so {num_classes} classes (labels 0..{num_classes - 1}) "
                f"were inferred from the first {min(_INFER_FILES, len(self))} label files, ignore_index "
                f"{self._source_ignore}; if the highest label is void rather than a class (CamVid's 11), pass "
                f"--num-classes {num_classes - 1} --ignore-index {num_classes - 1}, else pass --num-classes "
                f"{num_classes} to silence this (the stores' keys include the classes: another choice later means "
                f"extracting the features again)."
            )
        self.num_classes = int(num_classes)
        if not 1 <= self.num_classes <= 255:
            raise DatasetError(f"segfolder num_classes must be in 1..255 (255 marks ignored), not {self.num_classes}; pass --num-classes N with the number of classes (or leave it out to infer it).")
        if 0 <= self._source_ignore < self.num_classes:
            raise DatasetError(
                f"segfolder ignore_index {self._source_ignore} is one of the {self.num_classes} classes; "
                "pass an ignore_index >= num_classes."
            )
        # Lookup table: source label -> semantic value; values left at -1 are errors.
        lut_size = max(256, self._source_ignore + 1)
        self._lut = np.full(lut_size, -1, dtype=np.int16)
        self._lut[: self.num_classes] = np.arange(self.num_classes)
        if self._source_ignore >= 0:
            self._lut[self._source_ignore] = 255

    @staticmethod
    def _find_dirs(root: Path, split: str) -> tuple[Path, Path]:
        candidates = [
            (root / split, root / f"{split}annot"),
            (root / "images" / split, root / "labels" / split),
            (root / "images" / split, root / "annotations" / split),
        ]
        for image_dir, label_dir in candidates:
            if image_dir.is_dir() and label_dir.is_dir():
                return image_dir, label_dir
        raise DatasetError(
            f"segfolder root {root} has no {split}/ + {split}annot/ (nor images/{split}/ + labels/{split}/); {_LAYOUT}."
        )

    def _label_path(self, index: int) -> Path:
        return self._label_dir / (self.image_ids[index] + ".png")

    def _infer_num_classes(self) -> int:
        top = -1
        for i in range(min(_INFER_FILES, len(self))):
            labels = read_index_png(self._label_path(i))
            values = np.unique(labels)
            values = values[values != self._source_ignore]
            if values.size:
                top = max(top, int(values.max()))
        if top < 0:
            raise DatasetError(
                f"segfolder cannot infer num_classes from {self._label_dir}: the first label files hold only "
                "ignore_index; pass num_classes."
            )
        return top + 1

    def image_path(self, index: int) -> Path:
        return self._image_dir / self._image_files[index]

    def annotation_path(self, index: int) -> Path:
        return self._label_path(index)

    def annotation_size(self, index: int) -> tuple[int, int]:
        return header_size(self._label_path(index))

    def dataset_options(self) -> dict[str, Any]:
        # Resolved values: an omitted ignore_index is the same dataset as an explicit 255.
        return {"ignore_index": self._source_ignore, "num_classes": self.num_classes}

    def fingerprint(self) -> dict[str, Any]:
        splits = {}
        for split in self.splits:
            try:
                image_dir, _ = self._find_dirs(self.root, split)
            except DatasetError:
                continue
            names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
            # names and byte sizes: two datasets that both number their files 0001.png … differ
            splits[split] = {"count": len(names), "files": files_digest(image_dir, names)}
        return {"splits": splits, "num_classes": self.num_classes, "ignore_index": self._source_ignore}

    def read_annotation(self, index: int) -> Annotation:
        """Semantic labels of image ``index``: classes ``0..num_classes-1``, 255 ignored."""
        path = self._label_path(index)
        labels = read_index_png(path)
        in_range = labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) < self._lut.size)
        semantic = self._lut[labels] if in_range else None
        if semantic is None or (semantic < 0).any():
            bad = labels[(labels < 0) | (labels >= self._lut.size)] if semantic is None else labels[semantic < 0]
            raise LabelValueError(
                str(path),
                f"label {int(bad.flat[0])} is neither a class (num_classes {self.num_classes}) "
                f"nor ignore_index {self._source_ignore}",
                value=int(bad.flat[0]),
            )
        return Annotation(size=(int(labels.shape[0]), int(labels.shape[1])), semantic=semantic.astype(np.uint8))
