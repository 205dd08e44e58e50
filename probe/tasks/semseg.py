"""Semantic segmentation (paper §4.1: Pascal VOC 2012, COCO-Stuff): per-pixel class logits, CE, mIoU.

Batch key ``"semantic"``: ``(B, H, W)`` integer class indices in ``[0, num_classes)``;
``info.ignore_index`` (255) marks ignored pixels. Any other value is an error.

Metrics, from a confusion matrix accumulated over all valid pixels of the eval set:
    ``miou``: 100 · mean over classes of TP / (TP + FP + FN), taken over the classes present in the
        ground truth or the prediction of the eval set (union > 0); prediction = argmax over channels;
    ``pixel_acc``: 100 · correct / valid pixels;
    ``ce``: mean cross-entropy (natural log) over valid pixels.
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

__all__ = ["SemsegTask", "miou_from_confusion"]


def miou_from_confusion(conf: Tensor) -> tuple[float, Tensor]:
    """Mean IoU in percent over classes with a non-empty union, and the per-class IoU (NaN = absent).

    Args:
        conf: ``(C, C)`` counts, rows = ground truth, columns = prediction.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    present = union > 0
    miou = 100.0 * float(iou[present].mean()) if bool(present.any()) else math.nan
    return miou, iou


@register_task
class SemsegTask(Task):
    """Semantic segmentation, D_out = ``info.num_classes``, CE with ``ignore_index``."""

    name = "semseg"
    target_kind = "semantic"
    needs = ("semantic",)
    lr = 1e-3
    higher_is_better = True
    primary_metric = "miou"

    def __init__(self, info: TargetInfo) -> None:
        super().__init__(info)
        if not info.num_classes:
            raise ValueError("task 'semseg' needs TargetInfo.num_classes (the target store has no semantic labels?)")
        self.num_classes = int(info.num_classes)
        self.ignore_index = int(info.ignore_index)

    def out_channels(self) -> int:
        return self.num_classes

    def _target(self, pred: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        t = self._check_shapes(pred, batch, "semantic").long()
        valid = t != self.ignore_index
        bad = valid & ((t < 0) | (t >= self.num_classes))
        if bool(bad.any()):  # CUDA would otherwise fail later with an opaque device-side assert
            bad = torch.unique(t[bad])[:5].tolist()
            raise ValueError(
                f"task 'semseg': labels {bad} outside [0, {self.num_classes}) and not ignore_index {self.ignore_index}"
            )
        return torch.where(valid, t, torch.full_like(t, self.ignore_index)), valid

    def loss(self, pred: Tensor, batch: Batch, extra: nn.Module | None = None) -> Tensor:
        t, valid = self._target(pred, batch)
        # sum / count rather than reduction="mean": a batch with every pixel ignored gives 0, not NaN.
        total = F.cross_entropy(pred, t, ignore_index=self.ignore_index, reduction="sum")
        return total / valid.sum().clamp_min(1).to(pred.dtype)

    def metric_state(self) -> dict[str, Any]:
        return {"conf": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64), "ce_sum": 0.0, "n": 0}

    @torch.no_grad()
    def update(self, state: dict[str, Any], pred: Tensor, batch: Batch) -> None:
        t, valid = self._target(pred, batch)
        c = self.num_classes
        ce = F.cross_entropy(pred.double(), t, ignore_index=self.ignore_index, reduction="sum")
        hit = pred.argmax(1)
        idx = t[valid] * c + hit[valid]
        state["conf"] += torch.bincount(idx, minlength=c * c).reshape(c, c).cpu()
        state["ce_sum"] += float(ce)
        state["n"] += int(valid.sum())

    def compute(self, state: dict[str, Any]) -> dict[str, float]:
        conf = state["conf"]
        miou, _ = miou_from_confusion(conf)
        n = state["n"]
        acc = 100.0 * float(conf.diag().sum()) / n if n else math.nan
        return {"miou": miou, "pixel_acc": acc, "ce": state["ce_sum"] / n if n else math.nan}

    def per_class_iou(self, state: dict[str, Any]) -> dict[str, float]:
        """IoU in percent per class name (index if unnamed); NaN for classes absent from the eval set."""
        _, iou = miou_from_confusion(state["conf"])
        names = self.info.class_names or tuple(str(i) for i in range(self.num_classes))
        return {str(n): 100.0 * float(v) for n, v in zip(names, iou)}

    def trivial_metrics(
        self,
        train_batches: Iterable[Mapping[str, np.ndarray]],
        eval_batches: Iterable[Mapping[str, np.ndarray]],
    ) -> dict[str, float]:
        """The training class prior as a constant prediction.

        Its argmax is the majority training class (``majority_class``), which gives ``miou`` and
        ``pixel_acc``; ``ce`` is the CE of the prior itself, with add-one smoothing so a class unseen in
        training has a finite cost.
        """
        c = self.num_classes
        counts = np.zeros(c, dtype=np.int64)
        for b in train_batches:
            t = np.asarray(b["semantic"]).astype(np.int64).ravel()
            t = t[(t != self.ignore_index) & (t >= 0) & (t < c)]
            counts += np.bincount(t, minlength=c)
        prior = (counts + 1.0) / (counts.sum() + c)
        logp = torch.from_numpy(np.log(prior))
        state = self.metric_state()
        for b in eval_batches:
            tb = as_tensor_batch(b)
            s = tb["semantic"]
            pred = logp.view(1, c, 1, 1).expand(s.shape[0], c, *s.shape[1:])
            self.update(state, pred, tb)
        return {**self.compute(state), "majority_class": float(np.argmax(counts))}
