"""Build the dense targets of one image at the output resolution (definitions: docs/method.md, "Targets").

Definitions (also returned by :meth:`TargetConfig.definitions`, recorded in target-store attributes):

* **Resizing** — the whole image is resized to the output size ``(H, W)`` (squashed, no crop),
  like the backbone input, so the feature grid and the targets cover the same field of view. Output
  pixel ``(i, j)`` has its centre at original coordinates ``((i + 0.5)·h/H, (j + 0.5)·w/W)``.
* **instances** — ``uint16 (H, W)`` id map, 0 = background, 1..K = instances in the annotation's
  order. Each instance mask is resized as a float mask with PIL's bilinear filter (a triangle
  filter, widened when downsampling, i.e. antialiased, so a value is the weighted fraction of
  covered original pixels) and kept where the value is ≥ 0.5 (ties count as covered). Instances
  are painted in ``instance_order`` (higher painted later, on top) if the annotation gives one, else by
  decreasing area (large first, small on top); ties keep the annotation's order. Instances with no
  pixel left in the painted map (too small at the output size, or hidden) are dropped and the
  remaining ids renumbered 1..K consecutively, keeping their order. Also:
  ``instance_count`` (``int32`` scalar, K), ``instance_area`` (``float32 (K,)``, original-resolution
  area of each kept instance from ``instance_areas``, else its mask's pixel count), ``foreground``
  (``uint8 (H, W)``, 1 where the id map is > 0) and ``instance_ignore`` (``uint8 (H, W)``, 1 where
  the annotation's ``ignore_mask`` — COCO crowd regions — resized like a mask is ≥ 0.5; losses and
  metrics skip these pixels; all 0 without an ignore mask).
* **boundaries** — ``uint8 (H, W)``, 1 where the instance id map is not constant within the
  pixel's ``(2·boundary_width + 1)²`` neighbourhood (clipped at the image border). With the
  default ``boundary_width = 2`` (5×5) both sides of every edge between two instances or an
  instance and the background are marked: a band 4 pixels wide at the output resolution. The paper
  gives no width; this one matches the ≈ 10 % boundary rate implied by its Table 2 (the random
  backbone's CE 0.3021 ≈ the constant predictor's entropy at that rate; a 2-px band covers ≈ 5 %
  of COCO pixels, whose constant CE of 0.20 no trained probe would exceed). The image
  border itself is not a boundary; crowd (ignore) regions are background for this purpose.
* **distance** — ``float32 (H, W)`` in [0, 1]: Euclidean distance in output pixels from each
  pixel's centre to the nearest boundary pixel's centre (``scipy.ndimage.distance_transform_edt``,
  0 on boundary pixels), divided by the normaliser ``distance_norm``: ``"max"`` (default) — the
  image's own largest distance, so each image spans [0, 1]; ``"diagonal"`` — the output diagonal
  ``√(H² + W²)``, the same scale for every image. An image without any boundary is all 1.
* **semantic** — ``uint8 (H, W)`` class indices, nearest-neighbour resize (the original pixel
  under each output pixel's centre), so 255 = ignore is kept and never mixed.
* **depth** — ``float32 (H, W)`` metres, nearest-neighbour resize like ``semantic``, so invalid
  pixels (0) never bleed into valid ones; non-finite or negative depths become 0 = invalid.
* **image** (not a target: kept beside them for heads guided by the image and for pictures) —
  ``uint8 (H, W, 3)`` RGB, the image decoded at full size (no JPEG draft scaling, which would
  shift the geometry by up to a block) and resized whole with PIL's bilinear filter (antialiased,
  like the masks), so its pixel ``(i, j)`` has the same centre as the targets' pixel ``(i, j)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from extract.datasets.base import TARGET_KINDS, Annotation
from runtime.errors import DatasetError, MaxaError
from store.spec import DEFAULT_TARGET_SIZE

__all__ = ["TargetConfig", "TargetConfigError", "build_targets", "resize_image", "TARGET_OUTPUTS", "TARGETS_VERSION"]

#: Bump when a definition changes: recorded by ``TargetConfig.to_dict`` (so in target-store keys).
TARGETS_VERSION = 1

#: The arrays :func:`build_targets` returns for each requested kind.
TARGET_OUTPUTS: dict[str, tuple[str, ...]] = {
    "instances": ("instances", "instance_count", "instance_area", "foreground", "instance_ignore"),
    "boundaries": ("boundaries",),
    "distance": ("distance",),
    "semantic": ("semantic",),
    "depth": ("depth",),
}

_DISTANCE_NORMS = ("max", "diagonal")
_MASK_THRESHOLD = 0.5
_TIE_TOLERANCE = 1e-4  # ties count as covered, whatever the float rounding


class TargetConfigError(MaxaError, ValueError):
    """An invalid target configuration or an unknown target kind."""


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """How targets are built; part of a target store's identity.

    Attributes:
        size: output ``(height, width)`` in pixels (the paper's 224 × 224 by default).
        boundary_width: a pixel is a boundary if the instance id changes within this Chebyshev
            radius (2 → 5×5 neighbourhood → a 4-pixel band straddling each edge).
        distance_norm: ``"max"`` (per image, by its largest distance) or ``"diagonal"`` (by the
            output diagonal) — see the module docstring.
    """

    size: tuple[int, int] = DEFAULT_TARGET_SIZE
    boundary_width: int = 2
    distance_norm: str = "max"

    def __post_init__(self) -> None:
        size = tuple(self.size) if isinstance(self.size, (tuple, list)) else self.size
        if (
            not isinstance(size, tuple)
            or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in size)
        ):
            raise TargetConfigError(f"target size must be two positive integers (height, width), got {self.size!r}.")
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        bw = self.boundary_width
        if isinstance(bw, bool) or not isinstance(bw, (int, np.integer)) or bw < 1:
            raise TargetConfigError(f"boundary_width must be an integer ≥ 1, got {bw!r}.")
        object.__setattr__(self, "boundary_width", int(bw))
        if self.distance_norm not in _DISTANCE_NORMS:
            raise TargetConfigError(
                f"distance_norm must be one of {', '.join(_DISTANCE_NORMS)}, got {self.distance_norm!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields plus the definitions version."""
        d = asdict(self)
        d["size"] = list(self.size)
        d["version"] = TARGETS_VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TargetConfig":
        data = dict(data)
        version = data.pop("version", TARGETS_VERSION)
        if version != TARGETS_VERSION:
            raise TargetConfigError(
                f"targets were built with definitions version {version}; this maxa builds version "
                f"{TARGETS_VERSION}. Rebuild the target store."
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TargetConfigError(f"unknown target spec field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        if "size" in data:
            data["size"] = tuple(data["size"])
        return cls(**data)

    def definitions(self) -> dict[str, str]:
        """One sentence per target, with this spec's parameters filled in (for store attributes)."""
        h, w = self.size
        bw = self.boundary_width
        n = 2 * bw + 1
        if self.distance_norm == "max":
            norm = "divided by the image's largest distance, so each image spans [0, 1]"
        else:
            norm = f"divided by the output diagonal sqrt({h}^2 + {w}^2) = {math.hypot(h, w):.3f}"
        return {
            "resize": (
                f"The whole image is resized (squashed, no crop) to {h}x{w} (height x width), like the "
                "backbone input; output pixel (i, j) is centred at original ((i + 0.5) h/H, (j + 0.5) w/W)."
            ),
            "instances": (
                "uint16 id map, 0 = background, 1..K = instances in the annotation's order. Each mask is "
                "resized as a float mask with PIL's bilinear (antialiased triangle) filter and kept where "
                ">= 0.5 (ties count as covered); instances are painted in instance_order (higher on top) if given, else by "
                "decreasing area (small on top); instances with no pixel left are dropped and ids "
                "renumbered consecutively. instance_count = K; instance_area = original-resolution area of "
                "each kept instance; foreground = 1 where id > 0; instance_ignore = 1 where the ignore mask "
                "(COCO crowd), resized like a mask, is >= 0.5."
            ),
            "boundaries": (
                f"uint8, 1 where the instance id map is not constant within the pixel's {n}x{n} "
                f"neighbourhood (clipped at the image border): both sides of each edge are marked, a band "
                f"{2 * bw} pixels wide at the output resolution; the image border is not a boundary."
            ),
            "distance": (
                "float32 in [0, 1]: Euclidean distance in output pixels to the nearest boundary pixel "
                f"(0 on boundaries), {norm}; an image without boundaries is all 1."
            ),
            "semantic": "uint8 class indices, nearest-neighbour resize; 255 = ignore is kept.",
            "depth": (
                "float32 metres, nearest-neighbour resize so invalid pixels (0) never bleed into valid "
                "ones; 0 = invalid (non-finite or negative input depths become 0)."
            ),
            "input_image": (
                f"uint8 (H, W, 3) RGB, the image decoded at full size and resized whole to {h}x{w} with "
                "PIL's bilinear (antialiased triangle) filter: pixel (i, j) has the targets' pixel centre."
            ),
        }


def build_targets(ann: Annotation, spec: TargetConfig, kinds: Iterable[str]) -> dict[str, np.ndarray]:
    """Targets of one image at ``spec.size`` for the requested ``kinds`` (see the module docstring).

    Returns the arrays listed in :data:`TARGET_OUTPUTS` for each requested kind. Raises
    :class:`TargetConfigError` for an unknown kind and :class:`DatasetError` when the annotation
    lacks what a kind needs.
    """
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = sorted(kinds - set(TARGET_KINDS))
    if unknown:
        raise TargetConfigError(f"unknown target kind(s) {', '.join(unknown)}; known: {', '.join(TARGET_KINDS)}.")
    out: dict[str, np.ndarray] = {}
    if kinds & {"instances", "boundaries", "distance"}:
        inst = _instance_targets(ann, spec)
        if "instances" in kinds:
            out.update(inst)
        if kinds & {"boundaries", "distance"}:
            boundaries = instance_boundaries(inst["instances"], spec.boundary_width)
            if "boundaries" in kinds:
                out["boundaries"] = boundaries
            if "distance" in kinds:
                out["distance"] = boundary_distance(boundaries, spec.distance_norm)
    if "semantic" in kinds:
        if ann.semantic is None:
            raise DatasetError("the annotation has no semantic labels: this dataset cannot make 'semantic' targets.")
        out["semantic"] = _resize_nearest(_check_shape(np.asarray(ann.semantic), ann.size, "semantic"), spec.size)
        out["semantic"] = out["semantic"].astype(np.uint8, copy=False)
    if "depth" in kinds:
        if ann.depth is None:
            raise DatasetError("the annotation has no depth: this dataset cannot make 'depth' targets.")
        depth = _check_shape(np.asarray(ann.depth), ann.size, "depth").astype(np.float32)
        depth = _resize_nearest(depth, spec.size)
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
        out["depth"] = depth
    return out


def resize_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``uint8 (H, W, 3)`` RGB of a whole image resized to ``size = (H, W)`` on the targets' pixel grid
    (PIL's bilinear filter; output pixel ``(i, j)`` centred at original ``((i + 0.5)·h/H, (j + 0.5)·w/W)``)."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy (torch's collation warns on read-only arrays)


def instance_boundaries(ids: np.ndarray, width: int = 1) -> np.ndarray:
    """``uint8`` map, 1 where ``ids`` is not constant within the ``(2·width + 1)²`` neighbourhood."""
    size = 2 * width + 1
    # 'nearest' replicates edge pixels, which are inside the window already: borders add nothing.
    hi = ndimage.maximum_filter(ids, size=size, mode="nearest")
    lo = ndimage.minimum_filter(ids, size=size, mode="nearest")
    return (hi != lo).astype(np.uint8)


def boundary_distance(boundaries: np.ndarray, norm: str = "max") -> np.ndarray:
    """Normalised Euclidean distance to the nearest boundary pixel, ``float32`` in [0, 1]."""
    if not boundaries.any():
        return np.ones(boundaries.shape, dtype=np.float32)
    d = ndimage.distance_transform_edt(boundaries == 0).astype(np.float32)
    if norm == "max":
        m = float(d.max())
        scale = m if m > 0 else 1.0
    elif norm == "diagonal":
        scale = math.hypot(*boundaries.shape)
    else:
        raise TargetConfigError(f"distance_norm must be one of {', '.join(_DISTANCE_NORMS)}, got {norm!r}.")
    d /= np.float32(scale)
    np.clip(d, 0.0, 1.0, out=d)
    return d


# ----------------------------------------------------------------------------------------------
# instances


def _check_shape(a: np.ndarray, size: tuple[int, int], what: str) -> np.ndarray:
    if a.shape[-2:] != tuple(size):
        raise DatasetError(f"annotation {what} has shape {a.shape}, but the image size is {tuple(size)}.")
    return a


def _instance_targets(ann: Annotation, spec: TargetConfig) -> dict[str, np.ndarray]:
    if ann.instance_masks is None:
        raise DatasetError(
            "the annotation has no instance masks: this dataset cannot make 'instances', 'boundaries' or 'distance' targets."
        )
    masks = np.asarray(ann.instance_masks)
    if masks.ndim != 3:
        raise DatasetError(f"annotation instance_masks must be (K, H, W), got shape {masks.shape}.")
    _check_shape(masks, ann.size, "instance_masks")
    k = masks.shape[0]
    oh, ow = spec.size
    if ann.instance_areas is not None:
        areas = np.asarray(ann.instance_areas, dtype=np.float64).reshape(-1)
        if areas.shape[0] != k:
            raise DatasetError(f"annotation has {k} instance masks but {areas.shape[0]} instance areas.")
    else:
        areas = masks.sum(axis=(1, 2), dtype=np.int64).astype(np.float64)
    if ann.instance_order is not None:
        order_key = np.asarray(ann.instance_order, dtype=np.float64).reshape(-1)
        if order_key.shape[0] != k:
            raise DatasetError(f"annotation has {k} instance masks but {order_key.shape[0]} instance_order values.")
        paint = np.argsort(order_key, kind="stable")
    else:
        paint = np.argsort(-areas, kind="stable")

    ids = np.zeros((oh, ow), dtype=np.uint16)
    if k:
        resizer = _MaskResizer(ann.size, spec.size)
        for j in paint:
            resizer.paint(masks[j], ids, int(j) + 1)
    # Drop instances with no pixel left, renumber the rest consecutively in annotation order.
    present = np.bincount(ids.ravel(), minlength=k + 1)[1:] > 0
    kept = np.flatnonzero(present)
    if kept.size < k:
        lut = np.zeros(k + 1, dtype=np.uint16)
        lut[kept + 1] = np.arange(1, kept.size + 1, dtype=np.uint16)
        ids = lut[ids]
    ignore = np.zeros((oh, ow), dtype=np.uint8)
    if ann.ignore_mask is not None:
        im = _check_shape(np.asarray(ann.ignore_mask, dtype=bool), ann.size, "ignore_mask")
        if im.any():
            _MaskResizer(ann.size, spec.size).paint(im, ignore, 1)
    return {
        "instances": ids,
        "instance_count": np.asarray(kept.size, dtype=np.int32),
        "instance_area": areas[kept].astype(np.float32),
        "foreground": (ids > 0).astype(np.uint8),
        "instance_ignore": ignore,
    }


class _MaskResizer:
    """Resize one bool mask at a time, working only on its bounding box (plus the filter support).

    Equivalent to PIL's bilinear resize of the whole float mask (PIL's ``box`` argument keeps the
    sampling positions of the full-image resize; the crop keeps every pixel the filter reaches).
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        self.h, self.w = in_size
        self.oh, self.ow = out_size
        self.sy, self.sx = self.h / self.oh, self.w / self.ow
        # Bilinear support in input pixels: 1, scaled by the factor when downsampling; + margin.
        self.ry = max(self.sy, 1.0) + 2.0
        self.rx = max(self.sx, 1.0) + 2.0

    def paint(self, mask: np.ndarray, target: np.ndarray, value: int) -> None:
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(mask[y0:y1].any(axis=0))
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
        # Output pixels whose filter can reach the mask's bounding box.
        oy0, oy1 = _out_range(y0, y1, self.sy, self.ry, self.oh)
        ox0, ox1 = _out_range(x0, x1, self.sx, self.rx, self.ow)
        if oy0 >= oy1 or ox0 >= ox1:
            return
        # Input pixels those outputs' filters can reach.
        cy0, cy1 = _in_range(oy0, oy1, self.sy, self.ry, self.h)
        cx0, cx1 = _in_range(ox0, ox1, self.sx, self.rx, self.w)
        crop = Image.fromarray(mask[cy0:cy1, cx0:cx1].astype(np.float32), mode="F")
        box = (ox0 * self.sx - cx0, oy0 * self.sy - cy0, ox1 * self.sx - cx0, oy1 * self.sy - cy0)
        small = np.asarray(crop.resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=box))
        region = target[oy0:oy1, ox0:ox1]
        # PIL keeps box coordinates in single precision: exact ties (0.5) may come out ±1e-5.
        region[small >= _MASK_THRESHOLD - _TIE_TOLERANCE] = value


def _out_range(i0: int, i1: int, scale: float, r: float, n_out: int) -> tuple[int, int]:
    lo = max(0, int(math.floor((i0 - r) / scale - 0.5)))
    hi = min(n_out, int(math.ceil((i1 + r) / scale + 0.5)))
    return lo, hi


def _in_range(o0: int, o1: int, scale: float, r: float, n_in: int) -> tuple[int, int]:
    lo = max(0, int(math.floor(o0 * scale - r)))
    hi = min(n_in, int(math.ceil(o1 * scale + r)))
    return lo, hi


@lru_cache(maxsize=32)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Index of the input pixel under each output pixel's centre (PIL's NEAREST convention)."""
    idx = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def _resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = a.shape[-2:]
    oh, ow = size
    if (h, w) == (oh, ow):
        return a.copy()
    return a[..., _nearest_index(h, oh)[:, None], _nearest_index(w, ow)[None, :]]
