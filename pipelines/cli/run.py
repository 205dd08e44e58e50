"""The commands that run work: ``extract``, ``probe``, ``predict``, ``report``, ``bench speed``,
``sweep`` and ``quickstart``; each parses its options and hands them to the library function."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import numpy as np
import typer
from rich.markup import escape as rich_escape

from pipelines.cli.errors import clean_errors
from extract.config import DEFAULT_BATCH_SIZE
from store.spec import DEFAULT_TARGET_SIZE
from pipelines.defaults import (QUICKSTART_BACKBONE, QUICKSTART_MAX_EPOCHS, SPEED_BATCH_SIZE, SPEED_BATCHES,
                                 SPEED_REFERENCE)
from probe.config import probe_default
from pipelines.cli.options import (DEFAULT_DEVICE, DEFAULT_STORE_ROOT, Compression, StorageOptionList, Weights,
                                   _location, _parse_layers)
from pipelines.cli.render import _results_table, _speed_table, err, out
from pipelines.cli.stores import stores_ls
from pipelines.report_shared import DEFAULT_FEATURE_IMAGES
from runtime.errors import MaxaError


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (before torch loads, unless set).

    On a CPU the forward pass fills every core and the decode workers must slot in between its
    parallel regions; spinning threads take those gaps. Measured on 2 cores (ViT-S/16): the
    pipeline/bare ratio rose from 0.91 to 0.95. Probing keeps the default (spinning is ~13 %
    faster for the adapter's many small ops)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextmanager
def _dataset_warnings_as_lines() -> Iterator[None]:
    """While extracting: a reader's oddities (``DatasetWarning``, e.g. annotations of unknown images)
    as one yellow ``warning:`` line each, once; other warnings as usual."""
    import warnings

    from extract.datasets.base import DatasetWarning

    shown: set[str] = set()
    show_other = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if not issubclass(category, DatasetWarning):
            return show_other(message, category, filename, lineno, file, line)
        text = " ".join(str(message).split())
        if text not in shown:
            shown.add(text)
            err.print(f"[bold yellow]warning:[/] {rich_escape(text)}", soft_wrap=True, highlight=False)

    with warnings.catch_warnings():
        warnings.simplefilter("always", DatasetWarning)
        warnings.showwarning = show_warning
        yield


def _renamed(old: str, new: str, old_value: Any, value: Any) -> Any:
    """An option's value given under its old spelling (still accepted, with one warning line)."""
    if old_value is None:
        return value
    err.print(f"[bold yellow]warning:[/] {old} is now {new}; the old spelling goes in a later version.",
              soft_wrap=True, highlight=False)
    return old_value


