"""Image decoding: every PIL mode to the right 8-bit RGB or one refusal; EXIF orientation by size.

Files are written in their real formats by the tests (PIL, or PNG chunks by hand where PIL cannot
write the mode: 16 bits per channel). Expected values are computed independently of the code:
``round(v * 255 / 65535)`` for 16-bit values, palette colours for palette images.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from extract.datasets.decode import ImageSizeError, load_rgb, to_rgb
from extract.datasets.segfolder import SegFolderDataset
from extract.target_store import build_target_store
from store import read_attrs
from runtime.errors import BadImageError, DatasetError

VALUES16 = np.array([0, 1000, 32768, 65280, 65535, 257, 128, 129], dtype=np.uint16)


def _round8(values: np.ndarray) -> np.ndarray:
    """The reference 16 → 8-bit mapping, in floating point: round(v * 255 / 65535)."""
    return np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)


def _png16(path: Path, values: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written chunk by chunk (PIL cannot write 16-bit colour), cycling through the
    five PNG row filters so that decoding with the wrong bytes-per-pixel would show."""
    h, w = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    raw = values.astype(">u2").reshape(h, w * channels).view(np.uint8).reshape(h, -1).astype(np.int64)
    bpp = 2 * channels
    rows = []
    for y in range(h):
        cur, up = raw[y], raw[y - 1] if y else np.zeros_like(raw[0])
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        kind = y % 5
        if kind == 0:
            out = cur
        elif kind == 1:
            out = cur - left
        elif kind == 2:
            out = cur - up
        elif kind == 3:
            out = cur - (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
            out = cur - pred
        rows.append(bytes([kind]) + (out % 256).astype(np.uint8).tobytes())

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + chunk(b"IEND", b""))
    return path


def _grid16(h: int = 6, w: int = 7, channels: int = 0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 0 else (h, w, channels)
    values = rng.integers(0, 65536, shape).astype(np.uint16)
    values.reshape(-1)[: VALUES16.size] = VALUES16  # the edge cases, somewhere in the image
    return values


# -- 16-bit images ------------------------------------------------------------------------------


def test_16bit_gray_png_scales_to_8bit(tmp_path: Path) -> None:
    values = _grid16()
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    expected = _round8(values)
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))
    assert expected.reshape(-1)[:5].tolist() == [0, 4, 128, 254, 255]  # not the 255 convert("RGB") gives


def test_16bit_big_endian_tiff_and_mode_i(tmp_path: Path) -> None:
    values = _grid16(seed=1)
    path = tmp_path / "gray16b.tif"
    Image.frombytes("I;16B", (values.shape[1], values.shape[0]), values.astype(">u2").tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(load_rgb(path))[..., 0], _round8(values))
    # Older Pillow opens 16-bit PNGs as mode "I" (32-bit): values within 16 bits are 16-bit data.
    as_i = Image.fromarray(values.astype(np.int32))
    assert as_i.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(as_i, "x.png"))[..., 1], _round8(values))


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4)])
def test_16bit_per_channel_png_keeps_all_16_bits(tmp_path: Path, color_type: int, channels: int) -> None:
    values = _grid16(channels=channels, seed=2)
    path = _png16(tmp_path / "rgb16.png", values, color_type)
    pil = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(pil, (values[..., :3] >> 8).astype(np.uint8))  # what PIL does: high bytes
    got = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(got, _round8(values[..., :3]))  # alpha dropped
    assert not np.array_equal(got, pil)  # e.g. 65280 -> 254, 1000 -> 4 (PIL: 255, 3)


def _tiff16(path: Path, values: np.ndarray, little: bool) -> Path:
    """An uncompressed 16-bit-per-channel RGB TIFF written tag by tag (PIL cannot write one)."""
    e = "<" if little else ">"
    h, w, c = values.shape
    data = values.astype(e + "u2").tobytes()
    data_offset = 8 + 2 * c  # header, then BitsPerSample's values, then the pixels, then the IFD
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, c, 8), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, data_offset),
            (277, 3, 1, c), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    ifd = struct.pack(e + "H", len(tags))
    for tag, kind, count, value in tags:
        field = struct.pack(e + "HH", value, 0) if kind == 3 and count == 1 else struct.pack(e + "I", value)
        ifd += struct.pack(e + "HHI", tag, kind, count) + field
    head = (b"II*\0" if little else b"MM\0*") + struct.pack(e + "I", data_offset + len(data))
    path.write_bytes(head + struct.pack(e + "3H", 16, 16, 16) + data + ifd + struct.pack(e + "I", 0))
    return path


