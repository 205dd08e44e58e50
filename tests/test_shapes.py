"""The built-in procedural dataset ``shapes``."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from PIL import Image

from extract.datasets import create_dataset, dataset_names, get_dataset_class
from extract.datasets.shapes import SHAPE_CLASSES, ShapesDataset, large_area_for, render_shapes
from runtime.errors import DatasetError


def _ann_bytes(ann) -> bytes:
    parts = [repr(ann.size).encode()]
    for name in ("instance_masks", "instance_classes", "instance_areas", "instance_order", "ignore_mask", "semantic", "depth"):
        a = getattr(ann, name)
        parts.append(b"none" if a is None else np.ascontiguousarray(a).tobytes() + repr((a.dtype, a.shape)).encode())
    return b"|".join(parts)


def test_registered_and_defaults():
    assert "shapes" in dataset_names()
    assert get_dataset_class("shapes") is ShapesDataset
    train = create_dataset("shapes", None, "train")
    val = create_dataset("shapes", None, "val", num_images=None)
    assert len(train) == 256 and len(val) == 64
    assert train.image_ids[3] == "shapes-train-00003"
    assert val.image_ids[-1] == "shapes-val-00063"
    assert train.num_classes == 5 and train.class_names == list(SHAPE_CLASSES)
    assert train.targets == {"boundaries", "distance", "instances", "semantic", "depth"}
    # Explicit defaults give the same identity as omitted ones.
    assert create_dataset("shapes", "/ignored", "train", seed=0, image_size=224).identity() == train.identity()
    assert train.identity() != create_dataset("shapes", None, "train", seed=1).identity()


@pytest.mark.parametrize(
    "options", [{"seed": -1}, {"num_images": 0}, {"image_size": 8}, {"seed": "a"}, {"colour": True}]
)
def test_bad_options(options):
    with pytest.raises(DatasetError):
        ShapesDataset(None, "train", **options)


def test_bad_split():
    with pytest.raises(DatasetError):
        ShapesDataset(None, "trainval")


def test_deterministic_pure_function_of_seed_split_index():
    a = ShapesDataset(None, "train", seed=3, num_images=8)
    b = ShapesDataset(None, "train", seed=3, num_images=8)
    # Different access order, fresh readers: identical bytes.
    for i in (5, 0, 5, 2):
        assert a.read_image(i).tobytes() == b.read_image(i).tobytes()
        assert _ann_bytes(a.read_annotation(i)) == _ann_bytes(b.read_annotation(i))
    img, ann = render_shapes(3, 0, 5, 224)
    assert img.tobytes() == np.asarray(a.read_image(5)).tobytes()
    assert _ann_bytes(ann) == _ann_bytes(a.read_annotation(5))
    # Other seed, other split, other index: different images.
    other_seed = ShapesDataset(None, "train", seed=4, num_images=8)
    val = ShapesDataset(None, "val", seed=3, num_images=8)
    assert a.read_image(5).tobytes() != other_seed.read_image(5).tobytes()
    assert a.read_image(5).tobytes() != val.read_image(5).tobytes()
    assert a.read_image(5).tobytes() != a.read_image(6).tobytes()
    # num_images does not change the images themselves.
    more = ShapesDataset(None, "train", seed=3, num_images=100)
    assert more.read_image(5).tobytes() == a.read_image(5).tobytes()


def test_image_and_annotation_consistent():
    ds = ShapesDataset(None, "val", num_images=24, image_size=160)
    large = large_area_for(160)
    assert ds.large_area == pytest.approx(large)
    for i in range(len(ds)):
        img = ds.read_image(i, draft_size=(64, 64))
        ann = ds.read_annotation(i)
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (160, 160)
        assert ann.size == (160, 160)
        masks = ann.instance_masks
        k = masks.shape[0]
        assert masks.dtype == bool and masks.shape == (k, 160, 160)
        assert 3 <= k <= 6
        assert ann.instance_classes.shape == ann.instance_areas.shape == ann.instance_order.shape == (k,)
        assert set(ann.instance_classes.tolist()) <= {1, 2, 3, 4}
        assert np.all(np.diff(ann.instance_order) > 0)
        # Visible masks: disjoint, areas = pixel counts, >= 20 pixels, >= 3 large.
        assert masks.sum(axis=0).max() <= 1
        np.testing.assert_array_equal(ann.instance_areas, masks.sum(axis=(1, 2)))
        assert ann.instance_areas.min() >= 20
        assert (ann.instance_areas > large).sum() >= 3
        # Semantic: the class of the visible object, 0 exactly off all masks.
        sem = ann.semantic
        assert sem.dtype == np.uint8 and sem.shape == (160, 160)
        expected = np.zeros((160, 160), dtype=np.uint8)
        for m, c in zip(masks, ann.instance_classes):
            expected[m] = c
        if ann.ignore_mask is not None:
            expected[ann.ignore_mask] = 255
        np.testing.assert_array_equal(sem, expected)
        np.testing.assert_array_equal(sem > 0, masks.any(axis=0) | (ann.ignore_mask if ann.ignore_mask is not None else False))
        # Depth: positive metres everywhere; every object nearer than the background plane there.
        d = ann.depth
        assert d.dtype == np.float32 and d.shape == (160, 160)
        assert np.all(np.isfinite(d)) and d.min() > 0 and d.max() < 10
        bg = ~masks.any(axis=0)
        assert np.all(np.diff(d[:, 0][bg[:, 0]]) < 0)  # background recedes towards the top
        # Objects are nearer than the background plane (which depends on the row only).
        bg_plane_rows = {int(r): float(d[r, c]) for r, c in zip(*np.nonzero(bg))}
        for m in masks:
            ys, xs = np.nonzero(m)
            for y, x in list(zip(ys, xs))[:: max(1, len(ys) // 20)]:
                if int(y) in bg_plane_rows:
                    assert d[y, x] < bg_plane_rows[int(y)]
        assert np.asarray(img).astype(np.float32).std() > 10


def test_read_image_and_annotation_agree_in_any_order():
    ds = ShapesDataset(None, "train", num_images=4)
    ann2 = ds.read_annotation(2)
    img1 = ds.read_image(1)
    img2 = ds.read_image(2)
    assert _ann_bytes(ds.read_annotation(2)) == _ann_bytes(ann2)
    fresh = ShapesDataset(None, "train", num_images=4)
    assert fresh.read_image(2).tobytes() == img2.tobytes()
    assert fresh.read_image(1).tobytes() == img1.tobytes()
    with pytest.raises(IndexError):
        ds.read_image(4)


def test_pickle_roundtrip():
    ds = ShapesDataset(None, "val", seed=7, num_images=5)
    ds.read_image(1)  # fill the cache; it must not travel
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    assert clone.image_ids == ds.image_ids and clone.identity() == ds.identity()
    assert clone.read_image(3).tobytes() == ds.read_image(3).tobytes()
    assert _ann_bytes(clone.read_annotation(3)) == _ann_bytes(ds.read_annotation(3))


def test_render_is_fast():
    render_shapes(0, 0, 0, 224)
    n = 40
    t = time.perf_counter()
    for i in range(n):
        render_shapes(0, 0, i, 224)
    per_image = (time.perf_counter() - t) / n
    assert per_image < 0.05  # ~5 ms on a 2-core CPU; generous for loaded CI machines
