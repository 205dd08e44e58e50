"""Distance transform (paper §4.1): one channel regressing normalised distances to instance boundaries.

Batch key ``"distance"``: ``(B, H, W)`` float; non-finite values (NaN) mark ignored pixels.
Loss and metric: ``mse`` = mean squared error over valid pixels of the eval set (lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from probe.tasks.base import Batch, Task, masked_mse, mean_baseline, register_task

__all__ = ["DistanceTask"]


@register_task
class DistanceTask(Task):
    """Dense regression of the distance transform, D_out = 1, MSE."""

    name = "distance"
    target_kind = "distance"
    needs = ("distance",)
    lr = 1e-3
    higher_is_better = False
    primary_metric = "mse"

    def out_channels(self) -> int:
        return 1

    def _target(self, pred: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        t = self._check_shapes(pred, batch, "distance").to(pred.dtype)
        valid = torch.isfinite(t)
        return torch.where(valid, t, torch.zeros_like(t)), valid

    def loss(self, pred: Tensor, batch: Batch, extra: nn.Module | None = None) -> Tensor:
        return masked_mse(pred, *self._target(pred, batch))

    def metric_state(self) -> dict[str, Any]:
        return {"se": 0.0, "n": 0}

    @torch.no_grad()
    def update(self, state: dict[str, Any], pred: Tensor, batch: Batch) -> None:
        t, valid = self._target(pred.double(), batch)
        state["se"] += float(((pred[:, 0].double() - t) ** 2)[valid].sum())
        state["n"] += int(valid.sum())

    def compute(self, state: dict[str, Any]) -> dict[str, float]:
        return {"mse": state["se"] / state["n"] if state["n"] else math.nan}

    def trivial_metrics(
        self,
        train_batches: Iterable[Mapping[str, np.ndarray]],
        eval_batches: Iterable[Mapping[str, np.ndarray]],
    ) -> dict[str, float]:
        """Constant prediction at the training mean (``mean_train`` is that constant)."""
        return mean_baseline(self, "distance", np.isfinite, train_batches, eval_batches)
