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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.devices import device_name, resolve_device
from runtime.progress import ProgressReporter
from runtime.provenance import tool_version
from probe import fused
from probe.adapter import AdapterConfig, count_parameters
from probe.data import ProbeData, estimate_bytes, plan_in_memory
from probe.config import ProbeConfig
from probe.curves import RunCurves
from probe.heads import HEADS, IMAGE_INPUT, build_head, check_has_image, head_inputs, head_needs_image
from probe.tasks import Task, TrainingTargets, create_task, get_task
from probe.variants import variant_config
from probe.pairing import Stores, Where, open_stores, usable_images
from runtime.errors import MaxaError
from store.location import Location, as_location
from store.results import append_result, check_results_root, run_location, write_run_files
from store.spec import content_key

__all__ = ["ProbeConfig", "ProbeResult", "train_probe", "build_model", "HEADS", "MAX_CNN_CHANNELS"]

#: D_CNN = max(D/4, D_out), capped at 64 — the paper's setting for COCO-Stuff's 171 classes.
MAX_CNN_CHANNELS = 64


@dataclass
class ProbeResult:
    """What a probe gives: its ``record`` (the results table's row), where its run folder and
    result went (empty strings when ``write=False``), and the trained ``model`` (in eval mode, on
    the CPU) with the task's ``extra`` module, if any, and the per-epoch ``history``."""

    record: dict[str, Any]
    run_dir: str
    result_path: str
    model: torch.nn.Module | None = None
    extra: torch.nn.Module | None = None
    history: list[dict[str, Any]] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return self.record["metrics"]


def build_model(config: ProbeConfig, task: Task, in_channels, grids,
                out_size: tuple[int, int] = (224, 224)) -> tuple[torch.nn.Module, AdapterConfig]:
    """The adapter (or baseline head) for ``task`` on features with ``in_channels``/``grids``, for
    targets of ``out_size``."""
    out = task.out_channels()
    base = variant_config(config.variant, in_channels=tuple(in_channels), grids=tuple(grids), out_channels=out)
    cnn = min(base.cnn_dim, MAX_CNN_CHANNELS)
    adapter_config = variant_config(config.variant, in_channels=tuple(in_channels), grids=tuple(grids),
                                    out_channels=out, cnn_channels=cnn)
    return build_head(config.head, adapter_config, out_size=out_size), adapter_config


@dataclass
class _Data:
    """The task and the three image sets it trains, selects and is scored on."""

    task: Task
    training: TrainingTargets
    stored: list[str]
    fit: ProbeData
    val: ProbeData
    evaluation: ProbeData
    train_bad: int
    eval_bad: int
    out_size: tuple[int, int]  # the targets' resolution: the adapter's output size
    memory_plan: str  # which sets are held in memory, which streamed, and why


