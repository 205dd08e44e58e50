"""Dataset readers: one contract suite run against every reader, then known answers per reader.

Real samples come from ``../shared/data`` (never copied into the repository); everything else is
written by the tests in the datasets' own formats (palette PNGs, HDF5 ``.mat``, COCO JSON).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from extract.datasets.base import DatasetReader, DatasetWarning, get_dataset_class
from extract.datasets.coco import COCODataset
from extract.datasets.cocostuff import COCOSTUFF_CLASSES, CocoStuffDataset, label_lut
from extract.datasets.nyuv2 import NYUv2Dataset
from extract.datasets.segfolder import SegFolderDataset
from extract.datasets.voc import VOCDataset
from runtime.errors import BadImageError, DatasetError

from shared_data import SHARED_DATA, shared_data

# pycocotools' mask decoding trips a numpy 2 DeprecationWarning inside the library itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

_shared = shared_data


# -- writers of tiny datasets in their real formats ----------------------------------------------


def _jpeg(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _voc_palette() -> list[int]:
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _palette_png(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(_voc_palette())
    im.save(path)


VOC_IDS = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000042"]}


def write_voc(root: Path, with_objects: bool = True) -> Path:
    """A VOCdevkit/VOC2012 tree with 3 images of 30x40: two objects each, 255 borders."""
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, ids in VOC_IDS.items():
        (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (sets / "trainval.txt").write_text("\n".join(VOC_IDS["train"] + VOC_IDS["val"]) + "\n")
    for n, image_id in enumerate(VOC_IDS["train"] + VOC_IDS["val"]):
        _jpeg(base / "JPEGImages" / f"{image_id}.jpg", 30, 40, seed=n)
        cls = np.zeros((30, 40), np.uint8)
        obj = np.zeros((30, 40), np.uint8)
        cls[2:12, 3:15], obj[2:12, 3:15] = 15, 1  # person
        cls[15:28, 20:38], obj[15:28, 20:38] = 7 + n, 2  # car, cat, chair
        cls[1, :], obj[1, :] = 255, 255  # border band
        _palette_png(base / "SegmentationClass" / f"{image_id}.png", cls)
        if with_objects:
            _palette_png(base / "SegmentationObject" / f"{image_id}.png", obj)
    return base


STUFF_PIXELS = np.array([[0, 11, 12, 90], [91, 181, 255, 5]], dtype=np.uint8)
STUFF_EXPECTED = np.array([[0, 255, 11, 255], [80, 170, 255, 5]], dtype=np.uint8)


def write_cocostuff(
    root: Path, images: str = "images/val2017", labels: str = "stuffthingmaps_trainval2017/val2017"
) -> Path:
    for n, stem in enumerate(["000000000139", "000000000285"]):
        _jpeg(root / images / f"{stem}.jpg", 20, 24, seed=n)
        label = np.full((20, 24), 255, np.uint8)
        label[:2, :4] = STUFF_PIXELS
        (root / labels).mkdir(parents=True, exist_ok=True)
        Image.fromarray(label, mode="L").save(root / labels / f"{stem}.png")
    return root


NYU_H, NYU_W = 6, 8


def write_nyu_mat(root: Path) -> dict[str, np.ndarray]:
    """A 3-image labeled .mat in MATLAB's reversed-axis HDF5 convention, and its splits.mat."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, NYU_H, NYU_W, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.5, (3, NYU_H, NYU_W)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)  # (N, 3, W, H)
        f["depths"] = depths.transpose(0, 2, 1)  # (N, W, H)
        f["labels"] = np.zeros((3, NYU_W, NYU_H), np.uint16)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2]])})
    return {"images": images, "depths": depths}


def write_segfolder(root: Path, labels: np.ndarray) -> Path:
    _jpeg(root / "images" / "train" / "a.jpg", *labels.shape)
    (root / "labels" / "train").mkdir(parents=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "labels" / "train" / "a.png")
    return root


def write_coco(root: Path) -> Path:
    """A COCO tree with images 10 (one polygon, one crowd RLE) and 9 (no annotation)."""
    for image_id in (9, 10):
        _jpeg(root / "val2017" / f"{image_id:012d}.jpg", 20, 30, seed=image_id)
    crowd = np.zeros((20, 30), np.uint8, order="F")
    crowd[10:20, 20:30] = 1
    counts, value, run = [], 0, 0
    for pixel in crowd.ravel(order="F"):  # uncompressed RLE, column-major, starting with zeros
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    dataset = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 30} for i in (10, 9)],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0, "area": 50.0, "bbox": [2, 2, 10, 5],
             "segmentation": [[2, 2, 12, 2, 12, 7, 2, 7]]},
            {"id": 2, "image_id": 10, "category_id": 1, "iscrowd": 1, "area": 100.0, "bbox": [20, 10, 10, 10],
             "segmentation": {"counts": counts, "size": [20, 30]}},
        ],
    }  # fmt: skip
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(dataset))
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


