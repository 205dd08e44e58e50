"""Build a dataset split's target store once, at the output resolution, for every backbone.

Annotations are decoded and turned into targets (``extract.targets``) in DataLoader workers and
written shard by shard with the same crash-safe writer as feature stores. The same workers decode
each image and keep it resized to the output size (``input_image``, :func:`extract.targets.resize_image`)
for heads guided by the image and for pictures beside the predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader, Dataset

from extract.datasets.base import DatasetReader, image_ids_hash
from extract.images import default_decode_workers
from runtime.progress import ProgressReporter
from runtime.provenance import provenance
from extract.targets import TARGET_OUTPUTS, build_targets
from extract.targets import TargetConfig, resize_image
from store.catalogue import target_store_path
from store.location import Location
from runtime.errors import BadImageError, MaxaError
from store.spec import DEFAULT_TARGET_SIZE, TargetSpec
from store.writer import ArrayDef, StoreWriter

__all__ = ["TargetBuildResult", "build_target_store", "target_spec_for", "MAX_INSTANCES", "IMAGE_ARRAY"]

#: The resized input image's array (``(H, W, 3)`` uint8, dims ``y, x, rgb``) in a store with images.
IMAGE_ARRAY = "input_image"
#: Per-image instance areas are stored padded to this many instances.
MAX_INSTANCES = 256
TARGET_SHARD_SIZE = 256


@dataclass
class TargetBuildResult:
    location: Location  # the store, with the storage options it was reached with
    spec: TargetSpec
    reused: bool
    images_written: int = 0
    seconds: float = 0.0
    truncated_instances: int = 0

    @property
    def path(self) -> str:
        """The store's path or URL."""
        return str(self.location)


def _array_defs(kinds: tuple[str, ...], size: tuple[int, int], image: bool = False) -> list[ArrayDef]:
    yx = ("y", "x")
    table = {
        "instances": ArrayDef("instances", size, "uint16", yx),
        "instance_count": ArrayDef("instance_count", (), "int32", chunk_per_image=False),
        "instance_area": ArrayDef("instance_area", (MAX_INSTANCES,), "float32", ("instance",), chunk_per_image=False),
        "foreground": ArrayDef("foreground", size, "uint8", yx),
        "instance_ignore": ArrayDef("instance_ignore", size, "uint8", yx),
        "boundaries": ArrayDef("boundaries", size, "uint8", yx),
        "distance": ArrayDef("distance", size, "float32", yx),
        "semantic": ArrayDef("semantic", size, "uint8", yx),
        "depth": ArrayDef("depth", size, "float32", yx),
    }
    names = [name for kind in kinds for name in TARGET_OUTPUTS[kind]]
    arrays = [table[n] for n in dict.fromkeys(names)]
    if image:
        arrays.append(ArrayDef(IMAGE_ARRAY, (*size, 3), "uint8", ("y", "x", "rgb")))
    return arrays


def target_spec_for(reader: DatasetReader, image_ids: list[str], config: TargetConfig,
                    image: bool = True) -> TargetSpec:
    """The spec of ``reader``'s target store (``image``: with the resized input images)."""
    ident = reader.identity()
    return TargetSpec(
        dataset=ident["dataset"],
        split=ident["split"],
        dataset_options=ident["options"],
        dataset_id=reader.dataset_id(),
        size=config.size,
        kinds=tuple(sorted(reader.targets)),
        definitions={k: v for k, v in config.definitions().items()
                     if k in reader.targets or k == "resize" or (image and k == IMAGE_ARRAY)},
        build=config.to_dict(),
        num_images=len(image_ids),
        image_ids_hash=image_ids_hash(image_ids),
        num_classes=reader.num_classes,
        ignore_index=reader.ignore_index,
        class_names=tuple(reader.class_names) if reader.class_names else None,
        large_area=float(getattr(reader, "large_area", 96.0**2)),
        image=image,
    )


class _TargetItems(Dataset):
    """Item ``index``: ``(index, arrays, bad)``, ``bad`` the file and reason of an image that could
    not be decoded (its ``input_image`` is zeros), else ``""``; the caller decides (raise, or ``--skip-bad``)."""

    def __init__(self, reader: DatasetReader, config: TargetConfig, kinds: tuple[str, ...],
                 image: bool = False) -> None:
        self.reader, self.config, self.kinds, self.image = reader, config, kinds, image

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[int, dict[str, np.ndarray], str]:
        annotation = self.reader.read_annotation(index)
        # Labels of another size than their image would be resized onto the wrong pixels: refuse
        # (ImageSizeError, from the image header) before the store can be finalised.
        self.reader.check_image_size(index)
        out = build_targets(annotation, self.config, self.kinds)
        if "instance_area" in out:
            area = np.zeros(MAX_INSTANCES, np.float32)
            k = min(len(out["instance_area"]), MAX_INSTANCES)
            area[:k] = out["instance_area"][:k]
            out["instance_area"] = area
        bad = ""
        if self.image:
            try:  # full size: a JPEG draft would shift the geometry against the targets'
                out[IMAGE_ARRAY] = resize_image(self.reader.read_image(index), self.config.size)
            except BadImageError as err:  # exceptions lose their type crossing processes
                out[IMAGE_ARRAY] = np.zeros((*self.config.size, 3), np.uint8)
                bad = f"{err.path}\t{err.reason}"
        return index, out, bad


