"""One extraction job as a user asks for it: a dataset split through a backbone, plus its targets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.backbone_registry import entry_geometry, get_backbone_entry
from extract.backbones import load_backbone
from extract.config import ExtractConfig
from extract.datasets.base import create_dataset
from runtime.devices import resolve_device
from extract.runner import ExtractResult, extract_features
from extract.target_store import TargetBuildResult, build_target_store
from runtime.errors import MaxaError
from store.spec import DEFAULT_TARGET_SIZE
from store.location import Location, as_location

__all__ = ["ExtractJobResult", "run_extract"]


@dataclass
class ExtractJobResult:
    features: ExtractResult
    targets: TargetBuildResult | None


def run_extract(
    *,
    backbone: str,
    dataset: str,
    split: str,
    store_root: str | Path | Location,
    root: str | Path | None = None,
    dataset_options: dict[str, Any] | None = None,
    config: ExtractConfig | None = None,
    targets: bool = True,
    target_size: tuple[int, int] = DEFAULT_TARGET_SIZE,
    target_image: bool = True,
    show_progress: bool = True,
    **settings: Any,
) -> ExtractJobResult:
    """Extract ``backbone`` features of ``dataset``/``split`` and (by default) build its targets.

    The extraction settings are ``config`` (default: ``ExtractConfig()``) with any of its fields
    given as keywords in ``settings`` replaced (``weights="random", batch_size=4``).

    The target store is backbone-independent: it is built once per dataset split and size and
    found again by every later extraction of the same split. ``target_image`` keeps each image
    resized to the target size in it (``input_image``, for image-guided heads such as ``jbu``; part of
    the target store's key). ``store_root`` may be a folder, a URL
    (``s3://bucket/prefix``) or a store Location carrying fsspec storage options.
    """
    config = dataclasses.replace(config or ExtractConfig(), **settings)
    # Everything that can be refused is checked before any store is written: the store root, the
    # backbone name, layers, device and weights, then the dataset root.
    store_root = as_location(store_root)
    if store_root.isfile():
        raise MaxaError(f"--store-root {store_root} is a file, not a folder; choose a folder for the stores.")
    _check_layers(backbone, config.layers)
    dev = resolve_device(config.device)
    reader = create_dataset(dataset, root, split, **(dataset_options or {}))
    model = load_backbone(backbone, weights=config.weights, device=str(dev), layers=config.layers)
    target_result = None
    if targets and reader.targets:
        target_result = build_target_store(
            reader, store_root, size=target_size, limit=config.limit, num_workers=config.num_workers,
            show_progress=show_progress, skip_bad=config.skip_bad, image=target_image,
        )
    feature_result = extract_features(model, reader, store_root, config, show_progress=show_progress)
    return ExtractJobResult(features=feature_result, targets=target_result)


def _check_layers(backbone: str, layers: tuple[int, ...] | None) -> None:
    """Refuse layer indices the backbone does not have, in one line (no weights are loaded)."""
    entry = get_backbone_entry(backbone)
    if layers is None:
        return
    text = ",".join(str(i) for i in layers)
    try:
        entry_geometry(dataclasses.replace(entry, layers=tuple(layers)))
    except ValueError as err:
        raise MaxaError(
            f"--layers {text} does not fit backbone {entry.name}: {str(err).removeprefix(entry.name + ': ')}; "
            "give block/stage indices that exist (negative counts from the end, -1 is the last); "
            "`maxa backbones --json` lists each backbone's layers."
        ) from None