# -- the contract ---------------------------------------------------------------------------------


class DatasetContract:
    """What every reader promises. Subclasses provide ``cls``, ``split``, ``options`` and ``root``."""

    cls: type[DatasetReader]
    split: str = "val"
    options: dict[str, Any] = {}

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        raise NotImplementedError

    @pytest.fixture
    def reader(self, root: Path) -> DatasetReader:
        return self.cls(root, self.split, **self.options)

    @staticmethod
    def _indices(reader: DatasetReader) -> list[int]:
        return sorted({0, len(reader) - 1})

    def test_registered(self) -> None:
        assert get_dataset_class(self.cls.name) is self.cls

    def test_ids(self, reader: DatasetReader) -> None:
        assert len(reader) > 0
        assert all(isinstance(i, str) and i for i in reader.image_ids)
        assert len(set(reader.image_ids)) == len(reader.image_ids)

    def test_image_and_annotation_sizes(self, reader: DatasetReader) -> None:
        for i in self._indices(reader):
            image = reader.read_image(i)
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            ann = reader.read_annotation(i)
            assert ann.size == (image.height, image.width)
            small = reader.read_image(i, draft_size=(8, 8))
            assert small.mode == "RGB" and small.width >= min(8, image.width) and small.height >= min(8, image.height)

    def test_annotation_types_and_ranges(self, reader: DatasetReader) -> None:
        for i in self._indices(reader):
            ann = reader.read_annotation(i)
            h, w = ann.size
            if ann.semantic is not None:
                assert ann.semantic.dtype == np.uint8 and ann.semantic.shape == (h, w)
                values = np.unique(ann.semantic)
                assert np.all((values < reader.num_classes) | (values == 255)), values
            if ann.instance_masks is not None:
                k = len(ann.instance_masks)
                assert ann.instance_masks.dtype == bool and ann.instance_masks.shape == (k, h, w)
                assert ann.instance_classes.shape == (k,) and ann.instance_classes.dtype.kind in "iu"
                assert ann.instance_areas.shape == (k,) and np.all(ann.instance_areas >= 0)
                assert ann.ignore_mask is None or (ann.ignore_mask.dtype == bool and ann.ignore_mask.shape == (h, w))
            if ann.depth is not None:
                assert ann.depth.dtype == np.float32 and ann.depth.shape == (h, w)
                assert np.all(np.isfinite(ann.depth)) and ann.depth.min() >= 0

    def test_targets_match_annotations(self, reader: DatasetReader) -> None:
        ann = reader.read_annotation(0)
        assert set(reader.targets) <= {"boundaries", "distance", "instances", "semantic", "depth"}
        assert ("semantic" in reader.targets) == (ann.semantic is not None)
        assert ("depth" in reader.targets) == (ann.depth is not None)
        has_instances = ann.instance_masks is not None
        assert ("instances" in reader.targets) == has_instances
        assert ({"boundaries", "distance"} <= reader.targets) == has_instances
        if "semantic" in reader.targets:
            assert reader.num_classes and reader.ignore_index == 255
            assert reader.class_names is None or len(reader.class_names) == reader.num_classes

    def test_pickle_round_trip(self, reader: DatasetReader) -> None:
        before = reader.read_annotation(0)  # opens any lazy handle first
        clone = pickle.loads(pickle.dumps(reader))
        assert clone.image_ids == reader.image_ids
        after = clone.read_annotation(0)
        for field in ("semantic", "depth", "instance_masks"):
            if getattr(before, field) is not None:
                np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
        assert clone.read_image(0).size == reader.read_image(0).size

    def test_annotation_size_and_identity(self, reader: DatasetReader) -> None:
        for i in self._indices(reader):
            assert reader.annotation_size(i) == reader.read_annotation(i).size
            reader.check_image_size(i)
        _check_fingerprint(reader)

    def test_missing_root(self, tmp_path: Path) -> None:
        missing = tmp_path / "no_such_dataset"
        with pytest.raises(DatasetError, match=re.escape(str(missing))) as err:
            self.cls(missing, self.split, **self.options)
        assert "\n" not in str(err.value)

    def test_empty_root_names_layout(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
            self.cls(tmp_path, self.split, **self.options)

    def test_bad_split(self, root: Path) -> None:
        with pytest.raises(DatasetError, match="no split 'bogus'"):
            self.cls(root, "bogus", **self.options)


class TestCOCOContract(DatasetContract):
    cls = COCODataset

    @pytest.fixture
    def root(self) -> Path:
        return _shared("coco_mini")


class TestVOCContract(DatasetContract):
    cls = VOCDataset
    split = "train"

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        write_voc(tmp_path)
        return tmp_path


class TestCocoStuffContract(DatasetContract):
    cls = CocoStuffDataset

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        return write_cocostuff(tmp_path / "cocostuff")


class TestNYUv2MatContract(DatasetContract):
    cls = NYUv2Dataset
    split = "train"

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        write_nyu_mat(tmp_path / "nyu")
        return tmp_path / "nyu"


class TestNYUv2PairsContract(DatasetContract):
    cls = NYUv2Dataset
    split = "test"

    @pytest.fixture
    def root(self) -> Path:
        return _shared("nyu_samples")


class TestSegFolderContract(DatasetContract):
    cls = SegFolderDataset
    options = {"num_classes": 11, "ignore_index": 11}

    @pytest.fixture
    def root(self) -> Path:
        return _shared("camvid_small")


# -- known answers per reader ---------------------------------------------------------------------


def test_coco_mini_matches_json() -> None:
    from pycocotools.coco import COCO

    root = _shared("coco_mini")
    reader = COCODataset(root, "val")
    dataset = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert len(reader) == len(dataset["images"])
    assert reader.image_ids == [str(i) for i in sorted(im["id"] for im in dataset["images"])]
    assert reader.num_classes == 81 and reader.class_names[0] == "background"
    assert reader.class_names[1:] == [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])]

    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    crowd_image = next(a["image_id"] for a in dataset["annotations"] if a["iscrowd"])
    for image_id in (int(reader.image_ids[0]), crowd_image):
        ann = reader.read_annotation(reader.image_ids.index(str(image_id)))
        things = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        crowds = [a for a in coco.imgToAnns[image_id] if a["iscrowd"]]
        assert len(ann.instance_masks) == len(things)
        assert ann.instance_classes.tolist() == [a["category_id"] for a in things]
        assert ann.instance_areas.tolist() == [a["area"] for a in things]
        for mask, a in zip(ann.instance_masks, things):
            np.testing.assert_array_equal(mask, coco.annToMask(a).astype(bool))
        expected_ignore = np.zeros(ann.size, bool)
        for a in crowds:
            expected_ignore |= coco.annToMask(a).astype(bool)
        np.testing.assert_array_equal(ann.ignore_mask, expected_ignore)
        covered = ann.instance_masks.any(axis=0)
        assert np.all(ann.semantic[~covered & ~expected_ignore] == 0)
        assert np.all(ann.semantic[expected_ignore & ~covered] == 255)
        assert np.all((ann.semantic[covered] >= 1) & (ann.semantic[covered] <= 80))
    assert ann.ignore_mask.any(), "the crowd image should have a crowd region"


