"""One probe run's settings as a frozen value, with their defaults defined here once.

Free of torch at import, so the command line shows the defaults without loading it; the names
of heads and variants are checked when a config is made.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from runtime.errors import MaxaError

__all__ = ["ProbeConfig", "config_identity", "probe_default"]


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """One probe run's settings (saved, resolved, beside the adapter).

    Attributes:
        task: a registered task (``probe.tasks.task_names()``).
        variant: adapter variant (``base``, ``d16``, ``no-sigma``, ``shared-sigma``, ``single-layer``,
            ``paper-budget``); baseline heads take ``base`` only.
        head: ``maxa`` (default), ``linear``, ``cnn`` or ``jbu`` (image-guided upsampling, then a
            linear probe; needs target stores with the image).
        seed: seeds initialisation, the train/validation split and shuffling.
        batch_size: images per step.
        max_epochs: epoch cap.
        patience: stop after this many epochs without a lower validation loss.
        val_fraction: part of the training store held out for model selection.
        lr: learning rate; ``None`` = the task's (1e-3, 2e-3 for boundaries and depth).
        max_train_images: cap on training images (``None``: the task's ``default_max_train_images``;
            all images for most tasks).
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
        from probe.heads import HEADS  # torch: only when a config is made, not when defaults are read
        from probe.variants import VARIANTS

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


def probe_default(name: str) -> Any:
    """The default of :class:`ProbeConfig` field ``name`` (for option defaults elsewhere)."""
    f = next(f for f in fields(ProbeConfig) if f.name == name)
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None  # task: no default


def config_identity(config: dict[str, Any]) -> str:
    """A probe configuration (a :class:`ProbeConfig` as a dict, whole or in part) as canonical text:
    every field, those missing at their defaults, integral floats as ints. Two runs of the same
    stores are the same experiment only when this text is the same (what ``maxa sweep`` skips on):
    a run of another epoch budget, patience, learning rate, … is another experiment."""
    def canon(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    import json

    full = {f.name: config.get(f.name, probe_default(f.name)) for f in fields(ProbeConfig)}
    return json.dumps(canon(full), sort_keys=True, default=str)
