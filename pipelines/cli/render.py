"""How ``maxa`` prints: the two consoles and the rich tables and number formats of the commands'
output, kept apart from the commands so each reads as what it does rather than how it looks."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

# Piped output gets a wide, stable layout instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _human_bytes(n: int | None) -> str:
    if n is None or n < 0:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _params(n: int) -> str:
    """A parameter count as the paper writes it (0.184 M), or exact when that would read 0.000 M."""
    return f"{n / 1e6:.3f} M" if n >= 1000 else f"{n:,}"


def _results_table(records: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("backbone", "dataset", "task", "variant", "head", "seed", "metrics", "trivial", "P_learn", "epochs", "time"):
        table.add_column(col, overflow="fold")
    for r in records:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items() if not k.startswith("n_"))
        trivial = "  ".join(f"{k} {v:.4g}" for k, v in r["trivial"].items() if not k.startswith("n_"))
        table.add_row(r["backbone"], r["dataset"], r["task"], r["variant"], r["head"], str(r["seed"]), metrics,
                      trivial, _params(r["p_learn"]), str(r["epochs"]), f"{r['timings']['total_s']:.1f} s")
    return table


def _record_lines_table(records: list[dict[str, Any]], title: str):
    """``maxa results``: one line per record, with its primary metric and the trivial predictor's."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("finished", "backbone", "dataset", "task", "variant", "head", "seed", "metric", "value", "trivial"):
        table.add_column(col, overflow="fold")
    for r in records:
        name = r.get("primary_metric")
        value = (r.get("metrics") or {}).get(name, r.get("primary_value")) if name else None
        trivial = (r.get("trivial") or {}).get(name) if name else None
        when = r.get("finished")
        table.add_row(when.astimezone().strftime("%Y-%m-%d %H:%M") if when else "-",
                      *(str(r.get(k, "-")) for k in ("backbone", "dataset", "task", "variant", "head", "seed")),
                      name or "-", "-" if value is None else f"{value:.4g}", "-" if trivial is None else f"{trivial:.4g}")
    return table


def _backbones_table(rows: list[dict[str, Any]]):
    """``maxa backbones``: one row per registry entry."""
    from rich.table import Table

    table = Table(title="maxa backbones (any timm model also works as timm:NAME)")
    for col in ("name", "timm model", "input", "grid", "channels", "params (M)", "paper I/F", "weights"):
        table.add_column(col)
    for r in rows:
        paper = f"{r.get('paper_image_size') or '-'}/{r.get('paper_feature_size') or '-'}"
        many = len(r["grid"]) > 1  # name the layers only when there are several
        grids = "; ".join(f"{name + ' ' if many else ''}{g[0]}x{g[1]}" for name, g in r["grid"].items())
        chans = "; ".join(str(c) for c in r["channels"].values())
        table.add_row(r["name"], r["timm_name"], str(r["input_size"]), grids, chans,
                      f"{r['num_params'] / 1e6:.1f}", paper, str(r.get("weights", "")))
    return table


def _speed_table(rows: list[dict[str, Any]]):
    """``maxa bench speed``: one row per timed backbone (rows of ``speed_benchmark``)."""
    from rich.table import Table

    r0 = rows[0]
    table = Table(title=f"inference speed on {r0['device_name']} ({r0['device']}, {r0['dtype']}, "
                        f"{r0['torch_threads']} threads), {r0['batches']} batches x {r0['batch_size']} images, "
                        f"median per batch",
                  caption=f"relative = time / {r0['reference']} (same run, timed first and last: drift "
                          f"{r0['reference_drift']:.2f}); adapter = MAXA base, "
                          f"D_out {r0['task_dim']}, 224x224 output; adapter rel. in units of the reference "
                          "backbone's time. Weights: " + ", ".join(sorted({r['weights'] for r in rows})))
    from pipelines.defaults import SPEED_REFERENCE

    relative = "rel. ViT-B/16" if r0["reference"] == SPEED_REFERENCE else f"rel. {r0['reference']}"
    for col in ("backbone", "input", "grid", "params (M)", "s / batch", "img / s", relative,
                "adapter s / batch", "adapter rel.", "adapter P_learn"):
        table.add_column(col, overflow="fold")
    for r in rows:
        grid = "; ".join(f"{g[0]}x{g[1]}" for g in r["grids"].values())
        name = r["backbone"] + (" (ref)" if r["is_reference"] else "")
        table.add_row(name, f"{r['input_size'][0]}x{r['input_size'][1]}", grid, f"{r['backbone_params'] / 1e6:.1f}",
                      f"{r['seconds_per_batch']:.4f}", f"{r['images_per_second']:.2f}",
                      f"{r['relative_to_vitb16']:.2f}", f"{r['adapter_seconds_per_batch']:.4f}",
                      f"{r['adapter_relative']:.3f}", _params(r["p_learn"]))
    return table