def test_coco_train_split_and_semantic_order() -> None:
    root = _shared("coco_mini")
    reader = COCODataset(root, "train")
    assert len(reader) == 80
    ann = reader.read_annotation(0)
    dataset = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    contiguous = {c: i + 1 for i, c in enumerate(sorted(c["id"] for c in dataset["categories"]))}
    # The smallest instance is painted last, so it keeps its class wherever it is visible.
    k = int(np.argmin(ann.instance_areas))
    assert np.all(ann.semantic[ann.instance_masks[k]] == contiguous[int(ann.instance_classes[k])])


def test_coco_include_empty_and_numeric_order(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    reader = COCODataset(root, "val")
    assert reader.image_ids == ["9", "10"]  # numeric, not string, order
    empty = reader.read_annotation(0)
    assert empty.instance_masks.shape == (0, 20, 30) and not empty.ignore_mask.any()
    assert np.all(empty.semantic == 0)
    assert COCODataset(root, "val", include_empty=False).image_ids == ["10"]
    ann = reader.read_annotation(1)
    assert ann.instance_masks.shape == (1, 20, 30) and ann.instance_classes.tolist() == [3]
    assert ann.ignore_mask.sum() == 100 and ann.ignore_mask[10:, 20:].all()
    assert np.all(ann.semantic[ann.ignore_mask] == 255)
    assert np.all(ann.semantic[ann.instance_masks[0]] == 2)  # category 3 is the 2nd sorted category


def test_coco_corrupt_json(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    bad = root / "annotations" / "instances_val2017.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        COCODataset(root, "val")


def test_voc_reads_palette_indices_and_instances(tmp_path: Path) -> None:
    base = write_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        assert VOCDataset(root, "val").image_ids == VOC_IDS["val"]
    reader = VOCDataset(tmp_path, "trainval")
    assert reader.image_ids == VOC_IDS["train"] + VOC_IDS["val"]
    assert reader.num_classes == 21 and reader.class_names[15] == "person"
    ann = reader.read_annotation(2)
    assert set(np.unique(ann.semantic).tolist()) == {0, 9, 15, 255}
    assert ann.semantic[5, 5] == 15 and ann.semantic[20, 25] == 9 and ann.semantic[1, 0] == 255
    assert ann.instance_classes.tolist() == [15, 9]
    assert ann.instance_areas.tolist() == [10 * 12, 13 * 18]
    np.testing.assert_array_equal(ann.ignore_mask, ann.semantic == 255)


def test_voc_without_objects_is_semantic_only(tmp_path: Path) -> None:
    write_voc(tmp_path, with_objects=False)
    reader = VOCDataset(tmp_path, "train")
    assert reader.targets == frozenset({"semantic"})
    assert reader.read_annotation(0).instance_masks is None


def test_voc_rejects_colour_labels(tmp_path: Path) -> None:
    base = write_voc(tmp_path)
    label = base / "SegmentationClass" / f"{VOC_IDS['val'][0]}.png"
    Image.open(label).convert("RGB").save(label)
    with pytest.raises(BadImageError, match=re.escape(str(label))):
        VOCDataset(tmp_path, "val").read_annotation(0)


@pytest.mark.parametrize(
    "images,labels", [("images/val2017", "stuffthingmaps_trainval2017/val2017"), ("val2017", "annotations/val2017")]
)
def test_cocostuff_maps_182_ids_to_171_classes(tmp_path: Path, images: str, labels: str) -> None:
    reader = CocoStuffDataset(write_cocostuff(tmp_path, images, labels), "val")
    assert reader.image_ids == ["000000000139", "000000000285"]
    ann = reader.read_annotation(1)
    np.testing.assert_array_equal(ann.semantic[:2, :4], STUFF_EXPECTED)
    assert np.all(ann.semantic[2:] == 255)
    lut = label_lut()
    assert sorted(set(lut.tolist()) - {255}) == list(range(171)) and reader.num_classes == 171
    assert reader.class_names[11] == "stop sign" and reader.class_names[80] == "banner"


def test_cocostuff_thing_names_match_coco() -> None:
    dataset = json.loads((_shared("coco_mini") / "annotations" / "instances_val2017.json").read_text())
    names = [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])]
    assert COCOSTUFF_CLASSES[:80] == names


