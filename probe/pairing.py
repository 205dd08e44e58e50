"""The four stores of one probe, found and checked against each other before any training.

A probe trains on a feature store and its target store and is scored on the eval split's pair.
Missing pairs are found in the store root by dataset identity and image ids; every pairing that
could silently change a result (another dataset, another backbone, other target definitions,
shared images) is refused here, in one line that says what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import StoreError
from store.catalogue import find_eval_features, find_target_store, store_root_of
from store.location import Location
from store.checks import check_aligned, check_eval_pair, check_target_definitions
from store.reader import FeatureStore, TargetStore, open_features, open_targets

__all__ = ["Stores", "Where", "find_targets", "open_stores", "usable_images"]

#: A store or root: a local path, a URL, or a store Location (a URL with its storage options).
Where = str | Path | Location


@dataclass
class Stores:
    """The four stores of one probe run, checked against each other."""

    train_fs: FeatureStore
    train_ts: TargetStore
    eval_fs: FeatureStore
    eval_ts: TargetStore
    root: Location  # the training store's root
    eval_features: Where  # the eval feature store as given or found


def _open_pair(features: Where | FeatureStore, targets_path: Where | None,
               like: TargetStore | None = None) -> tuple[FeatureStore, TargetStore]:
    """A feature store and its target store (found by dataset and image ids unless given; with
    ``like``, one whose target definitions equal those of ``like``)."""
    fs = features if isinstance(features, FeatureStore) else open_features(features)
    if targets_path is None:
        root = store_root_of(fs.location)
        targets_path = find_target_store(root, fs.spec, like=like.spec if like is not None else None)
        if targets_path is None:
            same = f" with the training targets' definitions ({like.path})" if like is not None else ""
            raise StoreError(
                f"no complete target store for {fs.spec.dataset}/{fs.spec.split}{same} under {root}; "
                "run `maxa extract` for this split with targets (the default), or pass --targets / --eval-targets."
            )
    return fs, open_targets(targets_path)


def find_targets(features: Where | FeatureStore) -> TargetStore:
    """The complete target store aligned with a feature store (same dataset and image ids), found in
    the feature store's root; a one-line :class:`StoreError` when there is none."""
    return _open_pair(features, None)[1]


def usable_images(features: FeatureStore, targets: TargetStore, count: int | None = None) -> tuple[np.ndarray, int]:
    """Indices of the first ``count`` images (all by default) minus those recorded as bad, and how
    many were dropped: an undecodable image is stored as zeros and must not be trained or scored on."""
    n = len(features) if count is None else count
    bad = np.union1d(features.bad, targets.bad)
    bad = bad[bad < n]
    return np.setdiff1d(np.arange(n), bad), int(bad.size)


def open_stores(features: Where, eval_features: Where | None, targets: Where | None,
                 eval_targets: Where | None) -> Stores:
    """The training and eval feature and target stores, refused unless they belong together."""
    train_fs, train_ts = _open_pair(features, targets)
    root = store_root_of(train_fs.location)
    if eval_features is None:
        eval_features = find_eval_features(root, train_fs.spec)
        if eval_features is None:
            split = train_fs.spec.split
            if split in ("val", "test"):  # the eval store given as the training store, most likely
                raise StoreError(
                    f"{train_fs.path} is the {split} split, and no other val/test store of {train_fs.spec.backbone} "
                    f"on {train_fs.spec.dataset} is under {root} to evaluate on: give the train split's store to "
                    f"--store (the eval store is found beside it), or pass --eval-store.")
            raise StoreError(
                f"no eval store for {train_fs.spec.backbone} on {train_fs.spec.dataset} (val/test split) under "
                f"{root}; extract the val split with the same backbone and weights, or pass --eval-store."
            )
    eval_fs = open_features(eval_features)
    check_eval_pair(train_fs, eval_fs)  # before looking for its targets: the clearer refusal
    eval_fs, eval_ts = _open_pair(eval_fs, eval_targets, like=train_ts)
    check_aligned(train_fs, train_ts)
    check_aligned(eval_fs, eval_ts)
    check_target_definitions(train_ts, eval_ts)
    return Stores(train_fs, train_ts, eval_fs, eval_ts, root, eval_features)


