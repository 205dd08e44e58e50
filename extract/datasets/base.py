"""The dataset-reader contract and the reader registry.

A reader turns one published dataset layout into a list of image ids, decoded RGB images and
per-image annotations in original image coordinates. Readers know nothing about backbones, stores
or output resolutions: ``extract.targets`` turns an :class:`Annotation` into targets, and
``extract.runner`` resizes images for a backbone.
"""

from __future__ import annotations

import difflib
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from store.errors import BadImageError, DatasetError, UnknownNameError

__all__ = [
    "TARGET_KINDS",
    "Annotation",
    "DatasetReader",
    "register_dataset",
    "dataset_names",
    "get_dataset_class",
    "create_dataset",
    "load_rgb",
    "image_ids_hash",
]

#: Every target a reader may support. ``instances`` also implies ``boundaries`` and ``distance``.
TARGET_KINDS = ("boundaries", "distance", "instances", "semantic", "depth")


@dataclass
class Annotation:
    """Annotations of one image, in original image pixel coordinates (height, width).

    Attributes:
        size: ``(height, width)`` of the original image.
        instance_masks: ``(K, H, W)`` bool, one mask per non-crowd instance, or ``None``.
        instance_classes: ``(K,)`` int class/category id per instance (dataset's own ids).
        instance_areas: ``(K,)`` float area per instance in original pixels (COCO's ``area`` field
            where the dataset has one) — used for the "large object" rule (area > 96²).
        instance_order: ``(K,)`` float painting order, higher is painted later (nearer the
            camera). ``None`` paints larger instances first so small ones stay visible.
        ignore_mask: ``(H, W)`` bool of pixels to ignore for instance targets (COCO crowd regions).
        semantic: ``(H, W)`` uint8 class indices, 255 = ignore, or ``None``.
        depth: ``(H, W)`` float32 metres, 0 = invalid, or ``None``.
    """

    size: tuple[int, int]
    instance_masks: np.ndarray | None = None
    instance_classes: np.ndarray | None = None
    instance_areas: np.ndarray | None = None
    instance_order: np.ndarray | None = None
    ignore_mask: np.ndarray | None = None
    semantic: np.ndarray | None = None
    depth: np.ndarray | None = None


class DatasetReader(ABC):
    """Base class of every dataset reader.

    Subclasses set ``name``, ``targets`` (a subset of :data:`TARGET_KINDS`) and ``splits``, and
    implement ``__init__`` (validate the root and fill ``self.image_ids``), :meth:`read_image` and
    :meth:`read_annotation`. Construction must fail fast with :class:`DatasetError` naming the
    missing file and the expected layout.

    Attributes:
        name: registry name, e.g. ``"coco"``.
        targets: which targets the annotations support.
        splits: the split names the reader accepts.
        num_classes: number of semantic classes (``None`` without semantic labels).
        ignore_index: label value for ignored pixels in ``semantic``.
        class_names: optional names of the semantic classes.
        image_ids: stable ids of the images of this split, in store order.
    """

    name: ClassVar[str] = ""
    targets: ClassVar[frozenset[str]] = frozenset()
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    num_classes: int | None = None
    ignore_index: int = 255
    class_names: list[str] | None = None

    def __init__(self, root: str | Path | None, split: str, **options: Any) -> None:
        if split not in self.splits:
            raise DatasetError(
                f"dataset {self.name!r} has no split {split!r}; choose one of {', '.join(self.splits)}."
            )
        self.root = Path(root).expanduser() if root is not None else None
        self.split = split
        self.options = dict(options)
        self.image_ids: list[str] = []

    def __len__(self) -> int:
        return len(self.image_ids)

    @abstractmethod
    def read_image(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        """Decode image ``index`` as RGB. Raises :class:`BadImageError` naming the file.

        Args:
            index: position in :attr:`image_ids`.
            draft_size: passed to :func:`load_rgb`: JPEGs may decode at a reduced size no smaller
                than this. ``None`` decodes at full size.
        """

    @abstractmethod
    def read_annotation(self, index: int) -> Annotation:
        """Annotations of image ``index`` at its original size."""

    def identity(self) -> dict[str, Any]:
        """What determines this reader's images and labels (not the root path: stores move)."""
        return {"dataset": self.name, "split": self.split, "options": dict(sorted(self.options.items()))}

    def describe(self) -> dict[str, Any]:
        """Metadata recorded in target stores."""
        return {
            **self.identity(),
            "root": str(self.root) if self.root is not None else None,
            "num_images": len(self),
            "targets": sorted(self.targets),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "class_names": self.class_names,
        }


_REGISTRY: dict[str, type[DatasetReader]] = {}


def register_dataset(cls: type[DatasetReader]) -> type[DatasetReader]:
    """Class decorator: make a reader available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def dataset_names() -> list[str]:
    _load_builtin_readers()
    return sorted(_REGISTRY)


def get_dataset_class(name: str) -> type[DatasetReader]:
    _load_builtin_readers()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(
            f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(sorted(_REGISTRY))}."
        ) from None


def create_dataset(name: str, root: str | Path | None, split: str, **options: Any) -> DatasetReader:
    """Build the reader ``name`` for ``split`` under ``root``; options are reader-specific."""
    cls = get_dataset_class(name)
    return cls(root, split, **{k: v for k, v in options.items() if v is not None})


def load_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image as RGB, or raise :class:`BadImageError` naming the file.

    Args:
        path: image file.
        draft_size: if given, JPEG decoding may use DCT scaling to a size no smaller than this
            (PIL ``draft``), which makes decoding for a small backbone input several times faster.
    """
    try:
        with Image.open(path) as im:
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", draft_size)
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises OSError for truncated data
        raise BadImageError(str(path), str(err) or type(err).__name__) from None


def image_ids_hash(image_ids: list[str]) -> str:
    """A short hash of the ordered image-id list: feature and target stores must agree on it."""
    h = hashlib.sha256()
    for image_id in image_ids:
        h.update(image_id.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _load_builtin_readers() -> None:
    # Importing the modules runs their @register_dataset decorators.
    from extract.datasets import coco, cocostuff, nyuv2, segfolder, shapes, voc  # noqa: F401
