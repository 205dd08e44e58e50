"""A trained adapter's predictions for every image of a feature store, written as a Zarr store.

``maxa predict --adapter RUN --store FEATURES --out preds.zarr`` (or :func:`predict_store`) runs the
adapter in batches over the feature store and writes what :func:`probe.predict.output_values` gives
for each image (semseg class probabilities, or with ``labels`` the arg-max label map; boundary
probability; depth or distance values; the instance embedding) at the requested size. The store is
written shard by shard with the store writer (``store.writer``): crash-safe (a killed run leaves an
incomplete store that the same command finishes), one inner chunk per image, shards of at most
about :data:`SHARD_BYTES`, checksummed; ``zarr.open_group`` reads it like any other store, and
``store.predictions.open_predictions`` reads it with its image ids and spec. Memory stays bounded
by one shard of values plus one batch of raw outputs (:data:`BATCH_BYTES`), whatever the store's size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probe.predict import _forward, check_adapter_fits, image_reader, load_adapter_bytes, output_values
from runtime.devices import resolve_device
from runtime.errors import MaxaError
from runtime.progress import ProgressReporter
from runtime.provenance import provenance
from store import read_attrs
from store.location import Location, as_location
from store.predictions import PREDICTIONS_KIND
from store.reader import open_features
from store.spec import FORMAT_VERSION, content_key
from store.writer import ArrayDef, StoreWriter

__all__ = ["PredictionStoreResult", "predict_store", "prediction_array", "SHARD_BYTES", "BATCH_BYTES"]

#: Stored bytes per shard at most (one shard is held in memory before it is written).
SHARD_BYTES = 64 * 2**20
#: Raw float32 adapter output per batch at most (a batch shrinks for many classes or large sizes).
BATCH_BYTES = 128 * 2**20
#: Images per shard at most (small outputs).
MAX_SHARD_IMAGES = 256
#: Run fields recorded in the store's spec: which adapter made these values.
RUN_FIELDS = ("task", "variant", "head", "seed", "backbone", "weights", "dataset", "train_store", "eval_store",
              "train_targets", "finished", "tool_version")
DTYPES = ("float32", "float16")


@dataclass
class PredictionStoreResult:
    location: Location
    task: str
    values: str  # the array's name
    shape: tuple[int, ...]  # per image
    dtype: str
    images_written: int
    resumed: bool

    @property
    def path(self) -> str:
        return str(self.location)


def prediction_array(task: str, out_channels: int, size: tuple[int, int], *, labels: bool = False,
                     dtype: str = "float32") -> ArrayDef:
    """The per-image array a prediction store of ``task`` holds (name, shape, dtype, dimension names)."""
    h, w = (int(v) for v in size)
    if labels and task != "semseg":
        raise MaxaError(f"--labels writes a semseg label map; task {task!r} has no classes (drop --labels).")
    if dtype not in DTYPES:
        raise MaxaError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}.")
    if task == "semseg" and labels:
        return ArrayDef("labels", (h, w), "uint8" if out_channels <= 256 else "uint16", ("y", "x"),
                        attrs={"meaning": "arg-max class per pixel"})
    if task == "semseg":
        return ArrayDef("probabilities", (out_channels, h, w), dtype, ("class", "y", "x"),
                        attrs={"meaning": "class probabilities (softmax over classes)"})
    if task == "boundaries":
        return ArrayDef("boundary_probability", (h, w), dtype, ("y", "x"),
                        attrs={"meaning": "probability that a pixel is an instance boundary"})
    if task in ("depth", "distance"):
        return ArrayDef(task, (h, w), dtype, ("y", "x"), attrs={"meaning": f"{task} in the targets' units"})
    return ArrayDef("embedding", (out_channels, h, w), dtype, ("channel", "y", "x"),
                    attrs={"meaning": "per-pixel instance embedding (clustered by k-means in scoring)"})


def _check_out(out: Location, key: str) -> bool:
    """Whether ``out`` holds an unfinished prediction store of the same key (resumed); anything else
    already there is refused."""
    if not out.exists():
        return False
    meta = read_attrs(out)
    if meta is None:
        raise MaxaError(f"--out {out} already exists and is not a prediction store; remove it or choose another "
                        "--out.")
    if meta.get("kind") != PREDICTIONS_KIND or meta.get("key") != key:
        what = f"a {meta.get('kind')} store" if meta.get("kind") != PREDICTIONS_KIND else "other predictions"
        raise MaxaError(f"--out {out} already exists and holds {what}; remove it or choose another --out.")
    if meta.get("complete"):
        raise MaxaError(f"--out {out} already holds these predictions (complete); remove it to write them again, "
                        "or choose another --out.")
    return True


def predict_store(run_dir: str | Path | Location, store: str | Path | Location, out: str | Path | Location, *,
                  size: tuple[int, int], labels: bool = False, dtype: str = "float32", batch_size: int = 16,
                  device: str = "cpu", show_progress: bool = True) -> PredictionStoreResult:
    """Write the adapter of ``run_dir``'s values for every image of feature store ``store`` to ``out``.

    Args:
        run_dir: a run folder from ``maxa probe`` (path, URL or Location).
        store: the feature store (of the backbone, weights and layers the adapter was trained on).
        out: the prediction store to write (``….zarr``, path, URL or Location); it must not exist,
            except as an unfinished prediction store of the same request, which is finished.
        size: output ``(H, W)``.
        labels: semseg: store the arg-max label map instead of the class probabilities.
        dtype: ``float32`` (the values :func:`probe.predict.output_values` gives) or ``float16``.
        batch_size: images per forward pass at most (fewer where one image's output is large).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        show_progress: a bar on a terminal, plain lines elsewhere.
    """
    if not str(out).rstrip("/").endswith(".zarr"):
        raise MaxaError(f"--out {out}: a whole store's predictions go to a Zarr store (NAME.zarr).")
    size = (int(size[0]), int(size[1]))
    if batch_size < 1:
        raise MaxaError(f"--batch-size {batch_size}: needs at least 1.")
    model, meta, weights = load_adapter_bytes(run_dir)
    fs = open_features(store)
    check_adapter_fits(meta, fs, str(run_dir))
    images = image_reader(model, fs, meta)
    task = str(meta["task"])
    raw_channels = int(meta["config"]["adapter"]["out_channels"])
    array = prediction_array(task, raw_channels, size, labels=labels, dtype=dtype)
    run = {k: meta.get(k) for k in RUN_FIELDS}
    run.update(run_dir=str(run_dir), adapter_sha256=hashlib.sha256(weights).hexdigest())
    info = dict(meta.get("info") or {})
    spec = {
        "format_version": FORMAT_VERSION, "task": task, "values": array.name, "shape": list(array.shape),
        "dtype": array.dtype, "dims": list(array.dims), "size": list(size), "run": run,
        "features": {"key": fs.key, "path": fs.path, "backbone": fs.spec.backbone, "dataset": fs.spec.dataset,
                     "split": fs.spec.split, "dataset_id": fs.spec.dataset_id,
                     "image_ids_hash": fs.spec.image_ids_hash},
        "class_names": info.get("class_names"), "num_classes": info.get("num_classes"),
        "ignore_index": info.get("ignore_index"),
    }
    key = content_key({"kind": PREDICTIONS_KIND, "format_version": FORMAT_VERSION, "adapter": run["adapter_sha256"],
                       "features": fs.key, "size": list(size), "values": array.name, "dtype": array.dtype})
    loc = as_location(out)
    resumed = _check_out(loc, key)
    per_image = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
    shard_size = max(1, min(MAX_SHARD_IMAGES, len(fs), SHARD_BYTES // per_image))
    batch = max(1, min(batch_size, shard_size, BATCH_BYTES // (raw_channels * size[0] * size[1] * 4)))
    dev = resolve_device(device)
    model.to(dev)
    layers = fs.spec.layer_names
    centres = [fs.token_centres(l) for l in layers]
    bad = set(int(i) for i in fs.bad)
    writer = StoreWriter(loc, kind=PREDICTIONS_KIND, key=key, spec=spec, arrays=[array], image_ids=fs.image_ids,
                         shard_size=shard_size, compression="zstd", provenance=provenance(device=str(dev))).open()
    written = 0
    with writer:
        missing = writer.missing_shards()
        total = sum(b - a for a, b in map(writer.shard_range, missing))
        with ProgressReporter(f"predict {task} {fs.spec.dataset}/{fs.spec.split}", total,
                              enabled=show_progress) as progress:
            for shard in missing:
                start, stop = writer.shard_range(shard)
                values = np.zeros((stop - start, *array.shape), dtype=array.dtype)
                for b0 in range(start, stop, batch):
                    idx = list(range(b0, min(b0 + batch, stop)))
                    raw = _forward(model, [fs.read_batch(idx, l) for l in layers], centres, size, dev,
                                   None if images is None else images(idx))
                    for i, r in zip(idx, raw):
                        if i not in bad:  # an undecodable image's features are zeros: no prediction
                            values[i - start] = _stored(output_values(r, task), array.name)
                    progress.advance(len(idx))
                flags = np.array([i in bad for i in range(start, stop)], dtype=np.uint8)
                writer.write_shard(shard, {array.name: values}, bad=flags)
                written += stop - start
        writer.finalize()
    return PredictionStoreResult(location=loc, task=task, values=array.name, shape=tuple(array.shape),
                                 dtype=array.dtype, images_written=written, resumed=resumed)


def _stored(values: np.ndarray, name: str) -> np.ndarray:
    """What the array ``name`` keeps of one image's values."""
    return values.argmax(0) if name == "labels" else values
