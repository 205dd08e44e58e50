"""Inference speed of backbones and of the MAXA adapter (paper §4.5, Fig. 6 and Appendix A.4 / Fig. 8).

The paper times "ten batches with eight samples each in inference mode" and reports each backbone's runtime
as a factor of the ViT-B/16 at 224 px (the fastest model; SigLIP-SO takes 26x as long). Fig. 8 adds the
adapter's own runtime as light bars on top.

:func:`speed_benchmark` does the same on one machine in one run:

* the reference (default ``imagenet_b16``: ViT-B/16 at 224) is always measured in the same run, first, so
  ratios compare like with like (same device, threads, dtype, batch size);
* per backbone: build it (with its pretrained weights by default, as ``maxa extract``; ``random``
  times the same model with nothing to download — runtime does not depend on the weights), run
  ``warmup`` untimed batches, then time ``batches`` batches of ``batch_size`` random images at the backbone's
  native input size through :meth:`LoadedBackbone.forward` (the feature layers the adapter reads) under
  ``torch.inference_mode()``; on CUDA with bf16 autocast and ``torch.cuda.synchronize()`` around each batch;
* ``seconds_per_batch`` is the median over the timed batches, ``relative_to_vitb16`` = that / the
  reference's (exactly 1.0 for the reference itself). The reference is timed again after the others; its
  time pools both passes, and ``reference_drift`` (second / first) shows how steady the machine was;
* the adapter (``base`` variant, ``D_out = task_dim``, 224x224 output) is timed the same way on random
  features of that backbone's grids and channels: ``adapter_seconds_per_batch`` and ``adapter_relative`` =
  adapter time / the *reference backbone's* time (the unit of Fig. 8, so the light bar stacks on the dark one).

Each row is also a results-table record (``task="speed"``), read by ``pipelines.report``.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from extract.backbones import LoadedBackbone, get_backbone_entry, load_backbone
from runtime.devices import device_name, resolve_device
from runtime.provenance import tool_version
from pipelines.defaults import SPEED_BATCH_SIZE, SPEED_BATCHES, SPEED_REFERENCE
from probe.adapter import MaxaAdapter, count_parameters
from store.results import append_result
from probe.variants import variant_config
from runtime.errors import MaxaError

__all__ = ["DEFAULT_REFERENCE", "ADAPTER_OUT_SIZE", "speed_benchmark", "speed_record", "write_speed_records",
           "device_name"]

DEFAULT_REFERENCE = SPEED_REFERENCE
ADAPTER_OUT_SIZE = (224, 224)
_SEED = 0


def _load_avg() -> float | None:
    """1-minute load average at the start (other processes on the machine distort CPU timings)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, batches: int) -> list[float]:
    """Seconds per call of ``fn`` for ``batches`` calls after ``warmup`` untimed ones."""
    times = []
    with torch.inference_mode(), _autocast(device):
        for _ in range(warmup):
            fn()
        _sync(device)
        for _ in range(batches):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def _adapter_inputs(backbone: LoadedBackbone, batch_size: int, device: torch.device, gen: torch.Generator):
    layers = backbone.layer_names
    feats = [torch.randn(batch_size, g[0] * g[1], backbone.channels[n], generator=gen).to(device)
             for n, g in ((n, backbone.grids[n]) for n in layers)]
    pos = [torch.from_numpy(backbone.token_centres(n).reshape(-1, 2)).to(device) for n in layers]
    return feats, pos