def test_cocostuff_missing_label(tmp_path: Path) -> None:
    root = write_cocostuff(tmp_path)
    (root / "stuffthingmaps_trainval2017" / "val2017" / "000000000285.png").unlink()
    with pytest.raises(DatasetError, match="000000000285.png"):
        CocoStuffDataset(root, "val")


def test_nyu_mat_known_values(tmp_path: Path) -> None:
    truth = write_nyu_mat(tmp_path)
    train = NYUv2Dataset(tmp_path, "train")
    assert train.layout == "labeled" and train.image_ids == ["nyu_0001", "nyu_0003"]
    np.testing.assert_array_equal(np.array(train.read_image(1)), truth["images"][2])
    np.testing.assert_allclose(train.read_annotation(1).depth, truth["depths"][2])
    for split in ("test", "val"):
        reader = NYUv2Dataset(tmp_path, split)
        assert reader.image_ids == ["nyu_0002"]
        assert reader.read_annotation(0).size == (NYU_H, NYU_W)
    assert train._h5 is not None and pickle.loads(pickle.dumps(train))._h5 is None


def test_nyu_mat_in_dataloader_workers(tmp_path: Path) -> None:
    import torch.utils.data

    truth = write_nyu_mat(tmp_path)
    reader = NYUv2Dataset(tmp_path, "train")
    reader.read_annotation(0)  # the parent holds an open handle when the workers fork

    class Depths(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(reader)

        def __getitem__(self, i: int) -> np.ndarray:
            return reader.read_annotation(i).depth

    loader = torch.utils.data.DataLoader(Depths(), batch_size=None, num_workers=2)
    got = [d.numpy() for d in loader]
    np.testing.assert_allclose(got[1], truth["depths"][2])


def test_nyu_mat_missing_splits(tmp_path: Path) -> None:
    write_nyu_mat(tmp_path)
    (tmp_path / "splits.mat").unlink()
    with pytest.raises(DatasetError, match="splits.mat"):
        NYUv2Dataset(tmp_path, "train")


def test_nyu_samples_depth_in_metres() -> None:
    root = _shared("nyu_samples")
    reader = NYUv2Dataset(root, "test")
    assert reader.layout == "pairs" and len(reader) == 3
    with pytest.raises(DatasetError, match=r"test_annotations.json\) but has no train_annotations.json: which pairs "
                       r"are train is not known. .*--split test"):
        NYUv2Dataset(root, "train")  # a test list and no train list: the test pairs are not train images
    ann = reader.read_annotation(0)
    raw = np.array(Image.open(root / "depth" / "sync_depth_00000.png"))
    assert ann.size == (480, 640)
    np.testing.assert_allclose(ann.depth, raw / 1000.0, rtol=1e-6)
    assert 0 < ann.depth.max() <= 10 and np.all(ann.depth[raw == 0] == 0) and (raw == 0).any()


def test_segfolder_camvid_void_is_ignored() -> None:
    root = _shared("camvid_small")
    reader = SegFolderDataset(root, "val", num_classes=11, ignore_index=11)
    assert len(reader) == 40 and reader.num_classes == 11
    raw = np.array(Image.open(root / "valannot" / f"{reader.image_ids[0]}.png"))
    ann = reader.read_annotation(0)
    np.testing.assert_array_equal(ann.semantic == 255, raw == 11)
    np.testing.assert_array_equal(ann.semantic[raw != 11], raw[raw != 11])
    with pytest.warns(DatasetWarning, match=r"12 classes .* inferred .* --num-classes 11 --ignore-index 11"):
        inferred = SegFolderDataset(root, "train")  # void counts as a class when not ignored: said, once
    assert inferred.num_classes == 12 and inferred.options["num_classes"] == 12 and len(inferred.warnings) == 1
    assert reader.warnings == []  # given: nothing to say


def test_segfolder_label_out_of_range_names_file(tmp_path: Path) -> None:
    labels = np.zeros((10, 12), np.uint8)
    labels[0, 0], labels[1, 1] = 255, 5
    write_segfolder(tmp_path, labels)
    ann = SegFolderDataset(tmp_path, "train", num_classes=6).read_annotation(0)
    assert ann.semantic[0, 0] == 255 and ann.semantic[1, 1] == 5
    with pytest.raises(BadImageError, match=re.escape(str(tmp_path / "labels" / "train" / "a.png"))):
        SegFolderDataset(tmp_path, "train", num_classes=3).read_annotation(0)
    with pytest.raises(DatasetError, match="ignore_index"):
        SegFolderDataset(tmp_path, "train", num_classes=6, ignore_index=2)


def _real_jpeg(tmp_path: Path) -> Path:
    sample = SHARED_DATA / "coco_mini" / "val2017"
    source = next(iter(sorted(sample.glob("*.jpg"))), None) if sample.is_dir() else None
    if source is None:
        source = tmp_path / "source.jpg"
        _jpeg(source, 64, 64)
    return source


@pytest.mark.parametrize("kind", ["voc", "coco", "cocostuff"])
def test_truncated_jpeg_raises_bad_image(tmp_path: Path, kind: str) -> None:
    if kind == "voc":
        base = write_voc(tmp_path / "data")
        reader: DatasetReader = VOCDataset(base, "val")
        victim = base / "JPEGImages" / f"{VOC_IDS['val'][0]}.jpg"
    elif kind == "coco":
        reader = COCODataset(write_coco(tmp_path / "data"), "val")
        victim = tmp_path / "data" / "val2017" / "000000000009.jpg"
    else:
        reader = CocoStuffDataset(write_cocostuff(tmp_path / "data"), "val")
        victim = tmp_path / "data" / "images" / "val2017" / "000000000139.jpg"
    shutil.copyfile(_real_jpeg(tmp_path), victim)
    _truncate(victim)
    with pytest.raises(BadImageError, match=re.escape(str(victim))) as err:
        reader.read_image(0)
    assert err.value.path == str(victim)


# -- sizes: the annotation decides the image's orientation; other sizes are refused ---------------


def test_image_and_annotation_paths(tmp_path: Path) -> None:
    voc = VOCDataset(write_voc(tmp_path / "voc"), "train")
    assert voc.image_path(0).name == "2007_000032.jpg" and voc.annotation_path(0).name == "2007_000032.png"
    coco = COCODataset(write_coco(tmp_path / "coco"), "val")
    assert coco.image_path(0).name == "000000000009.jpg" and coco.annotation_path(0).name == "instances_val2017.json"
    write_nyu_mat(tmp_path / "nyu")
    nyu = NYUv2Dataset(tmp_path / "nyu", "train")
    assert nyu.image_path(0) is None and nyu.annotation_size(0) == (NYU_H, NYU_W)


@pytest.mark.parametrize("kind", ["voc", "cocostuff", "coco"])
def test_image_of_another_size_than_its_annotation_is_refused(tmp_path: Path, kind: str) -> None:
    from extract.datasets.base import ImageSizeError

    if kind == "voc":
        base = write_voc(tmp_path)
        reader: DatasetReader = VOCDataset(base, "val")
        image = base / "JPEGImages" / f"{VOC_IDS['val'][0]}.jpg"
        annotation = base / "SegmentationClass" / f"{VOC_IDS['val'][0]}.png"
    elif kind == "cocostuff":
        reader = CocoStuffDataset(write_cocostuff(tmp_path), "val")
        image = tmp_path / "images" / "val2017" / "000000000139.jpg"
        annotation = tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png"
    else:
        reader = COCODataset(write_coco(tmp_path), "val")
        image = tmp_path / "val2017" / "000000000009.jpg"
        annotation = tmp_path / "annotations" / "instances_val2017.json"
    _jpeg(image, 17, 19)
    with pytest.raises(ImageSizeError) as err:
        reader.read_image(0)
    assert str(image) in str(err.value) and str(annotation) in str(err.value) and "17x19" in str(err.value)


def test_coco_exif_rotated_image_matching_the_json_is_rotated(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    path = root / "val2017" / "000000000009.jpg"  # the JSON says 20x30 (height x width)
    pixels = np.random.default_rng(5).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored 30x20, shown rotated 90° counter-clockwise: 20x30
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    stored = np.asarray(Image.open(path).convert("RGB"))
    image = COCODataset(root, "val").read_image(0)
    np.testing.assert_array_equal(np.asarray(image), np.rot90(stored, k=1))


# -- COCO annotation checks -------------------------------------------------------------------------


def _coco_with(tmp_path: Path, **changes: Any) -> tuple[Path, Path]:
    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    dataset = json.loads(path.read_text())
    dataset["annotations"][0].update(changes)
    path.write_text(json.dumps(dataset))
    return root, path


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"category_id": 7}, "category_id 7"),
        ({"segmentation": [[2, 2, 12, 2]]}, "4 coordinates"),
        ({"segmentation": [[2, 2, 12, 2, 12, 7, 2]]}, "7 coordinates"),
        ({"segmentation": [[2, 2, 12, "x", 12, 7, 2, 7]]}, "non-numeric"),
        ({"segmentation": [[2, 2, 12, None, 12, 7, 2, 7]]}, "non-numeric"),
        ({"segmentation": []}, "empty segmentation"),
        ({"segmentation": {"size": [20, 30]}}, "without 'counts'"),
        ({"segmentation": {"counts": [600]}}, "without 'counts' and 'size'"),
        ({"segmentation": {"counts": [600], "size": [21, 30]}}, r"size \[21, 30\].*20x30"),
        ({"segmentation": {"counts": [500], "size": [20, 30]}}, "summing to 500"),
        ({"segmentation": "polygon"}, "type str"),
        ({"iscrowd": 2}, "iscrowd 2"),
        ({"area": "big"}, "area 'big'"),
    ],
)
def test_coco_bad_annotation_names_file_and_ids(tmp_path: Path, changes: dict[str, Any], reason: str) -> None:
    root, path = _coco_with(tmp_path, **changes)
    with pytest.raises(DatasetError) as err:
        COCODataset(root, "val")
    text = str(err.value)
    assert str(path) in text and "annotation id 1 " in text and "image id 10" in text, text
    assert re.search(reason, text), text
    assert "\n" not in text


