"""Instance discrimination (paper §4.1): a 32-d latent per pixel that separates instances.

Training: the adapter outputs a 32-d latent per pixel; :meth:`InstancesTask.extra_module` is a
``Linear(32, num_instances)`` that classifies every foreground pixel into its *global* training
instance (every training instance is its own class), trained with cross-entropy.

Evaluation: per eval image, k-means with the true instance count on the latents of the true
foreground pixels, scored by the adjusted Rand index against the true instance ids; the mean over
the images with at least ``min_large`` (3) large objects, in percent (as the paper's Table 2).

Batch keys (``(B, H, W)`` unless noted):
    ``instances``: integer local instance id per pixel, 0 = background, ``k ≥ 1`` = the image's k-th
        instance.
    ``foreground``: bool, pixels covered by an instance.
    ``instance_ignore``: bool, pixels to ignore (COCO crowd regions).
    ``instance_area``: ``(B, K_max)`` float, ``instance_area[i, k-1]`` = area of local id ``k`` in
        *original* image pixels, padded with 0 (a list of 1-D arrays is accepted too). Alternatively
        the loop may pass ``large_count``: ``(B,)`` int, instances with area > ``large_area``.
    ``instance_global`` (training only, derived by the loop — see :func:`global_instance_ids`): int64
        global training instance index ``offset[i] + k − 1`` for pixels with local id ``k ≥ 1`` that are
        foreground and not ignored, −1 elsewhere. ``offset[i]`` is the number of instances in the
        training store's images before image ``i`` (the target store's per-image instance offset), so
        indices run over ``[0, TargetInfo.num_instances)``.

"Large" follows COCO: area > 96² in original resolution. For datasets with small images or few
objects, pass ``min_large`` / ``large_area`` (e.g. ``min_large=0`` evaluates every image).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from probe.tasks.base import Batch, TargetInfo, Task, as_tensor_batch, register_task

__all__ = ["InstancesTask", "global_instance_ids", "large_counts"]

LATENT_DIM = 32


def global_instance_ids(
    instances: Tensor | np.ndarray,
    offsets: Tensor | np.ndarray | Sequence[int],
    foreground: Tensor | np.ndarray | None = None,
    ignore: Tensor | np.ndarray | None = None,
) -> Tensor:
    """The ``instance_global`` batch field: ``offset[i] + k − 1`` where local id ``k ≥ 1``, else −1.

    Args:
        instances: ``(B, H, W)`` local instance ids, 0 = background.
        offsets: ``(B,)`` global index of each image's first instance in the training store.
        foreground: optional ``(B, H, W)`` bool; pixels outside it get −1.
        ignore: optional ``(B, H, W)`` bool; pixels inside it get −1.

    Returns:
        ``(B, H, W)`` int64 tensor on ``instances``' device.
    """
    local = torch.as_tensor(instances).long()
    off = torch.as_tensor(np.asarray(offsets) if not isinstance(offsets, Tensor) else offsets, device=local.device)
    keep = local > 0
    if foreground is not None:
        keep &= torch.as_tensor(foreground, device=local.device).bool()
    if ignore is not None:
        keep &= ~torch.as_tensor(ignore, device=local.device).bool()
    glob = off.long().view(-1, 1, 1) + local - 1
    return torch.where(keep, glob, torch.full_like(glob, -1))


def large_counts(batch: Mapping[str, Any], large_area: float) -> Tensor:
    """``(B,)`` number of instances per image with original-resolution area > ``large_area``."""
    if "large_count" in batch:
        return torch.as_tensor(batch["large_count"]).long().cpu().view(-1)
    if "instance_area" not in batch:
        raise KeyError("task 'instances' needs batch['instance_area'] (B, K_max) or batch['large_count'] (B,)")
    areas = batch["instance_area"]
    if isinstance(areas, (list, tuple)):
        return torch.tensor([int((np.asarray(a) > large_area).sum()) for a in areas], dtype=torch.long)
    return (torch.as_tensor(areas).cpu() > large_area).sum(-1).long().view(-1)


@register_task
class InstancesTask(Task):
    """Instance discrimination, D_out = 32, global instance classifier, k-means + ARI.

    Args:
        info: needs ``num_instances`` (instances in the training store) for :meth:`extra_module`.
        min_large: an eval image counts if it has at least this many large instances (paper: 3).
        large_area: "large" threshold on original-resolution area (COCO: 96² = 9216 pixels).
        max_pixels: at most this many foreground pixels per eval image go into k-means (uniform,
            seeded by ``seed`` and the image's position in the eval stream).
        kmeans_n_init: k-means restarts (``KMeans(n_init=…, random_state=0)``).
        loss_max_pixels: the loss uses at most this many foreground pixels per batch, drawn uniformly
            with torch's RNG (an unbiased estimate of the full CE). With ~60k classes the full logits
            (pixels × classes) do not fit memory; ``None`` uses every foreground pixel.
        seed: seed of the eval pixel subsampling.
    """

    name = "instances"
    target_kind = "instances"
    needs = ("instances", "foreground", "instance_ignore", "instance_area", "instance_global")
    derived = ("instance_global",)
    lr = 1e-3
    higher_is_better = True
    primary_metric = "ari"

    def __init__(
        self,
        info: TargetInfo,
        *,
        min_large: int = 3,
        large_area: float = 96.0**2,
        max_pixels: int = 5000,
        kmeans_n_init: int = 3,
        loss_max_pixels: int | None = 8192,
        seed: int = 0,
    ) -> None:
        super().__init__(info)
        self.min_large = int(min_large)
        self.large_area = float(large_area)
        self.max_pixels = int(max_pixels)
        self.kmeans_n_init = int(kmeans_n_init)
        self.loss_max_pixels = loss_max_pixels
        self.seed = int(seed)

    def options(self) -> dict[str, Any]:
        return {
            "min_large": self.min_large,
            "large_area": self.large_area,
            "max_pixels": self.max_pixels,
            "kmeans_n_init": self.kmeans_n_init,
            "loss_max_pixels": self.loss_max_pixels,
            "seed": self.seed,
        }

    def out_channels(self) -> int:
        return LATENT_DIM

    def extra_module(self) -> nn.Module:
        if not self.info.num_instances:
            raise ValueError("task 'instances' needs TargetInfo.num_instances (instances in the training store)")
        return nn.Linear(LATENT_DIM, int(self.info.num_instances))

    def loss(self, pred: Tensor, batch: Batch, extra: nn.Module | None = None) -> Tensor:
        if extra is None:
            raise ValueError("task 'instances' needs its extra_module() passed to loss()")
        g = self._check_shapes(pred, batch, "instance_global").long().reshape(-1)
        latents = pred.permute(0, 2, 3, 1).reshape(-1, LATENT_DIM)
        idx = torch.nonzero(g >= 0).squeeze(1)
        if idx.numel() == 0:  # no foreground in this batch: zero loss, graph kept
            return pred.sum() * 0.0
        if self.loss_max_pixels is not None and idx.numel() > self.loss_max_pixels:
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[: self.loss_max_pixels]]
        logits = extra(latents[idx])
        target = g[idx]
        if int(target.max()) >= logits.shape[1]:
            raise ValueError(
                f"task 'instances': instance_global {int(target.max())} >= num_instances {logits.shape[1]}"
            )
        return F.cross_entropy(logits, target)

    def select(self, batch: Batch) -> Tensor:
        """Images with at least ``min_large`` instances of area > ``large_area``."""
        return large_counts(batch, self.large_area) >= self.min_large

    def metric_state(self) -> dict[str, Any]:
        return {"ari_sum": 0.0, "n": 0, "skipped": 0, "seen": 0}

    def _eval_pixels(
        self, batch: Mapping[str, Tensor], i: int, image_index: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Image ``i``'s evaluated pixels: (flat indices, true ids) subsampled, and the true count.

        Evaluated pixels are instance pixels (id ≥ 1) that are foreground and not ignored; the true
        count is the number of distinct ids among all of them (before subsampling).
        """
        inst = batch["instances"][i].cpu().long().reshape(-1)
        mask = inst > 0
        if "foreground" in batch:
            mask &= batch["foreground"][i].cpu().bool().reshape(-1)
        if "instance_ignore" in batch:
            mask &= ~batch["instance_ignore"][i].cpu().bool().reshape(-1)
        pix = torch.nonzero(mask).squeeze(1).numpy()
        ids = inst.numpy()
        k = int(np.unique(ids[pix]).size)
        if pix.size > self.max_pixels:
            rng = np.random.default_rng((self.seed, image_index))
            pix = np.sort(rng.choice(pix, self.max_pixels, replace=False))
        return pix, ids[pix], k

    def _score(self, state: dict[str, Any], batch: Mapping[str, Tensor], latents: Tensor | None) -> None:
        """Add the batch's selected images to ``state``; ``latents=None`` scores one constant cluster."""
        selected = self.select(batch).tolist()
        base = state["seen"]
        state["seen"] += len(selected)
        rows = [i for i, s in enumerate(selected) if s]
        if not rows:
            return
        lat = None if latents is None else latents[rows].detach().float().cpu().flatten(2).numpy()  # (n, 32, HW)
        for j, i in enumerate(rows):
            pix, true, k = self._eval_pixels(batch, i, base + i)
            if k < 2 or pix.size < k:  # ARI of a single true cluster says nothing about the latents
                state["skipped"] += 1
                continue
            if lat is None:
                labels = np.zeros(pix.size, dtype=np.int64)
            else:
                x = lat[j][:, pix].T
                # One thread: for ≤ 5,000 points OpenMP start-up costs more than it saves (10× slower on
                # a busy 2-core machine). Warnings: random latents may have fewer distinct points than k.
                with warnings.catch_warnings(), threadpool_limits(1):
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    km = KMeans(n_clusters=k, n_init=self.kmeans_n_init, random_state=0)
                    labels = km.fit_predict(np.ascontiguousarray(x, dtype=np.float32))
            state["ari_sum"] += float(adjusted_rand_score(true, labels))
            state["n"] += 1

    @torch.no_grad()
    def update(self, state: dict[str, Any], pred: Tensor, batch: Batch) -> None:
        self._check_shapes(pred, batch, "instances")
        self._score(state, batch, pred)

    def compute(self, state: dict[str, Any]) -> dict[str, float]:
        n = state["n"]
        return {
            "ari": 100.0 * state["ari_sum"] / n if n else math.nan,
            "n_eval_images": float(n),
            "n_skipped_images": float(state["skipped"]),
        }

    def trivial_metrics(
        self,
        train_batches: Iterable[Mapping[str, np.ndarray]],
        eval_batches: Iterable[Mapping[str, np.ndarray]],
    ) -> dict[str, float]:
        """Every evaluated foreground pixel in one cluster, scored like :meth:`update` (ARI 0)."""
        state = self.metric_state()
        for b in eval_batches:
            self._score(state, as_tensor_batch(b), None)
        return self.compute(state)