def build_target_store(
    reader: DatasetReader,
    store_root: str | Location,
    *,
    size: tuple[int, int] = DEFAULT_TARGET_SIZE,
    limit: int | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
    config: TargetConfig | None = None,
    image: bool = True,
    skip_bad: bool = False,
) -> TargetBuildResult:
    """Build (or find) the target store of ``reader``'s split under ``store_root``.

    Args:
        reader: the dataset split.
        store_root: root of stores: a folder, a URL or a store Location.
        size: output ``(H, W)``.
        limit: only the first ``limit`` images (must match the feature store's ``--limit``).
        num_workers: DataLoader workers.
        show_progress: draw a progress bar.
        config: target-building parameters (default: ``TargetConfig(size=size)``).
        image: also keep each input image resized to the output size (``input_image``; part of the
            store's key). Costs one full-size decode per image in the workers and ≈ 3·H·W bytes
            per image on disk (docs/store-format.md).
        skip_bad: an image that cannot be decoded is recorded as bad (zeros; never trained or
            scored on) instead of stopping the build, as ``maxa extract --skip-bad`` does.
    """
    config = config or TargetConfig(size=tuple(size))
    kinds = tuple(sorted(reader.targets))
    if not kinds:
        raise MaxaError(f"dataset {reader.name!r} provides no targets.")
    image_ids = list(reader.image_ids[:limit] if limit is not None else reader.image_ids)
    spec = target_spec_for(reader, image_ids, config, image=image)
    path = target_store_path(store_root, spec)
    arrays = _array_defs(kinds, spec.size, image=image)
    writer = StoreWriter(
        path, kind="targets", key=spec.key, spec=spec.to_dict(), arrays=arrays, image_ids=image_ids,
        shard_size=TARGET_SHARD_SIZE, compression="zstd", provenance=provenance(),
    ).open()
    result = TargetBuildResult(location=path, spec=spec, reused=writer.complete)
    if writer.complete:
        _check_reusable(path, reader, skip_bad)
        return result
    with writer:  # releases the store's lease however this ends, set-up included
        t0 = time.perf_counter()
        missing = writer.missing_shards()
        indices = [i for s in missing for i in range(*writer.shard_range(s))]
        workers = default_decode_workers() if num_workers is None else num_workers
        loader = DataLoader(
            _TargetItems(reader, config, kinds, image), sampler=indices, batch_size=None, num_workers=workers,
            prefetch_factor=8 if workers else None,
        )
        buffers: dict[int, dict[str, np.ndarray]] = {}
        bad_flags: dict[int, np.ndarray] = {}
        bad_images: list[str] = []
        with ProgressReporter(f"targets {spec.dataset}/{spec.split}", len(indices), enabled=show_progress) as bar:
            for index, out, bad in loader:
                shard = index // writer.shard_size
                start, stop = writer.shard_range(shard)
                if shard not in buffers:
                    buffers[shard] = {a.name: np.zeros((stop - start, *a.shape), a.dtype) for a in arrays}
                    bad_flags[shard] = np.zeros(stop - start, np.uint8)
                if bad:
                    file, reason = bad.split("\t", 1)
                    if not skip_bad:
                        raise BadImageError(file, reason)
                    bad_images.append(file)
                    bad_flags[shard][index - start] = 1
                for name, value in out.items():
                    buffers[shard][name][index - start] = value
                if "instance_count" in out and int(out["instance_count"]) > MAX_INSTANCES:
                    result.truncated_instances += 1
                bar.advance(1)
                result.images_written += 1
                if index == stop - 1:
                    writer.write_shard(shard, buffers.pop(shard), bad_flags.pop(shard))
            writer.finalize(max_instances=MAX_INSTANCES, truncated_instance_areas=result.truncated_instances,
                            dataset_warnings=list(getattr(reader, "warnings", [])), bad_images=bad_images)
    result.seconds = time.perf_counter() - t0
    return result


def _check_reusable(path: Location, reader: DatasetReader, skip_bad: bool) -> None:
    """A complete store with images recorded as undecodable is reused only as a feature store
    would be (``extract.runner.check_reusable``): asked to skip them, and only while they still fail."""
    from store.reader import open_targets

    if open_targets(path).bad.size:
        from extract.runner import check_reusable

        check_reusable(path, reader, skip_bad=skip_bad)