def test_coco_orphan_annotations_are_counted_and_warned(tmp_path: Path) -> None:
    from extract.datasets.base import DatasetWarning

    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    dataset = json.loads(path.read_text())
    orphan = dict(dataset["annotations"][0], category_id=99, segmentation="unchecked: ignored anyway")
    dataset["annotations"] += [dict(orphan, id=5, image_id=77), dict(orphan, id=9, image_id=78)]
    path.write_text(json.dumps(dataset))
    with pytest.warns(DatasetWarning, match="2 annotation"):
        reader = COCODataset(root, "val")
    assert reader.warnings == [
        f"2 annotation(s) in {path} refer to no image in it (annotation ids 5, 9); they are ignored."
    ]
    assert len(reader.read_annotation(1).instance_masks) == 1  # image 10 keeps its own annotation only
    assert pickle.loads(pickle.dumps(reader)).warnings == reader.warnings
    assert COCODataset(write_coco(tmp_path / "clean"), "val").warnings == []


def _coco_with_orphan_annotation(root: Path) -> Path:
    """A COCO root whose val file has annotation 3 on image 404, which is not among the images."""
    root = write_coco(root)
    path = root / "annotations" / "instances_val2017.json"
    dataset = json.loads(path.read_text())
    dataset["annotations"].append(dict(dataset["annotations"][0], id=3, image_id=404))
    path.write_text(json.dumps(dataset))
    return root


