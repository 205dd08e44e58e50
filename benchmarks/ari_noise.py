"""How much the instance-discrimination ARI moves with the k-means seed, per estimator (run by hand).

Extracts ``../shared/data/coco_mini`` (80 train → 79 val) with a small backbone at random
initialisation (as ``real_data_table.py``), trains ONE instances adapter (same settings: batch 4,
at most 60 epochs, patience 10, ``min_large`` 3), computes its latents on the val store once, and
then scores those same latents with several k-means estimators, each under ``--seeds`` seeds
(``kmeans_seed`` = ``seed`` = s: the k-means seed and the pixel-subsample seed). Per estimator it
prints the mean ARI over seeds, its spread (max − min, std) and the k-means time per eval image
(about 65 min for the default settings and 10 seeds on one core of the 2-core build machine).

    python benchmarks/ari_noise.py --store-root /tmp/maxa-ari --out benchmarks/out/ari_noise.json

Estimators (``--settings``; names are ``<pixels>-n<n_init>[-<variant>]``):
    ``sub5000-nN``: a uniform subsample of 5,000 foreground pixels, ``KMeans(n_init=N)``.
    ``all-nN``: every evaluated foreground pixel, ``KMeans(n_init=N)``.
    ``…-random``: random initial centres instead of k-means++.
    ``…-avgR``: per image the mean ARI of R k-means runs (``kmeans_runs=R``: run r sees its own
        pixel subsample and ``random_state`` R·s + r).
    ``…-threads2``: k-means with two BLAS/OpenMP threads instead of one (same numbers, other time).
    ``sub5000-n3-kmseed`` / ``sub5000-n3-pxseed``: today's estimator with only the k-means seed /
    only the pixel-subsample seed varied (the other fixed at 0), to split the noise by source.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans

from extract.jobs import run_extract
from probe.data import ProbeData
from probe.predict import load_adapter
from probe.tasks import TargetInfo, create_task
from probe.tasks.instances import InstancesTask
from probe.train import ProbeConfig, train_probe
from store.catalogue import find_target_store, store_root_of
from store.reader import open_features, open_targets

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

DEFAULT_SETTINGS = (
    "sub5000-n3", "sub5000-n3-kmseed", "sub5000-n3-pxseed", "sub5000-n10", "sub5000-n50",
    "all-n1", "all-n3", "all-n10", "all-n20", "all-n10-random", "all-n1-threads2", "all-n3-avg4",
    "sub5000-n1", "sub5000-n1-avg16", "sub5000-n1-avg32", "sub5000-n1-avg64",
)
_NAME = re.compile(r"^(sub(?P<sub>\d+)|all)-n(?P<n>\d+)(?P<rest>(-[a-z0-9]+)*)$")


class _VariantTask(InstancesTask):
    """The instances task with a k-means variant the task itself does not offer."""

    def __init__(self, *args: Any, kmeans_init: str = "k-means++", threads: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kmeans_init, self._kmeans_threads = kmeans_init, threads

    def _cluster(self, x: np.ndarray, k: int, random_state: int) -> np.ndarray:
        km = KMeans(n_clusters=k, n_init=self.kmeans_n_init, init=self.kmeans_init, random_state=random_state)
        return km.fit_predict(x)


def parse_setting(name: str) -> dict[str, Any]:
    m = _NAME.match(name)
    if not m:
        raise SystemExit(f"bad setting {name!r}: want <sub5000|all>-n<N>[-random][-avgR][-threads2][-kmseed|-pxseed]")
    s = {"max_pixels": int(m["sub"]) if m["sub"] else None, "kmeans_n_init": int(m["n"]),
         "init": "k-means++", "runs": 1, "threads": 1, "vary": "both"}
    for part in filter(None, m["rest"].split("-")):
        if part == "random":
            s["init"] = "random"
        elif part.startswith("avg"):
            s["runs"] = int(part[3:])
        elif part.startswith("threads"):
            s["threads"] = int(part[7:])
        elif part in ("kmseed", "pxseed"):
            s["vary"] = part
        else:
            raise SystemExit(f"bad setting {name!r}: unknown part {part!r}")
    return s


def make_task(setting: dict[str, Any], seed: int, base: dict[str, Any]) -> InstancesTask:
    km_seed = 0 if setting["vary"] == "pxseed" else seed
    px_seed = 0 if setting["vary"] == "kmseed" else seed
    opts = {**base, "max_pixels": setting["max_pixels"], "kmeans_n_init": setting["kmeans_n_init"],
            "kmeans_runs": setting["runs"], "kmeans_seed": km_seed, "seed": px_seed}
    if setting["init"] == "k-means++" and setting["threads"] == 1:
        return create_task("instances", TargetInfo(), **opts)
    return _VariantTask(TargetInfo(), kmeans_init=setting["init"], threads=setting["threads"], **opts)


def score(task: InstancesTask, cached: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, float]:
    state = task.metric_state()
    for pred, batch in cached:
        task.update(state, pred, batch)
    return task.compute(state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="timm:vit_small_patch16_224")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="the probe's training seed")
    p.add_argument("--min-large", type=int, default=3, help="large objects an eval image needs")
    p.add_argument("--seeds", type=int, default=10, help="k-means / subsample seeds per estimator (>= 8)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma-separated estimator names")
    p.add_argument("--store-root", default=None, help="reuse stores (and the trained adapter's run) here")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "ari_noise.json"))
    args = p.parse_args()
    settings = {name: parse_setting(name) for name in args.settings.split(",")}
    root = args.store_root or tempfile.mkdtemp(prefix="maxa-ari-")

    paths = {}
    for split in ("train", "val"):
        job = run_extract(backbone=args.backbone, dataset="coco", root=DATA / "coco_mini", split=split,
                          store_root=root, weights="random", device="cpu", show_progress=False)
        paths[split] = job.features.path
    config = ProbeConfig(task="instances", max_epochs=args.epochs, patience=args.patience,
                         batch_size=args.batch_size, seed=args.seed, task_options={"min_large": args.min_large})
    t0 = time.perf_counter()
    r = train_probe(paths["train"], config, eval_features=paths["val"], device="cpu", show_progress=False)
    print(f"trained: {r.record['epochs']} epochs, {time.perf_counter() - t0:.0f} s; train_probe's ARI "
          f"{r.metrics['ari']:.3f} on {int(r.metrics['n_eval_images'])} images; task options "
          f"{r.record['config']['task_options']}", flush=True)

    # the trained adapter's latents on the eval store, computed once
    model, meta = load_adapter(r.run_dir)
    eval_fs = open_features(paths["val"])
    eval_ts = open_targets(find_target_store(store_root_of(paths["val"]), eval_fs.spec))
    base = {"min_large": args.min_large, "large_area": r.record["config"]["task_options"]["large_area"]}
    stored = [n for n in create_task("instances", TargetInfo(), **base).needs if n != "instance_global"]
    data = ProbeData(eval_fs, eval_ts, stored, device="cpu")
    out_size = tuple(meta["out_size"])
    cached = []
    with torch.no_grad():
        for _, feats, batch in data.batches(args.batch_size):
            cached.append((model(feats, data.token_pos, out_size), batch))
    default = score(create_task("instances", TargetInfo(), **base), cached)
    assert abs(default["ari"] - r.metrics["ari"]) < 1e-9, (default, r.metrics)  # same latents, same scoring
    fg = [int(((b["instances"][i] > 0) & (b["foreground"][i] > 0) & (b["instance_ignore"][i] == 0)).sum())
          for _, b in cached for i in np.nonzero(create_task("instances", TargetInfo(), **base).select(b).numpy())[0]]
    print(f"eval images: {len(fg)}; evaluated foreground pixels per image: median {int(np.median(fg))}, "
          f"max {max(fg)} (of {out_size[0] * out_size[1]})", flush=True)

    rows = []
    print("\n| estimator | mean ARI | max − min | std | k-means s / image | load (5 min) |")
    print("|---|---|---|---|---|---|")
    for name, setting in settings.items():
        aris, seconds = [], 0.0
        for s in range(args.seeds):
            t = time.perf_counter()
            aris.append(score(make_task(setting, s, base), cached)["ari"])
            seconds += time.perf_counter() - t
        per_image = seconds / (args.seeds * len(fg))
        load = os.getloadavg()[1]  # other work on the machine inflates the seconds
        row = {"estimator": name, **setting, "mean_ari": statistics.fmean(aris), "max_minus_min": max(aris) - min(aris),
               "std": statistics.stdev(aris), "seconds_per_image": per_image, "aris": aris,
               "eval_images": len(fg), "seeds": args.seeds, "load_avg_5min": load}
        rows.append(row)
        print(f"| {name} | {row['mean_ari']:.2f} | {row['max_minus_min']:.2f} | {row['std']:.3f} | {per_image:.3f} | "
              f"{load:.1f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"backbone": args.backbone, "train_probe_ari": r.metrics["ari"],
                                          "task_defaults": create_task("instances", TargetInfo(), **base).options(),
                                          "foreground_pixels": fg, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
