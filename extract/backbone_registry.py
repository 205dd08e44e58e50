"""Backbone registry: short names → timm model, input size, feature layers, weight source.

Entries are registered by decorator and created by name, as in timm's ``_registry.py``. The geometry of an
entry (token grid and channels per layer, stride, parameter count) is computed on the ``meta`` device, so
listing every backbone needs neither weights nor real memory. The entries themselves live in
:mod:`extract.backbones`; loading weights lives in :mod:`extract.checkpoints` (local files) and
:mod:`extract.hub` (pretrained).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import timm
import torch
from torch.overrides import TorchFunctionMode

from runtime.errors import UnknownNameError

__all__ = [
    "CheckpointRecipe",
    "BackboneEntry",
    "LayerGeometry",
    "BackboneGeometry",
    "register_backbone",
    "get_backbone_entry",
    "list_backbones",
    "entry_geometry",
    "backbone_table",
]

TIMM_PREFIX = "timm:"


@dataclass(frozen=True, kw_only=True)
class CheckpointRecipe:
    """How to turn a checkpoint that timm does not know into the timm model's state dict.

    Args:
        source: where a user gets the file (URL or model card), quoted in the error when it is missing.
        keep_prefix: keep only keys starting with this prefix, and strip it (``""`` keeps everything).
        drop_prefixes: after stripping, drop keys starting with any of these (projection heads etc.).
        key_map: name of a key-remapping function in :data:`KEY_MAPS` applied after prefix handling.
        mean, std, interpolation: the checkpoint's own preprocessing where timm's config for the
            architecture describes other weights (MoCo v3 used ImageNet statistics on a timm ViT).
    """

    source: str
    keep_prefix: str = ""
    drop_prefixes: tuple[str, ...] = ()
    key_map: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class BackboneEntry:
    """One backbone: a timm model plus what the feature store needs to know about it.

    ``layers=None`` means the last layer (``forward_features`` output, with the final norm); explicit
    indices select blocks (ViT) or stages (ConvNeXt, Hiera) for ``forward_intermediates``.
    """

    name: str
    timm_name: str
    layers: tuple[int, ...] | None = None
    input_size: int | None = None
    weights: str = "timm hub"
    checkpoint: CheckpointRecipe | None = None
    paper_row: str | None = None
    paper_image_size: int | None = None
    paper_feature_size: int | None = None
    note: str = ""
    test_only: bool = False
    random_only: bool = False  # weights are random by definition (the paper's untrained baseline)
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.timm_name:
            raise ValueError("a backbone entry needs a name and a timm_name")
        if self.layers is not None:
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"{self.name}: layers must be non-empty and unique, got {self.layers}")
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.input_size is not None and self.input_size <= 0:
            raise ValueError(f"{self.name}: input_size must be positive")

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` besides ``pretrained`` (head removed)."""
        return {"num_classes": 0, **self.model_kwargs}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = self.checkpoint.to_dict() if self.checkpoint else None
        return d


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(fn: Callable[[], BackboneEntry]) -> Callable[[], BackboneEntry]:
    """Decorator: register the entry returned by ``fn`` under ``fn.__name__``."""
    entry = fn()
    if entry.name != fn.__name__:
        raise ValueError(f"entry name {entry.name!r} differs from its function {fn.__name__!r}")
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return fn


def list_backbones(include_test: bool = True) -> list[str]:
    """Registered short names, in registration order."""
    return [n for n, e in _REGISTRY.items() if include_test or not e.test_only]


def _timm_entry(timm_name: str) -> BackboneEntry:
    arch = timm_name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = (f" Did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close
                else " Pick a name from timm.list_models(), e.g. timm:vit_small_patch16_224, or a short name from `maxa backbones`.")
        raise UnknownNameError(f"unknown timm model {arch!r} in backbone {TIMM_PREFIX}{timm_name}.{hint}")
    return BackboneEntry(name=TIMM_PREFIX + timm_name, timm_name=timm_name, note="resolved on the fly from timm")


def get_backbone_entry(name: str | BackboneEntry) -> BackboneEntry:
    """Look a backbone up by short name, or build an entry for ``timm:NAME``.

    Raises:
        UnknownNameError: the name is neither registered nor a ``timm:`` model; the message lists the
            closest registered names.
    """
    if isinstance(name, BackboneEntry):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name[len(TIMM_PREFIX):])
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownNameError(
        f"unknown backbone {name!r}: {hint}Valid names: {', '.join(list_backbones(include_test=False))}; "
        f"or timm:NAME for any timm model (e.g. timm:vit_small_patch16_224)."
    )


@dataclass(frozen=True)
class LayerGeometry:
    """Token grid of one feature layer."""

    name: str  # "last", "block11", "stage2"
    index: int  # absolute index for forward_intermediates
    grid: tuple[int, int]
    channels: int
    stride: int  # pixels between token centres (the model's reduction)


@dataclass(frozen=True)
class BackboneGeometry:
    """Everything about an entry that does not need weights."""

    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    layers: tuple[LayerGeometry, ...]
    num_params: int
    final_norm: bool  # forward_intermediates(norm=True) is supported and used
    pretrained_tag: str


