"""One extraction job as a user asks for it: a dataset split through a backbone, plus its targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.datasets.base import create_dataset
from extract.runner import ExtractResult, extract_features
from extract.target_store import TargetBuildResult, build_target_store

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
    store_root: str | Path,
    root: str | Path | None = None,
    dataset_options: dict[str, Any] | None = None,
    weights: str = "pretrained",
    layers: tuple[int, ...] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    limit: int | None = None,
    num_workers: int | None = None,
    shard_size: int | None = None,
    compression: str = "none",
    skip_bad: bool = False,
    targets: bool = True,
    target_size: tuple[int, int] = (224, 224),
    show_progress: bool = True,
) -> ExtractJobResult:
    """Extract ``backbone`` features of ``dataset``/``split`` and (by default) build its targets.

    The target store is backbone-independent: it is built once per dataset split and size and
    found again by every later extraction of the same split.
    """
    reader = create_dataset(dataset, root, split, **(dataset_options or {}))
    target_result = None
    if targets and reader.targets:
        target_result = build_target_store(
            reader, str(store_root), size=target_size, limit=limit, num_workers=num_workers,
            show_progress=show_progress,
        )
    feature_result = extract_features(
        backbone, reader, str(store_root), weights=weights, layers=layers, batch_size=batch_size,
        device=device, limit=limit, num_workers=num_workers, shard_size=shard_size,
        compression=compression, skip_bad=skip_bad, show_progress=show_progress,
    )
    return ExtractJobResult(features=feature_result, targets=target_result)
