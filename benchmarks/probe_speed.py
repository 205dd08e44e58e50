"""Probe training from a store vs. with the live backbone in the loop (run by hand).

Both paths train the same MAXA adapter on the same images, batch size and number of epochs:

* ``store``: features read from the feature store, held in memory (what ``maxa probe`` does when
  they fit);
* ``stream``: the same store streamed batch by batch (``ProbeData(in_memory=False)``: what
  ``maxa probe`` does when they do not fit), page cache warm;
* ``live``:  the frozen backbone runs on every batch (images decoded and resized once, in memory,
  so the live path is not charged for decoding), then the same adapter step.

Each path runs in its own subprocess so its peak memory (max RSS) is its own. The one-off
extraction that fills the store is timed too, with the break-even number of epochs.

    python benchmarks/probe_speed.py --backbone random_b16 --images 48 --epochs 2
    python benchmarks/probe_speed.py --paths store stream --epochs 3   # streamed vs in memory only
    python benchmarks/probe_speed.py --paths store stream --images 80 --epochs 5 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco_mini"


def _adapter_and_task(task_name: str, variant: str, data, tspec):
    from probe.tasks import TargetInfo, create_task
    from probe.train import ProbeConfig, build_model

    task = create_task(task_name, TargetInfo(num_classes=tspec.num_classes, ignore_index=tspec.ignore_index))
    model, _ = build_model(ProbeConfig(task=task_name, variant=variant), task, data.in_channels, data.grids)
    return task, model


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not ``getrusage``: Linux keeps ru_maxrss across fork + exec, so a child
    would report the parent's peak (here: the extraction's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_path(args) -> dict:
    from extract.datasets import create_dataset
    from probe.data import ProbeData
    from store.reader import open_features, open_targets

    torch.manual_seed(0)
    fs, ts = open_features(args.features), open_targets(args.targets)
    data = ProbeData(fs, ts, [args.task], device="cpu", in_memory=False if args.path == "stream" else None)
    task, model = _adapter_and_task(args.task, args.variant, data, ts.spec)
    from probe import fused

    fused.extension()  # a one-off per process, like loading the backbone: not part of an epoch (as in train_probe)
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    out_size = tuple(ts.spec.size)
    backbone = None
    pixels = None
    if args.path == "live":
        from extract.backbones import load_backbone
        from extract.images import BackboneImages

        backbone = load_backbone(args.backbone, weights="random", device="cpu")
        reader = create_dataset("coco", COCO, "train")
        images = BackboneImages(reader, backbone.input_size, backbone.mean, backbone.std, backbone.interpolation)
        pixels = torch.stack([images[i]["pixels"] for i in range(len(fs))])
    epoch_times = []
    for epoch in range(args.epochs):
        gen = torch.Generator().manual_seed(epoch)
        t0 = time.perf_counter()
        for idx, feats, batch in data.batches(args.batch_size, shuffle=True, generator=gen, reuse_buffers=True):
            if backbone is not None:  # recompute the features with the frozen backbone
                with torch.inference_mode():
                    live = backbone.forward(pixels[torch.from_numpy(idx)])
                feats = [live[name].reshape(len(idx), -1, live[name].shape[-1]).clone() for name in backbone.layer_names]
            loss = task.loss(model(feats, data.token_pos, out_size), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_times.append(time.perf_counter() - t0)
    return {"path": args.path, "in_memory": data.in_memory, "epoch_seconds": epoch_times, "median_epoch_s": float(np.median(epoch_times)),
            "peak_rss_mb": _peak_rss_mb(), "images": len(fs),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="random_b16")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--task", default="boundaries")
    p.add_argument("--variant", default="base", help="adapter variant (no-sigma: both attention layers unmasked)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "probe_speed.json"))
    p.add_argument("--paths", nargs="+", choices=["store", "stream", "live"], default=["store", "stream", "live"],
                   help="paths to compare (each run --rounds times, alternated, except live: once)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each of store and stream, alternated (an epoch here is short: more rounds, steadier medians)")
    p.add_argument("--path", choices=["store", "stream", "live"], help=argparse.SUPPRESS)
    p.add_argument("--features", help=argparse.SUPPRESS)
    p.add_argument("--targets", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        print(json.dumps(run_path(args)))
        return

    from extract.jobs import run_extract

    root = tempfile.mkdtemp(prefix="maxa-probe-speed-")
    t0 = time.perf_counter()
    job = run_extract(backbone=args.backbone, dataset="coco", root=COCO, split="train", store_root=root,
                      weights="random", device="cpu", limit=args.images, show_progress=False)
    extract_s = time.perf_counter() - t0
    results = {}
    order = [p for p in args.paths if p != "live"]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    # several rounds, alternated: the median tolerates a noisy neighbour
    order = order + (["live"] if "live" in args.paths else []) + order * (args.rounds - 1)
    for path in order:
        cmd = [sys.executable, __file__, "--path", path, "--features", job.features.path,
               "--targets", job.targets.path, "--backbone", args.backbone, "--task", args.task, "--variant", args.variant,
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout.splitlines()[-1])
        results.setdefault(path, []).append(out)
    med = {k: float(np.median([t for r in v for t in r["epoch_seconds"]])) for k, v in results.items()}
    # the same without each run's first epoch (allocator and oneDNN warm-up), when there are later ones
    later = {k: [t for r in v for t in r["epoch_seconds"][1:]] for k, v in results.items()}
    summary = {
        "backbone": args.backbone, "task": args.task, "variant": args.variant, "images": args.images, "batch_size": args.batch_size,
        "epochs": args.epochs, "rounds": args.rounds, "device": "cpu", "threads": next(iter(results.values()))[0]["threads"],
        **{f"epoch_s_{k}": v for k, v in med.items()},
    }
    if "store" in med and "live" in med:
        summary["speedup"] = med["live"] / med["store"]
        if later["live"] and later["store"]:
            summary["speedup_after_first_epoch"] = float(np.median(later["live"]) / np.median(later["store"]))
        summary["extract_once_s"] = extract_s
        summary["break_even_epochs"] = extract_s / max(med["live"] - med["store"], 1e-9)
    if "store" in med and "stream" in med:
        summary["stream_over_memory"] = med["stream"] / med["store"]
        if later["stream"] and later["store"]:
            summary["stream_over_memory_after_first_epoch"] = float(np.median(later["stream"]) / np.median(later["store"]))
    for k, v in results.items():
        summary[f"peak_rss_mb_{k}"] = max(r["peak_rss_mb"] for r in v)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    for k, v in summary.items():
        print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