def _num_levels(model: torch.nn.Module) -> tuple[int, str]:
    """Number of feature levels for forward_intermediates and what one is called."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info: cannot select layers")
    blocks = getattr(model, "blocks", None)
    kind = "block" if blocks is not None and len(info) == len(blocks) else "stage"
    return len(info), kind


def data_config(model: torch.nn.Module, entry: BackboneEntry) -> dict[str, Any]:
    """timm's data config for the model, with the entry's size and the recipe's normalisation."""
    cfg = dict(timm.data.resolve_model_data_config(model))
    size = entry.input_size or entry.model_kwargs.get("img_size")  # a model built for another size runs at it
    if size is not None:
        cfg["input_size"] = (3, size, size) if isinstance(size, int) else (3, *size)
    rec = entry.checkpoint
    if rec is not None:
        for key in ("mean", "std", "interpolation"):
            if getattr(rec, key) is not None:
                cfg[key] = getattr(rec, key)
    return cfg


def compute_geometry(model: torch.nn.Module, entry: BackboneEntry) -> BackboneGeometry:
    """Geometry of a ``meta``-device ``model`` under ``entry``'s settings (a shape-only forward)."""
    cfg = data_config(model, entry)
    _, h, w = cfg["input_size"]
    n_levels, kind = _num_levels(model)
    if entry.layers is None:
        indices, names = [n_levels - 1], ["last"]
    else:
        indices = []
        for i in entry.layers:
            if not -n_levels <= i < n_levels:
                raise ValueError(f"{entry.name}: layer {i} out of range for {n_levels} {kind}s")
            indices.append(i % n_levels)
        names = [f"{kind}{i}" for i in indices]
    reductions = [int(model.feature_info[i]["reduction"]) for i in indices]
    if isinstance(model, timm.models.VisionTransformer):
        # forward_intermediates reshapes tokens with exactly this size: no forward needed
        gh, gw = model.patch_embed.dynamic_feat_size((h, w))
        shapes = [(int(model.feature_info[i]["num_chs"]), gh, gw) for i in indices]
        final_norm = True
    else:
        x = torch.empty(1, 3, h, w, device="meta")
        final_norm = "norm" in inspect.signature(model.forward_intermediates).parameters
        try:
            outs = model.forward_intermediates(x, indices=indices, intermediates_only=True, norm=final_norm)
        except AssertionError:  # Hiera, SAM2-Hiera: "normalization of features not supported"
            final_norm = False
            outs = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        shapes = [tuple(o.shape[1:]) for o in outs]
    layers = tuple(
        LayerGeometry(name=n, index=i, grid=(int(s[1]), int(s[2])), channels=int(s[0]), stride=r)
        for n, i, s, r in zip(names, indices, shapes, reductions)
    )
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    tag = pcfg.get("tag") or ""
    return BackboneGeometry(
        input_size=(int(h), int(w)),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg["interpolation"]),
        layers=layers,
        num_params=sum(p.numel() for p in model.parameters()),
        final_norm=final_norm,
        pretrained_tag=f"{pcfg.get('architecture', entry.timm_name)}.{tag}" if tag else entry.timm_name,
    )


class _SkipInitOnMeta(TorchFunctionMode):
    """Skip in-place ops (weight init) on meta tensors: they have no values, and init is 90 % of build time."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def meta_model(entry: BackboneEntry) -> torch.nn.Module:
    """The entry's model on the ``meta`` device: shapes and parameter count, no memory, no weights."""
    with torch.device("meta"), _SkipInitOnMeta():
        return timm.create_model(entry.timm_name, pretrained=False, **entry.create_kwargs())


@functools.lru_cache(maxsize=None)
def entry_geometry(entry: BackboneEntry) -> BackboneGeometry:
    """Geometry of a registry entry, from a weightless model on the ``meta`` device (cached)."""
    return compute_geometry(meta_model(entry), entry)


def backbone_table(include_test: bool = False) -> list[dict[str, Any]]:
    """One row per registered backbone for ``maxa backbones --json``; needs no weights."""
    rows = []
    for name in list_backbones(include_test=include_test):
        e = _REGISTRY[name]
        g = entry_geometry(e)
        rows.append({
            "name": e.name,
            "timm_name": e.timm_name,
            "input_size": g.input_size[0] if g.input_size[0] == g.input_size[1] else list(g.input_size),
            "layers": [lg.name for lg in g.layers],
            "grid": {lg.name: list(lg.grid) for lg in g.layers},
            "channels": {lg.name: lg.channels for lg in g.layers},
            "stride": {lg.name: lg.stride for lg in g.layers},
            "params_M": round(g.num_params / 1e6, 1),
            "num_params": g.num_params,
            "mean": list(g.mean),
            "std": list(g.std),
            "interpolation": g.interpolation,
            "weights": e.weights,
            "paper_row": e.paper_row,
            "paper_image_size": e.paper_image_size,
            "paper_feature_size": e.paper_feature_size,
            "note": e.note,
        })
    return rows
