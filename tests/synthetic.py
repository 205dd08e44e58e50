"""Stores whose features encode the answer: the known-answer check of the adapter.

Each image is a random layout of axis-aligned rectangles on a 14×14 grid of 8×8-pixel cells, so
every target at 112 × 112 is constant within a cell (semantic, instances) or fixed by the cell and
its neighbours (boundaries). The features on the 14×14 token grid carry, per token, the class of its
cell (one-hot) and, for each of the 8 neighbours, whether that neighbour belongs to another
instance — exactly what decides the boundary pixels inside the cell — plus Gaussian noise. An
adapter that reads the token at its own position can be near-perfect; one that cannot localise
(no σ) must untangle positions from content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.datasets.base import image_ids_hash
from extract.targets import instance_boundaries
from store.catalogue import feature_store_path, target_store_path
from store.spec import FeatureSpec, LayerSpec, TargetSpec
from store.writer import ArrayDef, StoreWriter

CELLS = 14
CELL = 8
SIZE = CELLS * CELL  # output resolution of the target stores
NUM_CLASSES = 4
NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _layout(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((CELLS, CELLS), np.int32)
    classes = np.zeros((CELLS, CELLS), np.int32)
    for k in range(1, rng.integers(3, 6) + 1):
        h, w = rng.integers(3, 8, 2)
        y, x = rng.integers(0, CELLS - h), rng.integers(0, CELLS - w)
        ids[y : y + h, x : x + w] = k
        classes[y : y + h, x : x + w] = rng.integers(1, NUM_CLASSES)
    # renumber visible instances 1..K
    _, inverse = np.unique(ids, return_inverse=True)
    return inverse.reshape(ids.shape).astype(np.int32), classes


def _features(ids: np.ndarray, classes: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[classes]
    padded = np.pad(ids, 1, mode="edge")
    diff = np.stack([padded[1 + dy : 1 + dy + CELLS, 1 + dx : 1 + dx + CELLS] != ids for dy, dx in NEIGHBOURS], -1)
    f = np.concatenate([onehot, diff.astype(np.float32), np.zeros((CELLS, CELLS, 4), np.float32)], -1)
    return (f + noise * rng.standard_normal(f.shape)).astype(np.float16)


def make_synthetic_root(root: str | Path, n_train: int = 64, n_val: int = 24, noise: float = 0.1, seed: int = 0,
                        extra_channels: int = 0) -> dict[str, str]:
    """Write train/val feature and target stores under ``root``; returns their paths.
    ``extra_channels``: that many channels of pure noise after the 16 that encode the answer
    (ViT-sized images, for the reading paths that depend on an image's size)."""
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        ids_list = [f"synthetic-{split}-{i}" for i in range(n)]
        feats, sem, inst, bnd = [], [], [], []
        for _ in range(n):
            ids, classes = _layout(rng)
            f = _features(ids, classes, rng, noise)
            if extra_channels:
                f = np.concatenate([f, (noise * rng.standard_normal((CELLS, CELLS, extra_channels))).astype(np.float16)], -1)
            feats.append(f)
            big_ids = np.kron(ids, np.ones((CELL, CELL), np.int32))
            sem.append(np.kron(classes, np.ones((CELL, CELL), np.int32)).astype(np.uint8))
            inst.append(big_ids.astype(np.uint16))
            bnd.append(instance_boundaries(big_ids, 1))
        layer = LayerSpec(name="last", grid=(CELLS, CELLS), channels=feats[0].shape[-1], stride=(CELL, CELL))
        fspec = FeatureSpec(backbone="synthetic", timm_name="none", weights_id="answer", input_size=(112, 112),
                            mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", layers=(layer,),
                            dataset="synthetic", dataset_id="synthetic", split=split, num_images=n,
                            image_ids_hash=image_ids_hash(ids_list))
        fw = StoreWriter(feature_store_path(root, fspec), kind="features", key=fspec.key, spec=fspec.to_dict(),
                         arrays=[ArrayDef("features/last", (CELLS, CELLS, layer.channels), "float16", ("y", "x", "c"))],
                         image_ids=ids_list, shard_size=n).open()
        fw.write_shard(0, {"features/last": np.stack(feats)})
        fw.finalize()
        tspec = TargetSpec(dataset="synthetic", dataset_id="synthetic", split=split, kinds=("boundaries", "semantic"),
                           size=(SIZE, SIZE), num_images=n,
                           image_ids_hash=image_ids_hash(ids_list), num_classes=NUM_CLASSES)
        tw = StoreWriter(target_store_path(root, tspec), kind="targets", key=tspec.key, spec=tspec.to_dict(),
                         arrays=[ArrayDef("boundaries", (SIZE, SIZE), "uint8", ("y", "x")),
                                 ArrayDef("semantic", (SIZE, SIZE), "uint8", ("y", "x"))],
                         image_ids=ids_list, shard_size=n, compression="zstd").open()
        tw.write_shard(0, {"boundaries": np.stack(bnd), "semantic": np.stack(sem)})
        tw.finalize()
        paths[split] = fw.path
    return paths


def make_instance_root(root: str | Path, n_train: int = 64, n_val: int = 24, code_dim: int = 8, noise_dim: int = 24,
                       noise: float = 1.5, seed: int = 0) -> dict[str, str]:
    """Feature and target stores for instance discrimination whose features encode the instances.

    Each instance of an image gets its own random code (``code_dim`` channels, zero on background)
    on every token it covers, beside ``noise_dim`` channels of pure noise: an adapter that learns to
    read the code channels separates the instances of images it never saw, one that mixes in the
    noise (as a random initialisation does) cannot. Targets: ``instances`` and its companions at
    ``SIZE``², every instance "large".
    """
    from extract.target_store import MAX_INSTANCES

    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rng = np.random.default_rng([seed, 2 if split == "train" else 3])
        ids_list = [f"instances-{split}-{i}" for i in range(n)]
        feats, inst, counts, areas = [], [], [], []
        for _ in range(n):
            ids, _classes = _layout(rng)
            k = int(ids.max())
            codes = np.concatenate([np.zeros((1, code_dim)), rng.standard_normal((k, code_dim))]).astype(np.float32)
            # distractors: smooth random ramps across the image (what a random projection latches on)
            yy, xx = np.meshgrid(np.linspace(-1, 1, CELLS), np.linspace(-1, 1, CELLS), indexing="ij")
            slopes = rng.standard_normal((2, noise_dim))
            ramps = yy[..., None] * slopes[0] + xx[..., None] * slopes[1]
            f = np.concatenate([codes[ids], noise * ramps], -1)
            feats.append(f.astype(np.float16))
            big = np.kron(ids, np.ones((CELL, CELL), np.int32))
            inst.append(big.astype(np.uint16))
            counts.append(k)
            area = np.zeros(MAX_INSTANCES, np.float32)
            area[:k] = 1e5  # every instance counts as large
            areas.append(area)
        inst_arr = np.stack(inst)
        layer = LayerSpec(name="last", grid=(CELLS, CELLS), channels=code_dim + noise_dim, stride=(CELL, CELL))
        fspec = FeatureSpec(backbone="synthetic-instances", timm_name="none", weights_id="answer",
                            input_size=(112, 112), mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest",
                            layers=(layer,), dataset="synthetic-instances", dataset_id="synthetic-instances",
                            split=split, num_images=n, image_ids_hash=image_ids_hash(ids_list))
        fw = StoreWriter(feature_store_path(root, fspec), kind="features", key=fspec.key, spec=fspec.to_dict(),
                         arrays=[ArrayDef("features/last", (CELLS, CELLS, layer.channels), "float16", ("y", "x", "c"))],
                         image_ids=ids_list, shard_size=n).open()
        fw.write_shard(0, {"features/last": np.stack(feats)})
        fw.finalize()
        tspec = TargetSpec(dataset="synthetic-instances", dataset_id="synthetic-instances", split=split,
                           kinds=("instances",), size=(SIZE, SIZE), num_images=n,
                           image_ids_hash=image_ids_hash(ids_list))
        arrays = {"instances": inst_arr, "instance_count": np.asarray(counts, np.int32),
                  "instance_area": np.stack(areas), "foreground": (inst_arr > 0).astype(np.uint8),
                  "instance_ignore": np.zeros_like(inst_arr, dtype=np.uint8)}
        defs = [ArrayDef("instances", (SIZE, SIZE), "uint16", ("y", "x")),
                ArrayDef("instance_count", (), "int32", chunk_per_image=False),
                ArrayDef("instance_area", (MAX_INSTANCES,), "float32", ("instance",), chunk_per_image=False),
                ArrayDef("foreground", (SIZE, SIZE), "uint8", ("y", "x")),
                ArrayDef("instance_ignore", (SIZE, SIZE), "uint8", ("y", "x"))]
        tw = StoreWriter(target_store_path(root, tspec), kind="targets", key=tspec.key, spec=tspec.to_dict(),
                         arrays=defs, image_ids=ids_list, shard_size=n, compression="zstd").open()
        tw.write_shard(0, arrays)
        tw.finalize()
        paths[split] = fw.path
    return paths


def extract_shapes(root: str | Path, counts: dict[str, int], **options) -> dict[str, object]:
    """``run_extract`` of the built-in ``shapes`` dataset with ``test_vit`` at random initialisation,
    offline and in this process, for each ``split: number of images`` of ``counts`` (``options``: more
    of ``run_extract``'s keywords); the jobs by split."""
    from extract.jobs import run_extract

    return {split: run_extract(backbone="test_vit", dataset="shapes", split=split, store_root=root, weights="random",
                               device="cpu", dataset_options={"num_images": n}, num_workers=0, show_progress=False,
                               **options)
            for split, n in counts.items()}
