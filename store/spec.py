"""What a store holds, as frozen dataclasses saved in the store's Zarr attributes.

A :class:`FeatureSpec` describes one backbone's features over one dataset split; a
:class:`TargetSpec` the backbone-independent targets of one dataset split at one output size.
Each has a content key: a hash of everything that determines the stored values, so asking twice
for the same thing finds the same store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from store.quantize import LOSSLESS, QUANTIZATIONS

__all__ = ["FORMAT_VERSION", "DEFAULT_TARGET_SIZE", "LayerSpec", "FeatureSpec", "TargetSpec", "content_key", "grid_token_centres",
           "store_format", "BACKBONE_IDENTITY"]

#: Targets (and so the adapter's output) at the paper's 224 × 224 unless asked otherwise.
DEFAULT_TARGET_SIZE = (224, 224)

#: Bump when the on-disk layout or the meaning of a spec changes: it is part of every content key,
#: and every open checks it (``store._layout.check_format``). Format 2 added ``dataset_id``.
FORMAT_VERSION = 2

#: The feature-spec fields that must agree for two stores to hold features of the same backbone
#: (an adapter trained on one may be evaluated on, or render, the other). ``quantization`` counts
#: only where it is lossy (a lossless spec's identity has no such field, as before it existed).
BACKBONE_IDENTITY = ("backbone", "timm_name", "weights_id", "input_size", "mean", "std", "interpolation", "resize",
                     "layers", "dtype", "quantization")


def store_format(meta: dict[str, Any]) -> Any:
    """The format version a store's ``maxa`` attributes declare (format 1 kept it in the spec only)."""
    if "format_version" in meta:
        return meta["format_version"]
    return dict(meta.get("spec") or {}).get("format_version", 1)


