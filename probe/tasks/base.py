"""The task contract and the task registry.

A task turns target-store arrays into a loss and streaming metrics, so the training loop can stay
ignorant of every task by name (as big_vision's evaluators and nanochat's tasks do). The loop:

1. reads a :class:`TrainingTargets` from the training target store (its first
   ``max_train_images`` images, ``default_max_train_images`` unless configured) and calls
   ``create_task(name, training.info, **options)``, the options defaulting to ``target_options(spec)``;
2. reads the arrays of ``stored_needs()`` for each batch, at the adapter's output resolution
   ``(B, H, W)``; a training batch gets the fields named in ``task.derived`` from ``derive``;
3. trains the adapter with ``out_channels()`` output channels, learning rate ``lr``, and the parameters
   of ``extra_module()`` (if any) in the same optimiser, minimising ``loss(pred, batch, extra)``;
4. evaluates with ``state = metric_state()``, ``update(state, pred, batch)`` per batch and
   ``compute(state)`` once. ``select(batch)`` says which images of a batch count (all by default);
   ``update`` applies it itself, so a loop may use it only to skip work.

Conventions shared by all tasks: ``pred`` is a float tensor ``(B, C, H, W)``; batch values in
``loss``/``update`` are tensors ``(B, H, W)`` on ``pred``'s device (any integer / bool / float dtype
noted per task); ``trivial_metrics`` receives the same keys as NumPy arrays. Metrics are accumulated as
float64 sums and counts (or confusion matrices) over the whole eval set, never as means of means.
"""

from __future__ import annotations

import dataclasses
import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from runtime.errors import UnknownNameError

__all__ = [
    "TargetInfo",
    "TrainingTargets",
    "Task",
    "register_task",
    "get_task",
    "create_task",
    "task_names",
    "target_kind",
    "tasks_for_targets",
    "task_target_kinds",
    "IMPLIED_TARGET_KINDS",
    "as_tensor_batch",
    "masked_mse",
    "mean_baseline",
]

Batch = Mapping[str, Tensor]


@dataclass(frozen=True, kw_only=True)
class TargetInfo:
    """What a task needs to know about a (training) target store to size its outputs.

    Attributes:
        num_classes: semantic classes (``semseg``), ``None`` where the dataset has none.
        ignore_index: semantic label value of ignored pixels.
        num_instances: total number of instances over the *training* target store (``instances``:
            the size of the global instance classifier).
        class_names: optional names of the semantic classes.
    """

    num_classes: int | None = None
    ignore_index: int = 255
    num_instances: int | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.num_instances is not None and self.num_instances < 0:
            raise ValueError(f"num_instances must be >= 0, got {self.num_instances}")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["class_names"] is not None:
            d["class_names"] = list(d["class_names"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainingTargets:
    """What the loop reads once from the training target store, for the task and its derived fields.

    Attributes:
        info: sizes the task's outputs.
        instance_offsets: where the store counts instances (``instance_count``), each training
            image's first global instance index (the instances of the images before it); else ``None``.
    """

    info: TargetInfo
    instance_offsets: np.ndarray | None = None

    @classmethod
    def read(cls, targets: Any, count: int) -> TrainingTargets:
        """From the first ``count`` images of the target store ``targets`` (a ``store.reader.TargetStore``)."""
        spec = targets.spec
        offsets = num_instances = None
        if "instance_count" in targets.array_names:
            counts = targets.read_all("instance_count")[:count].astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
            num_instances = int(counts.sum())
        info = TargetInfo(num_classes=spec.num_classes, ignore_index=spec.ignore_index,
                          num_instances=num_instances, class_names=spec.class_names)
        return cls(info=info, instance_offsets=offsets)


class Task(ABC):
    """One evaluation task: output size, loss, streaming metrics and the trivial baseline.

    Class attributes:
        name: registry name (``"boundaries"``, ``"distance"``, ``"instances"``, ``"semseg"``, ``"depth"``).
        target_kind: the dataset target kind it needs (one of ``extract.datasets.base.TARGET_KINDS``).
        needs: batch keys the task reads (target-store arrays, plus the fields in ``derived``).
        derived: the keys of ``needs`` that :meth:`derive` computes rather than read from the target
            store (``instances``: ``instance_global``, see ``probe.tasks.instances.global_instance_ids``);
            the stored keys they are computed from are in ``needs`` too.
        lr: Adam learning rate (paper A.1: 1e-3, 2e-3 for boundaries and depth).
        default_max_train_images: training images used unless the run caps them (``None``: all;
            ``instances``: the paper's 8,000).
        higher_is_better: direction of ``primary_metric``.
        primary_metric: the key of ``compute``'s result used for tables and model comparison.
    """

    name: ClassVar[str] = ""
    target_kind: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    derived: ClassVar[tuple[str, ...]] = ()
    lr: ClassVar[float] = 1e-3
    default_max_train_images: ClassVar[int | None] = None
    higher_is_better: ClassVar[bool] = True
    primary_metric: ClassVar[str] = ""

    def __init__(self, info: TargetInfo) -> None:
        self.info = info

    def options(self) -> dict[str, Any]:
        """Task options that shape results (recorded with a run); none by default."""
        return {}

    @classmethod
    def target_options(cls, spec: Any) -> dict[str, Any]:
        """Options the training target store's spec (``store.spec.TargetSpec``) sets unless the run
        gives them (``instances``: the dataset's own "large object" area); none by default."""
        return {}

    def stored_needs(self) -> list[str]:
        """The keys of ``needs`` read from the target store: all but ``derived``."""
        return [n for n in self.needs if n not in self.derived]

    def derive(self, batch: dict[str, Tensor], idx: np.ndarray, training: TrainingTargets) -> None:
        """Add the ``derived`` fields to a training ``batch`` of the training store's images ``idx``
        (in place); nothing by default."""

    @abstractmethod
    def out_channels(self) -> int:
        """``D_out``: channels of the adapter output."""

    def extra_module(self) -> nn.Module | None:
        """Trainable parts outside the adapter (not counted in P_learn); ``None`` for most tasks."""
        return None

    @abstractmethod
    def loss(self, pred: Tensor, batch: Batch, extra: nn.Module | None = None) -> Tensor:
        """Scalar training loss of ``pred`` ``(B, C, H, W)`` against ``batch`` arrays ``(B, H, W)``."""

    @abstractmethod
    def metric_state(self) -> Any:
        """A fresh, mutable accumulator for :meth:`update`."""

    @abstractmethod
    def update(self, state: Any, pred: Tensor, batch: Batch) -> None:
        """Add one eval batch to ``state`` (in place)."""

    @abstractmethod
    def compute(self, state: Any) -> dict[str, float]:
        """Final metrics over everything added to ``state``."""

    @abstractmethod
    def trivial_metrics(
        self,
        train_batches: Iterable[Mapping[str, np.ndarray]],
        eval_batches: Iterable[Mapping[str, np.ndarray]],
    ) -> dict[str, float]:
        """Metrics of the trivial predictor fitted on ``train_batches``, scored on ``eval_batches``.

        Returns the same keys as :meth:`compute` (plus task-specific extras) so results compare.
        """

    def selection_task(self) -> "Task | None":
        """The task whose ``primary_metric`` on the held-out part of the training store selects the
        epoch, or ``None`` to select on the held-out loss (the default). A task overrides this when
        its loss cannot improve on held-out images."""
        return None

    def select(self, batch: Batch) -> Tensor | None:
        """Boolean ``(B,)`` mask of the images that count for the metric; ``None`` = all."""
        return None

    def _check_shapes(self, pred: Tensor, batch: Batch, key: str) -> Tensor:
        if pred.ndim != 4 or pred.shape[1] != self.out_channels():
            raise ValueError(
                f"task {self.name!r} expects pred of shape (B, {self.out_channels()}, H, W), got {tuple(pred.shape)}"
            )
        if key not in batch:
            raise KeyError(f"task {self.name!r} needs batch[{key!r}]; batch has {sorted(batch)}")
        target = torch.as_tensor(batch[key], device=pred.device)
        b, _, h, w = pred.shape
        if tuple(target.shape) != (b, h, w):
            raise ValueError(
                f"task {self.name!r}: batch[{key!r}] has shape {tuple(target.shape)}, expected {(b, h, w)} to match pred"
            )
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info!r}, {self.options()!r})"


