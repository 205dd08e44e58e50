"""A ``torch.utils.data.Dataset`` over an aligned (feature, target) store pair, for users who
train their own heads on stored features (the notebook API, ``maxa.StorePairDataset``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from store.checks import check_aligned
from store.reader import FeatureStore, TargetStore

__all__ = ["StorePairDataset"]


class StorePairDataset(torch.utils.data.Dataset):
    """Item ``i``: ``{"index": store index, "features": {layer: (h, w, C) float32}, "targets":
    {name: array}}`` for image ``indices[i]`` of an aligned feature and target store (same images,
    same order: checked). ``targets=None`` gives features only; ``names`` picks target arrays
    (default: all of the store's); ``layers`` picks layers (default: all)."""

    def __init__(self, features: FeatureStore, targets: TargetStore | None = None, *,
                 names: Sequence[str] | None = None, layers: Sequence[str] | None = None,
                 indices: Sequence[int] | None = None) -> None:
        if targets is not None:
            check_aligned(features, targets)
        self.features, self.targets = features, targets
        self.layers = list(layers) if layers is not None else list(features.spec.layer_names)
        for name in self.layers:
            features.spec.layer(name)  # an unknown layer is refused here, not in a DataLoader worker
        available = targets.array_names if targets is not None else []
        self.names = list(names) if names is not None else list(available)
        unknown = [n for n in self.names if n not in available]
        if unknown:
            raise KeyError(f"target arrays {unknown} are not in the target store (it has {available})")
        self.indices = np.arange(len(features)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        feats = {l: torch.from_numpy(self.features.read(index, l).astype(np.float32)) for l in self.layers}
        tgts = {n: _tensor(self.targets.read(n, [index])[0]) for n in self.names} if self.targets is not None else {}
        return {"index": index, "features": feats, "targets": tgts}


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor of ``a`` (uint16 instance ids as int32: torch's uint16 support is thin)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a.astype(np.int32) if a.dtype == np.uint16 else a)
