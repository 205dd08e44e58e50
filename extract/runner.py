"""The extraction runner: a frozen backbone over a dataset split, once, into a feature store.

Decoding runs in DataLoader workers, the forward pass in the main thread under
``torch.inference_mode()`` (autocast on GPU), and shard writes in a small writer pool, so the three
overlap. Batches never cross a shard boundary and always start at a shard's first image, so a run
resumed after a kill forms exactly the same batches and produces a bitwise-equal store.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from extract.backbones import LoadedBackbone, load_backbone
from extract.config import DEFAULT_BATCH_SIZE, ExtractConfig
from runtime.devices import resolve_device
from extract.datasets.base import DatasetReader, image_ids_hash
from extract.images import BackboneImages, collate_images, default_decode_workers
from runtime.progress import ProgressReporter
from runtime.provenance import provenance
from store.location import Location
from store.catalogue import feature_store_path
from runtime.errors import BadImageError, MaxaError, StoreError
from store.reader import open_store
from store.quantize import quantization_for
from store.spec import FeatureSpec, LayerSpec
from store.writer import StoreWriter, feature_array_name, feature_arrays

__all__ = ["DEFAULT_BATCH_SIZE", "ExtractConfig", "ExtractResult", "extract_features", "feature_spec_for", "default_shard_size",
           "default_writer_threads", "resolve_device",
           "open_feature_store", "finalize_feature_store", "check_reusable"]

FP16_MAX = 65504.0
#: Target bytes per shard: big enough for efficient I/O, small enough to buffer.
SHARD_BYTES = 256 * 2**20
#: Most writer threads: each holds a shard (``SHARD_BYTES``) in memory while it encodes and writes
#: it, and four already outrun a local disk without compression (~2 GB/s each on one core).
MAX_WRITER_THREADS = 4


@dataclass
class ExtractResult:
    """What an extraction produced or found."""

    location: Location  # the store, with the storage options it was reached with
    spec: FeatureSpec
    reused: bool
    images_written: int = 0
    seconds: float = 0.0
    bad_images: list[str] = field(default_factory=list)
    clipped_values: int = 0

    @property
    def path(self) -> str:
        """The store's path or URL."""
        return str(self.location)

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0


