"""The ablation (paper Table 4) on the built-in shapes stores, every variant incl. paper-budget (run by hand).

    maxa quickstart --store-root /tmp/qs            # extracts shapes with test_vit
    python benchmarks/ablation_shapes.py /tmp/qs --epochs 6
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from probe.train import ProbeConfig, train_probe
from probe.variants import VARIANTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store_root")
    p.add_argument("--backbone", default="test_vit")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tasks", default="instances,semseg,depth")
    args = p.parse_args()
    train = glob.glob(str(Path(args.store_root) / "features" / args.backbone / "shapes-train-*.zarr"))[0]
    print("| variant | " + " | ".join(args.tasks.split(",")) + " | P_learn (semseg) |")
    print("|---|" + "---|" * (len(args.tasks.split(",")) + 1))
    for variant in VARIANTS:
        cells, p_learn = [], 0
        for task in args.tasks.split(","):
            r = train_probe(train, ProbeConfig(task=task, variant=variant, max_epochs=args.epochs), device="cpu",
                            show_progress=False)
            cells.append(f"{r.record['primary_metric']} {r.record['primary_value']:.4g}")
            if task == "semseg":
                p_learn = r.record["p_learn"]
        print(f"| {variant} | " + " | ".join(cells) + f" | {p_learn:,} |", flush=True)


if __name__ == "__main__":
    main()
