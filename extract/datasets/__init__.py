"""Dataset readers: one registered class per published layout (see ``base.py`` for the contract)."""

from extract.datasets.base import (
    TARGET_KINDS,
    Annotation,
    DatasetReader,
    DatasetWarning,
    ImageSizeError,
    create_dataset,
    dataset_names,
    get_dataset_class,
    image_ids_hash,
    load_rgb,
    register_dataset,
)

__all__ = [
    "TARGET_KINDS",
    "Annotation",
    "DatasetReader",
    "DatasetWarning",
    "ImageSizeError",
    "create_dataset",
    "dataset_names",
    "get_dataset_class",
    "image_ids_hash",
    "load_rgb",
    "register_dataset",
]
