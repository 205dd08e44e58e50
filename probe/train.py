"""Train and evaluate one probe purely from stores: no images, no backbone.

The loop knows no task by name: the task says which target arrays it needs, its output channels,
learning rate, loss and metrics. Model selection uses the loss on a held-out part of the training
store; evaluation runs on the eval store (the dataset's val/test split). Each finished probe writes
its adapter (weights + JSON meta with the resolved config) and appends one record to the results
table of the store root.
"""

from __future__ import annotations

import copy
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from runtime.devices import resolve_device
from runtime.provenance import tool_version
from probe import fused
from probe.adapter import AdapterConfig, count_parameters
from probe.data import ProbeData
from probe.heads import build_head
from probe.results import append_result, check_results_root, write_run_files
from probe.tasks import TargetInfo, Task, create_task
from probe.tasks.instances import global_instance_ids
from probe.variants import VARIANTS, variant_config
from store._layout import join, safe_name
from store.catalogue import find_eval_features, find_target_store, store_root_of
from runtime.errors import MaxaError, StoreError
from store.reader import (FeatureStore, TargetStore, check_aligned, check_eval_pair, check_target_definitions,
                          open_features, open_targets)
from store.spec import content_key

__all__ = ["ProbeConfig", "ProbeResult", "train_probe", "build_model", "HEADS", "MAX_CNN_CHANNELS"]