# -- extract --------------------------------------------------------------------------------------
@clean_errors
def extract(
    backbone: Annotated[str, typer.Option(help="Registry name (see `maxa backbones`) or timm:NAME.")],
    dataset: Annotated[str, typer.Option(help="Dataset reader: coco, voc, cocostuff, nyuv2, segfolder, shapes.")],
    split: Annotated[str, typer.Option(help="Dataset split: train, val, test (no default: a probe needs both "
                                            "its training and its eval split).")],
    root: Annotated[Optional[Path], typer.Option(help="Dataset root directory (not needed for shapes).")] = None,
    store_root: Annotated[str, typer.Option(help="Where stores live: a folder or s3://bucket/prefix ($MAXA_STORE_ROOT).")] = DEFAULT_STORE_ROOT,
    weights: Annotated[str, typer.Option(help="pretrained (timm hub / HF cache), random, or a checkpoint PATH.")] = "pretrained",
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated layer indices (default: the entry's).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = DEFAULT_BATCH_SIZE,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = DEFAULT_DEVICE,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N images.")] = None,
    decode_workers: Annotated[Optional[int], typer.Option(min=0, help="Image decode workers (default: up to 4).")] = None,
    shard_size: Annotated[Optional[int], typer.Option(min=1, help="Images per shard (default: ~256 MB).")] = None,
    compression: Annotated[Compression, typer.Option(help="Feature compression: none, zstd (lossless) or int8 (lossy, ~2× smaller than none; "
                                               "a store of its own key, see docs/store-format.md).")] = Compression.none,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Record undecodable images and go on.")] = False,
    build_targets: Annotated[bool, typer.Option(help="Also build the split's target store.")] = True,
    target_size: Annotated[int, typer.Option(min=8, help="Target (output) resolution, square.")] = DEFAULT_TARGET_SIZE[0],
    target_image: Annotated[bool, typer.Option(help="Keep each image resized to the target size in the target store "
                                               "(needed by --head jbu; ≈ 3·size² bytes per image).")] = True,
    num_classes: Annotated[Optional[int], typer.Option(help="segfolder: number of classes.")] = None,
    ignore_index: Annotated[Optional[int], typer.Option(help="segfolder: label value to ignore.")] = None,
    scene_seed: Annotated[Optional[int], typer.Option(help="shapes: scene seed.")] = None,
    num_images: Annotated[Optional[int], typer.Option(help="shapes: images in the split.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, plain lines every "
                                           "$MAXA_PROGRESS_S s elsewhere).")] = True,
    storage_option: StorageOptionList = None,
    old_workers: Annotated[Optional[int], typer.Option("--workers", min=0, hidden=True)] = None,
    old_targets: Annotated[Optional[bool], typer.Option("--targets/--no-targets", hidden=True)] = None,
    old_seed: Annotated[Optional[int], typer.Option("--seed", hidden=True)] = None,
) -> None:
    """Run a frozen backbone once over a dataset split into a feature store (and its targets).

    Two people asking for the same extraction share one store: the second waits for the first
    (its lease beside the store), then reuses the finished store."""
    _passive_openmp()
    from extract.jobs import run_extract

    decode_workers = _renamed("--workers", "--decode-workers", old_workers, decode_workers)
    build_targets = _renamed("--targets/--no-targets", "--build-targets/--no-build-targets", old_targets, build_targets)
    scene_seed = _renamed("--seed", "--scene-seed", old_seed, scene_seed)
    options = {"num_classes": num_classes, "ignore_index": ignore_index, "seed": scene_seed, "num_images": num_images}
    with _dataset_warnings_as_lines():
        result = run_extract(
            backbone=backbone, dataset=dataset, split=split, root=root, store_root=_location(store_root, storage_option),
            dataset_options={k: v for k, v in options.items() if v is not None}, weights=weights,
            layers=_parse_layers(layers), batch_size=batch_size, device=device, limit=limit,
            num_workers=decode_workers, shard_size=shard_size, compression=compression.value, skip_bad=skip_bad,
            targets=build_targets, target_size=(target_size, target_size), target_image=target_image,
            show_progress=progress,
        )
    f = result.features
    if f.reused:
        out.print(f"features: [green]complete store found[/] {f.path}")
    else:
        lossy = f" ({f.spec.quantization}, lossy)" if f.spec.lossy else ""
        out.print(f"features: wrote {f.images_written} images{lossy} in {f.seconds:.1f} s "
                  f"({f.images_per_second:.1f} img/s) → {f.path}")
    if f.bad_images:
        out.print(f"[yellow]{len(f.bad_images)} undecodable image(s) recorded as bad[/]: {', '.join(f.bad_images[:5])}")
    if result.targets is not None:
        t = result.targets
        state = "complete store found" if t.reused else f"built {t.images_written} images"
        out.print(f"targets:  {state} → {t.path}")


@clean_errors
def probe(
    store: Annotated[str, typer.Option(help="Training feature store (….zarr, a path or s3://… URL).")],
    task: Annotated[str, typer.Option(help="boundaries, distance, instances, semseg or depth.")],
    eval_store: Annotated[Optional[str], typer.Option(help="Eval feature store (default: same backbone+dataset, val/test split).")] = None,
    variant: Annotated[str, typer.Option(help="base, d16, no-sigma, shared-sigma, single-layer, paper-budget.")] = probe_default("variant"),
    head: Annotated[str, typer.Option(help="Readout: maxa (the MAXA adapter) or a baseline head (linear, cnn, "
                                     "jbu: image-guided upsampling then linear probing, needs target stores with images).")] = probe_default("head"),
    seed: Annotated[int, typer.Option(help="Seed: initialisation, validation split, shuffling.")] = probe_default("seed"),
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step (and per evaluation batch).")] = probe_default("batch_size"),
    max_epochs: Annotated[int, typer.Option(min=1, help="Epoch cap (early stopping on validation loss).")] = probe_default("max_epochs"),
    patience: Annotated[int, typer.Option(min=1, help="Epochs without improvement before stopping.")] = probe_default("patience"),
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: the task's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = DEFAULT_DEVICE,
    targets: Annotated[Optional[str], typer.Option(help="Training target store (default: found by image ids).")] = None,
    eval_targets: Annotated[Optional[str], typer.Option(help="Eval target store (default: found by image ids).")] = None,
    results_root: Annotated[Optional[str], typer.Option(help="Where runs and results go (default: the store root); "
                                                        "use your own with read-only access to a shared root.")] = None,
    min_large: Annotated[Optional[int], typer.Option(help="instances: eval images need this many large objects (3).")] = None,
    progress: Annotated[bool, typer.Option(help="Print progress: per epoch, and within epochs and the evaluation "
                                           "(a bar on a terminal, plain lines every $MAXA_PROGRESS_S s elsewhere).")] = True,
    tensorboard: Annotated[Optional[Path], typer.Option(help="Also log the curves to TensorBoard under this folder "
                                                        "(needs the tensorboard package; the run's curves.jsonl is "
                                                        "written either way).")] = None,
    storage_option: StorageOptionList = None,
) -> None:
    """Train the MAXA adapter (or a baseline head) on a store and evaluate it; record the result."""
    from probe.train import ProbeConfig, train_probe

    options = {"min_large": min_large} if min_large is not None else {}
    config = ProbeConfig(task=task, variant=variant, head=head, seed=seed, batch_size=batch_size,
                         max_epochs=max_epochs, patience=patience, lr=lr, task_options=options)
    def where(path: Optional[str]) -> Any:
        return _location(path, storage_option) if path else None

    result = train_probe(where(store), config, eval_features=where(eval_store), targets=where(targets),
                         eval_targets=where(eval_targets), results_root=where(results_root), device=device,
                         show_progress=progress, tensorboard=tensorboard)
    out.print(_results_table([result.record], "probe result"))
    out.print(f"adapter: {result.run_dir}\nresult:  {result.result_path}", highlight=False)


@clean_errors
def predict(
    adapter: Annotated[str, typer.Option(help="Run directory written by `maxa probe` (a path or s3://… URL).")],
    store: Annotated[str, typer.Option(help="Feature store holding the image(s) (a path or s3://… URL).")],
    index: Annotated[Optional[int], typer.Option(help="Image index in the store, for one image's --out .png/.npy "
                                                      "(default 0).")] = None,
    all_images: Annotated[bool, typer.Option("--all", help="Every image of the store, into --out NAME.zarr (what "
                                                           "a .zarr --out does anyway).")] = False,
    size: Annotated[int, typer.Option(min=8, help="Output resolution (any; the adapter takes positions).")] = DEFAULT_TARGET_SIZE[0],
    out_path: Annotated[str, typer.Option("--out", help="What to write: .png/.jpg — input | ground truth | prediction "
                                                        "side by side with a colour bar or class legend; .npy — one "
                                                        "image's values (semseg class probabilities (C,H,W), boundary "
                                                        "probability (H,W), depth/distance values (H,W), instance "
                                                        "embedding (C,H,W)); .zarr — those values for every image "
                                                        "of the store, with their image ids.")] = "pred.png",
    bare: Annotated[bool, typer.Option("--bare", help="With .png/.jpg: only the prediction, SIZE×SIZE pixels, no "
                                                      "panels.")] = False,
    labels: Annotated[bool, typer.Option("--labels", help="With .zarr, semseg: store the arg-max label map instead "
                                                          "of the class probabilities.")] = False,
    dtype: Annotated[str, typer.Option(help="With .zarr: float32 (the values as .npy gives them) or float16 "
                                            "(half the bytes).")] = "float32",
    batch_size: Annotated[int, typer.Option(min=1, help="With .zarr: images per forward pass at most.")] = 16,
    device: Annotated[str, typer.Option(help="With .zarr: auto, cpu, cuda, cuda:N.")] = DEFAULT_DEVICE,
    progress: Annotated[bool, typer.Option(help="With .zarr: show progress.")] = True,
    storage_option: StorageOptionList = None,
) -> None:
    """Render a trained adapter's prediction for one stored image at any output size (a picture or its
    values), or write its values for every image of the store into a Zarr store."""
    kind = Path(out_path.rstrip("/")).suffix.lower()
    if kind not in (".npy", ".png", ".jpg", ".jpeg", ".zarr"):
        raise MaxaError(f"--out {out_path}: write .png/.jpg (a picture), .npy (one image's values) or .zarr "
                        "(every image's values).")
    if kind == ".zarr" or all_images:
        if kind != ".zarr":
            raise MaxaError(f"--all writes every image's values into a Zarr store: --out NAME.zarr, not {out_path}.")
        if index is not None:
            raise MaxaError("--out NAME.zarr holds every image of the store; drop --index (or write one image "
                            "to .npy or .png).")
        from probe.predict_store import predict_store

        result = predict_store(_location(adapter, storage_option), _location(store, storage_option),
                               _location(out_path, storage_option), size=(size, size), labels=labels, dtype=dtype,
                               batch_size=batch_size, device=device, show_progress=progress)
        shape = " x ".join(map(str, result.shape))
        state = "finished an interrupted store, " if result.resumed else ""
        out.print(f"wrote {result.path} ({state}array {result.values!r}: {result.images_written} images of {shape} "
                  f"{result.dtype}, task {result.task})", highlight=False)
        return
    for flag, given in (("--labels", labels), ("--dtype", dtype != "float32"), ("--batch-size", batch_size != 16)):
        if given:
            raise MaxaError(f"{flag} applies to --out NAME.zarr (every image's values), not to {out_path}.")
    from probe.predict import output_values, predict as run_predict

    index = 0 if index is None else index
    raw, meta = run_predict(_location(adapter, storage_option), _location(store, storage_option), index, (size, size))
    values = output_values(raw, meta["task"])
    if kind == ".npy":
        np.save(out_path, values)
        out.print(f"wrote {out_path} ({' x '.join(map(str, values.shape))} float32, task {meta['task']})")
        return
    from pipelines.prediction_view import prediction_figure, prediction_image, view_inputs

    task = meta["task"]
    if bare:
        prediction_image(values, task).save(out_path)
        out.print(f"wrote {out_path} ({size}x{size}, task {task})", highlight=False)
        return
    view = view_inputs(_location(store, storage_option), index, task, trained_on=meta.get("info"))
    if view.class_names is None and (meta.get("info") or {}).get("class_names"):
        view.class_names = tuple(meta["info"]["class_names"])
    from store.reader import open_features

    shown = open_features(_location(store, storage_option)).spec
    where = (f"{meta.get('dataset')}" if shown.dataset_id == meta.get("dataset_id")
             else f"trained on {meta.get('dataset')} · shown on {shown.dataset}"
             + (" (another dataset id)" if shown.dataset == meta.get("dataset") else ""))
    title = f"{task} · {meta.get('backbone')} · {where} · {shown.split} image {index}"
    figure = prediction_figure(task, [(f"prediction {size}×{size}", values)], view, title)
    figure.save(out_path)
    out.print(f"wrote {out_path} ({' | '.join(t for t, _ in figure.panels)}; task {task})", highlight=False)


# -- report ---------------------------------------------------------------------------------------
@clean_errors
def report(
    roots: Annotated[list[Path], typer.Argument(help="Store root(s) whose results/ to report.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for results.md, index.html and img/.")] = Path("maxa-report"),
    max_feature_images: Annotated[int, typer.Option(min=0, help="Images per backbone in the feature PCA figure.")] = DEFAULT_FEATURE_IMAGES,
) -> None:
    """Paper-style tables (with the paper's numbers and Δ), plots, feature PCA and predictions as Markdown + HTML."""
    from pipelines.report import write_report

    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise MaxaError(f"store root {', '.join(missing)} does not exist; pass the --store-root you extracted into.")
    paths = write_report([str(r) for r in roots], str(out_dir), max_feature_images=max_feature_images)
    for note in paths.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    out.print(f"wrote {paths.markdown}\nwrote {paths.html} ({len(paths.images)} images in {out_dir / 'img'})",
              highlight=False)


# -- bench ----------------------------------------------------------------------------------------
@clean_errors
def bench_speed(
    backbones: Annotated[str, typer.Option(help="Comma-separated registry names or timm:NAME, e.g. dinov2_b14,siglip_384.")],
    reference: Annotated[str, typer.Option(help="Reference backbone (ViT-B/16 at 224), always timed in the same run.")] = SPEED_REFERENCE,
    batches: Annotated[int, typer.Option(min=1, help="Timed batches (paper: 10); shrink for large models on a CPU.")] = SPEED_BATCHES,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch (paper: 8).")] = SPEED_BATCH_SIZE,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = DEFAULT_DEVICE,
    store_root: Annotated[Optional[Path], typer.Option(help="Also append one task='speed' record per backbone to ROOT/results.")] = None,
    weights: Annotated[Weights, typer.Option(help="pretrained (default, as extract) or random (the same model untrained: "
                                                  "nothing to download; runtime does not depend on the weights).")] = Weights.pretrained,
    task_dim: Annotated[int, typer.Option(min=1, help="Adapter output channels D_out for its timing (1 = depth, boundaries).")] = 1,
    warmup: Annotated[Optional[int], typer.Option(min=0, help="Untimed warm-up batches (default: 1 on CPU, 2 on CUDA).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
) -> None:
    """Time backbones (and the MAXA adapter on their features) relative to ViT-B/16 at 224, as paper Fig. 6/8."""
    from pipelines.bench import speed_benchmark, write_speed_records

    rows = speed_benchmark(backbones.split(","), reference=reference, batches=batches, batch_size=batch_size,
                           device=device, weights=weights.value, task_dim=task_dim, warmup=warmup,
                           log=lambda m: err.print(m, highlight=False))
    paths = write_speed_records(store_root, rows) if store_root is not None else []
    if as_json:
        out.print_json(json.dumps(rows, default=str))
    else:
        out.print(_speed_table(rows))
    drift = rows[0]["reference_drift"]
    if not 0.83 <= drift <= 1.2:
        err.print(f"[yellow]note:[/] the reference ran {drift:.2f}x as long the second time (timed first and last): "
                  "the machine's speed changed during the run (other load?), so the ratios are noisy.",
                  highlight=False, soft_wrap=True)
    if paths:
        err.print(f"wrote {len(paths)} speed record(s) under {store_root / 'results'}", highlight=False)


# -- sweep ----------------------------------------------------------------------------------------
@clean_errors
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep TOML file, or a built-in sweep: smoke (the machinery on `shapes`, minutes on a CPU) or paper (the paper's tables; needs the datasets).")],
    store_root: Annotated[str, typer.Option(help="Where stores and results live: a folder or s3://bucket/prefix ($MAXA_STORE_ROOT).")] = DEFAULT_STORE_ROOT,
    workers: Annotated[Optional[int], typer.Option(min=0, help="LocalCluster workers (default: one per GPU, else a few CPU workers); 0 runs in this process.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing dask scheduler, e.g. tcp://head:8786.")] = None,
    data_root: Annotated[Optional[list[str]], typer.Option("--data-root", metavar="NAME=PATH", help="Override a \\[datasets.NAME] root (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (what would be extracted, probed, skipped) and stop.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    storage_option: StorageOptionList = None,
) -> None:
    """Run a sweep file: every store extracted once, then every probe, on dask; finished work is skipped."""
    from pipelines.sweep import format_plan, plan_from_file, run_sweep

    plan = plan_from_file(sweep_file, _location(store_root, storage_option), data_roots=data_root)
    for line in plan.sweep.notices:
        err.print(f"[bold yellow]warning:[/] {rich_escape(line)}", soft_wrap=True, highlight=False)
    if dry_run:
        out.print(format_plan(plan))
    summary = run_sweep(plan, workers=workers, scheduler=scheduler, dry_run=dry_run, show_progress=progress)
    out.print(summary.describe(), highlight=False)
    label = "cannot run" if dry_run else "failed"  # a dry run's table lists every job; these lines, each cause once
    for line in summary.grouped_failure_lines():
        err.print(f"[bold red]{label}:[/] {rich_escape(line)}", soft_wrap=True, highlight=False)
    if summary.failures and not dry_run:
        raise typer.Exit(1)


# -- quick start ----------------------------------------------------------------------------------
@clean_errors
def quickstart(
    store_root: Annotated[Path, typer.Option(help="Where stores, adapters and results go.")] = Path(DEFAULT_STORE_ROOT),
    backbone: Annotated[str, typer.Option(help="Backbone (random init).")] = QUICKSTART_BACKBONE,
    max_epochs: Annotated[int, typer.Option(min=1, help="Epoch cap per task.")] = QUICKSTART_MAX_EPOCHS,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = DEFAULT_DEVICE,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """The built-in default job, offline: extract `shapes` with a tiny random backbone, then train and
    evaluate the MAXA adapter on every task from the stores, and print the results."""
    from pipelines.quickstart import run_quickstart

    result = run_quickstart(store_root, backbone=backbone, max_epochs=max_epochs, device=device,
                            show_progress=progress, log=lambda m: err.print(m, highlight=False))
    stores_ls(store_root, as_json=False)
    out.print(_results_table(result.records, "MAXA on shapes (metrics on the val split; trivial = constant/majority predictor)"))
    from pipelines.quickstart import against_trivial

    out.print(against_trivial(result.records), highlight=False, soft_wrap=True)