@pytest.mark.parametrize("little", [True, False])
def test_16bit_per_channel_tiff(tmp_path: Path, little: bool) -> None:
    values = _grid16(channels=3, seed=4)
    path = _tiff16(tmp_path / "rgb16.tif", values, little)
    assert Image.open(path).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), _round8(values))


def test_16bit_gray_alpha_png(tmp_path: Path) -> None:
    values = _grid16(channels=2, seed=3)
    path = _png16(tmp_path / "la16.png", values, 4)
    got = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(got, np.repeat(_round8(values[..., 0])[..., None], 3, axis=2))


# -- 8-bit modes --------------------------------------------------------------------------------


PALETTE = [10, 20, 30, 200, 100, 50, 0, 255, 7]


@pytest.mark.parametrize("transparency", [None, 1, bytes([255, 0, 128])])
def test_palette_png_gives_palette_colours(tmp_path: Path, transparency) -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    im = Image.frombytes("P", (3, 2), indices.tobytes())
    im.putpalette(PALETTE)
    path = tmp_path / "p.png"
    im.save(path, **({} if transparency is None else {"transparency": transparency}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "palette with transparency" warning would spam every image
        got = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(got, np.array(PALETTE, np.uint8).reshape(3, 3)[indices])


def test_gray_alpha_rgba_bilevel_cmyk(tmp_path: Path) -> None:
    gray = np.array([[0, 90, 255]], np.uint8)
    Image.fromarray(np.stack([gray, np.array([[0, 50, 255]], np.uint8)], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "la.png")), np.repeat(gray[..., None], 3, 2))
    rgba = np.array([[[1, 2, 3, 0], [250, 128, 9, 77]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "rgba.png")), rgba[..., :3])
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "bits.png")
    assert np.asarray(load_rgb(tmp_path / "bits.png"))[0, :, 0].tolist() == [255, 0, 255]
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 255, 0, 0, 0, 0, 0, 255]))
    cmyk.save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "cmyk.tif")), [[[255, 0, 255], [0, 0, 0]]])
    ycbcr = Image.new("YCbCr", (2, 2), (128, 128, 128))
    assert np.asarray(to_rgb(ycbcr, "y.jpg")).tolist() == [[[128] * 3] * 2] * 2


def test_modes_without_8bit_meaning_are_refused(tmp_path: Path) -> None:
    float_tif = tmp_path / "depth.tif"
    Image.fromarray(np.array([[0.5, 2.0]], np.float32)).save(float_tif)
    with pytest.raises(BadImageError, match=re.escape(str(float_tif)) + ".*mode F") as err:
        load_rgb(float_tif)
    assert err.value.path == str(float_tif) and "\n" not in str(err.value)
    wide_tif = tmp_path / "int32.tif"
    Image.fromarray(np.array([[70000, 5]], np.int32)).save(wide_tif)
    with pytest.raises(BadImageError, match=re.escape(str(wide_tif)) + ".*mode I.*70000"):
        load_rgb(wide_tif)
    with pytest.raises(BadImageError, match="mode La"):
        to_rgb(Image.new("La", (2, 2)), tmp_path / "la.png")


def test_jpeg_draft_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(path)
    small = load_rgb(path, draft_size=(40, 32))
    assert small.size == (40, 32)  # DCT-scaled by 8, not decoded at 320x256
    assert load_rgb(path).size == (320, 256)


# -- EXIF orientation and sizes -----------------------------------------------------------------


