"""The dataset-reader contract and the reader registry.

A reader turns one published dataset layout into a list of image ids, decoded RGB images and
per-image annotations in original image coordinates. Readers know nothing about backbones, stores
or output resolutions: ``extract.targets`` turns an :class:`Annotation` into targets, and
``extract.runner`` resizes images for a backbone.

A reader also says which dataset it reads (:meth:`DatasetReader.dataset_id`): the same for every
split of one dataset and for copies of it at other paths, different for other data.
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from extract.datasets.decode import ImageSizeError, load_rgb, needs_transpose
from runtime.errors import DatasetError, UnknownNameError

__all__ = [
    "TARGET_KINDS",
    "Annotation",
    "DatasetReader",
    "DatasetWarning",
    "ImageSizeError",
    "register_dataset",
    "dataset_names",
    "get_dataset_class",
    "create_dataset",
    "load_rgb",
    "image_ids_hash",
    "names_digest",
    "file_digest",
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


class DatasetWarning(UserWarning):
    """Something odd in a dataset that the reader works around; the message says what and how."""


class DatasetReader(ABC):
    """Base class of every dataset reader.

    Subclasses set ``name``, ``targets`` (a subset of :data:`TARGET_KINDS`) and ``splits``, and
    implement ``__init__`` (validate the root and fill ``self.image_ids``), :meth:`read_annotation`,
    :meth:`annotation_size` and :meth:`fingerprint`. Readers of image files implement
    :meth:`image_path` (and :meth:`annotation_path`) and inherit :meth:`read_image`, which decodes
    every image mode and settles EXIF orientation against the annotation's size; readers without
    files override :meth:`read_image`. Construction must fail fast with :class:`DatasetError`
    naming the missing file and the expected layout.

    Attributes:
        name: registry name, e.g. ``"coco"``.
        targets: which targets the annotations support.
        splits: the split names the reader accepts.
        num_classes: number of semantic classes (``None`` without semantic labels).
        ignore_index: label value for ignored pixels in ``semantic``.
        class_names: optional names of the semantic classes.
        image_ids: stable ids of the images of this split, in store order.
        warnings: one line per oddity found while building the reader (also issued as
            :class:`DatasetWarning`); target stores record them.
    """

    name: ClassVar[str] = ""
    targets: ClassVar[frozenset[str]] = frozenset()
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    #: Options that only select images of a split; they are not part of the dataset's identity.
    split_options: ClassVar[frozenset[str]] = frozenset()
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
        self.warnings: list[str] = []
        self._dataset_id: str | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    # -- images and annotations -------------------------------------------------------------------

    def image_path(self, index: int) -> Path | None:
        """The file of image ``index``, or ``None`` for readers whose pixels are not image files."""
        return None

    def annotation_path(self, index: int) -> Path | None:
        """The file holding image ``index``'s annotation (label PNG, JSON, ...), for messages."""
        return None

    def annotation_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index``'s annotation, read cheaply (no label decoding)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement annotation_size")

    def read_image(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        """Decode image ``index`` as RGB, oriented like its annotation.

        The stored pixels when their size is :meth:`annotation_size`, the EXIF-transposed ones when
        only that size matches (see ``extract.datasets.decode``).

        Args:
            index: position in :attr:`image_ids`.
            draft_size: ``(width, height)``: JPEGs may decode at a reduced size no smaller than
                this. ``None`` decodes at full size.

        Raises:
            BadImageError: the file is missing, corrupt, or in a mode without an 8-bit meaning.
            ImageSizeError: the image's size is not its annotation's.
        """
        path = self.image_path(index)
        if path is None:
            raise NotImplementedError(f"{type(self).__name__} has no image files: it must override read_image")
        return load_rgb(path, draft_size, annotation_size=self.annotation_size(index),
                        annotation=self.annotation_path(index))

    def check_image_size(self, index: int) -> None:
        """Refuse image ``index`` if its size is not its annotation's, from the headers only.

        Unreadable images pass: decoding them reports them (and ``--skip-bad`` may skip them).

        Raises:
            ImageSizeError: naming both files and both sizes.
        """
        path = self.image_path(index)
        if path is None:
            return
        try:
            im = Image.open(path)
        except (OSError, SyntaxError, ValueError):
            return
        with im:
            needs_transpose(im, path, self.annotation_size(index), self.annotation_path(index))

    @abstractmethod
    def read_annotation(self, index: int) -> Annotation:
        """Annotations of image ``index`` at its original size."""

    def _warn(self, message: str) -> None:
        """Record a one-line oddity in :attr:`warnings` and issue it as a :class:`DatasetWarning`."""
        self.warnings.append(message)
        warnings.warn(message, DatasetWarning, stacklevel=3)

    # -- identity ---------------------------------------------------------------------------------

    def dataset_options(self) -> dict[str, Any]:
        """The options that define the dataset (not those that only select images of a split)."""
        return {k: v for k, v in sorted(self.options.items()) if k not in self.split_options}

    def fingerprint(self) -> dict[str, Any]:
        """Split-independent, JSON-serialisable facts that tell this dataset from others.

        Cheap (no image decoding), never the root path: the same data at another path on another
        machine gives the same fingerprint. Each reader documents what it uses and its limit.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement fingerprint")

    def dataset_id(self) -> str:
        """A 16-hex-digit key of the dataset: reader, :meth:`dataset_options` and :meth:`fingerprint`.

        The same for every split of one dataset and for copies at other paths; computed once.
        """
        if getattr(self, "_dataset_id", None) is None:
            from store.spec import content_key

            self._dataset_id = content_key(
                {"reader": self.name, "options": self.dataset_options(), "fingerprint": self.fingerprint()}
            )
        return self._dataset_id

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


def image_ids_hash(image_ids: list[str]) -> str:
    """A short hash of the ordered image-id list: feature and target stores must agree on it."""
    h = hashlib.sha256()
    for image_id in image_ids:
        h.update(image_id.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def names_digest(names: Iterable[str]) -> str:
    """sha256 of a list of names (file stems, ids) in the given order: a fingerprint part."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(b"\0")
    return h.hexdigest()


def files_digest(folder: str | Path, names: Iterable[str]) -> str:
    """sha256 of (name, size in bytes) of files in ``folder``: a cheap fingerprint part (one ``stat``
    per file, no reading) that tells apart two folders whose files share names (``0001.png``, …)."""
    folder = Path(folder)
    return names_digest(f"{name}\t{(folder / name).stat().st_size}" for name in names)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: a fingerprint part for small files (split lists, annotation lists)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_builtin_readers() -> None:
    # Importing the modules runs their @register_dataset decorators.
    from extract.datasets import coco, cocostuff, nyuv2, segfolder, shapes, voc  # noqa: F401