def test_coco_warnings_reach_the_target_store(tmp_path: Path) -> None:
    from extract.target_store import build_target_store
    from store import read_attrs

    root = _coco_with_orphan_annotation(tmp_path / "data")
    with pytest.warns(UserWarning):
        reader = COCODataset(root, "val")
    result = build_target_store(reader, str(tmp_path / "stores"), size=(16, 16), num_workers=0, show_progress=False)
    attrs = read_attrs(result.path)
    assert attrs["complete"] and attrs["dataset_warnings"] == reader.warnings and "annotation ids 3" in reader.warnings[0]


def test_cli_prints_dataset_warnings_once(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    root = _coco_with_orphan_annotation(tmp_path / "data")
    args = ["extract", "--backbone", "test_vit", "--dataset", "coco", "--split", "val", "--root", str(root),
            "--weights", "random", "--store-root", str(tmp_path / "stores"), "--device", "cpu", "--decode-workers", "0",
            "--no-progress", "--target-size", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "1 annotation(s)" in warning_lines[0] and "annotation ids 3" in warning_lines[0]


# -- dataset identity -------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _check_fingerprint(reader: DatasetReader) -> dict[str, Any]:
    fingerprint = reader.fingerprint()
    text = json.dumps(fingerprint)  # JSON-serialisable
    if reader.root is not None:
        assert str(reader.root) not in text and str(reader.root.parent) not in text
    assert re.fullmatch(r"[0-9a-f]{16}", reader.dataset_id())
    assert pickle.loads(pickle.dumps(reader)).dataset_id() == reader.dataset_id()
    return fingerprint


def test_segfolder_identity(tmp_path: Path) -> None:
    a = tmp_path / "camvid_a"
    for split in ("train", "val"):
        for stem in ("x", "y") if split == "train" else ("z",):
            _jpeg(a / split / f"{stem}.png", 8, 8)
            (a / f"{split}annot").mkdir(exist_ok=True)
            Image.fromarray(np.ones((8, 8), np.uint8)).save(a / f"{split}annot" / f"{stem}.png")
    train = SegFolderDataset(a, "train", num_classes=3)
    _check_fingerprint(train)
    assert SegFolderDataset(a, "val", num_classes=3).dataset_id() == train.dataset_id()  # splits pair up
    b = _copy(a, tmp_path / "elsewhere" / "camvid_b")
    assert SegFolderDataset(b, "train", num_classes=3).dataset_id() == train.dataset_id()  # same data, other path
    assert SegFolderDataset(a, "train", num_classes=3, ignore_index=255).dataset_id() == train.dataset_id()
    assert SegFolderDataset(a, "train", num_classes=4).dataset_id() != train.dataset_id()
    (b / "val" / "z.png").rename(b / "val" / "w.png")
    (b / "valannot" / "z.png").rename(b / "valannot" / "w.png")
    assert SegFolderDataset(b, "train", num_classes=3).dataset_id() != train.dataset_id()  # other files
    # another dataset that numbers its files the same way: same names, other images
    c = _copy(a, tmp_path / "camvid_c")
    _jpeg(c / "train" / "x.png", 16, 12)
    Image.fromarray(np.ones((12, 16), np.uint8)).save(c / "trainannot" / "x.png")
    assert SegFolderDataset(c, "train", num_classes=3).dataset_id() != train.dataset_id()


def test_coco_identity(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "a")
    val = COCODataset(root, "val")
    fingerprint = _check_fingerprint(val)
    assert [c["name"] for c in fingerprint["categories"]] == ["person", "car"]
    assert val.dataset_options() == {}
    assert COCODataset(root, "val", include_empty=False).dataset_id() == val.dataset_id()
    # the train file of the same dataset: other images, same header
    (root / "train2017").mkdir()
    train_json = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    train_json["images"] = train_json["images"][1:]
    train_json["annotations"] = []
    _jpeg(root / "train2017" / "000000000009.jpg", 20, 30)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train_json))
    assert COCODataset(root, "train").dataset_id() == val.dataset_id()
    assert COCODataset(_copy(root, tmp_path / "b"), "val").dataset_id() == val.dataset_id()
    for key, value in (("categories", [{"id": 1, "name": "person"}, {"id": 3, "name": "truck"}]),
                       ("info", {"description": "another dataset"})):
        other = _copy(root, tmp_path / f"other_{key}")
        path = other / "annotations" / "instances_val2017.json"
        dataset = json.loads(path.read_text())
        dataset[key] = value
        path.write_text(json.dumps(dataset))
        assert COCODataset(other, "val").dataset_id() != val.dataset_id(), key