def masked_mse(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error of ``pred`` (B, 1, H, W) against ``target`` (B, H, W) over ``valid`` pixels."""
    w = valid.to(pred.dtype)
    return ((pred[:, 0] - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)


def mean_baseline(
    task: "Task",
    key: str,
    valid: Any,
    train_batches: Iterable[Mapping[str, np.ndarray]],
    eval_batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """The task's metrics for a constant prediction at the training mean of ``key`` over the pixels
    where ``valid(values)`` holds; the constant is returned as ``mean_train``."""
    total, n = 0.0, 0
    for b in train_batches:
        t = np.asarray(b[key], dtype=np.float64)
        ok = valid(t)
        total += float(t[ok].sum())
        n += int(ok.sum())
    mean = total / n if n else 0.0
    state = task.metric_state()
    for b in eval_batches:
        tb = as_tensor_batch(b)
        t = tb[key]
        task.update(state, torch.full((t.shape[0], 1, *t.shape[1:]), mean, dtype=torch.float64), tb)
    return {**task.compute(state), "mean_train": mean}


def as_tensor_batch(batch: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """NumPy batch → tensor batch (non-array values pass through); used by ``trivial_metrics``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            if v.dtype == np.uint16:  # torch has limited uint16 support
                v = v.astype(np.int32)
            out[k] = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        else:
            out[k] = v
    return out


_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its ``name``."""
    if not cls.name or not cls.target_kind or not cls.primary_metric:
        raise ValueError(f"{cls.__name__} must set name, target_kind and primary_metric")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_tasks() -> None:
    # Importing the modules runs their @register_task decorators.
    from probe.tasks import boundaries, depth, distance, instances, semseg  # noqa: F401


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(_REGISTRY)


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; unknown names raise :class:`UnknownNameError`."""
    _load_builtin_tasks()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(_REGISTRY))}.") from None


def create_task(name: str, info: TargetInfo, **options: Any) -> Task:
    """Build task ``name``; ``options`` are task-specific keyword options (e.g. ``min_large``)."""
    return get_task(name)(info, **options)


def target_kind(name: str) -> str:
    """The dataset target kind task ``name`` needs, e.g. ``"semseg"`` → ``"semantic"``."""
    return get_task(name).target_kind


def task_target_kinds() -> dict[str, str]:
    """Task name → the dataset target kind it needs (the mapping behind :func:`target_kind`)."""
    return {n: _REGISTRY[n].target_kind for n in task_names()}


#: Target kinds a dataset gets for free from another (``extract.datasets.base.TARGET_KINDS``: instance
#: masks also give boundaries and the distance transform).
IMPLIED_TARGET_KINDS: dict[str, tuple[str, ...]] = {"instances": ("boundaries", "distance")}


def tasks_for_targets(kinds: Iterable[str]) -> list[str]:
    """Tasks a dataset supporting target ``kinds`` can run (implied kinds included)."""
    have = set(kinds)
    for k in list(have):
        have.update(IMPLIED_TARGET_KINDS.get(k, ()))
    return [n for n, kind in task_target_kinds().items() if kind in have]
