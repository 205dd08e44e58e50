"""The jbu head (image-guided joint bilateral upsampling, then a linear probe) against MAXA on one store (run by hand).

Both heads train on the same feature and target store (extracted once here: COCO photos from
``../shared/data/coco_mini``, a timm ViT at random initialisation, 224² targets with images), the
same task, batch size and steps. Each head runs in its own subprocess, so its memory is its own:
the peak RSS of the training steps above the RSS with the data loaded (Linux: the peak is reset
through ``/proc/self/clear_refs`` before the first step), and the whole process's peak. Step time
is one optimiser step (forward, backward, Adam) per batch, median over the steps after the first.

    python benchmarks/jbu_vs_maxa.py --images 32 --steps 12 --batch 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco_mini"


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_head(args) -> dict:
    import numpy as np
    import torch

    from probe import fused
    from probe.adapter import count_parameters
    from probe.data import ProbeData
    from probe.heads import head_inputs, head_needs_image
    from probe.tasks import TargetInfo, create_task
    from probe.train import ProbeConfig, build_model
    from store.reader import open_features, open_targets

    torch.manual_seed(0)
    fs, ts = open_features(args.features), open_targets(args.targets)
    task = create_task(args.task, TargetInfo(num_classes=ts.spec.num_classes, ignore_index=ts.spec.ignore_index))
    needs = list(task.stored_needs()) + (["input_image"] if head_needs_image(args.head) else [])
    data = ProbeData(fs, ts, needs, device="cpu", in_memory=True)
    out_size = tuple(ts.spec.size)
    model, _ = build_model(ProbeConfig(task=args.task, head=args.head), task, data.in_channels, data.grids, out_size)
    if args.head == "maxa":
        fused.extension()  # built once per machine; not part of a step
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    rss_before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    times = []
    gen = torch.Generator().manual_seed(0)
    while len(times) < args.steps:
        for _, feats, batch in data.batches(args.batch, shuffle=True, generator=gen):
            if len(times) >= args.steps:
                break
            t0 = time.perf_counter()
            loss = task.loss(model(feats, data.token_pos, out_size, **head_inputs(model, batch)), batch, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return {"head": args.head, "p_learn": count_parameters(model), "step_s": float(np.median(times[1:])),
            "step_s_all": times, "rss_before_mb": rss_before, "train_peak_above_mb": _rss_mb("VmHWM") - rss_before,
            "process_peak_mb": _rss_mb("VmPeak"), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="timm:vit_small_patch16_224")
    ap.add_argument("--task", default="boundaries")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="runs per head, alternated")
    ap.add_argument("--head", help=argparse.SUPPRESS)
    ap.add_argument("--features", help=argparse.SUPPRESS)
    ap.add_argument("--targets", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.head:
        print(json.dumps(run_head(args)))
        return
    from extract.jobs import run_extract

    with tempfile.TemporaryDirectory() as tmp:
        job = run_extract(backbone=args.backbone, dataset="coco", root=COCO, split="train", store_root=tmp,
                          weights="random", device="cpu", limit=args.images, show_progress=False)
        rows = []
        for r in range(args.rounds):
            for head in ("maxa", "jbu"):
                cmd = [sys.executable, __file__, "--head", head, "--features", job.features.path,
                       "--targets", job.targets.path, "--task", args.task, "--steps", str(args.steps),
                       "--batch", str(args.batch)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"round {r + 1} {head:>5}: P_learn {row['p_learn']:>7,}  step {row['step_s'] * 1e3:7.1f} ms "
                      f"(batch {args.batch})  train peak +{row['train_peak_above_mb']:7.1f} MB over "
                      f"{row['rss_before_mb']:.0f} MB", flush=True)
        for head in ("maxa", "jbu"):
            mine = [r for r in rows if r["head"] == head]
            print(f"{head}: median step {1e3 * sorted(r['step_s'] for r in mine)[len(mine) // 2]:.1f} ms, "
                  f"train peak +{max(r['train_peak_above_mb'] for r in mine):.0f} MB, P_learn {mine[0]['p_learn']:,}")


if __name__ == "__main__":
    main()
