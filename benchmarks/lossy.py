"""Probe metrics and bytes on disk of lossy (``--compression int8``) against float16 stores (run by hand).

For each store set, the same probes (same configuration, same seed, same torch threads) are trained
on a float16 store and on its int8 counterpart, and scored on the matching eval store:

* the known-answer stores of ``tests/synthetic.py`` (as in ``tests/test_golden.py``: semseg and
  boundaries on the encoded-answer features, instances on the instance codes); their int8 stores
  are written from the float16 ones by ``StoreWriter`` (which quantises);
* ``../shared/data/coco_mini`` (boundaries, distance, instances) and ``camvid_small`` (semseg),
  extracted twice by ``run_extract`` (``compression="none"`` and ``"int8"``) with a small backbone
  at random initialisation and probed with the settings of ``benchmarks/real_data_table.py``.

A single short run of a small probe is chaotic: the same pair trained with another seed can move
by more than the bar. With ``--seeds`` each pair is trained once per seed (the probe's seed; the
stores stay the same) and the table gives the mean paired difference with its standard error, and
a verdict: within the bar, outside it, or unresolved by the runs' spread. ``--known-size`` makes
the known-answer stores bigger (their scores less noisy); ``--jobs`` trains seeds in parallel
processes (on a many-core host, ``--jobs`` cores ``--threads 1``; the numbers do not change).

Two more arms tell int8's own effect from a chaotic training run's:

* ``--control``: a float16 copy of the known-answer stores plus uniform noise of the int8 error's
  size (a probe as sensitive to any perturbation that small moves as much);
* ``--same-adapter``: the float16 run's adapter (trained again from the same seed, checked bitwise
  equal) scored on the int8 eval store's values, held in a float16 store that pairs with the
  float16 training store: what int8 changes at evaluation alone.

``--runs FILE`` keeps every finished seed as one JSON line in ``FILE`` (appended as it finishes, with
the settings, the CPU and the commit): a later call with the same file and settings trains only
the seeds the file lacks and summarises all of them, so a comparison that needs hundreds of seeds
can be built up over several calls, hosts or interrupted runs.

Prints a markdown table: dataset, task, metric, seeds, float16, int8 (means), delta (mean ± s.e.),
verdict, bytes per image (feature arrays, crc32c and shard index included) of both and their
ratio; writes every run and the summary as JSON.

    python benchmarks/lossy.py --out benchmarks/out/lossy.json
    python benchmarks/lossy.py --only synthetic --seeds 0 1 2 3 4 5 --known-size 128 48 --known-epochs 3
    python benchmarks/lossy.py --only instances --seeds $(seq 0 199) --known-size 64 48 --threads 1 \
        --jobs 2 --runs benchmarks/results/lossy_instances.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from extract.jobs import run_extract
from probe.train import ProbeConfig, train_probe
from store import StoreWriter, feature_arrays, feature_store_path, open_features
from store.location import as_location

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))

#: Percent metrics: the bar is 0.5 points; the others (losses, errors) 2 % relative.
PERCENT = {"iou", "miou", "ari", "pixel_acc"}
#: (store set, task, ProbeConfig keywords, metrics shown). Known-answer settings as tests/test_golden.py.
KNOWN = [
    ("synthetic", "semseg", dict(lr=1e-2, max_epochs=12, batch_size=8, patience=12), ("miou",)),
    ("synthetic", "boundaries", dict(lr=1e-2, max_epochs=30, batch_size=8, patience=30), ("iou",)),
    ("instances", "instances", dict(lr=1e-2, max_epochs=30, batch_size=8, patience=30,
                                    task_options={"min_large": 2}), ("ari",)),
]
#: The control arm (``--control``): float16 plus uniform noise of the int8 error's size (:func:`noisy_copy`).
CONTROL = "float16+noise"
#: The same-adapter arm (``--same-adapter``): the float16 probe (trained on the float16 store, so the
#: very same adapter, bitwise) scored on the int8 eval store's values (:func:`dequantized_copy`).
SAME_ADAPTER = "float16 adapter, int8 eval"
#: Arms beside float16 and int8: (name, key in the rows and summary, what the table says).
EXTRA_ARMS = [(CONTROL, "control", "float16 plus uniform noise of the int8 error's size, the same probes and seeds"),
              (SAME_ADAPTER, "same_adapter", "the float16 run's adapter scored on the int8 eval values: what int8 "
                                             "changes at evaluation alone, without training's chaos")]
#: (reader, data, options, tasks with their metrics): as benchmarks/real_data_table.py.
REAL = [
    ("coco", DATA / "coco_mini", {}, {"boundaries": ("iou", "ce"), "distance": ("mse",), "instances": ("ari",)}),
    ("segfolder", DATA / "camvid_small", {"num_classes": 11, "ignore_index": 11}, {"semseg": ("miou", "pixel_acc")}),
]


def _copy_store(path: str, root: str, spec: Any, compression: str,
                values: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> str:
    """Store ``path``'s features, each shard's values through ``values``, as a store of ``spec``
    written under ``root`` with ``compression``."""
    fs = open_features(path)
    w = StoreWriter(feature_store_path(root, spec), kind="features", key=spec.key, spec=spec.to_dict(),
                    arrays=feature_arrays(spec), image_ids=fs.image_ids, shard_size=fs.shard_size,
                    compression=compression).open()
    for shard in range(w.num_shards):
        start, stop = w.shard_range(shard)
        w.write_shard(shard, {f"features/{l}": values(fs.read_batch(range(start, stop), l)) for l in fs.spec.layer_names})
    w.finalize()
    return w.path


def int8_copy(path: str, root: str) -> str:
    """The int8 store of the features of float16 store ``path``, written under ``root``."""
    spec = dataclasses.replace(open_features(path).spec, quantization="int8")
    return _copy_store(path, root, spec, "int8")  # the writer quantises


def dequantized_copy(int8_path: str, float16_path: str, root: str, targets_root: str) -> str:
    """A float16 store under ``root`` with the spec (so the key, and the pairing) of ``float16_path``
    and the values int8 store ``int8_path`` reads: bitwise what a probe sees of the int8 store
    (readers return an int8 store's values dequantised to float16). The target stores of root
    ``targets_root``, if any, are copied beside it (a probe finds its eval targets there)."""
    if (Path(targets_root) / "targets").is_dir():
        shutil.copytree(Path(targets_root) / "targets", Path(root) / "targets")
    return _copy_store(int8_path, root, open_features(float16_path).spec, "none")


def noisy_copy(path: str, root: str, seed: int = 0) -> str:
    """A float16 store of ``path``'s features plus uniform noise of the int8 error's size: each
    value moved by up to half an int8 step (``s / 2``, ``s`` the image's channel scale of
    :func:`store.quantize.quantize`), so a probe's sensitivity to any perturbation of that size
    can be told apart from int8's own effect."""
    from store.quantize import QMAX

    rng = np.random.default_rng(seed)

    def noisy(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        step = np.abs(x).max(axis=(1, 2), keepdims=True) / QMAX
        return (x + rng.uniform(-0.5, 0.5, x.shape).astype(np.float32) * step).astype(np.float16)

    fs = open_features(path)
    # other "weights" (so its own key and path; train and eval copies still pair), all else the same
    spec = dataclasses.replace(fs.spec, weights_id=f"{fs.spec.weights_id}+int8-sized-noise")
    return _copy_store(path, root, spec, "none", noisy)


def _scaled(kwargs: dict[str, Any], scale: float, lr: float | None = None) -> dict[str, Any]:
    """Known-answer probe settings with ``scale`` times the epochs and the patience (and learning
    rate ``lr`` where given)."""
    return {**kwargs, "max_epochs": max(1, round(kwargs["max_epochs"] * scale)),
            "patience": max(1, round(kwargs["patience"] * scale)), **({"lr": lr} if lr else {})}


def bytes_per_image(path: str) -> float:
    """Bytes of the feature arrays (and scales) per image, without the store's metadata files."""
    loc, fs = as_location(path), open_features(path)
    total = 0
    for sub in ("features", "feature_scales"):
        for layer in fs.spec.layer_names:
            chunks = loc / sub / layer / "c"  # the shard files (the array's zarr.json aside)
            if chunks.exists():
                total += chunks.tree_bytes()
    return total / len(fs)


def probe(train: str, evaluation: str | None, task: str, kwargs: dict[str, Any], seed: int,
          results: str) -> dict[str, float]:
    config = ProbeConfig(task=task, seed=seed, **kwargs)
    r = train_probe(train, config, eval_features=evaluation, device="cpu", results_root=results, show_progress=False)
    digest = hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes() for t in r.model.state_dict().values()))
    return {k: float(v) for k, v in r.metrics.items()} | {"_epochs": float(r.record["epochs"]),
                                                           "_best_epoch": float(r.record["best_epoch"]),
                                                           "_adapter": digest.hexdigest()}


