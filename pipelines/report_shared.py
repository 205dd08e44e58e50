"""What ``maxa report`` and its figures (:mod:`pipelines.plots`) share: the task and metric
vocabulary, the :class:`Figure` record and the report's defaults.

It lives apart so that neither imports the other for it: the report draws its figures with
``plots``, and ``plots`` must not import the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_FEATURE_IMAGES", "PROBE_TASKS", "TASK_LABELS", "METRICS", "UNKNOWN_METRIC", "TASK_METRICS",
           "Figure", "FIGURE_SECTIONS", "metric_decimals", "primary_metric"]

#: Images per backbone in the feature PCA figure (``maxa report --max-feature-images``).
DEFAULT_FEATURE_IMAGES = 4

PROBE_TASKS = ("instances", "boundaries", "distance", "semseg", "depth")
TASK_LABELS = {"instances": "Inst. Disc.", "boundaries": "Boundaries", "distance": "Distance Transform",
               "semseg": "Semseg", "depth": "Depth"}
#: metric → (label, higher is better, decimals)
METRICS = {"ari": ("ARI", True, 1), "iou": ("IoU", True, 1), "miou": ("IoU", True, 1), "ce": ("CE", False, 4),
           "mse": ("MSE", False, 4), "pixel_acc": ("Acc", True, 1), "rmse": ("RMSE", False, 4),
           "absrel": ("AbsRel", False, 4), "delta1": ("δ1", True, 3)}
#: How a metric not in :data:`METRICS` is shown: no label, direction unknown, 4 decimals.
UNKNOWN_METRIC = ("", None, 4)
TASK_METRICS = {"instances": ("ari",), "boundaries": ("ce", "iou"), "distance": ("mse",),
                "semseg": ("ce", "miou"), "depth": ("mse",)}

#: The report's figure sections, in order: (``Figure.section``, heading).
FIGURE_SECTIONS = (("plots", "Plots"), ("pca", "Feature PCA (first three components as RGB)"),
                   ("predictions", "Predictions at several output resolutions"))


def relative_to_vitb16(r: dict[str, Any]) -> float | None:
    """A speed record's time relative to ViT-B/16 at 224 px, or ``None`` when it was timed against
    another reference (``maxa bench speed --reference``): its ratio is then in other units, and is
    never shown as one to ViT-B/16."""
    from pipelines.defaults import SPEED_REFERENCE

    reference = (r.get("config") or {}).get("reference", SPEED_REFERENCE)
    v = (r.get("metrics") or {}).get("relative_to_vitb16")
    return None if v is None or reference != SPEED_REFERENCE else float(v)


def other_references(speed: list[dict[str, Any]]) -> list[str]:
    """The references other than ViT-B/16 that speed records were timed against."""
    from pipelines.defaults import SPEED_REFERENCE

    return sorted({str((r.get("config") or {}).get("reference")) for r in speed
                   if (r.get("config") or {}).get("reference", SPEED_REFERENCE) != SPEED_REFERENCE})


def metric_decimals(metric: str) -> int:
    """Decimals a value of ``metric`` is shown with."""
    return METRICS.get(metric, UNKNOWN_METRIC)[2]


def primary_metric(r: dict[str, Any]) -> str:
    """The metric record ``r`` is ranked by: the one it names, else its task's last."""
    return r.get("primary_metric") or TASK_METRICS[r["task"]][-1]


@dataclass
class Figure:
    """One image of the report: ``png`` bytes, saved as ``img/<name>``."""

    name: str
    png: bytes
    caption: str
    section: str  # plots | pca | predictions
    group: str = ""  # figures of one group are shown in one row (predictions of one run)