def train_probe(
    features: Where,
    config: ProbeConfig,
    *,
    eval_features: Where | None = None,
    targets: Where | None = None,
    eval_targets: Where | None = None,
    results_root: Where | None = None,
    device: str = "auto",
    in_memory: bool | None = None,
    show_progress: bool = True,
    log: Any = None,
    tensorboard: str | Path | None = None,
    write: bool = True,
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
        show_progress: print progress: a line per epoch, and within an epoch and the evaluation a
            bar on a terminal or plain lines (images/s, steps/s, loss, ETA) every
            ``$MAXA_PROGRESS_S`` seconds elsewhere (``runtime.progress``).
        log: callable for progress lines (default: print to stderr).
        tensorboard: also log the curves to TensorBoard under this folder (``probe.curves``; the
            run's ``curves.jsonl`` is written either way).
        write: write the run folder (adapter, meta, curves) and append the record to the results
            table; ``False`` (a notebook trying things): nothing is written, the result still holds
            the record and the trained model.

    Every store and root may be a path, a URL (``s3://…``) or a store Location (which carries
    fsspec storage options). Probing only reads the stores: with ``results_root`` elsewhere nothing
    is written under the store root.
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(config.seed)
    stores = open_stores(features, eval_features, targets, eval_targets)
    out_root = as_location(results_root) if results_root is not None else stores.root
    if write:
        check_results_root(out_root)
    say = log or (lambda msg: print(msg, flush=True, file=sys.stderr))
    data = _prepare_data(config, stores, dev, in_memory, say, show_plan=show_progress)
    trainer = _Trainer(config, data, dev, show_progress)
    run_dir = _run_dir(config, stores, out_root)
    curves = RunCurves(run_dir, tensorboard, write=write)
    try:
        fitted = trainer.fit(say if show_progress else None, curves)
        # evaluation on the eval store
        t_eval = time.perf_counter()
        metrics = trainer.score(data.task, data.evaluation, f"  {config.task} eval")
        trivial = data.task.trivial_metrics(data.fit.numpy_batches(data.stored),
                                            data.evaluation.numpy_batches(data.stored))
        fitted["eval_s"] = time.perf_counter() - t_eval
        curves.final(metrics, fitted["best_epoch"] + 1)
    finally:
        curves.close()
    return _save(config, stores, data, trainer, fitted, metrics, trivial, features=features,
                 run_dir=run_dir if write else None, out_root=out_root, dev=dev, t_start=t_start)


def _run_dir(config: ProbeConfig, stores: Stores, out_root: Location) -> Location:
    """The run's folder: named by dataset, task, variant, head, seed and a key of the stores and config."""
    run_key = content_key({"train": stores.train_fs.key, "eval": stores.eval_fs.key, "config": config.to_dict()})
    return run_location(out_root, stores.train_fs.spec.backbone, f"{stores.train_ts.spec.dataset}-{config.task}-"
                        f"{config.variant}-{config.head}-seed{config.seed}-{run_key}")


def _prepare_data(config: ProbeConfig, stores: Stores, dev: torch.device, in_memory: bool | None, say,
                  show_plan: bool = True) -> _Data:
    """The task, sized from the training targets, and its fit / held-out / eval image sets."""
    train_fs, train_ts, eval_fs, eval_ts = stores.train_fs, stores.train_ts, stores.eval_fs, stores.eval_ts
    task_class = get_task(config.task)
    cap = config.max_train_images if config.max_train_images is not None else task_class.default_max_train_images
    n_train_total = len(train_fs) if cap is None else min(cap, len(train_fs))
    tspec = train_ts.spec
    training = TrainingTargets.read(train_ts, n_train_total)
    task_options = {**task_class.target_options(tspec), **config.task_options}
    task = create_task(config.task, training.info, **task_options)
    if task.target_kind not in tspec.kinds:
        raise MaxaError(f"task {config.task!r} needs {task.target_kind!r} targets; dataset {tspec.dataset!r} "
                        f"has {', '.join(tspec.kinds)}.")
    stored = task.stored_needs()
    reads = list(stored)
    if head_needs_image(config.head):  # read beside the targets, never a target itself
        for ts in (train_ts, eval_ts):
            check_has_image(ts, config.head)
        reads.append(IMAGE_INPUT)

    # images recorded as undecodable hold zeros: never trained, selected or scored on
    usable, train_bad = usable_images(train_fs, train_ts, n_train_total)
    eval_idx, eval_bad = usable_images(eval_fs, eval_ts)
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
    sets = {"fit": (train_fs, train_ts, fit_idx), "held-out": (train_fs, train_ts, val_idx),
            "eval": (eval_fs, eval_ts, eval_idx)}
    if in_memory is None:  # one budget for the three sets, the training set first
        keep, plan = plan_in_memory([estimate_bytes(fs, ts, reads, len(i)) for fs, ts, i in sets.values()], dev,
                                    list(sets))
    else:
        keep, plan = [in_memory] * 3, ("in memory" if in_memory else "streamed") + " (as asked)"
    if show_plan:
        say(f"  data: {plan}")
    fit, val, evaluation = (ProbeData(fs, ts, reads, indices=i, device=dev, in_memory=k)
                            for (fs, ts, i), k in zip(sets.values(), keep))
    return _Data(task, training, stored, fit, val, evaluation, train_bad, eval_bad, tuple(tspec.size), plan)


class _Trainer:
    """The model (and the task's extra module) with its optimiser: trains, selects an epoch, scores."""

    def __init__(self, config: ProbeConfig, data: _Data, dev: torch.device, show_progress: bool = False) -> None:
        self.config, self.data, self.task = config, data, data.task
        self.show_progress = show_progress
        self.out_size = data.out_size
        self.model, self.adapter_config = build_model(config, self.task, data.fit.in_channels, data.fit.grids,
                                                      data.out_size)
        self.model.to(dev)
        if dev.type == "cpu":  # build or load the CPU kernels now, not inside the first epoch
            fused.extension()
        self.extra = self.task.extra_module()
        if self.extra is not None:
            self.extra.to(dev)
        params = list(self.model.parameters()) + (list(self.extra.parameters()) if self.extra is not None else [])
        self.lr = config.lr if config.lr is not None else self.task.lr
        self.opt = torch.optim.Adam(params, lr=self.lr)
        self.gen = torch.Generator().manual_seed(config.seed)

    def progress(self, what: str, data: ProbeData) -> ProgressReporter:
        """Progress within one pass (a bar on a terminal, removed when done; else plain lines)."""
        return ProgressReporter(what, len(data), enabled=self.show_progress, transient=True)

    def run_epoch(self, data: ProbeData, train: bool, what: str = "") -> float:
        """One pass over ``data``: trains on it, or only measures its loss; the mean loss per image."""
        model, task = self.model, self.task
        model.train(train)
        total, count, steps = 0.0, 0, 0
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train), self.progress(what, data) as bar:
            for idx, feats, batch in data.batches(self.config.batch_size, shuffle=train, generator=self.gen,
                                                    reuse_buffers=True):
                task.derive(batch, idx, self.data.training)
                loss = task.loss(model(feats, data.token_pos, self.out_size, **head_inputs(model, batch)), batch,
                                 self.extra)
                if train:
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
                steps += 1
                if bar.enabled:
                    bar.advance(len(idx), loss=total / count, **{"steps/s": f"{steps / (time.perf_counter() - t0):.2f}"})
        return total / max(count, 1)

    def score(self, scorer: Task, data: ProbeData, what: str = "") -> dict[str, float]:
        self.model.eval()
        state = scorer.metric_state()
        with torch.no_grad(), self.progress(what, data) as bar:
            for idx, feats, batch in data.batches(self.config.batch_size, reuse_buffers=True):
                scorer.update(state, self.model(feats, data.token_pos, self.out_size, **head_inputs(self.model, batch)),
                              batch)
                bar.advance(len(idx))
        return scorer.compute(state)

    def fit(self, say, curves: RunCurves | None = None) -> dict[str, Any]:
        """Train up to ``max_epochs`` and keep the best epoch's weights (``say``: progress lines, or
        None; ``curves``: where each epoch's values are written).

        Model selection on the held-out part: its loss, or, for a task whose loss cannot improve on
        held-out images, the metric of the task's ``selection_task()``.
        """
        config, fit, val = self.config, self.data.fit, self.data.val
        selector = self.task.selection_task()
        selection = "val_loss" if selector is None else f"val_{selector.primary_metric}"
        best = (math.inf, -1, None)
        history = []
        t_train = time.perf_counter()
        for epoch in range(config.max_epochs):
            t0 = time.perf_counter()
            what = f"  {config.task} epoch {epoch + 1}/{config.max_epochs}"
            train_loss = self.run_epoch(fit, True, f"{what} train")
            entry = {"epoch": epoch, "train_loss": train_loss}
            if selector is None:
                entry["val_loss"] = value = self.run_epoch(val, False, f"{what} held-out")
            else:
                entry[selection] = self.score(selector, val, f"{what} held-out")[selector.primary_metric]
                value = -entry[selection] if selector.higher_is_better else entry[selection]
                if not math.isfinite(value):  # no held-out image the metric can score
                    raise MaxaError(f"task {config.task!r}: none of the {len(val)} held-out training images can be "
                                    f"scored for model selection ({selection}); use a larger training store or a "
                                    "larger --val-fraction.")
            entry["seconds"] = time.perf_counter() - t0
            history.append(entry)
            improved = value < best[0]
            if improved:
                best = (value, epoch, self._state())
            if curves is not None:
                curves.epoch(entry, improved)
            if say is not None:
                say(f"  {config.task} epoch {epoch + 1:>3}/{config.max_epochs}  train {train_loss:.4f}  "
                    f"{selection.replace('_', ' ')} {entry[selection]:.4f}{'  *' if improved else ''}  "
                    f"({entry['seconds']:.1f} s)")
            if epoch - best[1] >= config.patience:
                break
        train_seconds = time.perf_counter() - t_train
        self.model.load_state_dict(best[2][0])
        if self.extra is not None:
            self.extra.load_state_dict(best[2][1])
        return {"history": history, "best_epoch": best[1], "selection": selection, "train_s": train_seconds}

    def _state(self) -> tuple[dict, dict | None]:
        return (copy.deepcopy(self.model.state_dict()),
                copy.deepcopy(self.extra.state_dict()) if self.extra is not None else None)


def _save(config: ProbeConfig, stores: Stores, data: _Data, trainer: _Trainer, fitted: dict[str, Any],
          metrics: dict[str, float], trivial: dict[str, float], *, features: Where, run_dir: Location | None,
          out_root: Location, dev: torch.device, t_start: float) -> ProbeResult:
    """Write the adapter and its meta under the run's folder and append the record to the results
    table (``run_dir`` None: write nothing); the result holds the record and the trained model."""
    train_fs, train_ts, eval_fs, eval_ts = stores.train_fs, stores.train_ts, stores.eval_fs, stores.eval_ts
    task, model, extra, tspec = data.task, trainer.model, trainer.extra, train_ts.spec
    history, train_seconds = fitted["history"], fitted["train_s"]
    p_learn = count_parameters(model)
    record = {
        "task": config.task, "variant": config.variant, "head": config.head, "seed": config.seed,
        "backbone": train_fs.spec.backbone, "weights": train_fs.spec.weights_id, "dataset": tspec.dataset,
        "train_split": train_fs.spec.split, "eval_split": eval_fs.spec.split,
        "train_images": int(len(data.fit)), "val_images": int(len(data.val)), "eval_images": int(len(data.evaluation)),
        "train_bad_excluded": data.train_bad, "eval_bad_excluded": data.eval_bad,
        "dataset_id": train_fs.spec.dataset_id, "eval_dataset_id": eval_fs.spec.dataset_id,
        "eval_image_ids_hash": eval_fs.spec.image_ids_hash,
        "primary_metric": task.primary_metric, "primary_value": float(metrics.get(task.primary_metric, math.nan)),
        "higher_is_better": task.higher_is_better,
        "metrics": metrics, "trivial": trivial, "p_learn": int(p_learn),
        "epochs": len(history), "best_epoch": int(fitted["best_epoch"]) + 1, "selection": fitted["selection"],
        "train_store": train_fs.key, "eval_store": eval_fs.key,
        # only where lossy: a lossless record is as before the option existed (report identities)
        **({"quantization": train_fs.spec.quantization} if train_fs.spec.lossy else {}),
        "train_targets": train_ts.key, "eval_targets": eval_ts.key,
        "timings": {"train_s": train_seconds, "eval_s": fitted["eval_s"], "total_s": time.perf_counter() - t_start,
                    "epoch_s": train_seconds / max(len(history), 1)},
        "config": {"probe": config.to_dict(), "adapter": trainer.adapter_config.to_dict(),
                   "task_options": task.options(), "lr": trainer.lr, "device": str(dev),
                   "in_memory": data.fit.in_memory, "memory_plan": data.memory_plan,
                   "threads": torch.get_num_threads()},
        "run_dir": str(run_dir) if run_dir is not None else "", "device": device_name(dev),
        "tool_version": tool_version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta = {**record, "history": history, "info": data.training.info.to_dict(), "out_size": list(data.out_size),
            "train_features": str(features), "eval_features": str(stores.eval_features),
            "layers": list(train_fs.spec.layer_names), "backbone_identity": train_fs.spec.backbone_identity()}
    result_path = ""
    if run_dir is not None:
        adapter_bytes = io.BytesIO()
        torch.save({"model": model.state_dict(), "extra": extra.state_dict() if extra is not None else None},
                   adapter_bytes)
        write_run_files(run_dir, {"adapter.pt": adapter_bytes.getvalue(),
                                  "meta.json": json.dumps(meta, indent=2, default=float).encode()})
        result_path = append_result(out_root, record)
    model.cpu().eval()
    if extra is not None:
        extra.cpu().eval()
    return ProbeResult(record=record, run_dir=record["run_dir"], result_path=result_path, model=model, extra=extra,
                       history=history)
