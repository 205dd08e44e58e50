"""The built-in default job: offline, on the procedural ``shapes`` dataset, every task.

Extracts ``shapes`` train and val with a tiny backbone at random initialisation (features and
targets), then trains and evaluates the MAXA adapter on every task the dataset supports, reading
only the stores. It exercises the whole two-stage pipeline in a few minutes on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from extract.jobs import ExtractJobResult, run_extract
from probe.tasks import tasks_for_targets
from pipelines.defaults import QUICKSTART_BACKBONE, QUICKSTART_MAX_EPOCHS
from probe.train import ProbeConfig, train_probe

__all__ = ["QuickstartResult", "against_trivial", "run_quickstart"]

#: Task order in the printed table (instance awareness, semantics, geometry: the paper's order).
TASK_ORDER = ("boundaries", "distance", "instances", "semseg", "depth")


@dataclass
class QuickstartResult:
    extracted: dict[str, ExtractJobResult]
    records: list[dict[str, Any]]


def run_quickstart(
    store_root: str | Path,
    *,
    backbone: str = QUICKSTART_BACKBONE,
    max_epochs: int = QUICKSTART_MAX_EPOCHS,
    device: str = "auto",
    tasks: tuple[str, ...] | None = None,
    num_images: dict[str, int] | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Extract ``shapes`` and probe every task on it.

    Args:
        store_root: where stores, adapters and results go.
        backbone: registry name (random weights).
        max_epochs: epoch cap per probe.
        device: torch device for extraction and probing.
        tasks: tasks to run (default: every task ``shapes`` supports).
        num_images: images per split (default: the dataset's 256 train / 64 val).
        show_progress: progress bars and per-epoch lines.
        log: where progress lines go.
    """
    say = log or print
    extracted = {}
    for split in ("train", "val"):
        options = {"num_images": num_images[split]} if num_images and split in num_images else {}
        extracted[split] = run_extract(backbone=backbone, dataset="shapes", split=split, store_root=store_root,
                                       weights="random", device=device, dataset_options=options,
                                       show_progress=show_progress)
        say(f"{split}: features {extracted[split].features.path}")
    kinds = extracted["train"].targets.spec.kinds
    chosen = tasks or tuple(t for t in TASK_ORDER if t in tasks_for_targets(kinds))
    records = []
    for task in chosen:
        say(f"probe: {task}")
        result = train_probe(extracted["train"].features.path, ProbeConfig(task=task, max_epochs=max_epochs),
                             eval_features=extracted["val"].features.path, device=device,
                             show_progress=show_progress, log=say if show_progress else None)
        records.append(result.record)
    return QuickstartResult(extracted=extracted, records=records)


#: "Clearly above the trivial predictor": a percent metric by this many points, an error this much lower.
POINTS_ABOVE, ERROR_BELOW = 1.0, 0.95


def against_trivial(records: list[dict[str, Any]]) -> str:
    """One line on what the table shows: the tasks whose primary metric is clearly better than the
    trivial predictor's and those where it is not (a tiny backbone at random initialisation knows
    little of some tasks; the job shows the pipeline at work, not a backbone worth measuring)."""
    above, level = [], []
    for r in records:
        value, trivial = r["primary_value"], r["trivial"].get(r["primary_metric"])
        if trivial is None:
            continue
        better = value >= trivial + POINTS_ABOVE if r["higher_is_better"] else value <= trivial * ERROR_BELOW
        (above if better else level).append(r["task"])
    backbone = records[0]["backbone"] if records else "the backbone"
    line = f"{backbone} at random initialisation: MAXA is clearly above the trivial predictor on " \
           f"{', '.join(above) or 'no task'}"
    if level:
        line += (f"; not on {', '.join(level)} (a tiny random backbone carries little of them; more epochs help "
                 "some: --max-epochs)")
    return line + ". Real backbones and data: README, 'Real use'."