def default_shard_size(spec_layers: tuple[LayerSpec, ...]) -> int:
    per_image = sum(l.grid[0] * l.grid[1] * l.channels * 2 for l in spec_layers)
    return int(max(1, min(1024, SHARD_BYTES // per_image)))


def default_writer_threads(decode_workers: int, cpus: int | None = None) -> int:
    """Threads that write finished shards, each its own shard, while the forward goes on.

    Encoding a shard (crc32c, zstd; ``store.fastwrite``) releases the GIL, so the threads run in
    parallel, on the cores left once the forward's thread and the ``decode_workers`` have theirs
    (writes must not starve decoding): at least one, at most :data:`MAX_WRITER_THREADS`. Two cores
    and one decode worker: one thread; a 16-core GPU host with four decode workers: four.
    """
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    return max(1, min(MAX_WRITER_THREADS, cpus - 1 - decode_workers))


def feature_spec_for(backbone: LoadedBackbone, reader: DatasetReader, image_ids: list[str], *,
                     compression: str = "none") -> FeatureSpec:
    """The spec (and so the content key) of ``backbone`` over ``image_ids`` of ``reader``, stored with
    ``compression`` (a lossy one is the spec's ``quantization``; lossless ones leave the spec alone)."""
    layers = tuple(
        LayerSpec(
            name=name,
            grid=backbone.grids[name],
            channels=backbone.channels[name],
            stride=_pair(backbone.stride(name)),
            token_centres=backbone.token_centres(name).tolist(),
        )
        for name in backbone.layer_names
    )
    ident = reader.identity()
    return FeatureSpec(
        backbone=backbone.entry.name,
        timm_name=backbone.entry.timm_name,
        weights_id=backbone.weights_id,
        input_size=backbone.input_size,
        mean=backbone.mean,
        std=backbone.std,
        interpolation=backbone.interpolation,
        layers=layers,
        dataset=ident["dataset"],
        split=ident["split"],
        dataset_options=ident["options"],
        dataset_id=reader.dataset_id(),
        num_images=len(image_ids),
        image_ids_hash=image_ids_hash(image_ids),
        quantization=quantization_for(compression),
    )


def extract_features(
    backbone: str | LoadedBackbone,
    reader: DatasetReader,
    store_root: str | Location,
    config: ExtractConfig | None = None,
    *,
    show_progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    shards: list[int] | None = None,
    finalize: bool = True,
    coordinated: bool = False,
) -> ExtractResult:
    """Extract ``backbone`` features of ``reader``'s images into a store under ``store_root``.

    Re-running with the same arguments returns the existing store at once if it is complete, and
    finishes only the missing shards if it is not. Two processes asking for the same store at once
    share it: the second waits on the first's lease, then reuses the store (or takes over a stale
    lease and writes only the missing shards); see ``store.lease``.

    Args:
        backbone: registry name (loaded with ``config.weights`` and ``config.layers``) or an
            already loaded backbone.
        reader: the dataset split.
        store_root: root directory of stores, a URL (``s3://bucket/prefix``) or a store Location
            (which carries fsspec storage options: endpoint, credentials, ...).
        config: the extraction settings (default: ``ExtractConfig()``).
        show_progress: draw a progress bar.
        on_shard: called with each shard index once it is on disk (tests use it).
        shards: write only these shard indices (those already flagged done are skipped); default:
            every missing shard.
        finalize: mark the store complete once no shard is missing (default). ``False`` leaves
            that to a coordinator (:func:`finalize_feature_store`).
        coordinated: run as a shard worker under a coordinator that created the store and holds
            its lease (:func:`open_feature_store`): the store must exist; it is opened for writing
            without claiming the lease (so the worker never waits on its coordinator), only
            ``shards`` are written, and the store is never finalized here.
    """
    config = config or ExtractConfig()
    dev = resolve_device(config.device)
    if isinstance(backbone, LoadedBackbone):
        model = backbone
    else:
        model = load_backbone(backbone, weights=config.weights, device=str(dev), layers=config.layers)
    image_ids = _image_ids(reader, config.limit)
    spec = feature_spec_for(model, reader, image_ids, compression=config.compression)
    path = feature_store_path(store_root, spec)
    writer = _feature_writer(spec, path, image_ids, config, device=str(dev))
    if coordinated:
        writer.attach()
    else:
        writer.open()
    with writer:  # releases the store's lease however this ends (a coordinated writer holds none)
        if writer.complete:
            check_reusable(path, reader, skip_bad=config.skip_bad)
            return ExtractResult(location=path, spec=spec, reused=True)
        missing = _wanted_shards(writer, path, shards)
        result = ExtractResult(location=path, spec=spec, reused=False)
        start_time = time.perf_counter()
        if missing:
            _run_shards(model, reader, writer, missing, spec, dev, config, show_progress, on_shard, result)
        if finalize and not coordinated and not writer.missing_shards():
            writer.finalize(bad_images=result.bad_images, clipped_values=result.clipped_values)
    result.seconds = time.perf_counter() - start_time
    return result


def _image_ids(reader: DatasetReader, limit: int | None) -> list[str]:
    image_ids = list(reader.image_ids[:limit] if limit is not None else reader.image_ids)
    if not image_ids:
        raise MaxaError(f"dataset {reader.name!r} split {reader.split!r} has no images to extract.")
    return image_ids


def _wanted_shards(writer: StoreWriter, path: Location, shards: list[int] | None) -> list[int]:
    """The missing shards, only those of ``shards`` if given (an index out of range is an error)."""
    missing = writer.missing_shards()
    if shards is None:
        return missing
    wanted = {int(s) for s in shards}
    bad = sorted(s for s in wanted if not 0 <= s < writer.num_shards)
    if bad:
        raise ValueError(f"{path} has shards 0..{writer.num_shards - 1}; asked for {bad}")
    return [s for s in missing if s in wanted]


def check_reusable(path: str | Location, reader: DatasetReader, *, skip_bad: bool) -> None:
    """Refuse to reuse a complete store (features, or targets with images) whose recorded bad images
    no longer tell the truth.

    A store extracted with ``--skip-bad`` holds zeros for the images it could not decode. Reusing
    it is right only while those files are still undecodable and the user still asks to skip them:
    after a repair the store would silently keep the zeros. Only the recorded images are decoded
    again, so this costs nothing for a store without bad images.
    """
    bad = open_store(path, allow_incomplete=False).bad
    if bad.size == 0:
        return
    first = reader.image_ids[int(bad[0])]
    if not skip_bad:
        raise StoreError(
            f"{path} holds {bad.size} image(s) recorded as undecodable (e.g. {first}) by an extraction with "
            f"--skip-bad; pass --skip-bad to use it as it is, or repair the files, remove the store "
            f"(`maxa stores rm {path}`) and extract again."
        )
    for index in bad:
        try:
            reader.read_image(int(index))
        except BadImageError:
            continue
        raise StoreError(
            f"{path} recorded image {reader.image_ids[int(index)]} as undecodable, but it decodes now: the store "
            f"is stale (it holds zeros for that image). Remove it (`maxa stores rm {path}`) and extract again."
        )


def _feature_writer(spec: FeatureSpec, path: Location, image_ids: list[str], config: ExtractConfig, *,
                    device: str) -> StoreWriter:
    return StoreWriter(
        path, kind="features", key=spec.key, spec=spec.to_dict(), arrays=feature_arrays(spec), image_ids=image_ids,
        shard_size=config.shard_size or default_shard_size(spec.layers), compression=config.compression,
        provenance=provenance(device=device, batch_size=config.batch_size),
        wait_timeout=config.wait_timeout,
    )


def open_feature_store(
    backbone: LoadedBackbone,
    reader: DatasetReader,
    store_root: str | Location,
    config: ExtractConfig | None = None,
) -> StoreWriter:
    """The coordinator's side of a distributed extraction: create (or find) the store and hold its lease.

    ``backbone`` only needs its geometry and weights id (its model may be ``None``): the spec, and so
    the store's key and path, do not depend on the weights' values. Shard workers then call
    :func:`extract_features` with ``coordinated=True`` and their ``shards``; the coordinator ends
    with :func:`finalize_feature_store` (or ``writer.close()`` to leave the store for a re-run).
    A complete store comes back with ``writer.complete`` set and no lease held.
    """
    config = config or ExtractConfig()
    image_ids = _image_ids(reader, config.limit)
    spec = feature_spec_for(backbone, reader, image_ids, compression=config.compression)
    writer = _feature_writer(spec, feature_store_path(store_root, spec), image_ids, config, device=config.device)
    return writer.open()


def finalize_feature_store(writer: StoreWriter, *, bad_images: list[str] | None = None,
                           clipped_values: int = 0) -> None:
    """Mark a coordinated store complete (every shard must be flagged done) and release its lease."""
    writer.finalize(bad_images=list(bad_images or []), clipped_values=int(clipped_values))


def _batches(writer: StoreWriter, shards: list[int], batch_size: int) -> list[list[int]]:
    out = []
    for s in shards:
        start, stop = writer.shard_range(s)
        out.extend(list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size))
    return out


def _run_shards(model, reader, writer, shards, spec, dev, config, show_progress, on_shard, result) -> None:
    # workers decode and resize to uint8; normalisation happens here, on the device (bitwise the same)
    images = BackboneImages(reader, spec.input_size, spec.mean, spec.std, spec.interpolation, normalize=False)
    # at least one (targets may take none): decoding overlaps the forward pass on this thread
    workers = default_decode_workers(at_least=1) if config.num_workers is None else config.num_workers
    loader = DataLoader(
        images,
        batch_sampler=_batches(writer, shards, config.batch_size),
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_lower_priority if dev.type == "cpu" else None,
    )
    shard_of = {s: writer.shard_range(s) for s in shards}
    buffers: dict[int, dict[str, np.ndarray]] = {}
    bad_flags: dict[int, np.ndarray] = {}
    threads = default_writer_threads(workers)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="maxa-writer")
    pending: list[Future] = []
    total = sum(stop - start for start, stop in shard_of.values())
    progress = ProgressReporter(f"extract {spec.backbone} {spec.dataset}/{spec.split}", total, enabled=show_progress)

    def write(shard: int, data: dict[str, np.ndarray], bad: np.ndarray) -> int:
        writer.write_shard(shard, data, bad)
        if on_shard is not None:
            on_shard(shard)
        return shard

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    try:
        with progress:
            for batch in loader:
                idx = batch["index"].numpy()
                for k, msg in enumerate(batch["bad"]):
                    if msg:
                        path, _, reason = msg.partition("\t")
                        if not config.skip_bad:
                            raise BadImageError(path, reason)
                        result.bad_images.append(path)
                pixels = images.normalize(batch["pixels"].to(dev, non_blocking=True))
                with torch.inference_mode(), autocast:
                    feats = model.forward(pixels)
                shard = int(idx[0] // writer.shard_size)
                start, stop = shard_of[shard]
                if shard not in buffers:
                    buffers[shard] = {
                        feature_array_name(l.name): np.zeros((stop - start, *l.grid, l.channels), np.float16)
                        for l in spec.layers
                    }
                    bad_flags[shard] = np.zeros(stop - start, np.uint8)
                rows = slice(int(idx[0]) - start, int(idx[-1]) + 1 - start)  # batches are consecutive images
                for l in spec.layers:
                    result.clipped_values += _store_fp16(feats[l.name], buffers[shard][feature_array_name(l.name)][rows])
                for k, msg in enumerate(batch["bad"]):
                    if msg:
                        bad_flags[shard][idx[k] - start] = 1
                        for arr in buffers[shard].values():
                            arr[idx[k] - start] = 0
                progress.advance(len(idx))
                result.images_written += len(idx)
                if idx[-1] == stop - 1:  # last batch of the shard: hand it to a writer
                    pending = _reap(pending)
                    while len(pending) >= threads:  # bound the memory held by shards in flight
                        pending.pop(0).result()
                    pending.append(pool.submit(write, shard, buffers.pop(shard), bad_flags.pop(shard)))
            for f in pending:
                f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=False)


def _pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        return float(value[0]), float(value[1])
    return float(value), float(value)


def _lower_priority(_worker_id: int) -> None:
    """On a CPU-only run the forward saturates the cores: decoding should fill the gaps, not
    preempt the forward's threads (a preempted thread stalls the whole parallel region)."""
    try:
        os.nice(10)
    except OSError:
        pass


def _reap(pending: list[Future]) -> list[Future]:
    """Drop finished writes, re-raising any write error here."""
    still = []
    for f in pending:
        if f.done():
            f.result()
        else:
            still.append(f)
    return still


def _store_fp16(x: torch.Tensor, out: np.ndarray) -> int:
    """Cast ``x`` to float16 into ``out`` (a view of a shard buffer); returns the clipped count.

    Fast path: one ``aminmax`` pass proves every value finite and within float16's range (NaN
    propagates into it), then the cast writes straight into ``out``. Otherwise :func:`_to_fp16`
    clips and counts. The stored values are the same either way.
    """
    lo, hi = torch.aminmax(x)
    if bool(lo >= -FP16_MAX) and bool(hi <= FP16_MAX):
        if x.device.type == "cpu":
            torch.from_numpy(out).copy_(x)
        else:
            out[...] = x.to(torch.float16).cpu().numpy()
        return 0
    values, clipped = _to_fp16(x)
    out[...] = values
    return clipped


def _to_fp16(x: torch.Tensor) -> tuple[np.ndarray, int]:
    """Cast on the device; values beyond float16's range are clipped (and counted), not inf."""
    bad = ~torch.isfinite(x) | (x.abs() > FP16_MAX)
    clipped = int(bad.sum())
    if clipped:
        x = x.float().nan_to_num(0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp(-FP16_MAX, FP16_MAX)
    return x.to(torch.float16).cpu().numpy(), clipped