def test_voc_cocostuff_nyu_shapes_identity(tmp_path: Path) -> None:
    from extract.datasets.shapes import ShapesDataset

    write_voc(tmp_path / "voc")
    voc = VOCDataset(tmp_path / "voc", "train")
    _check_fingerprint(voc)
    assert VOCDataset(tmp_path / "voc", "val").dataset_id() == voc.dataset_id()
    assert VOCDataset(_copy(tmp_path / "voc", tmp_path / "voc2"), "trainval").dataset_id() == voc.dataset_id()
    (tmp_path / "voc2" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n")
    assert VOCDataset(tmp_path / "voc2", "train").dataset_id() != voc.dataset_id()

    stuff = CocoStuffDataset(write_cocostuff(tmp_path / "stuff"), "val")
    _check_fingerprint(stuff)
    write_cocostuff(tmp_path / "stuff", "images/train2017", "stuffthingmaps_trainval2017/train2017")
    both = CocoStuffDataset(tmp_path / "stuff", "val")
    assert CocoStuffDataset(tmp_path / "stuff", "train").dataset_id() == both.dataset_id() != stuff.dataset_id()

    write_nyu_mat(tmp_path / "nyu")
    nyu = NYUv2Dataset(tmp_path / "nyu", "train")
    assert _check_fingerprint(nyu)["layout"] == "labeled"
    assert NYUv2Dataset(_copy(tmp_path / "nyu", tmp_path / "nyu2"), "test").dataset_id() == nyu.dataset_id()
    scipy.io.savemat(tmp_path / "nyu2" / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2], [3]])})
    assert NYUv2Dataset(tmp_path / "nyu2", "test").dataset_id() != nyu.dataset_id()

    shapes = ShapesDataset(None, "train", num_images=4)
    _check_fingerprint(shapes)
    assert ShapesDataset(None, "val", num_images=2).dataset_id() == shapes.dataset_id()
    assert shapes.dataset_options() == {"image_size": 224, "seed": 0}
    assert ShapesDataset(None, "train", num_images=4, seed=1).dataset_id() != shapes.dataset_id()


def test_nyu_pairs_identity(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    for n in range(2):
        _jpeg(root / "rgb" / f"rgb_{n:05d}.jpg", 6, 8)
        (root / "depth").mkdir(exist_ok=True)
        Image.fromarray(np.full((6, 8), 1000 + n, np.uint16)).save(root / "depth" / f"sync_depth_{n:05d}.png")
    reader = NYUv2Dataset(root, "test")
    assert _check_fingerprint(reader)["layout"] == "pairs"
    assert NYUv2Dataset(root, "train").dataset_id() == reader.dataset_id()
    assert NYUv2Dataset(_copy(root, tmp_path / "copy"), "test").dataset_id() == reader.dataset_id()
    listing = {"files": [{"rgb": "rgb/rgb_00000.jpg", "depth": "depth/sync_depth_00000.png"}]}
    (tmp_path / "copy" / "test_annotations.json").write_text(json.dumps(listing))
    assert NYUv2Dataset(tmp_path / "copy", "test").dataset_id() != reader.dataset_id()
