"""Decode an image file to the 8-bit RGB its mode means, at the orientation its annotation has.

``Image.convert("RGB")`` is right for 8-bit modes only: it clips 16-bit grayscale (``I;16``) to 255
(an all-white image), and PIL reads 16-bit-per-channel PNG/TIFF keeping only the high byte of every
value (``v >> 8``: 65280 → 255). Here every 16-bit value maps to ``round(v · 255 / 65535)``, the
8-bit modes go through ``convert("RGB")`` (palette colours, alpha dropped, as torchvision and timm
do), and modes without an 8-bit meaning (float, 32-bit integers beyond 16 bits) are refused with
:class:`BadImageError` naming the file and the mode.

EXIF orientation follows the dataset: COCO's API, torchvision and label-map datasets use the stored
pixels, so the annotation's size decides. Stored pixels are used when their size is the
annotation's; the EXIF transposition (orientation 5–8) only when that makes the sizes agree;
anything else is refused with :class:`ImageSizeError` naming both files and both sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import BadImageError, DatasetError

__all__ = ["ImageSizeError", "exif_orientation", "header_size", "load_rgb", "needs_transpose", "to_rgb"]

#: EXIF orientations that swap height and width, and the transposition ``ImageOps.exif_transpose`` applies.
_TRANSPOSING = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

#: Raw modes of 16-bit-per-channel files that PIL unpacks to their high bytes → the raw mode of
#: the same layout in the other byte order, which unpacks the low bytes instead.
_LOW_BYTES = {
    "L;16B": "L;16", "L;16": "L;16B",
    "RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B",
    "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B",
    "RGBX;16B": "RGBX;16L", "RGBX;16L": "RGBX;16B",
    "CMYK;16B": "CMYK;16L", "CMYK;16L": "CMYK;16B",
}  # fmt: skip
#: 16-bit gray + alpha PNGs open as RGBA from ``LA;16B``; plain ``RGBA`` reads the same 4 bytes raw.
_GRAY_ALPHA_16 = "LA;16B"
#: Premultiplied 16-bit TIFF: the low bytes cannot be un-premultiplied on their own.
_UNSUPPORTED_WIDE = frozenset({"RGBa;16B", "RGBa;16L"})
_WIDE_RAWMODES = frozenset(_LOW_BYTES) | {_GRAY_ALPHA_16} | _UNSUPPORTED_WIDE


class ImageSizeError(DatasetError):
    """An image's stored size matches its annotation's neither as stored nor EXIF-transposed."""

    def __init__(self, image: str, annotation: str, image_size: tuple[int, int],
                 annotation_size: tuple[int, int], orientation: int = 1) -> None:
        self.image, self.annotation = str(image), str(annotation)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.annotation_size = (int(annotation_size[0]), int(annotation_size[1]))
        self.orientation = int(orientation)
        (h, w), (ah, aw) = self.image_size, self.annotation_size
        exif = f" (nor {w}x{h} after its EXIF orientation {orientation})" if orientation in _TRANSPOSING else ""
        super().__init__(
            f"image {self.image} is {h}x{w} pixels (height x width){exif} but its annotation {self.annotation} "
            f"is {ah}x{aw}; they must be the same picture at the same size: replace the wrong file or fix the "
            "annotation's size."
        )

    def __reduce__(self):  # survive pickling across DataLoader worker processes
        return (type(self), (self.image, self.annotation, self.image_size, self.annotation_size, self.orientation))


def header_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from an image file's header, without decoding pixels.

    Raises:
        BadImageError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as im:
            return int(im.height), int(im.width)
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(str(path), str(err) or type(err).__name__) from None


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag of an open image (1 when absent or unreadable)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: treat as untagged, sizes still decide
        return 1
    return value if isinstance(value, int) else 1


def needs_transpose(im: Image.Image, path: str | Path, annotation_size: tuple[int, int],
                    annotation: str | Path | None) -> bool:
    """Whether the open image ``im`` must be EXIF-transposed to match ``annotation_size``.

    Raises:
        ImageSizeError: neither the stored nor the transposed size is the annotation's.
    """
    stored = (int(im.height), int(im.width))
    wanted = (int(annotation_size[0]), int(annotation_size[1]))
    if stored == wanted:
        return False
    orientation = exif_orientation(im)
    if orientation in _TRANSPOSING and stored[::-1] == wanted:
        return True
    raise ImageSizeError(str(path), str(annotation or "(no file)"), stored, wanted, orientation)


def _refuse(path: str | Path, mode: str, why: str) -> BadImageError:
    return BadImageError(str(path), f"mode {mode} {why}")


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit values → ``round(v * 255 / 65535)`` (exact: ``(v + 128) // 257``, and v/257 never ends in .5)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def to_rgb(im: Image.Image, path: str | Path) -> Image.Image:
    """A loaded image as 8-bit RGB, or :class:`BadImageError` for modes without an 8-bit meaning.

    Args:
        im: a loaded image of any mode PIL opens (16-bit-per-channel files go through
            :func:`load_rgb`, which reads their low bytes too).
        path: the file, for error messages.
    """
    mode = im.mode
    if mode == "F":
        raise _refuse(path, mode, "(32-bit float pixels) has no 8-bit meaning; save the image as 8- or 16-bit")
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(im)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:  # "I" from a 16-bit PNG always fits; a 32-bit one may not
            raise _refuse(path, mode, f"holds values {low}..{high}, beyond 16 bits: no 8-bit meaning; "
                                      "save the image as 8- or 16-bit")
        return Image.fromarray(_to_8bit(values)).convert("RGB")
    if mode == "P":
        im.info.pop("transparency", None)  # alpha is dropped anyway; PIL would warn about it
    try:
        return im.convert("RGB")
    except ValueError as err:  # e.g. "La": PIL has no conversion
        raise _refuse(path, mode, f"cannot be converted to RGB ({err})") from None


def _tile_rawmode(tile) -> str | None:
    args = tile[3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _with_rawmode(tile, rawmode: str):
    args = tile[3]
    args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _wide(im: Image.Image, path: str | Path) -> str | None:
    """The raw mode of a 16-bit-per-channel file PIL would truncate to 8 bits, else ``None``."""
    if im.mode == "I" or im.mode.startswith("I;16") or not im.tile:
        return None  # 16-bit grayscale opens with all 16 bits
    rawmodes = {_tile_rawmode(t) for t in im.tile}
    wide = rawmodes & _WIDE_RAWMODES  # not "BGR;16" (BMP): 16 bits per pixel, 5-6-5, PIL converts it right
    if not wide:
        return None
    rawmode = next(iter(wide))
    if rawmodes != {rawmode} or rawmode in _UNSUPPORTED_WIDE:
        raise _refuse(path, im.mode, f"is stored as 16-bit {', '.join(sorted(map(str, rawmodes)))}, which maxa "
                                     "cannot decode exactly; save it as 8-bit or as a 16-bit PNG")
    return rawmode


def _load_wide(im: Image.Image, path: str | Path, rawmode: str) -> Image.Image:
    """Decode all 16 bits of every channel (two passes: high bytes, then low bytes) → 8-bit RGB."""
    with Image.open(path) as other:
        low_rawmode = "RGBA" if rawmode == _GRAY_ALPHA_16 else _LOW_BYTES[rawmode]
        other.tile = [_with_rawmode(t, low_rawmode) for t in other.tile]
        other.load()
        low = np.asarray(other).astype(np.uint16)
    if rawmode == _GRAY_ALPHA_16:  # raw RGBA bytes: gray high, gray low, alpha high, alpha low
        gray = _to_8bit(low[..., 0] * 256 + low[..., 1])
        return Image.fromarray(gray).convert("RGB")
    im.load()
    values = np.asarray(im).astype(np.uint16) * 256 + low
    pixels = _to_8bit(values)
    if im.mode == "L":
        return Image.fromarray(pixels).convert("RGB")
    if im.mode == "CMYK":
        return Image.frombytes("CMYK", im.size, np.ascontiguousarray(pixels).tobytes()).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3]))  # RGB / RGBA / RGBX: alpha dropped


def load_rgb(
    path: str | Path,
    draft_size: tuple[int, int] | None = None,
    *,
    annotation_size: tuple[int, int] | None = None,
    annotation: str | Path | None = None,
) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, or raise :class:`BadImageError` naming the file.

    Args:
        path: image file.
        draft_size: ``(width, height)``: JPEG decoding may use DCT scaling to a size no smaller than
            this (PIL ``draft``), several times faster for a small backbone input.
        annotation_size: ``(height, width)`` the dataset's annotation has; decides the EXIF
            orientation (see the module docstring). ``None`` decodes the stored pixels.
        annotation: the annotation's file, named by :class:`ImageSizeError`.

    Raises:
        BadImageError: missing, corrupt or truncated file, or a mode without an 8-bit meaning.
        ImageSizeError: the image's size is not its annotation's (not a bad image: ``--skip-bad``
            does not skip it).
    """
    try:
        with Image.open(path) as im:
            method = None
            if annotation_size is not None and needs_transpose(im, path, annotation_size, annotation):
                method = _TRANSPOSING[exif_orientation(im)]
            rawmode = _wide(im, path)
            if rawmode is not None:
                rgb = _load_wide(im, path, rawmode)
            else:
                if draft_size is not None and im.format == "JPEG":
                    # draft_size is the final image's (width, height): swap it when the stored image is transposed
                    im.draft("RGB", tuple(draft_size[::-1]) if method is not None else tuple(draft_size))
                im.load()
                rgb = to_rgb(im, path)
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises OSError for truncated data
        raise BadImageError(str(path), str(err) or type(err).__name__) from None
    return rgb if method is None else rgb.transpose(method)