def _measure(name: str, weights: str, device: torch.device, batches: int, batch_size: int, warmup: int,
             task_dim: int) -> dict[str, Any]:
    t_start = time.perf_counter()
    backbone = load_backbone(name, weights=weights, device=device)
    build_s = time.perf_counter() - t_start
    gen = torch.Generator().manual_seed(_SEED)
    H, W = backbone.input_size
    images = torch.randn(batch_size, 3, H, W, generator=gen).to(device)
    t0 = time.perf_counter()
    backbone_times = _time(lambda: backbone.forward(images), device, warmup, batches)
    backbone_s = time.perf_counter() - t0

    layers = backbone.layer_names
    cfg = variant_config("base", in_channels=tuple(backbone.channels[n] for n in layers),
                         grids=tuple(backbone.grids[n] for n in layers), out_channels=task_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        adapter = MaxaAdapter(cfg).to(device).eval()
    feats, pos = _adapter_inputs(backbone, batch_size, device, gen)
    t0 = time.perf_counter()
    adapter_times = _time(lambda: adapter(feats, pos, ADAPTER_OUT_SIZE), device, warmup, batches)
    adapter_s = time.perf_counter() - t0

    row = {
        "backbone": backbone.entry.name, "weights": backbone.weights_id, "input_size": (H, W),
        "grids": {n: list(g) for n, g in backbone.grids.items()}, "channels": dict(backbone.channels),
        "backbone_params": int(backbone.num_params), "p_learn": int(count_parameters(adapter)),
        "adapter_config": cfg.to_dict(),
        "seconds_per_batch": statistics.median(backbone_times), "batch_s": backbone_times,
        "adapter_seconds_per_batch": statistics.median(adapter_times), "adapter_batch_s": adapter_times,
        "timings": {"build_s": build_s, "backbone_s": backbone_s, "adapter_s": adapter_s,
                    "total_s": time.perf_counter() - t_start},
    }
    del backbone, adapter, images, feats, pos
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def speed_benchmark(
    backbones: list[str],
    reference: str = DEFAULT_REFERENCE,
    batches: int = SPEED_BATCHES,
    batch_size: int = SPEED_BATCH_SIZE,
    device: str = "auto",
    weights: str = "pretrained",
    task_dim: int = 1,
    warmup: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time each backbone and the MAXA adapter on its features, relative to ``reference`` (same run).

    Returns one row per backbone, the reference first (added when not among ``backbones``; flagged
    ``is_reference``). Row keys: backbone, weights, input_size, grids, channels, backbone_params, p_learn,
    seconds_per_batch (median), images_per_second, relative_to_vitb16, adapter_seconds_per_batch,
    adapter_relative, batch_s / adapter_batch_s (every timed batch), timings, batches, batch_size, device,
    device_name, torch_threads, dtype, load_avg_1m, reference, is_reference, reference_drift. ``warmup``
    defaults to 1 batch on CPU, 2 on CUDA.

    With other backbones the reference is timed twice, first and last: its ``seconds_per_batch`` is the median
    of both passes (2 x ``batches`` batches) and ``reference_drift`` = second pass / first pass; far from 1 means
    the machine's speed changed during the run (other load, clock throttling) and the ratios are noisy.

    Raises:
        UnknownNameError: an unknown backbone name (checked before anything is built).
        MaxaError: bad counts or device.
    """
    if batches < 1 or batch_size < 1 or task_dim < 1:
        raise MaxaError(f"batches ({batches}), batch size ({batch_size}) and task dim ({task_dim}) must be >= 1.")
    names = [b.strip() for b in backbones if b and b.strip()]
    if not names:
        raise MaxaError("no backbone to benchmark: give comma-separated names, e.g. --backbones dinov2_b14,siglip_384.")
    entries = [get_backbone_entry(n) for n in [reference, *names]]  # unknown names fail here, before any build
    ref_name = entries[0].name
    order = [ref_name] + [e.name for e in entries[1:] if e.name != ref_name]
    order = list(dict.fromkeys(order))  # a name given twice is measured once
    dev = resolve_device(device)
    if warmup is None:
        warmup = 2 if dev.type == "cuda" else 1
    common = {"batches": batches, "batch_size": batch_size, "warmup": warmup, "device": str(dev),
              "device_name": device_name(dev), "torch_threads": torch.get_num_threads(),
              "dtype": "bfloat16 (autocast)" if dev.type == "cuda" else "float32", "reference": ref_name,
              "task_dim": task_dim, "load_avg_1m": _load_avg()}
    rows = []
    for i, name in enumerate(order):
        if log:
            log(f"timing {name} ({i + 1}/{len(order)}) on {common['device_name']}: "
                f"{warmup} warm-up + {batches} batches of {batch_size}")
        row = _measure(name, weights, dev, batches, batch_size, warmup, task_dim)
        row.update(common)
        row["is_reference"] = name == ref_name
        rows.append(row)
    ref = rows[0]
    ref["reference_drift"] = 1.0
    if len(rows) > 1:  # time the reference again at the end: pooled median, and drift as a noise indicator
        if log:
            log(f"timing {ref_name} again (reference, after the others)")
        again = _measure(ref_name, weights, dev, batches, batch_size, warmup, task_dim)
        first = ref["seconds_per_batch"]
        ref["reference_drift"] = again["seconds_per_batch"] / first
        for key in ("batch_s", "adapter_batch_s"):
            ref[key] = ref[key] + again[key]
        ref["seconds_per_batch"] = statistics.median(ref["batch_s"])
        ref["adapter_seconds_per_batch"] = statistics.median(ref["adapter_batch_s"])
        ref["timings"] = {k: v + again["timings"][k] for k, v in ref["timings"].items()}
    ref_s = ref["seconds_per_batch"]
    for row in rows:
        row["reference_drift"] = ref["reference_drift"]
        row["images_per_second"] = batch_size / row["seconds_per_batch"]
        row["relative_to_vitb16"] = row["seconds_per_batch"] / ref_s
        row["adapter_relative"] = row["adapter_seconds_per_batch"] / ref_s
    return rows


def speed_record(row: dict[str, Any]) -> dict[str, Any]:
    """The results-table record of one :func:`speed_benchmark` row (keys as probe records where they apply)."""
    H, W = row["input_size"]
    return {
        "task": "speed", "variant": "base", "head": "maxa", "seed": 0,
        "backbone": row["backbone"], "weights": row["weights"], "dataset": "-",
        "primary_metric": "relative_to_vitb16", "primary_value": float(row["relative_to_vitb16"]),
        "higher_is_better": False,
        "metrics": {
            "seconds_per_batch": row["seconds_per_batch"], "images_per_second": row["images_per_second"],
            "relative_to_vitb16": row["relative_to_vitb16"],
            "adapter_seconds_per_batch": row["adapter_seconds_per_batch"],
            "adapter_relative": row["adapter_relative"],
            "batch_size": row["batch_size"], "batches": row["batches"], "input_size": H,  # height; config has [H, W]
        },
        "trivial": {},
        "p_learn": int(row["p_learn"]),
        "timings": {**row["timings"], "batch_s": row["batch_s"], "adapter_batch_s": row["adapter_batch_s"]},
        "config": {"device": row["device"], "torch_threads": row["torch_threads"], "dtype": row["dtype"],
                   "warmup": row["warmup"], "reference_drift": row["reference_drift"],
                   "load_avg_1m": row["load_avg_1m"], "reference": row["reference"], "input_size": [H, W],
                   "grids": row["grids"], "channels": row["channels"], "backbone_params": row["backbone_params"],
                   "adapter": row["adapter_config"], "adapter_out_size": list(ADAPTER_OUT_SIZE)},
        "device": row["device_name"],
        "tool_version": tool_version(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_speed_records(root: str | Path, rows: list[dict[str, Any]]) -> list[str]:
    """Append one ``task="speed"`` record per row under ``root/results``; returns the written paths."""
    return [append_result(root, speed_record(r)) for r in rows]
