"""The extraction runner end to end: stores, reuse, resume after kill -9, bad images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.datasets import create_dataset
from extract.jobs import run_extract
from extract.runner import ExtractConfig, extract_features
from store import open_features, open_targets, verify_store
from runtime.errors import BadImageError

from shared_data import shared_data

REPO = Path(__file__).resolve().parents[1]


def shapes(split: str = "val", n: int = 12):
    return create_dataset("shapes", None, split, num_images=n)


def test_extract_shapes_store_contents(tmp_path):
    job = run_extract(backbone="test_vit", dataset="shapes", split="val", store_root=tmp_path, weights="random",
                      device="cpu", batch_size=4, dataset_options={"num_images": 10}, num_workers=0,
                      show_progress=False)
    f, t = job.features, job.targets
    assert not f.reused and f.images_written == 10
    fs = open_features(f.path)
    spec = fs.spec
    assert spec.input_size == (160, 160) and spec.layers[0].grid == (10, 10)  # test_vit: 160 px, patch 16
    assert fs.read_all().shape == (10, 10, 10, 64)
    assert np.isfinite(fs.read_all().astype(np.float32)).all()
    ts = open_targets(t.path)
    assert ts.spec.image_ids_hash == spec.image_ids_hash and len(ts) == 10
    assert {"boundaries", "distance", "instances", "semantic", "depth"} <= set(ts.array_names)
    assert ts.read("boundaries", [0]).shape == (1, 224, 224)
    prov = fs.provenance
    assert prov["timm"] and prov["torch"] and prov["host"]
    # same request again: the same complete store, returned without work
    again = run_extract(backbone="test_vit", dataset="shapes", split="val", store_root=tmp_path, weights="random",
                        device="cpu", dataset_options={"num_images": 10}, show_progress=False)
    assert again.features.reused and again.features.path == f.path and again.targets.reused


def test_features_match_direct_forward(tmp_path):
    """The stored features are the backbone's own features of the resized, normalised image."""
    import torch

    from extract.backbones import load_backbone
    from extract.images import BackboneImages

    reader = shapes(n=3)
    bb = load_backbone("test_vit", weights="random", device="cpu")
    res = extract_features(bb, reader, str(tmp_path), ExtractConfig(batch_size=2, num_workers=0), show_progress=False)
    images = BackboneImages(reader, bb.input_size, bb.mean, bb.std, bb.interpolation)
    x = torch.stack([images[i]["pixels"] for i in range(3)])
    with torch.inference_mode():
        ref = bb.model.forward_features(x)[:, bb.model.num_prefix_tokens:].reshape(3, 10, 10, 64)
    np.testing.assert_array_equal(open_features(res.path).read_all(), ref.to(torch.float16).numpy())


def test_worker_decoding_equals_inline(tmp_path):
    a = extract_features("test_vit", shapes(n=6), str(tmp_path / "a"), ExtractConfig(weights="random", device="cpu",
                         batch_size=4, num_workers=0), show_progress=False)
    b = extract_features("test_vit", shapes(n=6), str(tmp_path / "b"), ExtractConfig(weights="random", device="cpu",
                         batch_size=4, num_workers=2), show_progress=False)
    np.testing.assert_array_equal(open_features(a.path).read_all(), open_features(b.path).read_all())


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from extract.datasets import create_dataset
    from extract.runner import ExtractConfig, extract_features

    def slow(shard):
        print(shard, flush=True)
        time.sleep(0.4)

    reader = create_dataset("shapes", None, "val", num_images=24)
    extract_features("test_vit", reader, sys.argv[1], ExtractConfig(weights="random", device="cpu", batch_size=2,
                     shard_size=4, num_workers=0), show_progress=False, on_shard=slow)
    """
)


def test_kill9_then_resume_is_bitwise_equal(tmp_path):
    ref = extract_features("test_vit", shapes(n=24), str(tmp_path / "ref"), ExtractConfig(weights="random", device="cpu",
                           batch_size=2, shard_size=4, num_workers=0), show_progress=False)
    script = tmp_path / "extract_slowly.py"
    script.write_text(KILL_SCRIPT)
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    written = [proc.stdout.readline(), proc.stdout.readline()]  # two shards on disk
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert all(line.strip() for line in written), "the subprocess died before writing two shards"
    path = Path(ref.path.replace(str(tmp_path / "ref"), str(root)))
    partial = open_features(path, allow_incomplete=True)
    done = partial.shard_done()
    assert 2 <= done.sum() < len(done), f"kill landed at an unexpected point: {done}"
    with pytest.raises(Exception, match="incomplete"):
        open_features(path)
    resumed = extract_features("test_vit", shapes(n=24), str(root), ExtractConfig(weights="random", device="cpu",
                               batch_size=2, shard_size=4, num_workers=0), show_progress=False)
    assert resumed.path == str(path) and not resumed.reused
    assert resumed.images_written == 4 * int((~done).sum()) < 24  # only the missing shards
    np.testing.assert_array_equal(open_features(path).read_all(), open_features(ref.path).read_all())
    assert verify_store(path).ok and not list(path.rglob("*.partial"))


def _tiny_segfolder(tmp_path: Path, corrupt: bool) -> Path:
    root = tmp_path / "seg"
    for split in ("train",):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), np.uint8)).save(root / split / f"im{i}.png")
            Image.fromarray(np.full((48, 64), i % 3, np.uint8)).save(root / f"{split}annot" / f"im{i}.png")
    if corrupt:
        data = (root / "train" / "im2.png").read_bytes()
        (root / "train" / "im2.png").write_bytes(data[: len(data) // 3])
    return root


def test_corrupt_image_names_file_or_is_skipped(tmp_path):
    root = _tiny_segfolder(tmp_path, corrupt=True)
    reader = create_dataset("segfolder", root, "train", num_classes=3)
    with pytest.raises(BadImageError, match="im2.png"):
        extract_features("test_vit", reader, str(tmp_path / "s"), ExtractConfig(weights="random", device="cpu", batch_size=2,
                         num_workers=0), show_progress=False)
    res = extract_features("test_vit", reader, str(tmp_path / "s"), ExtractConfig(weights="random", device="cpu", batch_size=2,
                           num_workers=0, skip_bad=True), show_progress=False)
    fs = open_features(res.path)
    assert fs.bad.tolist() == [2] and res.bad_images and res.bad_images[0].endswith("im2.png")
    assert not np.any(fs[2]) and np.any(fs[1])
    assert fs.meta["num_bad"] == 1


def test_coco_mini_real_photos(tmp_path):
    job = run_extract(backbone="test_vit", dataset="coco", root=shared_data("coco_mini"), split="val",
                      store_root=tmp_path, weights="random", device="cpu", limit=6, num_workers=0,
                      show_progress=False)
    fs, ts = open_features(job.features.path), open_targets(job.targets.path)
    assert len(fs) == len(ts) == 6 and fs.spec.image_ids_hash == ts.spec.image_ids_hash
    assert ts.read_all("instance_count").sum() > 0


def test_writer_threads_leave_cores_to_decoding():
    from extract.runner import MAX_WRITER_THREADS, default_writer_threads

    assert default_writer_threads(1, cpus=2) == 1  # this machine: the forward and one decode worker
    assert default_writer_threads(4, cpus=16) == MAX_WRITER_THREADS == 4  # a 16-core GPU host
    assert default_writer_threads(4, cpus=8) == 3
    assert default_writer_threads(0, cpus=1) == 1  # always one
