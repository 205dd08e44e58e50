"""Instance discrimination (paper §4.1): a 32-d latent per pixel that separates instances.

Training: the adapter outputs a 32-d latent per pixel; :meth:`InstancesTask.extra_module` is a
``Linear(32, num_instances)`` that classifies every foreground pixel into its *global* training
instance (every training instance is its own class), trained with cross-entropy.

Evaluation: per eval image, k-means with the true instance count on the latents of the true
foreground pixels, scored by the adjusted Rand index against the true instance ids; the mean over
the images with at least ``min_large`` (3) large objects, in percent (as the paper's Table 2).

The estimator (chosen in ``benchmarks/ari_noise.py``, table in ``docs/instances.md``): an image's
ARI is the mean over ``kmeans_runs`` (64) k-means fits, each ``KMeans(n_init=1)`` (k-means++) on
its own uniform subsample of ``max_pixels`` (5,000) evaluated pixels and scored on those pixels.
k-means on these latents has many local optima of nearly equal inertia but different ARI: over 10
seeds one fit moved the coco_mini mean by 1.12 points and the previous best-of-3 by 0.94, the best
of 20 restarts on every pixel still by 0.31, the mean of 64 cheap fits by 0.11 (~2 s per image). Run
``r`` of ``kmeans_seed`` ``s`` uses ``random_state = s · kmeans_runs + r`` (different seeds share
no fit) and the subsample seeded by (``seed``, the image's position in the eval stream, ``r``), so
evaluating again with another ``kmeans_seed`` shows the estimator's own noise.

Batch keys (``(B, H, W)`` unless noted):
    ``instances``: integer local instance id per pixel, 0 = background, ``k ≥ 1`` = the image's k-th
        instance.
    ``foreground``: bool, pixels covered by an instance.
    ``instance_ignore``: bool, pixels to ignore (COCO crowd regions).
    ``instance_area``: ``(B, K_max)`` float, ``instance_area[i, k-1]`` = area of local id ``k`` in
        *original* image pixels, padded with 0 (a list of 1-D arrays is accepted too). Alternatively
        the loop may pass ``large_count``: ``(B,)`` int, instances with area > ``large_area``.
    ``instance_global`` (training only, added by :meth:`InstancesTask.derive` — see :func:`global_instance_ids`): int64
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
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from probe.tasks.base import Batch, TargetInfo, Task, TrainingTargets, as_tensor_batch, register_task

__all__ = ["InstancesTask", "adjusted_rand", "global_instance_ids", "large_counts"]

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


def adjusted_rand(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """``sklearn.metrics.adjusted_rand_score``, bit for bit, from a dense contingency table.

    sklearn builds a sparse table (about 6 ms per 5,000-point call, a quarter of the evaluation's
    time); with a handful of clusters a dense one costs a fiftieth. Same pair counts in exact
    integers, same formula, same special case (full agreement → 1.0).
    """
    t = np.unique(labels_true, return_inverse=True)[1].reshape(-1)
    p = np.unique(labels_pred, return_inverse=True)[1].reshape(-1)
    n_p = int(p.max()) + 1 if p.size else 0
    n = int(t.size)
    table = np.bincount(t * n_p + p, minlength=(int(t.max()) + 1 if n else 0) * n_p).astype(np.int64)
    table = table.reshape(-1, n_p) if n_p else table.reshape(0, 0)
    sum_squares = int((table**2).sum())
    fp = int((table.sum(0) ** 2).sum()) - sum_squares  # contingency · n_k, as sklearn's pair_confusion_matrix
    fn = int((table.sum(1) ** 2).sum()) - sum_squares
    tp = sum_squares - n
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


@register_task
class InstancesTask(Task):
    """Instance discrimination, D_out = 32, global instance classifier, k-means + ARI.

    Args:
        info: needs ``num_instances`` (instances in the training store) for :meth:`extra_module`.
        min_large: an eval image counts if it has at least this many large instances (paper: 3).
        large_area: "large" threshold on original-resolution area (COCO: 96² = 9216 pixels).
        max_pixels: at most this many evaluated pixels per k-means fit (a uniform subsample per
            fit, seeded by ``seed``, the image's position in the eval stream and the fit's index);
            ``None`` = every evaluated pixel.
        kmeans_runs: k-means fits per eval image; the image's ARI is their mean.
        kmeans_n_init: restarts within one fit (``KMeans(n_init=…)``, best inertia kept).
        kmeans_seed: fit ``r`` uses ``KMeans(random_state=kmeans_seed · kmeans_runs + r)``; evaluate
            again with another value to see the estimator's noise.
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
    default_max_train_images = 8000  # the paper trains instance discrimination on 8,000 images
    _kmeans_threads = 1  # BLAS/OpenMP threads for k-means (a benchmark may change it; the numbers do not)

    def __init__(
        self,
        info: TargetInfo,
        *,
        min_large: int = 3,
        large_area: float = 96.0**2,
        max_pixels: int | None = 5000,
        kmeans_runs: int = 64,
        kmeans_n_init: int = 1,
        kmeans_seed: int = 0,
        loss_max_pixels: int | None = 8192,
        seed: int = 0,
    ) -> None:
        super().__init__(info)
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"task 'instances': max_pixels must be >= 1 or None (every pixel), got {max_pixels}")
        if kmeans_runs < 1 or kmeans_n_init < 1 or kmeans_seed < 0:
            raise ValueError("task 'instances': kmeans_runs and kmeans_n_init must be >= 1, kmeans_seed >= 0")
        self.min_large = int(min_large)
        self.large_area = float(large_area)
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.kmeans_runs = int(kmeans_runs)
        self.kmeans_n_init = int(kmeans_n_init)
        self.kmeans_seed = int(kmeans_seed)
        self.loss_max_pixels = loss_max_pixels
        self.seed = int(seed)

    def options(self) -> dict[str, Any]:
        return {
            "min_large": self.min_large,
            "large_area": self.large_area,
            "max_pixels": self.max_pixels,
            "kmeans_runs": self.kmeans_runs,
            "kmeans_n_init": self.kmeans_n_init,
            "kmeans_seed": self.kmeans_seed,
            "loss_max_pixels": self.loss_max_pixels,
            "seed": self.seed,
        }

    @classmethod
    def target_options(cls, spec: Any) -> dict[str, Any]:
        """The dataset's own "large object" rule (``TargetSpec.large_area``) unless a run overrides it."""
        return {"large_area": spec.large_area}

    def derive(self, batch: dict[str, Tensor], idx: np.ndarray, training: TrainingTargets) -> None:
        """``instance_global`` from the batch's local ids and the training store's instance offsets."""
        offsets = training.instance_offsets
        if offsets is None or "instances" not in batch:
            return
        batch["instance_global"] = global_instance_ids(
            batch["instances"], torch.from_numpy(offsets[idx]).to(batch["instances"].device),
            batch.get("foreground"), batch.get("instance_ignore"),
        )

    def selection_task(self) -> "InstancesTask":
        """Select the epoch on the ARI of the held-out training images, not on their loss.

        The classifier covers only the instances of the images it trains on, so the held-out
        images' cross-entropy can only rise (it picked the one-epoch model). Their ARI measures
        what the eval metric measures and can improve. Every held-out image with two or more
        instances counts (``min_large`` 0: a 10 % held-out part has few images with three large
        objects), with a cheaper estimator than the final one (4 fits on 2,000 pixels: about
        0.05 s per image) since it runs every epoch.
        """
        cheap = {"min_large": 0, "kmeans_runs": 4, "kmeans_n_init": 1,
                 "max_pixels": 2000 if self.max_pixels is None else min(self.max_pixels, 2000)}
        return type(self)(self.info, **{**self.options(), **cheap})

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

    def _eval_pixels(self, batch: Mapping[str, Tensor], i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Image ``i``'s evaluated pixels: flat indices, the whole id map, and the true count.

        Evaluated pixels are instance pixels (id ≥ 1) that are foreground and not ignored; the true
        count is the number of distinct ids among them.
        """
        inst = batch["instances"][i].cpu().long().reshape(-1)
        mask = inst > 0
        if "foreground" in batch:
            mask &= batch["foreground"][i].cpu().bool().reshape(-1)
        if "instance_ignore" in batch:
            mask &= ~batch["instance_ignore"][i].cpu().bool().reshape(-1)
        pix = torch.nonzero(mask).squeeze(1).numpy()
        ids = inst.numpy()
        return pix, ids, int(np.unique(ids[pix]).size)

    def _run_pixels(self, pix: np.ndarray, image_index: int, run: int) -> np.ndarray:
        """The pixels k-means run ``run`` sees: all of ``pix``, or ``max_pixels`` of them drawn
        uniformly, seeded by (``seed``, the image's position in the eval stream, ``run``)."""
        if self.max_pixels is None or pix.size <= self.max_pixels:
            return pix
        rng = np.random.default_rng((self.seed, image_index, run))
        return np.sort(rng.choice(pix, self.max_pixels, replace=False))

    def _score(self, state: dict[str, Any], batch: Mapping[str, Tensor], latents: Tensor | None) -> None:
        """Add the batch's selected images to ``state``; ``latents=None`` scores one constant cluster."""
        selected = self.select(batch).tolist()
        base = state["seen"]
        state["seen"] += len(selected)
        rows = [i for i, s in enumerate(selected) if s]
        if not rows:
            return
        lat = None if latents is None else latents[rows].detach().float().cpu().flatten(2).numpy()  # (n, 32, HW)
        # One BLAS/OpenMP thread per fit: two were no faster for 5,000-50,000 points on the 2-core
        # build machine, and a pool of threads over the fits was slower (sklearn's k-means holds the
        # GIL for most of a small fit): docs/instances.md. Entered once per batch, not per fit.
        # Warnings: random latents may have fewer distinct points than k.
        with warnings.catch_warnings(), threadpool_limits(self._kmeans_threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            for j, i in enumerate(rows):
                pix, ids, k = self._eval_pixels(batch, i)
                n_fit = pix.size if self.max_pixels is None else min(pix.size, self.max_pixels)
                if k < 2 or n_fit < k:  # ARI of a single true cluster says nothing about the latents
                    state["skipped"] += 1
                    continue
                if lat is None:  # one cluster: ARI 0 whatever the pixels
                    state["ari_sum"] += adjusted_rand(ids[pix], np.zeros(pix.size, dtype=np.int64))
                    state["n"] += 1
                    continue
                ari = 0.0
                for run in range(self.kmeans_runs):
                    p = self._run_pixels(pix, base + i, run)
                    labels = self._cluster(np.ascontiguousarray(lat[j][:, p].T, dtype=np.float32), k,
                                           self.kmeans_seed * self.kmeans_runs + run)
                    ari += adjusted_rand(ids[p], labels)
                state["ari_sum"] += ari / self.kmeans_runs
                state["n"] += 1

    def _cluster(self, x: np.ndarray, k: int, random_state: int) -> np.ndarray:
        """k-means labels of the ``(n, 32)`` latents ``x`` into ``k`` clusters (one fit)."""
        return KMeans(n_clusters=k, n_init=self.kmeans_n_init, random_state=random_state).fit_predict(x)

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
