"""The resized input image kept in target stores: geometry, identity, old stores, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.datasets import create_dataset
from extract.target_store import IMAGE_ARRAY, build_target_store, target_spec_for
from extract.targets import TargetConfig, resize_image
from store.catalogue import find_target_store
from store.reader import open_targets
from store.spec import TargetSpec


@pytest.fixture(scope="module")
def shapes_reader():
    return create_dataset("shapes", None, "train", num_images=6)


def test_image_pixels_share_the_targets_grid():
    """A white rectangle on an odd-sized image, resized like the targets' masks (PIL bilinear on the
    float mask): the image's pixel (i, j) holds the mask's value at pixel (i, j), to uint8 rounding."""
    h, w = 97, 61
    mask = np.zeros((h, w), np.float32)
    mask[23:71, 9:40] = 1.0
    rgb = Image.fromarray(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2), "RGB")
    size = (32, 24)
    image = resize_image(rgb, size)
    assert image.shape == (32, 24, 3) and image.dtype == np.uint8 and image.flags.writeable
    expected = np.asarray(Image.fromarray(mask, "F").resize((size[1], size[0]), Image.Resampling.BILINEAR))
    assert np.abs(image[..., 0] / 255.0 - expected).max() <= 1.5 / 255
    assert 0.1 < expected.mean() < 0.9  # the comparison covers both sides of the rectangle's edges
    # the mask's edge is at a fractional output position: a shifted grid would be far off
    shifted = np.asarray(Image.fromarray(mask[1:], "F").resize((size[1], size[0]), Image.Resampling.BILINEAR))
    assert np.abs(image[..., 0] / 255.0 - shifted).max() > 0.05


def test_store_holds_image_and_targets_line_up(shapes_reader, tmp_path):
    res = build_target_store(shapes_reader, tmp_path, size=(64, 48), num_workers=0, show_progress=False)
    ts = open_targets(res.path)
    assert ts.spec.image and IMAGE_ARRAY in ts.array_names and "input_image" in ts.spec.definitions
    images = ts.read_all(IMAGE_ARRAY)
    assert images.shape == (6, 64, 48, 3) and images.dtype == np.uint8
    for i in (0, 5):
        assert np.array_equal(images[i], resize_image(shapes_reader.read_image(i), (64, 48)))
    zarr_json = json.loads((Path(res.path) / IMAGE_ARRAY / "zarr.json").read_text())
    assert zarr_json["dimension_names"] == ["image", "y", "x", "rgb"]


def test_key_and_definition(shapes_reader, tmp_path):
    """A store without images keeps the key it had before images existed; one with images has
    another key (an old store is never taken for one with images) and the same target definition."""
    ids = list(shapes_reader.image_ids)
    with_image = target_spec_for(shapes_reader, ids, TargetConfig())
    without = target_spec_for(shapes_reader, ids, TargetConfig(), image=False)
    old = {k: v for k, v in without.to_dict().items() if k != "image"}  # a spec as written before the field
    assert TargetSpec.from_dict(old).key == without.key and not TargetSpec.from_dict(old).image
    assert with_image.key != without.key and "input_image" not in without.definitions
    assert with_image.definition() == without.definition()


def test_old_store_keeps_working_and_image_store_is_preferred(shapes_reader, tmp_path):
    old = build_target_store(shapes_reader, tmp_path, num_workers=0, show_progress=False, image=False)
    assert IMAGE_ARRAY not in open_targets(old.path).array_names and not open_targets(old.path).spec.image
    fspec = {"dataset_id": old.spec.dataset_id, "split": "train", "image_ids_hash": old.spec.image_ids_hash}
    assert str(find_target_store(tmp_path, fspec)) == old.path
    new = build_target_store(shapes_reader, tmp_path, num_workers=0, show_progress=False)
    assert new.path != old.path and not new.reused
    assert str(find_target_store(tmp_path, fspec)) == new.path
    assert str(find_target_store(tmp_path, fspec, like=open_targets(old.path).spec)) == new.path
    # the same targets either way
    a, b = open_targets(old.path), open_targets(new.path)
    for name in a.array_names:
        assert np.array_equal(a.read_all(name), b.read_all(name))


def _segfolder(root: Path, corrupt: bool) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), np.uint8)).save(root / "train" / f"im{i}.png")
        Image.fromarray(np.full((48, 64), i % 3, np.uint8)).save(root / "trainannot" / f"im{i}.png")
    if corrupt:
        data = (root / "train" / "im2.png").read_bytes()
        (root / "train" / "im2.png").write_bytes(data[: len(data) // 3])
    return root


def test_undecodable_image_stops_or_is_recorded_bad(tmp_path):
    from runtime.errors import BadImageError, StoreError

    root = _segfolder(tmp_path / "seg", corrupt=True)
    reader = create_dataset("segfolder", root, "train", num_classes=3)
    with pytest.raises(BadImageError, match="im2.png"):
        build_target_store(reader, tmp_path / "s", num_workers=0, show_progress=False)
    res = build_target_store(reader, tmp_path / "s", num_workers=0, show_progress=False, skip_bad=True)
    ts = open_targets(res.path)
    assert ts.bad.tolist() == [2] and ts.meta["num_bad"] == 1
    assert not ts.read(IMAGE_ARRAY, [2]).any() and ts.read(IMAGE_ARRAY, [1]).any()
    again = build_target_store(reader, tmp_path / "s", num_workers=0, show_progress=False, skip_bad=True)
    assert again.reused and again.path == res.path
    with pytest.raises(StoreError, match="--skip-bad"):
        build_target_store(reader, tmp_path / "s", num_workers=0, show_progress=False)
    # repaired: the store's zeros would be stale
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "train" / "im2.png")
    with pytest.raises(StoreError, match="decodes now"):
        build_target_store(reader, tmp_path / "s", num_workers=0, show_progress=False, skip_bad=True)
