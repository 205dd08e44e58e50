"""The built-in procedural dataset ``shapes``: no files, deterministic by seed.

Every image shows a textured gradient background and 3–6 overlapping flat objects — circles,
rectangles (squares included), triangles and ellipses — painted back to front. Each object is an
instance whose class is its shape kind, so the class is visible from the outline, not the colour
(colours are random per object). Depth: the background is a plane receding with the image row
(``far`` ∈ [6, 9] m at the top row to ``near`` ∈ [1.5, 2.5] m at the bottom row, linear in the
row), and each object is a slightly tilted plane nearer than everything it covers.

Image ``i`` of a split is a pure function of ``(seed, split, i)``: it is rendered from
``numpy.random.default_rng([seed, split_index, i])`` (train 0, val 1, test 2), so any image can be
rendered on its own, in any DataLoader worker, in any order.

Layout rules (checked per image by rejection sampling with the same generator):

* Every object keeps at least ``max(20, 15 % of its in-image area)`` visible pixels after
  occlusion, so annotations hold only the visible part of each object and no sliver instances.
* At least 3 objects are *large*: visible area > :attr:`ShapesDataset.large_area`
  ``= (96 · image_size / 640)²`` pixels — COCO's large-object rule (area > 96² at COCO's typical
  640-pixel image side) scaled to the image size (1129 px at 224).

If 64 layouts in a row fail these rules (does not happen in practice), the last one is kept;
objects then left with fewer than 20 visible pixels are not instances: their pixels become
``ignore_mask`` (semantic 255).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from extract.datasets.base import Annotation, DatasetReader, register_dataset
from runtime.errors import DatasetError

__all__ = ["ShapesDataset", "SHAPE_CLASSES", "render_shapes"]

#: Class index → name. 0 is the background.
SHAPE_CLASSES = ("background", "circle", "rectangle", "triangle", "ellipse")

#: Bump when rendering changes: it is part of the reader's identity (so of the store keys).
GENERATOR_VERSION = 1

_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
_DEFAULT_NUM_IMAGES = {"train": 256, "val": 64, "test": 64}
_MAX_LAYOUT_TRIES = 64
_MIN_VISIBLE_PIXELS = 20
_MIN_VISIBLE_FRACTION = 0.15
_MIN_LARGE = 3


def large_area_for(image_size: int) -> float:
    """The large-object area threshold in pixels: COCO's 96² scaled from 640 to ``image_size``."""
    return (96.0 * image_size / 640.0) ** 2


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32, shape (size, size) each; read-only."""
    c = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _sample_object(rng: np.random.Generator, size: int, large: bool) -> dict[str, Any]:
    """Shape parameters of one object. ``s`` is the radius of the circle of equal area."""
    kind = int(rng.integers(1, 5))
    s = float(rng.uniform(0.13, 0.22) if large else rng.uniform(0.06, 0.15)) * size
    cx, cy = (float(v) for v in rng.uniform(0.08, 0.92, size=2) * size)
    phi = float(rng.uniform(0.0, 2.0 * math.pi))
    obj: dict[str, Any] = {"kind": kind, "cx": cx, "cy": cy, "phi": phi, "s": s}
    if kind == 1:  # circle
        obj["extent"] = s
    elif kind == 2:  # rectangle, aspect 1 (square) .. 2, area π s²
        u = math.sqrt(float(rng.uniform(1.0, 2.0)))
        a, b = 0.5 * math.sqrt(math.pi) * s * u, 0.5 * math.sqrt(math.pi) * s / u
        obj.update(a=a, b=b, extent=math.hypot(a, b))
    elif kind == 3:  # triangle: near-equilateral, circumradius so that area ≈ π s²
        r = s * math.sqrt(math.pi / (3.0 * math.sqrt(3.0) / 4.0))
        angles = phi + np.array([0.0, 2.0 * math.pi / 3.0, 4.0 * math.pi / 3.0])
        angles[1:] += rng.uniform(-0.3, 0.3, size=2)
        obj["verts"] = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
        obj["extent"] = r
    else:  # ellipse, aspect 1.8 .. 2.8 (clearly not a circle), area π s²
        u = math.sqrt(float(rng.uniform(1.8, 2.8)))
        obj.update(a=s * u, b=s / u, extent=s * u)
    return obj


def _bbox(obj: dict[str, Any], size: int) -> tuple[slice, slice] | None:
    e = obj["extent"] + 1.0
    y0, y1 = max(0, int(obj["cy"] - e)), min(size, int(math.ceil(obj["cy"] + e)))
    x0, x1 = max(0, int(obj["cx"] - e)), min(size, int(math.ceil(obj["cx"] + e)))
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _object_mask(obj: dict[str, Any], size: int) -> np.ndarray:
    """Full-size bool mask of the whole object (before occlusion)."""
    mask = np.zeros((size, size), dtype=bool)
    box = _bbox(obj, size)
    if box is None:
        return mask
    yy, xx = _grid(size)
    y = yy[box] - np.float32(obj["cy"])
    x = xx[box] - np.float32(obj["cx"])
    kind = obj["kind"]
    if kind == 1:
        inside = x * x + y * y <= np.float32(obj["s"] ** 2)
    elif kind in (2, 4):
        c, s = np.float32(math.cos(obj["phi"])), np.float32(math.sin(obj["phi"]))
        xr = x * c + y * s
        yr = -x * s + y * c
        if kind == 2:
            inside = (np.abs(xr) <= obj["a"]) & (np.abs(yr) <= obj["b"])
        else:
            inside = (xr / np.float32(obj["a"])) ** 2 + (yr / np.float32(obj["b"])) ** 2 <= 1.0
    else:
        v = obj["verts"] - np.array([obj["cx"], obj["cy"]])
        inside = np.ones(x.shape, dtype=bool)
        # Vertices are counter-clockwise in (x, y-down) angle order: same-sign edge functions.
        for k in range(3):
            (ax, ay), (bx, by) = v[k], v[(k + 1) % 3]
            inside &= (np.float32(bx - ax) * (y - np.float32(ay)) - np.float32(by - ay) * (x - np.float32(ax))) >= 0
    mask[box] = inside
    return mask


def _layout(rng: np.random.Generator, size: int):
    """Sample object layouts until one satisfies the visibility and large-object rules."""
    large_area = large_area_for(size)
    for attempt in range(_MAX_LAYOUT_TRIES):
        n = int(rng.integers(3, 7))
        objs = [_sample_object(rng, size, large=k < _MIN_LARGE) for k in range(n)]
        order = rng.permutation(n)  # painter's order: later = nearer
        objs = [objs[k] for k in order]
        masks = [_object_mask(o, size) for o in objs]
        label = np.zeros((size, size), dtype=np.int16)  # 0 = background, k+1 = object k
        for k, m in enumerate(masks):
            label[m] = k + 1
        visible = np.bincount(label.ravel(), minlength=n + 1)[1:]
        full = np.array([m.sum() for m in masks])
        ok = np.all(visible >= np.maximum(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * full))
        if ok and int((visible > large_area).sum()) >= _MIN_LARGE:
            return objs, masks, label, visible
    return objs, masks, label, visible


def render_shapes(seed: int, split_index: int, index: int, size: int) -> tuple[np.ndarray, Annotation]:
    """Render image ``index`` of a split: ``(uint8 (size, size, 3) RGB, Annotation)``.

    A pure function of its arguments (see the module docstring for the rules). Each step below
    draws from the one generator in this order, so the order is part of the output.
    """
    rng = np.random.default_rng([seed, split_index, index])
    objs, masks, label, visible = _layout(rng, size)
    yy, xx = _grid(size)
    img = _background(rng, xx, yy, size)
    # Background depth: a plane receding with the image row, far at the top, near at the bottom.
    far, near = rng.uniform(6.0, 9.0), rng.uniform(1.5, 2.5)
    depth = (np.float32(far) + np.float32(near - far) * (yy / np.float32(size))).astype(np.float32)
    _paint_objects(rng, img, depth, objs, masks, xx, yy, size, far, near)
    image = _add_noise(rng, img)
    return image, _annotation(objs, label, visible, depth, size)


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """A two-colour linear gradient in a random direction plus two sinusoidal gratings.

    Colour planes are (3, H, W) float32 while rendering (faster than broadcasting over a last axis of 3).
    """
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    t = (xx * np.float32(math.cos(theta)) + yy * np.float32(math.sin(theta))) / np.float32(size)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = np.empty((3, size, size), dtype=np.float32)
    waves = []
    for _ in range(2):
        freq = rng.uniform(2.0, 12.0) * 2 * math.pi / size
        ang = rng.uniform(0, math.pi)
        amp = rng.uniform(6.0, 20.0, size=3)
        phase = rng.uniform(0, 2 * math.pi)
        arg = (xx * np.float32(math.cos(ang)) + yy * np.float32(math.sin(ang))) * np.float32(freq) + np.float32(phase)
        waves.append((np.sin(arg), amp))
    for c in range(3):
        plane = img[c]
        np.multiply(t, np.float32(c1[c] - c0[c]), out=plane)
        plane += np.float32(c0[c])
        for wave, amp in waves:
            plane += wave * np.float32(amp[c])
    return img


def _paint_objects(rng: np.random.Generator, img: np.ndarray, depth: np.ndarray, objs: list[dict[str, Any]],
                   masks: list[np.ndarray], xx: np.ndarray, yy: np.ndarray, size: int, far: float,
                   near: float) -> None:
    """Paint each object's colour and depth into ``img`` and ``depth`` (in place), back to front."""
    bg_mean = img.reshape(3, -1).mean(axis=1)
    for obj, full_mask in zip(objs, masks):
        box = _bbox(obj, size)
        if box is None:
            continue
        m = full_mask[box]  # work inside the object's bounding box only (much faster)
        if not m.any():
            continue
        # Colour: random, but not too close to the background behind the object's centre.
        if 0 <= obj["cy"] < size and 0 <= obj["cx"] < size:
            behind = img[:, int(obj["cy"]), int(obj["cx"])]
        else:
            behind = bg_mean
        for _ in range(8):
            colour = rng.uniform(0, 255, size=3)
            if float(np.linalg.norm(colour - behind)) >= 80.0:
                break
        # Shading: a linear ramp across the object (a lit, tilted plane).
        dx = xx[box][m] - np.float32(obj["cx"])
        dy = yy[box][m] - np.float32(obj["cy"])
        g = rng.uniform(-40.0, 40.0, size=2) / max(obj["extent"], 1.0)
        ramp = dx * np.float32(g[0]) + dy * np.float32(g[1])
        for c in range(3):
            img[c][box][m] = ramp + np.float32(colour[c])
        # Depth: a near-planar patch, nearer than everything it covers.
        tilt = rng.uniform(-0.3, 0.3, size=2) / size
        rel = 1.0 + dx * np.float32(tilt[0]) + dy * np.float32(tilt[1])
        ground = far + (near - far) * min(max(obj["cy"] / size, 0.0), 1.0)
        target = ground * rng.uniform(0.6, 0.95)
        patch = depth[box]
        covered_min = float(patch[m].min())
        scale = min(target, covered_min * rng.uniform(0.75, 0.95)) / float(rel.max())
        patch[m] = rel * np.float32(scale)


