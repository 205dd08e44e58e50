"""Every applicable task on the real data in ../shared/data against the trivial predictor (run by hand).

Extracts coco_mini (train → val) and camvid_small (train → val) with a small backbone at random
initialisation (no pretrained weights here), trains the MAXA adapter on every task each dataset
supports, and prints a markdown table: backbone, dataset, task, metric, MAXA, trivial.

    python benchmarks/real_data_table.py --backbone timm:vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from extract.jobs import run_extract
from probe.train import ProbeConfig, train_probe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

#: (reader, data, options, the paper's tasks on that data, extra tasks the reader also supports).
#: COCO semseg here is 80 thing classes + background from the instance masks: not a task of the paper
#: (which segments COCO-Stuff, whose stuff maps coco_mini lacks), shown for completeness.
JOBS = [
    ("coco", DATA / "coco_mini", {}, ("boundaries", "distance", "instances"), ("semseg",)),
    ("segfolder", DATA / "camvid_small", {"num_classes": 11, "ignore_index": 11}, ("semseg",), ()),
]
#: Which metrics to show per task (primary first) and whether higher is better.
SHOW = {
    "boundaries": [("iou", True), ("ce", False)],
    "distance": [("mse", False)],
    "instances": [("ari", True)],
    "semseg": [("miou", True), ("pixel_acc", True), ("ce", False)],
    "depth": [("mse", False)],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="timm:vit_small_patch16_224")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (e.g. 2 for a ResNet's stride-8 stage)")
    p.add_argument("--tasks", default=None, help="only these tasks (comma-separated)")
    # ~72 training images: small batches and a long cap give the adapter enough optimisation steps
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store-root", default=None)
    p.add_argument("--min-large", type=int, default=3, help="instances: large objects an eval image needs")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "real_data_table.json"))
    args = p.parse_args()
    root = args.store_root or tempfile.mkdtemp(prefix="maxa-real-")
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    only = set(args.tasks.split(",")) if args.tasks else None
    rows = []
    for dataset, data_root, options, paper_tasks, extra_tasks in JOBS:
        paths = {}
        for split in ("train", "val"):
            job = run_extract(backbone=args.backbone, dataset=dataset, root=data_root, split=split, store_root=root,
                              weights="random", layers=layers, device="cpu", dataset_options=options,
                              show_progress=False)
            paths[split] = job.features.path
        for task in paper_tasks + extra_tasks:
            if only and task not in only:
                continue
            t0 = time.perf_counter()
            opts = {"min_large": args.min_large} if task == "instances" else {}
            config = ProbeConfig(task=task, max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                                 seed=args.seed, task_options=opts)
            r = train_probe(paths["train"], config, eval_features=paths["val"], device="cpu", show_progress=False)
            for metric, higher in SHOW[task]:
                ours, trivial = r.metrics.get(metric), r.record["trivial"].get(metric)
                better = None if ours is None or trivial is None else (ours > trivial if higher else ours < trivial)
                rows.append({"backbone": args.backbone, "dataset": data_root.name, "task": task, "metric": metric,
                             "paper_task": task in paper_tasks,
                             "higher_is_better": higher, "maxa": ours, "trivial": trivial, "beats_trivial": better,
                             "epochs": r.record["epochs"], "eval_images": r.metrics.get("n_eval_images", r.record["eval_images"]),
                             "seconds": time.perf_counter() - t0})
            for row in rows[-len(SHOW[task]):]:
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| backbone (random init) | data | task | metric | MAXA | trivial | beats trivial |")
    print("|---|---|---|---|---|---|---|")
    extra = " (not a paper task)"
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        print(f"| {r['backbone']} | {r['dataset']} | {r['task']}{'' if r['paper_task'] else extra} | {r['metric']} {arrow} | {r['maxa']:.4g} | "
              f"{r['trivial']:.4g} | {'yes' if r['beats_trivial'] else 'NO'} |")


if __name__ == "__main__":
    main()
