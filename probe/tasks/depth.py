"""Monocular depth (paper §4.1, NYUv2): one channel regressing depth, MSE on valid pixels.

Batch key ``"depth"``: ``(B, H, W)`` float, in the target store's unit (metres); pixels with depth
≤ 0 or non-finite are invalid and ignored in loss and metrics. Predictions are used raw for the
loss and MSE; for AbsRel and δ they are clamped to ≥ 1e-3 first.

Metrics (exact over all valid pixels of the eval set, pixel-pooled — not per-image averages):
    ``mse`` = mean (p − g)²; ``rmse`` = √mse; ``absrel`` = mean |p − g| / g;
    ``delta1`` = fraction (0–1) of pixels with max(p/g, g/p) < 1.25.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from probe.tasks.base import Batch, Task, masked_mse, mean_baseline, register_task

__all__ = ["DepthTask"]

_MIN_PRED = 1e-3


@register_task
class DepthTask(Task):
    """Depth regression, D_out = 1, MSE on valid pixels."""

    name = "depth"
    target_kind = "depth"
    needs = ("depth",)
    lr = 2e-3
    higher_is_better = False
    primary_metric = "mse"

    def out_channels(self) -> int:
        return 1

    def _target(self, pred: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        g = self._check_shapes(pred, batch, "depth").to(pred.dtype)
        valid = torch.isfinite(g) & (g > 0)
        return torch.where(valid, g, torch.ones_like(g)), valid

    def loss(self, pred: Tensor, batch: Batch, extra: nn.Module | None = None) -> Tensor:
        return masked_mse(pred, *self._target(pred, batch))

    def metric_state(self) -> dict[str, Any]:
        return {"se": 0.0, "abs_rel": 0.0, "delta1": 0, "n": 0}

    @torch.no_grad()
    def update(self, state: dict[str, Any], pred: Tensor, batch: Batch) -> None:
        g, valid = self._target(pred.double(), batch)
        p = pred[:, 0].double()[valid]
        g = g[valid]
        pc = p.clamp_min(_MIN_PRED)
        state["se"] += float(((p - g) ** 2).sum())
        state["abs_rel"] += float(((pc - g).abs() / g).sum())
        state["delta1"] += int((torch.maximum(pc / g, g / pc) < 1.25).sum())
        state["n"] += int(valid.sum())

    def compute(self, state: dict[str, Any]) -> dict[str, float]:
        n = state["n"]
        if not n:
            return {"mse": math.nan, "rmse": math.nan, "absrel": math.nan, "delta1": math.nan}
        mse = state["se"] / n
        return {"mse": mse, "rmse": math.sqrt(mse), "absrel": state["abs_rel"] / n, "delta1": state["delta1"] / n}

    def trivial_metrics(
        self,
        train_batches: Iterable[Mapping[str, np.ndarray]],
        eval_batches: Iterable[Mapping[str, np.ndarray]],
    ) -> dict[str, float]:
        """Constant prediction at the training mean depth over valid pixels (``mean_train``)."""
        return mean_baseline(self, "depth", lambda g: np.isfinite(g) & (g > 0), train_batches, eval_batches)
