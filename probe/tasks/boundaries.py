"""Instance boundaries (paper §4.1): one logit per pixel, BCE loss, IoU of the boundary class.

Batch key ``"boundaries"``: ``(B, H, W)`` integer/bool/float, 1 = boundary, 0 = not; any other value
(e.g. 255) marks a pixel to ignore in loss and metrics.

Metrics (exact over the eval set):
    ``iou``: 100 · |pred ∩ true| / |pred ∪ true| of the boundary class, pred = sigmoid(logit) > 0.5
        (NaN if neither the targets nor the predictions have a boundary pixel);
    ``ce``: mean BCE over valid pixels (natural log).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probe.tasks.base import Batch, TargetInfo, Task, as_tensor_batch, register_task

__all__ = ["BoundariesTask"]


@register_task
class BoundariesTask(Task):
    """Binary boundary segmentation, D_out = 1.

    Args:
        info: target info (unused beyond bookkeeping).
        pos_weight: optional BCE weight of the boundary class. ``None`` (default) is the paper's plain
            BCE; the boundary class is rare (~5–10 % of pixels), so a weight trades CE for IoU.
    """

    name = "boundaries"
    target_kind = "boundaries"
    needs = ("boundaries",)
    lr = 2e-3
    higher_is_better = True
    primary_metric = "iou"

    def __init__(self, info: TargetInfo, *, pos_weight: float | None = None) -> None:
        super().__init__(info)
        self.pos_weight = pos_weight

    def options(self) -> dict[str, Any]:
        return {"pos_weight": self.pos_weight}

    def out_channels(self) -> int:
        return 1

    def _target(self, pred: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        t = self._check_shapes(pred, batch, "boundaries")
        valid = (t == 0) | (t == 1)
        return (t == 1).to(pred.dtype), valid

    def loss(self, pred: Tensor, batch: Batch, extra: nn.Module | None = None) -> Tensor:
        y, valid = self._target(pred, batch)
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, dtype=pred.dtype, device=pred.device)
        per_pixel = F.binary_cross_entropy_with_logits(pred[:, 0], y, reduction="none", pos_weight=pw)
        w = valid.to(pred.dtype)
        return (per_pixel * w).sum() / w.sum().clamp_min(1.0)

    def metric_state(self) -> dict[str, float]:
        return {"inter": 0, "union": 0, "bce_sum": 0.0, "n": 0}

    @torch.no_grad()
    def update(self, state: dict[str, float], pred: Tensor, batch: Batch) -> None:
        y, valid = self._target(pred, batch)
        logits = pred[:, 0].double()
        true = (y > 0.5) & valid
        hit = (logits > 0) & valid
        bce = F.binary_cross_entropy_with_logits(logits, y.double(), reduction="none")
        state["inter"] += int((hit & true).sum())
        state["union"] += int((hit | true).sum())
        state["bce_sum"] += float(bce[valid].sum())
        state["n"] += int(valid.sum())

    def compute(self, state: dict[str, float]) -> dict[str, float]:
        iou = 100.0 * state["inter"] / state["union"] if state["union"] else math.nan
        ce = state["bce_sum"] / state["n"] if state["n"] else math.nan
        return {"iou": iou, "ce": ce}

    def trivial_metrics(
        self,
        train_batches: Iterable[Mapping[str, np.ndarray]],
        eval_batches: Iterable[Mapping[str, np.ndarray]],
    ) -> dict[str, float]:
        """Constant predictor at the training boundary rate p.

        ``iou``/``ce`` score the constant probability p (so ``iou`` is 0 unless p > 0.5);
        ``iou_all_boundary`` scores "every pixel is boundary", the best constant for IoU;
        ``boundary_rate_train`` is p.
        """
        pos = n = 0
        for b in train_batches:
            t = np.asarray(b["boundaries"])
            pos += int((t == 1).sum())
            n += int(((t == 0) | (t == 1)).sum())
        p = pos / n if n else 0.0
        pc = min(max(p, 1e-7), 1 - 1e-7)
        logit = math.log(pc / (1 - pc))
        const, allb = self.metric_state(), self.metric_state()
        for b in eval_batches:
            tb = as_tensor_batch(b)
            shape = (tb["boundaries"].shape[0], 1, *tb["boundaries"].shape[1:])
            self.update(const, torch.full(shape, logit, dtype=torch.float64), tb)
            self.update(allb, torch.full(shape, 20.0, dtype=torch.float64), tb)
        out = self.compute(const)
        out["iou_all_boundary"] = self.compute(allb)["iou"]
        out["boundary_rate_train"] = p
        return out