def run_arms(job: tuple) -> tuple[dict[str, dict[str, Any]], float]:
    """One seed of one task on every arm (``job``: stores by arm, task, probe keywords, seed, store
    root, torch threads): the metrics by arm, and the seconds it took."""
    stores, task, kwargs, seed, root, threads = job
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    got = {c: probe(tr, ev, task, kwargs, seed, f"{root}/results-{c}") for c, (tr, ev) in stores.items()}
    if SAME_ADAPTER in got and got[SAME_ADAPTER]["_adapter"] != got["float16"]["_adapter"]:
        raise RuntimeError(f"seed {seed}: the float16 probe trained twice gave two adapters: the same-adapter arm "
                           "would not measure evaluation alone (is training deterministic here?)")
    return got, time.perf_counter() - t0


def pairs(root: str, args: argparse.Namespace) -> list[tuple[str, str, dict[str, tuple[str, str]], dict]]:
    """(dataset label, store set, {compression: (train store, eval store)}, tasks) of every store set."""
    from synthetic import make_instance_root, make_synthetic_root

    out = []
    for name, make in (("synthetic", make_synthetic_root), ("instances", make_instance_root)):
        if args.only and name not in args.only:
            continue
        sub = f"{root}/{name}"
        f16 = make(sub, n_train=args.known_size[0], n_val=args.known_size[1])
        q = {split: int8_copy(p, sub) for split, p in f16.items()}
        arms = {"float16": (f16["train"], f16["val"]), "int8": (q["train"], q["val"])}
        if args.control:
            noisy = {split: noisy_copy(p, sub, seed=k) for k, (split, p) in enumerate(f16.items())}
            arms[CONTROL] = (noisy["train"], noisy["val"])
        if args.same_adapter:
            arms[SAME_ADAPTER] = (f16["train"], dequantized_copy(q["val"], f16["val"], f"{sub}/int8-values", sub))
        out.append((f"known-answer {name}", name, arms, {}))
    for reader, data, options, tasks in REAL:
        if args.only and data.name not in args.only:
            continue
        stores = {}
        for comp, label in (("none", "float16"), ("int8", "int8")):
            got = [run_extract(backbone=args.backbone, dataset=reader, root=data, split=split, store_root=f"{root}/real",
                               weights="random", device="cpu", dataset_options=options, show_progress=False,
                               compression=comp).features.path for split in ("train", "val")]
            stores[label] = tuple(got)
        if args.same_adapter:
            stores[SAME_ADAPTER] = (stores["float16"][0], dequantized_copy(
                stores["int8"][1], stores["float16"][1], f"{root}/real-int8-values-{data.name}", f"{root}/real"))
        out.append((data.name, data.name, stores, tasks))
    return out


