"""The sweep's data: what a validated sweep file asks for, and the jobs a plan makes of it.

:mod:`pipelines.sweep_file` produces a :class:`SweepFile` (datasets as :class:`SplitRef` pairs, one
:class:`ProbeSpec` per probe asked for); :mod:`pipelines.sweep_plan` turns it into a :class:`SweepPlan`
of :class:`TargetJob`, :class:`FeatureJob` and :class:`ProbeJob`, each with a plan status
(:data:`TODO`, :data:`SKIP` or :data:`FAILED`); :mod:`pipelines.sweep` runs the plan. Kept apart so
that parsing, planning and running share these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SplitRef",
    "DatasetDef",
    "ProbeSpec",
    "SweepFile",
    "TargetJob",
    "FeatureJob",
    "ProbeJob",
    "SweepPlan",
    "TODO",
    "SKIP",
    "FAILED",
    "PLAN_STATUSES",
    "first_line",
]

#: A job's plan status: to run, already done in the store root (or not needed), or cannot run.
TODO, SKIP, FAILED = "todo", "skip", "failed"
PLAN_STATUSES = (TODO, SKIP, FAILED)


def first_line(e: BaseException) -> str:
    """An error as the one line a failed job reports."""
    text = str(e).strip() or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# -- the parsed file ------------------------------------------------------------------------------
def freeze(v: Any) -> Any:
    """Tables and lists as (hashable) nested tuples; :func:`thaw` undoes it."""
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    return v


def thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v) and v:
            return {k: thaw(x) for k, x in v}
        return [thaw(x) for x in v]
    return v


@dataclass(frozen=True)
class SplitRef:
    """One dataset split as extraction sees it (small and hashable: it travels in dask tasks)."""

    dataset: str  # the sweep's dataset name
    reader: str
    root: str | None
    split: str
    options: tuple[tuple[str, Any], ...] = ()
    limit: int | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.split}"

    def options_dict(self) -> dict[str, Any]:
        return {k: thaw(v) for k, v in self.options}


@dataclass
class DatasetDef:
    name: str
    reader: str
    root: str | None
    train: SplitRef
    eval: SplitRef


@dataclass(frozen=True)
class ProbeSpec:
    """One probe the file asks for (before store keys are known)."""

    experiment: str
    backbone: str
    weights: str
    layers: tuple[int, ...] | None
    dataset: str
    task: str
    variant: str
    head: str
    seed: int
    settings: tuple[tuple[str, Any], ...]  # frozen probe settings (max_epochs, ...)

    def settings_dict(self) -> dict[str, Any]:
        return {k: thaw(v) for k, v in self.settings}


@dataclass
class SweepFile:
    path: str
    name: str
    extract: dict[str, Any]
    datasets: dict[str, DatasetDef]
    probes: list[ProbeSpec]
    experiments: list[str]
    #: lines to show the user (old spellings of keys, still read)
    notices: list[str] = field(default_factory=list)


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class TargetJob:
    id: str
    split: SplitRef
    size: tuple[int, int]
    path: Any = None  # the store's Location (path or URL with its storage options) once planned
    status: str = TODO  # one of PLAN_STATUSES
    error: str = ""


@dataclass
class FeatureJob:
    id: str
    backbone: str
    weights: str
    layers: tuple[int, ...] | None
    split: SplitRef
    path: Any = None  # the store's Location once planned
    key: str | None = None
    num_shards: int = 0
    missing_shards: list[int] = field(default_factory=list)
    status: str = TODO
    error: str = ""
    planned_backbone: Any = None  # a model-less LoadedBackbone (coordinator only)
    reader: Any = None  # the DatasetReader (coordinator only)


@dataclass
class ProbeJob:
    id: str
    spec: ProbeSpec
    train: str  # FeatureJob ids
    eval: str
    train_targets: str  # TargetJob ids
    eval_targets: str
    status: str = TODO
    error: str = ""

    @property
    def config(self) -> dict[str, Any]:
        s = self.spec.settings_dict()
        cfg = {"task": self.spec.task, "variant": self.spec.variant, "head": self.spec.head, "seed": self.spec.seed}
        for k in ("max_epochs", "patience", "batch_size", "lr", "val_fraction", "max_train_images"):
            if k in s:
                cfg[k] = s[k]
        opts = s.get("task_options", {}).get(self.spec.task)
        if opts:
            cfg["task_options"] = dict(opts)
        return cfg


def run_identity(train_key: str, eval_key: str, config: dict[str, Any]) -> tuple[str, str, str]:
    """What makes a probe run this experiment: its two feature stores and its whole configuration
    (:func:`probe.config.config_identity`: task, variant, head, seed and every setting, defaults
    filled in), so a run of another epoch budget or learning rate is never taken for it."""
    from probe.config import config_identity

    return (train_key, eval_key, config_identity(config))


def recorded_run_identity(record: dict[str, Any]) -> tuple[str, str, str] | None:
    """:func:`run_identity` of a probe record; ``None`` for a record that does not say its
    configuration (never taken for a planned run) and for speed records."""
    config = record.get("config")
    probe = config.get("probe") if isinstance(config, dict) else None
    if not record.get("train_store") or record.get("task") == "speed" or not isinstance(probe, dict):
        return None
    return run_identity(record["train_store"], record.get("eval_store"), probe)


@dataclass
class SweepPlan:
    sweep: SweepFile
    store_root: Any  # a store Location: the folder or URL and its storage options
    targets: dict[str, TargetJob]
    features: dict[str, FeatureJob]
    probes: list[ProbeJob]

    def jobs(self) -> tuple[Any, ...]:
        """Every job: target stores, feature stores, then probes."""
        return (*self.targets.values(), *self.features.values(), *self.probes)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for kind, jobs in (("targets", self.targets.values()), ("features", self.features.values()), ("probes", self.probes)):
            c = {s: 0 for s in PLAN_STATUSES}
            for j in jobs:
                c[j.status] += 1
            out[kind] = c
        return out