def _add_noise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Pixel noise, uniform integers in [-8, 7] (std ≈ 4.6) from raw generator bytes (fast); the
    (H, W, 3) uint8 image."""
    noise = np.frombuffer(rng.bytes(img.size), dtype=np.uint8).reshape(img.shape) >> 4
    img += noise
    img += np.float32(0.5 - 8.0)  # centre the noise, and round to nearest below
    np.clip(img, 0, 255, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


def _annotation(objs: list[dict[str, Any]], label: np.ndarray, visible: np.ndarray, depth: np.ndarray,
                size: int) -> Annotation:
    """Instances (those with enough visible pixels; the rest ignored), classes and depth of a layout."""
    n = len(objs)
    keep = [k for k in range(n) if visible[k] >= _MIN_VISIBLE_PIXELS]
    classes = np.array([objs[k]["kind"] for k in range(n)], dtype=np.int64)
    lut = np.zeros(n + 1, dtype=np.uint8)
    lut[1:] = classes
    semantic = lut[label]
    ignore = None
    dropped = [k for k in range(n) if k not in keep]
    if dropped:
        ignore = np.isin(label, np.array(dropped) + 1)
        semantic[ignore] = 255
    inst = np.stack([label == k + 1 for k in keep]) if keep else np.zeros((0, size, size), dtype=bool)
    return Annotation(
        size=(size, size),
        instance_masks=inst,
        instance_classes=classes[keep],
        instance_areas=visible[keep].astype(np.float64),
        instance_order=np.array(keep, dtype=np.float64),
        ignore_mask=ignore,
        semantic=semantic,
        depth=depth,
    )


@register_dataset
class ShapesDataset(DatasetReader):
    """Procedural circles, rectangles, triangles and ellipses with instances, classes and depth.

    Options:
        seed: generator seed (int ≥ 0, default 0).
        num_images: images in the split (default: train 256, val 64, test 64).
        image_size: side of the square images in pixels (default 224, at least 32).

    The root is ignored (may be ``None``).

    Fingerprint: :data:`GENERATOR_VERSION`, the seed and the image size (every image is a pure
    function of them); ``num_images`` only selects how many images a split has.
    """

    name = "shapes"
    targets = frozenset({"boundaries", "distance", "instances", "semantic", "depth"})
    splits = ("train", "val", "test")
    num_classes = len(SHAPE_CLASSES)
    ignore_index = 255
    class_names = list(SHAPE_CLASSES)
    split_options = frozenset({"num_images"})

    def __init__(self, root=None, split: str = "train", **options: Any) -> None:
        super().__init__(root, split, **options)
        unknown = sorted(set(options) - {"seed", "num_images", "image_size"})
        if unknown:
            raise DatasetError(
                f"dataset 'shapes' has no option(s) {', '.join(unknown)}; its options are seed, num_images, image_size."
            )
        seed = options.get("seed", 0)
        num_images = options.get("num_images")
        if num_images is None:
            num_images = _DEFAULT_NUM_IMAGES[split]
        image_size = options.get("image_size", 224)
        for key, value, lo in (("seed", seed, 0), ("num_images", num_images, 1), ("image_size", image_size, 32)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise DatasetError(f"dataset 'shapes': option {key} must be an integer ≥ {lo}, got {value!r}.")
        self.seed, self.num_images, self.image_size = int(seed), int(num_images), int(image_size)
        # Resolved options, so that explicit defaults give the same identity as omitted ones.
        self.options = {"seed": self.seed, "num_images": self.num_images, "image_size": self.image_size}
        self.split_index = _SPLIT_INDEX[split]
        self.large_area = large_area_for(self.image_size)
        self.image_ids = [f"shapes-{split}-{i:05d}" for i in range(self.num_images)]
        self._cache: tuple[int, np.ndarray, Annotation] | None = None

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "generator_version": GENERATOR_VERSION}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "large_area": self.large_area}

    def annotation_size(self, index: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    def fingerprint(self) -> dict[str, Any]:
        return {"generator_version": GENERATOR_VERSION, "seed": self.seed, "image_size": self.image_size}

    def _render(self, index: int) -> tuple[np.ndarray, Annotation]:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"shapes {self.split}: index {index} out of range 0..{self.num_images - 1}")
        cached = self._cache
        if cached is not None and cached[0] == index:
            return cached[1], cached[2]
        image, ann = render_shapes(self.seed, self.split_index, index, self.image_size)
        self._cache = (index, image, ann)
        return image, ann

    def read_image(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        """The RGB image (``draft_size`` is ignored: nothing to decode)."""
        return Image.fromarray(self._render(index)[0], "RGB")

    def read_annotation(self, index: int) -> Annotation:
        return self._render(index)[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # keep pickles (DataLoader workers) small
        return state
