"""Known-answer tests of ``extract.targets``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from extract.datasets.base import TARGET_KINDS, Annotation
from extract.datasets.shapes import ShapesDataset
from extract.targets import TARGET_OUTPUTS, TargetConfig, TargetConfigError, build_targets
from runtime.errors import DatasetError

ALL = list(TARGET_KINDS)


def _block(size, y0, y1, x0, x1):
    m = np.zeros(size, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _ann(size, blocks, **kw):
    masks = np.stack([_block(size, *b) for b in blocks]) if blocks else np.zeros((0, *size), dtype=bool)
    return Annotation(size=size, instance_masks=masks, **kw)


# ---------------------------------------------------------------------------------------------
# spec


def test_spec_roundtrip_and_validation():
    spec = TargetConfig(size=(112, 96), boundary_width=2, distance_norm="diagonal")
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TargetConfig.from_dict(d) == spec
    assert TargetConfig.from_dict(json.loads(json.dumps(TargetConfig().to_dict()))) == TargetConfig()
    assert TargetConfig(size=[224, 224]) == TargetConfig()
    assert hash(TargetConfig()) == hash(TargetConfig(size=(224, 224)))
    for bad in ({"size": (0, 3)}, {"size": (224,)}, {"size": 224}, {"boundary_width": 0}, {"distance_norm": "mean"}):
        with pytest.raises(TargetConfigError):
            TargetConfig(**bad)
    with pytest.raises(TargetConfigError):
        TargetConfig.from_dict({**d, "version": 999})
    with pytest.raises(TargetConfigError):
        TargetConfig.from_dict({**d, "colour": 1})
    defs = TargetConfig().definitions()
    assert {"resize", "instances", "boundaries", "distance", "semantic", "depth"} <= set(defs)
    assert all(isinstance(v, str) and v for v in defs.values())
    assert "5x5" in defs["boundaries"] and "4 pixels" in defs["boundaries"]
    assert TargetConfig().boundary_width == 2  # the width that matches the paper's class balance


def test_only_requested_kinds_and_errors():
    ann = _ann((20, 20), [(5, 15, 5, 15)])
    assert set(build_targets(ann, TargetConfig(size=(20, 20)), ["boundaries"])) == {"boundaries"}
    assert set(build_targets(ann, TargetConfig(size=(20, 20)), ["distance"])) == {"distance"}
    assert set(build_targets(ann, TargetConfig(size=(20, 20)), ["instances"])) == set(TARGET_OUTPUTS["instances"])
    assert build_targets(ann, TargetConfig(), []) == {}
    with pytest.raises(TargetConfigError):
        build_targets(ann, TargetConfig(), ["edges"])
    with pytest.raises(DatasetError):
        build_targets(ann, TargetConfig(), ["semantic"])
    with pytest.raises(DatasetError):
        build_targets(ann, TargetConfig(), ["depth"])
    with pytest.raises(DatasetError):
        build_targets(Annotation(size=(20, 20)), TargetConfig(), ["boundaries"])
    with pytest.raises(DatasetError):  # mask shape disagrees with the image size
        build_targets(Annotation(size=(20, 20), instance_masks=np.zeros((1, 20, 21), bool)), TargetConfig(), ["instances"])


# ---------------------------------------------------------------------------------------------
# boundaries and distance


def test_single_square_boundary_is_its_outline_two_pixels_wide():
    ann = _ann((20, 20), [(5, 15, 5, 15)])
    t = build_targets(ann, TargetConfig(size=(20, 20), boundary_width=1), ALL[:3])
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[4:16, 4:16] = 1  # one pixel outside the square …
    expected[6:14, 6:14] = 0  # … and one pixel inside: both sides of the edge
    assert t["boundaries"].dtype == np.uint8
    np.testing.assert_array_equal(t["boundaries"], expected)
    np.testing.assert_array_equal(t["instances"], _block((20, 20), 5, 15, 5, 15).astype(np.uint16))
    assert t["instances"].dtype == np.uint16
    assert int(t["instance_count"]) == 1
    np.testing.assert_array_equal(t["foreground"], t["instances"] > 0)
    np.testing.assert_array_equal(t["instance_area"], np.array([100.0], dtype=np.float32))
    assert t["instance_ignore"].dtype == np.uint8 and not t["instance_ignore"].any()


def test_boundary_width_two_and_image_border_is_not_a_boundary():
    ann = _ann((20, 20), [(0, 10, 0, 20)])  # top half: touches three image borders
    b = build_targets(ann, TargetConfig(size=(20, 20), boundary_width=2), ["boundaries"])["boundaries"]
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[8:12, :] = 1  # band 4 px wide around the row-10 edge only
    np.testing.assert_array_equal(b, expected)


def test_distance_zero_on_boundaries_and_one_step_per_pixel():
    ann = _ann((20, 20), [(5, 15, 5, 15)])
    diag = math.hypot(20, 20)
    t = build_targets(ann, TargetConfig(size=(20, 20), boundary_width=1, distance_norm="diagonal"), ["boundaries", "distance"])
    d = t["distance"]
    assert d.dtype == np.float32 and d.min() >= 0 and d.max() <= 1
    assert np.all(d[t["boundaries"] == 1] == 0) and np.all(d[t["boundaries"] == 0] > 0)
    # Row 10: inside from the inner ring at col 14 leftwards, outside from col 15 rightwards.
    np.testing.assert_allclose(d[10, 10:20] * diag, [4, 3, 2, 1, 0, 0, 1, 2, 3, 4], atol=1e-5)
    np.testing.assert_allclose(d[0, 0] * diag, math.sqrt(32), atol=1e-5)  # to the corner (4, 4)
    # Brute force check everywhere.
    by, bx = np.nonzero(t["boundaries"])
    yy, xx = np.mgrid[:20, :20]
    brute = np.sqrt((yy[..., None] - by) ** 2 + (xx[..., None] - bx) ** 2).min(axis=-1)
    np.testing.assert_allclose(d * diag, brute, atol=1e-4)
    # Per-image max: the same map scaled so that its maximum (the corners) is 1.
    dm = build_targets(ann, TargetConfig(size=(20, 20), boundary_width=1, distance_norm="max"), ["distance"])["distance"]
    np.testing.assert_allclose(dm, brute / math.sqrt(32), atol=1e-5)
    assert dm.max() == pytest.approx(1.0) and dm[0, 0] == pytest.approx(1.0)


def test_no_instances_no_boundaries_distance_all_ones():
    for ann in (_ann((30, 40), []), Annotation(size=(30, 40), instance_masks=np.zeros((2, 30, 40), bool))):
        for norm in ("max", "diagonal"):
            t = build_targets(ann, TargetConfig(size=(15, 20), distance_norm=norm), ALL[:3])
            assert not t["boundaries"].any() and not t["instances"].any()
            np.testing.assert_array_equal(t["distance"], np.ones((15, 20), np.float32))
            assert int(t["instance_count"]) == 0 and t["instance_area"].shape == (0,)


def test_whole_image_instance_has_no_boundary():
    t = build_targets(_ann((10, 10), [(0, 10, 0, 10)]), TargetConfig(size=(10, 10)), ALL[:3])
    assert not t["boundaries"].any() and np.all(t["distance"] == 1) and np.all(t["instances"] == 1)


# ---------------------------------------------------------------------------------------------
# instances


def test_two_overlapping_instances_painted_in_order():
    size, spec = (20, 20), TargetConfig(size=(20, 20))
    blocks = [(2, 12, 2, 12), (6, 16, 6, 16)]  # equal areas, overlap [6:12, 6:12]
    ids = build_targets(_ann(size, blocks, instance_order=np.array([1.0, 0.0])), spec, ["instances"])["instances"]
    assert ids[8, 8] == 1 and ids[3, 3] == 1 and ids[14, 14] == 2  # first instance painted last: on top
    ids = build_targets(_ann(size, blocks, instance_order=np.array([0.0, 1.0])), spec, ["instances"])["instances"]
    assert ids[8, 8] == 2 and ids[3, 3] == 1 and ids[14, 14] == 2
    # No order: decreasing area, the smaller instance on top.
    small_on_top = [(2, 12, 2, 12), (6, 10, 6, 10)]
    ids = build_targets(_ann(size, small_on_top), spec, ["instances"])["instances"]
    assert ids[7, 7] == 2 and ids[3, 3] == 1
    ids = build_targets(_ann(size, small_on_top[::-1]), spec, ["instances"])["instances"]
    assert ids[7, 7] == 1 and ids[3, 3] == 2
    # Equal areas, no order: the annotation's order breaks the tie (later on top).
    ids = build_targets(_ann(size, blocks), spec, ["instances"])["instances"]
    assert ids[8, 8] == 2
    # Areas given by the annotation decide, not pixel counts: the small block is painted first and
    # hidden entirely, so it is dropped.
    t = build_targets(_ann(size, small_on_top, instance_areas=np.array([1.0, 500.0])), spec, ["instances"])
    assert t["instances"][7, 7] == 1 and int(t["instance_count"]) == 1
    np.testing.assert_array_equal(t["instance_area"], [1.0])


def test_vanishing_and_hidden_instances_dropped_and_renumbered():
    size = (100, 100)
    blocks = [
        (0, 50, 0, 100),  # 1: top half
        (80, 82, 80, 82),  # tiny 2x2: vanishes at 10x10
        (60, 100, 0, 50),  # bottom-left
        (10, 20, 10, 20),  # hidden under the top half (painted first by order)
        (60, 100, 50, 100),  # bottom-right
    ]
    order = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
    areas = np.array([5000.0, 4.0, 2000.0, 100.0, 2000.0])
    t = build_targets(_ann(size, blocks, instance_order=order, instance_areas=areas), TargetConfig(size=(10, 10)), ["instances"])
    expected = np.zeros((10, 10), dtype=np.uint16)
    expected[0:5, :] = 1
    expected[6:10, 0:5] = 2
    expected[6:10, 5:10] = 3
    np.testing.assert_array_equal(t["instances"], expected)
    assert int(t["instance_count"]) == 3
    np.testing.assert_array_equal(t["instance_area"], np.array([5000.0, 2000.0, 2000.0], dtype=np.float32))
    assert t["instance_area"].dtype == np.float32


def test_ignore_mask_becomes_instance_ignore():
    ignore = _block((40, 40), 0, 20, 0, 40)
    ann = _ann((40, 40), [(20, 40, 0, 20)], ignore_mask=ignore)
    t = build_targets(ann, TargetConfig(size=(20, 20)), ["instances"])
    np.testing.assert_array_equal(t["instance_ignore"], _block((20, 20), 0, 10, 0, 20).astype(np.uint8))
    np.testing.assert_array_equal(t["instances"], _block((20, 20), 10, 20, 0, 10).astype(np.uint16))


def test_bilinear_threshold_at_half_weight():
    # 4x downsampling: output column j is centred on input 4j + 2 and its triangle filter reaches
    # input columns 4j - 2 .. 4j + 5 with weights (1, 3, 5, 7, 7, 5, 3, 1) / 32.
    masks = np.zeros((3, 40, 40), dtype=bool)
    masks[0, :, 21] = True  # a 1-px bar: at most 7/32 < 0.5: vanishes
    masks[1, :, 8:16] = True  # columns 2 and 3 (28/32); columns 1 and 4 get 4/32
    masks[2, :, 28:34] = True  # column 7 (28/32) and column 8 (exactly 16/32: ties count as covered)
    t = build_targets(Annotation(size=(40, 40), instance_masks=masks), TargetConfig(size=(10, 10)), ["instances"])
    expected = np.zeros((10, 10), dtype=np.uint16)
    expected[:, 2:4] = 1
    expected[:, 7:9] = 2
    np.testing.assert_array_equal(t["instances"], expected)
    assert int(t["instance_count"]) == 2


def test_masks_match_a_whole_image_pil_resize():
    from PIL import Image

    rng = np.random.default_rng(0)
    for h, w, oh, ow in ((123, 321, 47, 90), (50, 60, 224, 224), (480, 640, 224, 224)):
        yy, xx = np.mgrid[:h, :w]
        masks = np.stack(
            [((yy - rng.uniform(0, h)) / rng.uniform(2, h / 3)) ** 2 + ((xx - rng.uniform(0, w)) / rng.uniform(2, w / 3)) ** 2 < 1 for _ in range(6)]
        )
        ids = build_targets(
            Annotation(size=(h, w), instance_masks=masks, instance_order=np.arange(6.0)), TargetConfig(size=(oh, ow)), ["instances"]
        )["instances"]
        expected = np.zeros((oh, ow), dtype=np.int64)
        for k, m in enumerate(masks):
            f = np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((ow, oh), Image.Resampling.BILINEAR))
            expected[f >= 0.5 - 1e-4] = k + 1
        # Renumber like build_targets (drop absent ids).
        present = np.unique(expected[expected > 0])
        lut = np.zeros(7, dtype=np.int64)
        lut[present] = np.arange(1, present.size + 1)
        np.testing.assert_array_equal(ids, lut[expected])


def test_non_square_output_keeps_orientation():
    ann = _ann((40, 80), [(0, 20, 0, 40)])  # top-left quarter
    ids = build_targets(ann, TargetConfig(size=(10, 30)), ["instances"])["instances"]
    assert ids.shape == (10, 30)
    np.testing.assert_array_equal(ids, _block((10, 30), 0, 5, 0, 15).astype(np.uint16))


# ---------------------------------------------------------------------------------------------
# semantic and depth


def test_semantic_nearest_keeps_ignore():
    sem = np.full((40, 40), 3, dtype=np.uint8)
    sem[0:20, :] = 255
    sem[:, 39] = 7  # a 1-px line: nearest neighbour may drop it, but never invents values
    ann = Annotation(size=(40, 40), semantic=sem)
    out = build_targets(ann, TargetConfig(size=(20, 20)), ["semantic"])["semantic"]
    assert out.dtype == np.uint8 and out.shape == (20, 20)
    assert set(np.unique(out)) <= {3, 7, 255}
    assert np.all(out[:10, :19] == 255) and np.all(out[10:, :19] == 3)
    up = build_targets(ann, TargetConfig(size=(80, 80)), ["semantic"])["semantic"]
    assert np.all(up[:40, :78] == 255) and np.all(up[40:, :78] == 3) and np.all(up[:, 78:] == 7)


def test_depth_zeros_do_not_bleed():
    depth = np.full((40, 40), 5.0, dtype=np.float32)
    depth[::2, ::2] = 0.0  # a quarter of the pixels invalid, scattered
    depth[0, 1] = np.nan
    depth[1, 0] = -1.0
    ann = Annotation(size=(40, 40), depth=depth)
    for size in ((20, 20), (13, 17), (64, 64)):
        out = build_targets(ann, TargetConfig(size=size), ["depth"])["depth"]
        assert out.dtype == np.float32 and out.shape == size
        assert np.all(np.isfinite(out)) and set(np.unique(out)) <= {0.0, 5.0}
    # At 2x downsampling every output pixel centre sits on an odd-odd input pixel: all valid.
    assert np.all(build_targets(ann, TargetConfig(size=(20, 20)), ["depth"])["depth"] == 5.0)


# ---------------------------------------------------------------------------------------------
# scale consistency and a real reader


def _blocks_annotation(scale: int) -> Annotation:
    n = 56 * scale
    blocks = [(4, 30, 6, 40), (20, 50, 24, 52), (34, 44, 2, 14), (0, 10, 44, 56)]
    masks = np.stack([_block((n, n), *(v * scale for v in b)) for b in blocks])
    sem = np.zeros((56, 56), dtype=np.uint8)
    sem[4:30, 6:40] = 1
    sem[40:, :] = 255
    depth = np.linspace(1, 9, 56 * 56, dtype=np.float32).reshape(56, 56)
    depth[10:20, 30:40] = 0
    up = np.ones((scale, scale), dtype=np.uint8)
    return Annotation(
        size=(n, n),
        instance_masks=masks,
        instance_order=np.array([0.0, 1.0, 2.0, 3.0]),
        semantic=np.kron(sem, up),
        depth=np.kron(depth, up.astype(np.float32)),
    )


@pytest.mark.parametrize("out", [56, 28])
def test_twice_larger_annotation_gives_the_same_targets(out):
    spec = TargetConfig(size=(out, out))
    small = build_targets(_blocks_annotation(1), spec, ALL)
    large = build_targets(_blocks_annotation(2), spec, ALL)  # 28: blocks on even coordinates
    for key in ("instances", "boundaries", "distance", "semantic", "depth", "foreground", "instance_count"):
        np.testing.assert_array_equal(small[key], large[key], err_msg=key)
    assert int(small["instance_count"]) == 4


def test_twice_larger_blocks_at_even_coordinates():
    # Blocks on even coordinates: 56 -> 28 and 112 -> 28 both give the same exact blocks.
    ann = _blocks_annotation(1)
    t = build_targets(ann, TargetConfig(size=(28, 28)), ["instances"])["instances"]
    expected = np.zeros((28, 28), dtype=np.uint16)
    for k, (y0, y1, x0, x1) in enumerate([(4, 30, 6, 40), (20, 50, 24, 52), (34, 44, 2, 14), (0, 10, 44, 56)]):
        expected[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = k + 1
    np.testing.assert_array_equal(t, expected)


def test_shapes_annotations_build_consistent_targets():
    ds = ShapesDataset(None, "val", num_images=6, image_size=224)
    spec = TargetConfig(size=(112, 112))
    for i in range(len(ds)):
        ann = ds.read_annotation(i)
        t = build_targets(ann, spec, ALL)
        k = int(t["instance_count"])
        assert 3 <= k <= len(ann.instance_classes)
        assert t["instances"].max() == k and len(np.unique(t["instances"])) == k + 1
        np.testing.assert_array_equal(t["foreground"], t["instances"] > 0)
        # Semantic > 0 where an instance is, up to pixels whose majority changed at 2x downsampling.
        agree = ((t["semantic"] > 0) == (t["foreground"] > 0)).mean()
        assert agree > 0.98
        assert t["depth"].min() > 0 and t["distance"].max() <= 1 and t["distance"].min() == 0
        assert t["boundaries"].any()
