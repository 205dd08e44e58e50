"""Extraction throughput: the bare model versus the whole extraction pipeline (run by hand, not a test).

On real photos (COCO mini), in ONE process, for one backbone, batch size and device:

1. **bare** — ``LoadedBackbone.forward`` (the call the runner makes) under ``torch.inference_mode`` on
   images already decoded, resized and normalised in memory, in the runner's own batches; one
   warm-up batch is run untimed first;
2. **pipeline** — ``extract_features(...)`` with the loaded backbone into a fresh temporary store root:
   decoding in DataLoader workers + forward + float16 cast + shard writes + finalize;
3. **ratio** pipeline / bare (medians);
4. **compression** — bytes on disk per image against raw float16 (h·w·C·2) and the time to write the
   shards (``StoreWriter.write_shard``, crc32c included) with ``--compression none`` and ``zstd``.

Bare and pipeline runs alternate (bare, pipeline, bare, pipeline, ...) and medians are reported,
because shared machines are noisy. A last ``cli`` run is what ``maxa extract`` does for the features:
backbone loaded by name, progress bar on.

    python benchmarks/extract_throughput.py --backbone timm:vit_small_patch16_224
    python benchmarks/extract_throughput.py --backbone timm:vit_base_patch16_224 --limit 32 --batch-size 16

Writes ``benchmarks/out/extract_<backbone>.json`` (git-ignored) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os

# What `maxa extract` runs with (pipelines/cli/run.py:_passive_openmp): must precede the torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from extract.backbones import LoadedBackbone, load_backbone  # noqa: E402
from extract.datasets.base import DatasetReader, create_dataset  # noqa: E402
from extract.images import BackboneImages  # noqa: E402
from extract.runner import (DEFAULT_BATCH_SIZE, ExtractConfig, _batches, default_shard_size, extract_features,  # noqa: E402
                           feature_spec_for)
from store import COMPRESSIONS, feature_array_name  # noqa: E402
from store import open_features  # noqa: E402
from store.writer import ArrayDef, StoreWriter  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "coco_mini"


class RepeatedReader(DatasetReader):
    """``base``'s images ``repeat`` times over (ids ``<id>#<r>``), to have enough images to time."""

    name = "repeated"
    splits = ()

    def __init__(self, base: DatasetReader, repeat: int) -> None:  # noqa: D107 (no split check)
        self.base, self.repeat = base, int(repeat)
        self.root, self.split = base.root, base.split
        self.options = {"of": base.name, "repeat": self.repeat}
        self.image_ids = [f"{i}#{r}" for r in range(self.repeat) for i in base.image_ids]

    def read_image(self, index, draft_size=None):
        return self.base.read_image(index % len(self.base), draft_size=draft_size)

    def read_annotation(self, index):
        return self.base.read_annotation(index % len(self.base))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _batch_list(model: LoadedBackbone, reader: DatasetReader, n: int, batch_size: int) -> list[list[int]]:
    """The runner's own batches (shard-aligned) for the first ``n`` images."""
    ids = reader.image_ids[:n]
    spec = feature_spec_for(model, reader, ids)

    class _Shape:  # just what _batches needs from a writer
        shard_size = default_shard_size(spec.layers)
        num_images = n

        def shard_range(self, s):
            start = s * self.shard_size
            return start, min(start + self.shard_size, self.num_images)

    w = _Shape()
    return _batches(w, list(range(-(-n // w.shard_size))), batch_size)


def predecode(model: LoadedBackbone, reader: DatasetReader, batches: list[list[int]], device) -> list[torch.Tensor]:
    images = BackboneImages(reader, model.input_size, model.mean, model.std, model.interpolation)
    return [torch.stack([images[i]["pixels"] for i in b]).to(device) for b in batches]


def bare(model: LoadedBackbone, tensors: list[torch.Tensor], keep: list | None = None) -> float:
    """Seconds for the forward of every batch (the caller has run a warm-up batch, untimed).

    ``keep``: if given, receives each batch's features as float16 numpy (outside the timing).
    """
    with torch.inference_mode():
        t0 = time.perf_counter()
        outs = []
        for x in tensors:
            outs.append(model.forward(x))
        _sync(x.device)
        seconds = time.perf_counter() - t0
    if keep is not None:
        keep.extend({k: v.to(torch.float16).cpu().numpy() for k, v in o.items()} for o in outs)
    return seconds


class TimedForward:
    """Wraps ``model.forward`` (an instance attribute shadows the method) to time it inside the runner."""

    def __init__(self, model: LoadedBackbone) -> None:
        self.model, self.inner, self.seconds, self.calls = model, model.forward, 0.0, 0

    def __enter__(self) -> "TimedForward":
        def forward(x):
            t0 = time.perf_counter()
            out = self.inner(x)
            _sync(x.device)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        self.model.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        del self.model.forward


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def pipeline(backbone, reader, n, args, root: Path, *, compression: str, progress: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    config = ExtractConfig(weights=args.weights, batch_size=args.batch_size, device=args.device, limit=n,
                           num_workers=args.workers, compression=compression)
    res = extract_features(backbone, reader, str(root), config, show_progress=progress)
    wall = time.perf_counter() - t0
    assert not res.reused and res.images_written == n, (res.reused, res.images_written)
    return {"wall_s": wall, "runner_s": res.seconds, "path": res.path}


def compression_figures(model, reader, n, feats: dict[str, np.ndarray], repeats: int) -> dict[str, Any]:
    """Bytes on disk and write time (whole shards, crc32c) for each compression, same features."""
    ids = reader.image_ids[:n]
    spec = feature_spec_for(model, reader, ids)
    raw = sum(l.grid[0] * l.grid[1] * l.channels * 2 for l in spec.layers)
    arrays = [ArrayDef(feature_array_name(l.name), (*l.grid, l.channels), "float16", ("y", "x", "c"))
              for l in spec.layers]
    out: dict[str, Any] = {"raw_fp16_bytes_per_image": raw}
    for comp in COMPRESSIONS:
        times, size = [], 0
        for _ in range(repeats):
            tmp = Path(tempfile.mkdtemp(prefix="maxa-bench-w-"))
            try:
                w = StoreWriter(tmp / "s.zarr", kind="features", key="bench", spec={}, arrays=arrays, image_ids=ids,
                                shard_size=default_shard_size(spec.layers), compression=comp).open()
                t0 = time.perf_counter()
                for s in range(w.num_shards):
                    a, b = w.shard_range(s)
                    w.write_shard(s, {k: v[a:b] for k, v in feats.items()})
                times.append(time.perf_counter() - t0)
                size = _dir_bytes(tmp / "s.zarr" / "features")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        t = statistics.median(times)
        out[comp] = {
            "bytes_per_image": size / n,
            "ratio_vs_raw": raw / (size / n),
            "write_s_median": t,
            "write_s_all": times,
            "write_images_per_s": n / t,
            "write_MB_per_s": raw * n / t / 1e6,
        }
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="timm:vit_small_patch16_224")
    p.add_argument("--weights", default="random")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="COCO root (coco_mini)")
    p.add_argument("--split", default="train")
    p.add_argument("--repeat", type=int, default=1, help="repeat the split's image list this many times")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (after --repeat)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the runner's)")
    p.add_argument("--rounds", type=int, default=2, help="bare/pipeline alternations")
    p.add_argument("--compression", default="none", help="compression of the timed pipeline runs")
    p.add_argument("--write-repeats", type=int, default=3)
    p.add_argument("--no-cli", action="store_true", help="skip the CLI-equivalent run")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _alternate(model, reader, n: int, args: argparse.Namespace, tensors) -> tuple[dict[str, list[float]], bool, dict, Any]:
    """Bare and pipeline rounds in turn, then the stored features checked against the bare forward, the
    compression figures and the CLI-equivalent run: ``(runs, identical, compression, cli)``."""
    runs: dict[str, list[float]] = {"bare": [], "pipeline": [], "pipeline_runner": [], "bare_s": [],
                                    "pipeline_s": [], "pipeline_forward_s": [],
                                    "bare_cpu_s": [], "pipeline_cpu_s": []}
    tmp_root = Path(tempfile.mkdtemp(prefix="maxa-bench-"))
    try:
        last_path = None
        reference: list[dict[str, np.ndarray]] = []
        for r in range(args.rounds):
            c0 = cpu_seconds()
            s = bare(model, tensors, keep=reference if r == 0 else None)
            runs["bare_cpu_s"].append(cpu_seconds() - c0)
            runs["bare"].append(n / s)
            runs["bare_s"].append(s)
            print(f"  round {r}: bare     {n / s:8.2f} img/s ({s:.1f} s)", flush=True)
            root = tmp_root / f"p{r}"
            c0 = cpu_seconds()
            with TimedForward(model) as tf:
                res = pipeline(model, reader, n, args, root, compression=args.compression)
            runs["pipeline_cpu_s"].append(cpu_seconds() - c0)
            runs["pipeline"].append(n / res["wall_s"])
            runs["pipeline_runner"].append(n / res["runner_s"])
            runs["pipeline_s"].append(res["wall_s"])
            runs["pipeline_forward_s"].append(tf.seconds)
            print(f"  round {r}: pipeline {n / res['wall_s']:8.2f} img/s ({res['wall_s']:.1f} s, of which forward "
                  f"{tf.seconds:.1f} s)", flush=True)
            if last_path is not None:
                shutil.rmtree(Path(last_path).parent, ignore_errors=True)
            last_path = res["path"]

        fs = open_features(last_path)
        feats = {feature_array_name(l.name): fs.read_all(l.name) for l in fs.spec.layers}
        ref = {k: np.concatenate([b[name] for b in reference]) for name in model.layer_names
               for k in [feature_array_name(name)]}
        identical = all(np.array_equal(feats[k], ref[k]) for k in feats)
        print(f"  stored features bitwise equal to the bare forward (fp16): {identical}", flush=True)
        comp = compression_figures(model, reader, n, feats, args.write_repeats)

        cli = None
        if not args.no_cli:
            t0 = time.perf_counter()
            res = pipeline(args.backbone, reader, n, args, tmp_root / "cli", compression=args.compression,
                           progress=True)
            cli = {"images_per_s": n / (time.perf_counter() - t0), "wall_s": time.perf_counter() - t0,
                   "includes": "load_backbone by name + progress bar"}
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)

    return runs, identical, comp, cli


def _summary(args: argparse.Namespace, model, n: int, runs: dict[str, list[float]], identical: bool, comp: dict,
             cli: Any, load_s: float, warmup_s: float, t_start: float) -> dict[str, Any]:
    """The JSON record of one run (medians, paired ratios, the machine)."""
    med = {k: statistics.median(v) for k, v in runs.items()}
    paired = [p / b for p, b in zip(runs["pipeline"], runs["bare"])]
    forward_share = [f / w for f, w in zip(runs["pipeline_forward_s"], runs["pipeline_s"])]
    result = {
        "backbone": args.backbone,
        "weights": args.weights,
        "device": args.device,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()
                    or platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
                    "loadavg_end": list(os.getloadavg())},
        "dataset": f"coco {args.split} x{args.repeat}",
        "images": n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "pipeline_compression": args.compression,
        "grid_channels": {name: [*model.grids[name], model.channels[name]] for name in model.layer_names},
        "bare_images_per_s": runs["bare"],
        "pipeline_images_per_s": runs["pipeline"],
        "pipeline_runner_images_per_s": runs["pipeline_runner"],
        "median": {"bare": med["bare"], "pipeline": med["pipeline"], "pipeline_runner": med["pipeline_runner"]},
        "ratio": med["pipeline"] / med["bare"],
        "ratio_paired_median": statistics.median(paired),
        "ratio_paired": paired,
        "forward_share_of_pipeline_wall": forward_share,
        "cpu_seconds_per_image": {"bare": med["bare_cpu_s"] / n, "pipeline": med["pipeline_cpu_s"] / n},
        "cpu_ratio_bare_over_pipeline": med["bare_cpu_s"] / med["pipeline_cpu_s"],
        "forward_seconds": {"bare": runs["bare_s"], "inside_pipeline": runs["pipeline_forward_s"],
                            "pipeline_wall": runs["pipeline_s"]},
        "stored_equals_bare_forward": identical,
        "cli_equivalent": cli,
        "backbone_load_s": load_s,
        "warmup_batch_s": warmup_s,
        "compression": comp,
        "total_s": time.perf_counter() - t_start,
    }

    return result


def _print_table(result: dict[str, Any], runs: dict[str, list[float]], comp: dict, cli: Any, n: int) -> None:
    med = {k: statistics.median(v) for k, v in runs.items()}
    paired = result["ratio_paired"]
    forward_share = result["forward_share_of_pipeline_wall"]
    print()
    print(f"{'measure':<28}{'images/s':>10}   runs")
    print(f"{'bare forward':<28}{med['bare']:10.2f}   {', '.join(f'{v:.2f}' for v in runs['bare'])}")
    print(f"{'pipeline (extract_features)':<28}{med['pipeline']:10.2f}   "
          f"{', '.join(f'{v:.2f}' for v in runs['pipeline'])}")
    print(f"{'ratio pipeline / bare':<28}{result['ratio']:10.3f}   median of paired rounds "
          f"{result['ratio_paired_median']:.3f}: {', '.join(f'{v:.3f}' for v in paired)}")
    print(f"{'forward share of pipeline':<28}{statistics.median(forward_share):10.3f}   (wall time inside "
          f"LoadedBackbone.forward / pipeline wall time)")
    print(f"{'CPU s/img bare, pipeline':<28}{med['bare_cpu_s'] / n:10.3f}   {med['pipeline_cpu_s'] / n:.3f} "
          f"(ratio {result['cpu_ratio_bare_over_pipeline']:.3f}; workers included; robust to other load)")
    if cli:
        print(f"{'cli-equivalent (+load, bar)':<28}{cli['images_per_s']:10.2f}")
    print()
    print(f"{'compression':<12}{'bytes/img':>11}{'x raw':>8}{'write s':>9}{'write MB/s':>12}   "
          f"(raw fp16 {comp['raw_fp16_bytes_per_image']:,} B/img)")
    for c in COMPRESSIONS:
        d = comp[c]
        print(f"{c:<12}{d['bytes_per_image']:11,.0f}{d['ratio_vs_raw']:8.3f}{d['write_s_median']:9.3f}"
              f"{d['write_MB_per_s']:12.1f}")
    print(f"total {result['total_s']:.0f} s")



def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)

    t_start = time.perf_counter()
    base = create_dataset("coco", args.data, args.split)
    reader = RepeatedReader(base, args.repeat) if args.repeat > 1 else base
    n = min(len(reader), args.limit or len(reader))

    t0 = time.perf_counter()
    model = load_backbone(args.backbone, weights=args.weights, device=args.device)
    load_s = time.perf_counter() - t0
    batches = _batch_list(model, reader, n, args.batch_size)
    t0 = time.perf_counter()
    tensors = predecode(model, reader, batches, model.device)
    predecode_s = time.perf_counter() - t0
    print(f"{args.backbone}: {n} images, batches {[len(b) for b in batches]}, torch threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}; load {load_s:.1f} s, predecode {predecode_s:.1f} s "
          f"({n / predecode_s:.0f} img/s on the main thread)", flush=True)

    t0 = time.perf_counter()
    with torch.inference_mode():
        model.forward(tensors[0])  # warm-up batch, excluded from every figure
        _sync(model.device)
    warmup_s = time.perf_counter() - t0
    runs, identical, comp, cli = _alternate(model, reader, n, args, tensors)
    result = _summary(args, model, n, runs, identical, comp, cli, load_s, warmup_s, t_start)
    _print_table(result, runs, comp, cli, n)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "out" / f"extract_{re.sub(r'[^A-Za-z0-9_.-]+', '-', args.backbone)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