#: The settings that make two runs of one (dataset, task, seed) the same experiment (``--runs``).
SETTINGS = ("backbone", "known_size", "known_epochs", "known_lr", "epochs", "patience", "threads")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SETTINGS}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_runs(path: str | None, settings: dict[str, Any]) -> list[dict]:
    """The runs kept in ``path`` (JSON lines) with these ``settings``; none if there is no file."""
    if not path or not Path(path).exists():
        return []
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            sys.exit(f"--runs {path}: line {n} is not JSON (an interrupted write?): remove that line and run again")
        if row.get("settings") == settings:
            rows.append(row)
    # a seed trained again (for an arm its first run lacked) counts once: its latest run
    latest = {(r["dataset"], r["task"], r["metric"], r["seed"]): r for r in rows}
    return list(latest.values())


def seed_ranges(seeds) -> str:
    """``seeds`` as runs of consecutive numbers: ``0-6, 9, 11-299``."""
    out: list[list[int]] = []
    for s in sorted(set(seeds)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _arm_keys(arms: list[str]) -> set[str]:
    """The keys a run row holds for ``arms`` (beyond float16 and int8)."""
    return {key for arm, key, _ in EXTRA_ARMS if arm in arms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="timm:vit_small_patch16_224")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="probe seeds: each pair of probes is trained once per seed; the table gives the mean "
                        "difference and its standard error over the seeds")
    p.add_argument("--known-size", type=int, nargs=2, default=[32, 12], metavar=("TRAIN", "VAL"),
                   help="images in the known-answer train and eval stores (bigger: less noise per run)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per probe (the same for every arm)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds trained at once, each in its own process with --threads torch threads (a many-core "
                        "host: --jobs cores --threads 1); the numbers do not depend on it")
    p.add_argument("--only", nargs="*", default=None, help="store sets: synthetic instances coco_mini camvid_small")
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    p.add_argument("--control", action="store_true",
                   help="known-answer stores: also train on a float16 copy with uniform noise of the int8 "
                        "error's size (the probe's own sensitivity to a perturbation that small)")
    p.add_argument("--same-adapter", action="store_true",
                   help="also score the float16 run's adapter (trained again, checked bitwise the same) on "
                        "the int8 eval values: int8's effect at evaluation alone")
    p.add_argument("--known-lr", type=float, default=None,
                   help="known-answer stores: this learning rate instead of the test's (1e-2)")
    p.add_argument("--known-epochs", type=float, default=1.0, metavar="SCALE",
                   help="known-answer stores: train SCALE times the epochs of tests/test_golden.py (patience too)")
    p.add_argument("--epochs", type=int, default=60, help="real data: epoch cap (real_data_table.py's 60)")
    p.add_argument("--patience", type=int, default=10, help="real data: early-stopping patience")
    p.add_argument("--store-root", default=None)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "lossy.json"))
    p.add_argument("--runs", default=None, metavar="FILE",
                   help="keep each finished seed in FILE (JSON lines); seeds FILE already holds with the same "
                        "settings are not trained again, and the summary is over every seed FILE holds")
    args = p.parse_args()
    args.known_size = list(args.known_size)
    settings = settings_of(args)
    kept = load_runs(args.runs, settings)
    meta = {"settings": settings, "cpu": _cpu(), "commit": _commit()}
    torch.set_num_threads(args.threads)
    root = args.store_root or tempfile.mkdtemp(prefix="maxa-lossy-")
    real = dict(max_epochs=args.epochs, patience=args.patience, batch_size=4)
    rows = []
    for label, which, stores, tasks in pairs(root, args):
        size = {c: bytes_per_image(stores[c][0]) for c in ("float16", "int8")}
        jobs = [(t, _scaled(kw, args.known_epochs, args.known_lr), m) for s, t, kw, m in KNOWN if s == which] or \
               [(t, {**real, "task_options": {"min_large": 3} if t == "instances" else {}}, m) for t, m in tasks.items()]
        for task, kwargs, metrics in jobs:
            if args.tasks and task not in args.tasks:
                continue
            want = _arm_keys(list(stores))
            done = {r["seed"]: r for r in kept if r["dataset"] == label and r["task"] == task
                    and want <= {k for k in r if f"delta_{k}" in r}}
            earlier = [r for r in kept if r["dataset"] == label and r["task"] == task]
            rows.extend(r for r in earlier if r["seed"] in done or r["seed"] not in args.seeds)
            if done:
                print(f"{label} {task}: {len(earlier)} runs kept in {args.runs}; seeds {seed_ranges(set(args.seeds) & set(done))} "
                      "not trained again", flush=True)
            seeds = [s for s in args.seeds if s not in done]
            work = [(stores, task, kwargs, seed, root, args.threads) for seed in seeds]
            # spawned, not forked: a forked child would inherit torch's thread pools in whatever state
            with (ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) if args.jobs > 1
                  else contextlib.nullcontext()) as pool:
                runs = pool.map(run_arms, work) if pool else map(run_arms, work)  # in seed order, as they finish
                for seed, (got, seconds) in zip(seeds, runs):
                    for metric in metrics:
                        a, b = got["float16"][metric], got["int8"][metric]
                        extra = {k: v for arm, key, _ in EXTRA_ARMS if arm in got
                                 for k, v in ((key, got[arm][metric]), (f"delta_{key}", got[arm][metric] - a))}
                        rows.append({"dataset": label, "task": task, "metric": metric, "seed": seed, "float16": a,
                                     "int8": b, "delta": b - a, **extra, "bytes_float16": size["float16"],
                                     "bytes_int8": size["int8"], "ratio": size["float16"] / size["int8"],
                                     "epochs": [got["float16"]["_epochs"], got["int8"]["_epochs"]],
                                     "best_epoch": {c: got[c]["_best_epoch"] for c in stores},
                                     "seconds": seconds, **meta})
                        print(json.dumps(rows[-1]), flush=True)
                        if args.runs:
                            Path(args.runs).parent.mkdir(parents=True, exist_ok=True)
                            with open(args.runs, "a") as f:  # one whole line per run: an interrupted call keeps the rest
                                f.write(json.dumps(rows[-1]) + "\n")
    summary = summarise(rows)
    lr = f", lr {args.known_lr:g}" if args.known_lr else ""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": rows, "summary": summary}, indent=2))
    print(f"\nbackbone {args.backbone} (random init), seeds {seed_ranges(args.seeds)}, {args.threads} torch threads, known-answer "
          f"stores of {args.known_size[0]}/{args.known_size[1]} images and {args.known_epochs:g}× the test's epochs{lr}, real data: at most {args.epochs} epochs, "
          f"patience {args.patience}\n")
    print("| dataset | task | metric | seeds | float16 | int8 | delta (mean ± s.e.) | within bar | B/img float16 | "
          "B/img int8 | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        rel = "" if r["metric"] in PERCENT else f" ({100 * r['delta'] / r['float16']:+.2f} %)"
        print(f"| {r['dataset']} | {r['task']} | {r['metric']} | {r['seeds']} | {r['float16']:.4g} | {r['int8']:.4g} | "
              f"{r['delta']:+.3g} ± {r['stderr']:.2g}{rel} | {r['verdict']} | {r['bytes_float16']:,.0f} | "
              f"{r['bytes_int8']:,.0f} | {r['ratio']:.3f}× |")
    for _, key, what in EXTRA_ARMS:
        shown = [r for r in summary if f"delta_{key}" in r]
        if not shown:
            continue
        print(f"\n{key.replace('_', ' ')}: {what}\n")
        print(f"| dataset | task | metric | seeds | delta int8 (mean ± s.e.) | delta {key} (mean ± s.e.) | within bar | "
              f"per seed: int8 / {key} |")
        print("|---|---|---|---|---|---|---|---|")
        for r in shown:  # over the seeds that ran this arm
            pairs_ = ", ".join(f"{a:+.2f} / {b:+.2f}" for a, b in zip(r[f"delta_{key}_int8_per_seed"],
                                                                     r[f"delta_{key}_per_seed"]))
            print(f"| {r['dataset']} | {r['task']} | {r['metric']} | {r[f'delta_{key}_seeds']} | "
                  f"{r[f'delta_{key}_int8']:+.3g} ± {r[f'stderr_{key}_int8']:.2g} | "
                  f"{r[f'delta_{key}']:+.3g} ± {r[f'stderr_{key}']:.2g} | {r[f'verdict_{key}']} | {pairs_} |")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (dataset, task, metric): means over the seeds, the mean paired difference and its
    standard error, and the verdict against the bar (0.5 points; 2 % relative for losses and errors):
    "yes" when the mean difference lies within the bar by two standard errors, "no" when outside it
    by two, "unresolved" when the runs' spread cannot tell (one seed: within or not)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["task"], r["metric"]), []).append(r)
    out = []
    for (dataset, task, metric), rs in groups.items():
        a = float(np.mean([r["float16"] for r in rs]))
        bar = 0.5 if metric in PERCENT else 0.02 * abs(a)
        deltas = [r["delta"] for r in rs]
        mean, stderr, verdict = _verdict(deltas, bar)
        extra = {}
        for _, key, _ in EXTRA_ARMS:  # each extra arm's difference from float16, with its own verdict
            having = [r for r in rs if f"delta_{key}" in r]
            if having:
                d = [r[f"delta_{key}"] for r in having]
                m, se, v = _verdict(d, bar)
                m8, se8, _ = _verdict([r["delta"] for r in having], bar)
                extra |= {f"delta_{key}": m, f"stderr_{key}": se, f"verdict_{key}": v, f"delta_{key}_per_seed": d,
                          f"delta_{key}_seeds": len(having), f"delta_{key}_int8": m8, f"stderr_{key}_int8": se8,
                          f"delta_{key}_int8_per_seed": [r["delta"] for r in having]}
        out.append({**extra, "dataset": dataset, "task": task, "metric": metric, "seeds": len(rs), "float16": a,
                    "int8": float(np.mean([r["int8"] for r in rs])), "delta": mean, "stderr": stderr,
                    "delta_per_seed": deltas, "bar": bar, "verdict": verdict,
                    "bytes_float16": rs[0]["bytes_float16"], "bytes_int8": rs[0]["bytes_int8"], "ratio": rs[0]["ratio"]})
    return out


def _verdict(deltas: list[float], bar: float) -> tuple[float, float, str]:
    """Mean of the paired differences ``deltas``, its standard error, and the verdict against ``bar``."""
    d = np.asarray(deltas, dtype=np.float64)
    mean = float(d.mean())
    stderr = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    if abs(mean) + 2 * stderr <= bar:
        return mean, stderr, "yes"
    if abs(mean) - 2 * stderr > bar:
        return mean, stderr, "**no**"
    return mean, stderr, "unresolved"


if __name__ == "__main__":
    main()