def content_key(identity: dict[str, Any]) -> str:
    """A 16-hex-digit hash of a JSON-serialisable identity dict (order-independent)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def grid_token_centres(grid: tuple[int, int]) -> list[list[list[float]]]:
    """Normalised ``(y, x)`` centres of an ``(h, w)`` token grid that tiles the whole input."""
    h, w = grid
    return [[[(i + 0.5) / h, (j + 0.5) / w] for j in range(w)] for i in range(h)]


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One stored feature layer: an ``(N, h, w, C)`` float16 array.

    Attributes:
        name: layer name, also the array name under ``features/`` (e.g. ``"last"``, ``"stage2"``).
        grid: ``(h, w)`` token grid.
        channels: ``C``.
        stride: input pixels per token along ``(y, x)``.
        token_centres: ``(h, w, 2)`` nested tuples, each token centre's normalised ``(y, x)``
            image coordinates in [0, 1] (what positional encodings are built from).
    """

    name: str
    grid: tuple[int, int]
    channels: int
    stride: tuple[float, float]
    token_centres: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        object.__setattr__(self, "stride", tuple(float(v) for v in self.stride))
        if not self.token_centres:
            object.__setattr__(self, "token_centres", _tuplify(grid_token_centres(self.grid)))
        else:
            object.__setattr__(self, "token_centres", _tuplify(self.token_centres))
        if len(self.token_centres) != self.grid[0] or len(self.token_centres[0]) != self.grid[1]:
            raise ValueError(f"token_centres of layer {self.name!r} do not match its grid {self.grid}")
        if self.channels <= 0:
            raise ValueError(f"layer {self.name!r} has {self.channels} channels")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerSpec":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """Everything that determines a feature store's contents.

    Attributes:
        backbone: registry name (``"siglip_384"``, ``"timm:test_vit"``).
        timm_name: the timm model name.
        weights_id: identity of the weights (``"pretrained:<name>"``, ``"random:seed0"``,
            ``"file:<sha256>"``).
        input_size: ``(H, W)`` the backbone saw (native, from timm's pretrained config).
        mean, std, interpolation: the input normalisation and resize filter.
        resize: how images became ``input_size`` (``"squash"``: the whole image, no crop).
        layers: the stored layers.
        dataset, split, dataset_options: the dataset reader's name, split and options.
        dataset_id: the dataset's identity (``DatasetReader.dataset_id``): tells two datasets read
            by the same reader apart, equal for every split of one dataset and for the same data
            at another path or on another machine. Train and eval stores pair only on it.
        num_images: N.
        image_ids_hash: hash of the ordered image ids; target stores must match it.
        dtype: dtype of the features as readers return them.
        quantization: ``"none"`` (lossless, the default) or a lossy encoding of the stored values
            (``"int8"``: int8 with a per-image, per-channel scale, see ``store.quantize``). Part of
            the key only where lossy, so lossless keys are those of stores made before it existed.
    """

    backbone: str
    timm_name: str
    weights_id: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize: str = "squash"
    layers: tuple[LayerSpec, ...]
    dataset: str
    split: str
    dataset_options: dict[str, Any] = field(default_factory=dict)
    dataset_id: str = ""
    num_images: int
    image_ids_hash: str
    dtype: str = "float16"
    quantization: str = LOSSLESS
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.quantization != LOSSLESS and self.quantization not in QUANTIZATIONS.values():
            raise ValueError(f"unknown quantization {self.quantization!r}; choose none or "
                             + " or ".join(sorted(set(QUANTIZATIONS.values()))))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        layers = tuple(l if isinstance(l, LayerSpec) else LayerSpec.from_dict(l) for l in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ValueError("a feature store needs at least one layer")
        if len({l.name for l in layers}) != len(layers):
            raise ValueError("layer names must be unique")
        if self.num_images < 0:
            raise ValueError("num_images must be >= 0")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(l.name for l in self.layers)

    def layer(self, name: str | None = None) -> LayerSpec:
        """The layer ``name`` (the first layer when ``None``)."""
        if name is None:
            return self.layers[0]
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"store has no layer {name!r}; layers: {', '.join(self.layer_names)}")

    def backbone_identity(self) -> dict[str, Any]:
        """The fields that say which features these are, whatever the images (:data:`BACKBONE_IDENTITY`)."""
        d = self.identity()
        return {k: d[k] for k in BACKBONE_IDENTITY if k in d}

    @property
    def lossy(self) -> bool:
        """Whether the stored values are a lossy encoding of the features (``quantization``)."""
        return self.quantization != LOSSLESS

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for layer in d["layers"]:
            layer.pop("token_centres")  # derived from grid and stride, and large
        if not self.lossy:
            d.pop("quantization")  # a lossless spec keeps the key it had before quantization existed
        return d

    @property
    def key(self) -> str:
        return content_key({"kind": "features", **self.identity()})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [l.to_dict() for l in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """Everything that determines a target store's contents (no backbone).

    Attributes:
        dataset, split, dataset_options: the dataset reader's name, split and options.
        dataset_id: the dataset's identity (see :class:`FeatureSpec`).
        size: ``(H, W)`` output resolution of every target.
        kinds: the targets stored (subset of boundaries, distance, instances, semantic, depth).
        definitions: how each target is computed (boundary width, distance normalisation, resize).
        build: the target-building configuration (its parameters and version).
        num_images, image_ids_hash: the images, in store order.
        num_classes, ignore_index, class_names: semantic labels, where present.
        large_area: the dataset's "large object" area in original pixels (COCO: 96²), for the
            instance-discrimination test-image rule.
        image: the store also holds ``input_image``, each input image resized to ``size`` like the
            targets (``(H, W, 3)`` uint8 RGB; heads guided by the image read it). Part of the key
            only where true, so a store built before it existed keeps its key and is never taken
            for one with images; not part of :meth:`definition` (it does not change the targets).
    """

    dataset: str
    split: str
    dataset_options: dict[str, Any] = field(default_factory=dict)
    dataset_id: str = ""
    size: tuple[int, int] = DEFAULT_TARGET_SIZE
    kinds: tuple[str, ...]
    definitions: dict[str, str] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    num_images: int
    image_ids_hash: str
    num_classes: int | None = None
    ignore_index: int = 255
    class_names: tuple[str, ...] | None = None
    large_area: float = 96.0**2
    image: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "image", bool(self.image))
        object.__setattr__(self, "kinds", tuple(sorted(self.kinds)))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if not self.kinds:
            raise ValueError("a target store needs at least one target kind")

    @property
    def key(self) -> str:
        d = self.to_dict()
        if not self.image:
            d.pop("image")  # the key of a store without images is the one it had before the field existed
        return content_key({"kind": "targets", **d})

    def definition(self) -> dict[str, Any]:
        """What the targets mean, whatever the images: two target stores that agree on it hold
        comparable targets (a probe trained on one may be scored on the other). Whether a store
        also holds the resized input image does not change its targets."""
        d = self.to_dict()
        for k in ("split", "dataset_options", "num_images", "image_ids_hash", "image"):
            d.pop(k)
        d["definitions"] = {k: v for k, v in d["definitions"].items() if k != "input_image"}
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetSpec":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
