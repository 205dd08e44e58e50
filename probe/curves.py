"""A probe run's learning curves as it trains: ``curves.jsonl`` in the run folder, and TensorBoard.

``curves.jsonl`` holds one JSON object per finished epoch (``epoch``, ``train_loss``, the
selection value — ``val_loss`` or ``val_<metric>`` —, ``seconds``, ``best``), then one
``{"eval": {...}}`` line with the eval metrics when the run ends. It is rewritten whole after
every epoch (an atomic replace, also on object storage), so ``tail -F`` on a cluster shows a run's
progress and a killed run keeps the epochs it finished. With ``--tensorboard DIR`` the same
scalars go to ``DIR/<run name>`` (needs the ``tensorboard`` package: ``pip install tensorboard``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from runtime.errors import MaxaError
from store.location import Location
from store.results import write_run_files

__all__ = ["CURVES_FILE", "RunCurves", "read_curves"]

CURVES_FILE = "curves.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: those become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunCurves:
    """Writes a run's curves while it trains (see the module's docstring)."""

    def __init__(self, run_dir: Location, tensorboard: str | Path | None = None, *, write: bool = True) -> None:
        self.run_dir = run_dir
        self.write = write  # False: keep the lines (and TensorBoard), write no curves.jsonl
        self.lines: list[str] = []
        self._tb: Any = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MaxaError("--tensorboard needs the tensorboard package: pip install tensorboard "
                                "(or leave out --tensorboard; the curves are in the run's curves.jsonl).") from None
            self._tb = SummaryWriter(log_dir=str(Path(tensorboard) / run_dir.name))

    def epoch(self, entry: dict[str, Any], best: bool) -> None:
        """One finished epoch: ``entry`` holds ``epoch`` (from 0) and its values."""
        row = {**_clean(dict(entry)), "epoch": int(entry["epoch"]) + 1, "best": bool(best)}
        self._write(row)
        if self._tb is not None:
            for k, v in entry.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}" if k in ("train_loss", "seconds") else f"select/{k}",
                                        float(v), row["epoch"])
            self._tb.flush()

    def final(self, metrics: dict[str, float], epoch: int) -> None:
        """The eval metrics of the selected epoch (``epoch``, from 1)."""
        self._write({"eval": _clean(dict(metrics)), "epoch": int(epoch)})
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"eval/{k}", float(v), epoch)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write(self, row: dict[str, Any]) -> None:
        self.lines.append(json.dumps(row, sort_keys=True))
        if self.write:
            write_run_files(self.run_dir, {CURVES_FILE: ("\n".join(self.lines) + "\n").encode()})


def read_curves(run_dir: Location) -> list[dict[str, Any]]:
    """The rows of a run's ``curves.jsonl`` (empty when there is none)."""
    data = (run_dir / CURVES_FILE).read_bytes()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data else []