HEADS = ("maxa", "linear", "cnn")
#: D_CNN = max(D/4, D_out), capped at 64 — the paper's setting for COCO-Stuff's 171 classes.
MAX_CNN_CHANNELS = 64
#: The paper trains instance discrimination on 8,000 images (each instance its own class).
INSTANCE_TRAIN_IMAGES = 8000


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """One probe run's settings (saved, resolved, beside the adapter).

    Attributes:
        task: ``boundaries``, ``distance``, ``instances``, ``semseg`` or ``depth``.
        variant: adapter variant (``base``, ``d16``, ``no-sigma``, ``shared-sigma``, ``single-layer``,
            ``paper-budget``); baseline heads take ``base`` only.
        head: ``maxa`` (default), ``linear`` or ``cnn``.
        seed: seeds initialisation, the train/validation split and shuffling.
        batch_size: images per step.
        max_epochs: epoch cap.
        patience: stop after this many epochs without a lower validation loss.
        val_fraction: part of the training store held out for model selection.
        lr: learning rate; ``None`` = the task's (1e-3, 2e-3 for boundaries and depth).
        max_train_images: cap on training images (``None``: 8,000 for instances, else all).
        task_options: task keyword options (e.g. ``{"min_large": 3}``).
    """

    task: str
    variant: str = "base"
    head: str = "maxa"
    seed: int = 0
    batch_size: int = 16
    max_epochs: int = 30
    patience: int = 5
    val_fraction: float = 0.1
    lr: float | None = None
    max_train_images: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise MaxaError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}.")
        if self.head not in HEADS:
            raise MaxaError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}.")
        if self.head != "maxa" and self.variant != "base":
            raise MaxaError(f"--variant {self.variant} applies to the maxa head only; use --head maxa.")
        if not 0.0 < self.val_fraction < 1.0:
            raise MaxaError("--val-fraction must be between 0 and 1.")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise MaxaError("batch size, max epochs and patience must be >= 1.")
        if self.lr is not None and not (math.isfinite(self.lr) and 0.0 < self.lr <= 1.0):
            raise MaxaError(f"--lr {self.lr} is not a learning rate: give a number in (0, 1], e.g. --lr 1e-3, "
                            "or leave it out for the task's own (1e-3; 2e-3 for boundaries and depth).")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise MaxaError("max_train_images must be >= 2 (one image to fit, one to hold out).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class ProbeResult:
    record: dict[str, Any]
    run_dir: str
    result_path: str

    @property
    def metrics(self) -> dict[str, float]:
        return self.record["metrics"]


def _open_pair(features: str | FeatureStore, targets_path: str | None, storage_options: dict[str, Any] | None = None,
               like: TargetStore | None = None) -> tuple[FeatureStore, TargetStore]:
    """A feature store and its target store (found by dataset and image ids unless given; with
    ``like``, one whose target definitions equal those of ``like``)."""
    fs = features if isinstance(features, FeatureStore) else open_features(features, storage_options=storage_options)
    if targets_path is None:
        root = store_root_of(fs.path, storage_options)
        targets_path = find_target_store(root, fs.spec, storage_options=storage_options,
                                         like=like.spec if like is not None else None)
        if targets_path is None:
            same = f" with the training targets' definitions ({like.path})" if like is not None else ""
            raise StoreError(
                f"no complete target store for {fs.spec.dataset}/{fs.spec.split}{same} under {root}; "
                "run `maxa extract` for this split with targets (the default), or pass --targets / --eval-targets."
            )
    return fs, open_targets(targets_path, storage_options=storage_options)


def _usable(features: FeatureStore, targets: TargetStore, count: int | None = None) -> tuple[np.ndarray, int]:
    """Indices of the first ``count`` images (all by default) minus those recorded as bad, and how
    many were dropped: an undecodable image is stored as zeros and must not be trained or scored on."""
    n = len(features) if count is None else count
    bad = np.union1d(features.bad, targets.bad)
    bad = bad[bad < n]
    return np.setdiff1d(np.arange(n), bad), int(bad.size)


def build_model(config: ProbeConfig, task: Task, in_channels, grids) -> tuple[torch.nn.Module, AdapterConfig]:
    """The adapter (or baseline head) for ``task`` on features with ``in_channels``/``grids``."""
    out = task.out_channels()
    base = variant_config(config.variant, in_channels=tuple(in_channels), grids=tuple(grids), out_channels=out)
    cnn = min(base.cnn_dim, MAX_CNN_CHANNELS)
    adapter_config = variant_config(config.variant, in_channels=tuple(in_channels), grids=tuple(grids),
                                    out_channels=out, cnn_channels=cnn)
    return build_head(config.head, adapter_config), adapter_config


def _derive(task: Task, batch: dict[str, torch.Tensor], idx: np.ndarray, offsets: np.ndarray | None) -> None:
    """Add fields a task derives from stored arrays (instances: global training instance ids)."""
    if "instance_global" in task.needs and offsets is not None and "instances" in batch:
        batch["instance_global"] = global_instance_ids(
            batch["instances"], torch.from_numpy(offsets[idx]).to(batch["instances"].device),
            batch.get("foreground"), batch.get("instance_ignore"),
        )


def train_probe(
    features: str,
    config: ProbeConfig,
    *,
    eval_features: str | None = None,
    targets: str | None = None,
    eval_targets: str | None = None,
    results_root: str | None = None,
    device: str = "auto",
    in_memory: bool | None = None,
    show_progress: bool = True,
    log: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> ProbeResult:
    """Train ``config.task`` on the feature store ``features`` and evaluate on ``eval_features``.

    Args:
        features: training feature store.
        config: the probe settings.
        eval_features: eval feature store (default: same backbone and dataset, split val/test, in
            the same store root).
        targets, eval_targets: target stores (default: found in the store root by image ids).
        results_root: where runs and results go (default: the training store's root); lets a
            reader with read-only access to a shared root keep results in their own.
        device: ``auto``, ``cpu``, ``cuda``.
        in_memory: force or forbid holding the stores in memory (default: if they fit).
        show_progress: print per-epoch progress.
        log: callable for progress lines (default: print to stderr).
        storage_options: fsspec options for stores (and results) given as URLs (``s3://…``).
            Probing only reads the stores: with ``results_root`` elsewhere nothing is written
            under the store root.
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(config.seed)
    train_fs, train_ts = _open_pair(features, targets, storage_options)
    root = store_root_of(features, storage_options)
    if eval_features is None:
        eval_features = find_eval_features(root, train_fs.spec, storage_options=storage_options)
        if eval_features is None:
            raise StoreError(
                f"no eval store for {train_fs.spec.backbone} on {train_fs.spec.dataset} (val/test split) under "
                f"{root}; extract the val split with the same backbone and weights, or pass --eval-store."
            )
    eval_fs = open_features(eval_features, storage_options=storage_options)
    check_eval_pair(train_fs, eval_fs)  # before looking for its targets: the clearer refusal
    eval_fs, eval_ts = _open_pair(eval_fs, eval_targets, storage_options, like=train_ts)
    check_aligned(train_fs, train_ts)
    check_aligned(eval_fs, eval_ts)
    check_target_definitions(train_ts, eval_ts)
    out_root = str(results_root or root)
    check_results_root(out_root, storage_options=storage_options)
    say = log or (lambda msg: print(msg, flush=True, file=sys.stderr))

    # the task, sized from the training targets
    cap = config.max_train_images
    if cap is None and config.task == "instances":
        cap = INSTANCE_TRAIN_IMAGES
    n_train_total = len(train_fs) if cap is None else min(cap, len(train_fs))
    tspec = train_ts.spec
    offsets = None
    num_instances = None
    if "instance_count" in train_ts.array_names:
        counts = train_ts.read_all("instance_count")[:n_train_total].astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        num_instances = int(counts.sum())
    info = TargetInfo(num_classes=tspec.num_classes, ignore_index=tspec.ignore_index,
                      num_instances=num_instances, class_names=tspec.class_names)
    task_options = dict(config.task_options)
    if config.task == "instances":  # the dataset's own "large object" rule unless overridden
        task_options.setdefault("large_area", tspec.large_area)
    task = create_task(config.task, info, **task_options)
    if task.target_kind not in tspec.kinds:
        raise MaxaError(f"task {config.task!r} needs {task.target_kind!r} targets; dataset {tspec.dataset!r} "
                        f"has {', '.join(tspec.kinds)}.")
    stored = [n for n in task.needs if n not in getattr(task, "derived", ())]
    if "instance_global" in task.needs:
        stored = list(dict.fromkeys([*stored, "instances", "foreground", "instance_ignore"]))

    # images recorded as undecodable hold zeros: never trained, selected or scored on
    usable, train_bad = _usable(train_fs, train_ts, n_train_total)
    eval_idx, eval_bad = _usable(eval_fs, eval_ts)
    if train_bad or eval_bad:
        say(f"  excluded images recorded as bad (undecodable at extraction): {train_bad} of the training store "
            f"{train_fs.path}, {eval_bad} of the eval store {eval_fs.path}")
    if eval_idx.size == 0:
        raise MaxaError(f"every image of the eval store {eval_fs.path} is recorded as bad: nothing to evaluate.")

    # split the training store: a seeded held-out part for model selection
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(usable.size)
    n_val = max(1, int(round(config.val_fraction * usable.size)))
    if usable.size - n_val < 1:
        raise MaxaError(f"the training store has {usable.size} usable image(s): too few to hold out a validation part.")
    val_idx, fit_idx = np.sort(usable[order[:n_val]]), np.sort(usable[order[n_val:]])
    fit = ProbeData(train_fs, train_ts, stored, indices=fit_idx, device=dev, in_memory=in_memory)
    val = ProbeData(train_fs, train_ts, stored, indices=val_idx, device=dev, in_memory=in_memory)
    evaluation = ProbeData(eval_fs, eval_ts, stored, indices=eval_idx, device=dev, in_memory=in_memory)
    out_size = tuple(tspec.size)

    model, adapter_config = build_model(config, task, fit.in_channels, fit.grids)
    model.to(dev)
    if dev.type == "cpu":  # build or load the CPU kernels now, not inside the first epoch
        fused.extension()
    extra = task.extra_module()
    if extra is not None:
        extra.to(dev)
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    lr = config.lr if config.lr is not None else task.lr
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(config.seed)

    def run_epoch(data: ProbeData, train: bool) -> float:
        model.train(train)
        total, count = 0.0, 0
        with torch.set_grad_enabled(train):
            for idx, feats, batch in data.batches(config.batch_size, shuffle=train, generator=gen):
                _derive(task, batch, idx, offsets)
                loss = task.loss(model(feats, data.token_pos, out_size), batch, extra)
                if train:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        return total / max(count, 1)

    def score(scorer: Task, data: ProbeData) -> dict[str, float]:
        model.eval()
        state = scorer.metric_state()
        with torch.no_grad():
            for _idx, feats, batch in data.batches(config.batch_size):
                scorer.update(state, model(feats, data.token_pos, out_size), batch)
        return scorer.compute(state)

    # Model selection on the held-out part: its loss, or, for a task whose loss cannot improve on
    # held-out images (instances: the classifier knows only training instances), its own metric.
    selector = task.selection_task()
    selection = "val_loss" if selector is None else f"val_{selector.primary_metric}"
    best = (math.inf, -1, None)
    history = []
    t_train = time.perf_counter()
    for epoch in range(config.max_epochs):
        t0 = time.perf_counter()
        train_loss = run_epoch(fit, True)
        entry = {"epoch": epoch, "train_loss": train_loss}
        if selector is None:
            entry["val_loss"] = value = run_epoch(val, False)
        else:
            entry[selection] = score(selector, val)[selector.primary_metric]
            value = -entry[selection] if selector.higher_is_better else entry[selection]
            if not math.isfinite(value):  # no held-out image the metric can score
                raise MaxaError(f"task {config.task!r}: none of the {len(val)} held-out training images can be "
                                f"scored for model selection ({selection}); use a larger training store or a larger "
                                "--val-fraction.")
        entry["seconds"] = time.perf_counter() - t0
        history.append(entry)
        improved = value < best[0]
        if improved:
            best = (value, epoch, (copy.deepcopy(model.state_dict()),
                                   copy.deepcopy(extra.state_dict()) if extra is not None else None))
        if show_progress:
            shown = entry[selection]
            say(f"  {config.task} epoch {epoch + 1:>3}/{config.max_epochs}  train {train_loss:.4f}  "
                f"{selection.replace('_', ' ')} {shown:.4f}{'  *' if improved else ''}  ({entry['seconds']:.1f} s)")
        if epoch - best[1] >= config.patience:
            break
    train_seconds = time.perf_counter() - t_train
    model.load_state_dict(best[2][0])
    if extra is not None:
        extra.load_state_dict(best[2][1])

    # evaluation on the eval store
    t_eval = time.perf_counter()
    metrics = score(task, evaluation)
    trivial = task.trivial_metrics(fit.numpy_batches(stored), evaluation.numpy_batches(stored))
    eval_seconds = time.perf_counter() - t_eval

    # save the adapter and the record
    p_learn = count_parameters(model)
    run_key = content_key({"train": train_fs.key, "eval": eval_fs.key, "config": config.to_dict()})
    run_dir = join(out_root, "runs", safe_name(train_fs.spec.backbone), f"{tspec.dataset}-{config.task}-{config.variant}-{config.head}-seed{config.seed}-{run_key}")
    adapter_bytes = io.BytesIO()
    torch.save({"model": model.state_dict(), "extra": extra.state_dict() if extra is not None else None},
               adapter_bytes)
    record = {
        "task": config.task, "variant": config.variant, "head": config.head, "seed": config.seed,
        "backbone": train_fs.spec.backbone, "weights": train_fs.spec.weights_id, "dataset": tspec.dataset,
        "train_split": train_fs.spec.split, "eval_split": eval_fs.spec.split,
        "train_images": int(len(fit)), "val_images": int(len(val)), "eval_images": int(len(evaluation)),
        "train_bad_excluded": train_bad, "eval_bad_excluded": eval_bad,
        "dataset_id": train_fs.spec.dataset_id, "eval_dataset_id": eval_fs.spec.dataset_id,
        "eval_image_ids_hash": eval_fs.spec.image_ids_hash,
        "primary_metric": task.primary_metric, "primary_value": float(metrics.get(task.primary_metric, math.nan)),
        "higher_is_better": task.higher_is_better,
        "metrics": metrics, "trivial": trivial, "p_learn": int(p_learn),
        "epochs": len(history), "best_epoch": int(best[1]) + 1, "selection": selection,
        "train_store": train_fs.key, "eval_store": eval_fs.key,
        "train_targets": train_ts.key, "eval_targets": eval_ts.key,
        "timings": {"train_s": train_seconds, "eval_s": eval_seconds, "total_s": time.perf_counter() - t_start,
                    "epoch_s": train_seconds / max(len(history), 1)},
        "config": {"probe": config.to_dict(), "adapter": adapter_config.to_dict(), "task_options": task.options(),
                   "lr": lr, "device": str(dev), "in_memory": fit.in_memory},
        "run_dir": str(run_dir), "tool_version": tool_version(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta = {**record, "history": history, "info": info.to_dict(), "out_size": list(out_size),
            "train_features": str(features), "eval_features": str(eval_features),
            "layers": list(train_fs.spec.layer_names), "backbone_identity": train_fs.spec.backbone_identity()}
    write_run_files(run_dir, {"adapter.pt": adapter_bytes.getvalue(),
                              "meta.json": json.dumps(meta, indent=2, default=float).encode()},
                    storage_options=storage_options)
    result_path = append_result(out_root, record, storage_options=storage_options)
    return ProbeResult(record=record, run_dir=str(run_dir), result_path=result_path)
