"""Read a prediction store: a trained adapter's values over every image of a feature store.

A prediction store is written by ``maxa predict --out NAME.zarr`` (``probe.predict_store``) with the
same crash-safe writer as feature and target stores (``store.writer``), so it has the same layout
(docs/store-format.md): ``index`` holds the image ids in the feature store's order, ``bad`` flags
images the feature store recorded as undecodable (their values are zeros), and one per-image array
holds the values, named by what they are (``probabilities``, ``labels``, ``boundary_probability``,
``depth``, ``distance``, ``embedding``). The ``maxa`` attributes' spec names the task, the array,
the output size, the run (its folder and the adapter's sha256) and the feature store.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from store import _layout as L
from store.location import Location
from store.reader import _Store

__all__ = ["PredictionStore", "open_predictions", "PREDICTIONS_KIND"]

#: The ``kind`` in a prediction store's ``maxa`` attributes.
PREDICTIONS_KIND = "predictions"


class PredictionStore(_Store):
    """``len(store)`` images; ``store.read(indices)`` → ``(B, *shape)`` values of :attr:`values_name`."""

    kind = PREDICTIONS_KIND

    @property
    def spec(self) -> dict[str, Any]:
        """Task, values array, output size, dtype, run and feature store identity (a dict)."""
        return dict(self.meta["spec"])

    @property
    def task(self) -> str:
        return str(self.spec["task"])

    @property
    def values_name(self) -> str:
        """The array that holds the values (``probabilities``, ``boundary_probability``, ...)."""
        return str(self.spec["values"])

    @cached_property
    def array_names(self) -> list[str]:
        return sorted(name for name, _ in self.group.arrays() if name not in L.BOOKKEEPING)

    def read(self, indices: Sequence[int], name: str | None = None) -> np.ndarray:
        """``(B, *shape)`` values of images ``indices`` (any order, repeats allowed)."""
        return self._read_rows(name or self.values_name, indices)

    def read_all(self, name: str | None = None) -> np.ndarray:
        name = name or self.values_name
        arr = self._array(name)
        return self._read_range(name, arr, 0, arr.shape[0])


def open_predictions(path: str | Path | Location, *, allow_incomplete: bool = False) -> PredictionStore:
    """Open a prediction store for reading (refuses an incomplete one unless asked)."""
    return PredictionStore(path, allow_incomplete=allow_incomplete)