def _exif_jpeg(path: Path, height: int, width: int, orientation: int) -> np.ndarray:
    """A JPEG stored ``height`` x ``width`` with an EXIF orientation tag; returns its stored pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 3] = (250, 10, 10)  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return np.asarray(Image.open(path).convert("RGB"))


def _segfolder(root: Path, image_hw: tuple[int, int], label_hw: tuple[int, int], orientation: int = 1) -> np.ndarray:
    stored = _exif_jpeg(root / "images" / "train" / "a.jpg", *image_hw, orientation)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(label_hw, np.uint8)).save(root / "labels" / "train" / "a.png")
    return stored


def test_exif_rotated_jpeg_follows_its_annotation(tmp_path: Path) -> None:
    # Orientation 6: the camera was turned; the viewer rotates the stored pixels 90° clockwise.
    stored = _segfolder(tmp_path / "rotated", (20, 30), (30, 20), orientation=6)
    reader = SegFolderDataset(tmp_path / "rotated", "train", num_classes=2)
    image = np.asarray(reader.read_image(0))
    assert image.shape == (30, 20, 3)
    np.testing.assert_array_equal(image, np.rot90(stored, k=-1))  # clockwise
    assert image[0, -1].tolist() == stored[0, 0].tolist()  # the red corner moved to the top right
    assert reader.read_image(0, draft_size=(10, 15)).size == (10, 15)  # draft asked for the stored (15, 10)
    reader.check_image_size(0)

    stored = _segfolder(tmp_path / "raw", (20, 30), (20, 30), orientation=6)  # COCO-style: raw pixels
    raw = SegFolderDataset(tmp_path / "raw", "train", num_classes=2)
    np.testing.assert_array_equal(np.asarray(raw.read_image(0)), stored)


def test_label_of_another_size_is_refused_naming_both_files(tmp_path: Path) -> None:
    _segfolder(tmp_path, (20, 30), (24, 30), orientation=6)  # the EXIF transpose does not fit either
    reader = SegFolderDataset(tmp_path, "train", num_classes=2)
    image, label = tmp_path / "images" / "train" / "a.jpg", tmp_path / "labels" / "train" / "a.png"
    for check in (lambda: reader.read_image(0), lambda: reader.check_image_size(0)):
        with pytest.raises(ImageSizeError) as err:
            check()
        text = str(err.value)
        assert str(image) in text and str(label) in text and "20x30" in text and "24x30" in text, text
        assert "\n" not in text and isinstance(err.value, DatasetError) and not isinstance(err.value, BadImageError)
    clone = pickle.loads(pickle.dumps(err.value))  # crosses DataLoader worker processes
    assert type(clone) is ImageSizeError and str(clone) == str(err.value)


def test_target_store_refuses_label_of_another_size(tmp_path: Path) -> None:
    _segfolder(tmp_path / "data", (20, 30), (20, 31))
    reader = SegFolderDataset(tmp_path / "data", "train", num_classes=2)
    with pytest.raises(ImageSizeError, match=re.escape(str(tmp_path / "data" / "labels" / "train" / "a.png"))):
        build_target_store(reader, str(tmp_path / "stores"), size=(16, 16), num_workers=0, show_progress=False)
    paths = list((tmp_path / "stores").rglob("*.zarr"))
    assert all(not (read_attrs(p) or {}).get("complete") for p in paths)

    # From a worker process, torch re-raises it as text: the CLI finds the one line in it.
    from pipelines.cli import _worker_error

    with pytest.raises(RuntimeError) as err:
        build_target_store(reader, str(tmp_path / "stores"), size=(16, 16), num_workers=1, show_progress=False)
    message, code = _worker_error(err.value)
    assert code == 2 and str(tmp_path / "data" / "images" / "train" / "a.jpg") in message and "20x31" in message


def _extract_args(root: Path, stores: Path, *extra: str) -> list[str]:
    return ["extract", "--backbone", "test_vit", "--dataset", "segfolder", "--split", "train", "--root", str(root),
            "--weights", "random", "--store-root", str(stores), "--device", "cpu", "--num-classes", "2",
            "--no-progress", *extra]


@pytest.mark.parametrize("extra", [("--decode-workers", "1"), ("--decode-workers", "1", "--no-build-targets"), ("--decode-workers", "0", "--no-build-targets")])
def test_cli_size_mismatch_stops_even_with_skip_bad(tmp_path: Path, extra: tuple[str, ...]) -> None:
    from pipelines.cli import app

    _segfolder(tmp_path / "data", (20, 30), (30, 30))
    result = CliRunner().invoke(app, _extract_args(tmp_path / "data", tmp_path / "stores", "--skip-bad", *extra))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "a.jpg" in lines[0] and "a.png" in lines[0] and "30x30" in lines[0]
    rows = json.loads(CliRunner().invoke(app, ["stores", "ls", str(tmp_path / "stores"), "--json"]).output or "[]")
    assert not any(r["complete"] for r in rows)
