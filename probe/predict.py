"""Render a trained adapter's prediction for one stored image, at any output size."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from probe.adapter import AdapterConfig
from probe.heads import IMAGE_INPUT, build_head, check_has_image
from runtime.errors import MaxaError
from store.location import Location
from store.reader import FeatureStore, open_features
from store.results import read_run_file

__all__ = ["load_adapter", "load_adapter_bytes", "predict", "predict_arrays", "check_adapter_fits", "output_values"]


def load_adapter(run_dir: str | Path | Location) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of ``run_dir`` (from ``maxa probe``; a folder, URL or Location) and its meta."""
    model, meta, _ = load_adapter_bytes(run_dir)
    return model, meta


def load_adapter_bytes(run_dir: str | Path | Location) -> tuple[torch.nn.Module, dict[str, Any], bytes]:
    """:func:`load_adapter`, and the bytes of ``adapter.pt`` (what identifies the trained weights)."""
    meta_bytes = read_run_file(run_dir, "meta.json")
    weights = read_run_file(run_dir, "adapter.pt")
    if meta_bytes is None or weights is None:
        raise MaxaError(f"{run_dir} is not an adapter run directory (needs meta.json and adapter.pt from `maxa probe`).")
    meta = json.loads(meta_bytes)
    config = AdapterConfig.from_dict(meta["config"]["adapter"])
    model = build_head(meta["config"]["probe"]["head"], config, out_size=tuple(meta.get("out_size", (224, 224))))
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    return model, meta, weights


def predict(run_dir: str | Path | Location, store: str | Path | Location, index: int,
            size: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """``(C, H, W)`` raw adapter output for image ``index`` of feature store ``store`` (paths or URLs)."""
    model, meta = load_adapter(run_dir)
    fs = open_features(store)
    check_adapter_fits(meta, fs, run_dir)
    if not 0 <= index < len(fs):
        raise MaxaError(f"--index {index} is out of range: the store has {len(fs)} images.")
    layers = fs.spec.layer_names
    images = image_reader(model, fs, meta)
    out = predict_arrays(model, [fs.read(index, l) for l in layers], [fs.token_centres(l) for l in layers], size,
                         image=None if images is None else images([index]))
    return out[0], meta


def image_reader(model: torch.nn.Module, fs: FeatureStore, meta: dict[str, Any]) -> Callable[[Sequence[int]], np.ndarray] | None:
    """For a head guided by the image (``jbu``): a function giving images ``indices``' ``(B, H, W, 3)``
    uint8 input images from the target store aligned with ``fs``; ``None`` for every other head."""
    if not getattr(model, "needs_image", False):
        return None
    from probe.pairing import find_targets

    ts = find_targets(fs)
    check_has_image(ts, str(meta["config"]["probe"]["head"]))
    return lambda indices: ts.read(IMAGE_INPUT, list(indices))


def predict_arrays(model: torch.nn.Module, features: Sequence[np.ndarray], token_centres: Sequence[np.ndarray],
                   size: tuple[int, int], image: np.ndarray | None = None) -> np.ndarray:
    """``(B, C, H, W)`` raw output of a trained ``model`` for features given as arrays: per layer
    ``(B, h, w, C)`` (or one image's ``(h, w, C)``) and its ``(h, w, 2)`` token centres
    (``FeatureStore.token_centres``); ``image``: the ``(B, H, W, 3)`` (or ``(H, W, 3)``) uint8 input
    images, for a head guided by them (``jbu``; the target store's ``input_image``).
    :func:`output_values` turns it into probabilities or values."""
    return _forward(model, features, token_centres, size, torch.device("cpu"), image)


def _forward(model: torch.nn.Module, features: Sequence[np.ndarray], token_centres: Sequence[np.ndarray],
             size: tuple[int, int], device: torch.device, image: np.ndarray | None = None) -> np.ndarray:
    """:func:`predict_arrays` with the inputs on ``device`` (where ``model`` is)."""
    feats, pos = [], []
    for a, centres in zip(features, token_centres, strict=True):
        a = np.asarray(a, dtype=np.float32)
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4:
            raise MaxaError(f"features must be (h, w, C) or (B, h, w, C) per layer, not {a.shape}")
        feats.append(torch.from_numpy(a.reshape(a.shape[0], -1, a.shape[-1])).to(device))
        pos.append(torch.from_numpy(np.asarray(centres, dtype=np.float32).reshape(-1, 2)).to(device))
    extra = {}
    if image is not None:
        image = np.asarray(image, dtype=np.uint8)
        extra["image"] = torch.from_numpy(image[None] if image.ndim == 3 else image).to(device)
    model.eval()
    with torch.no_grad():
        return model(feats, pos, tuple(size), **extra).float().cpu().numpy()


def check_adapter_fits(meta: dict[str, Any], fs: FeatureStore, run_dir: str | Path) -> None:
    """Refuse a feature store other than the features the adapter was trained on (another backbone,
    weights, preprocessing, layers, grids or channels): its output would look like a prediction and
    mean nothing."""
    spec = fs.spec
    adapter = AdapterConfig.from_dict(meta["config"]["adapter"])
    mine = ", ".join(f"{l.name} {l.grid[0]}x{l.grid[1]}x{l.channels}" for l in spec.layers)
    theirs = ", ".join(f"{n} {g[0]}x{g[1]}x{c}" for n, g, c in zip(meta["layers"], adapter.grids, adapter.in_channels))
    same_shape = (list(spec.layer_names) == list(meta["layers"])
                  and tuple(l.grid for l in spec.layers) == adapter.grids
                  and tuple(l.channels for l in spec.layers) == adapter.in_channels)
    # runs recorded before backbone identities still name the backbone and weights
    trained_on = meta.get("backbone_identity")
    same_backbone = (trained_on is None or _jsonable(spec.backbone_identity()) == trained_on) and \
        meta.get("backbone") in (None, spec.backbone) and meta.get("weights") in (None, spec.weights_id)
    if not (same_shape and same_backbone):
        raise MaxaError(
            f"feature store {fs.path} ({spec.backbone}, weights {spec.weights_id}; {mine}) is not what the adapter "
            f"{run_dir} was trained on ({meta.get('backbone')}, weights {meta.get('weights')}; {theirs}); render it on "
            "a store of the same backbone, weights and layers."
        )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def output_values(out: np.ndarray, task: str) -> np.ndarray:
    """What a raw ``(C, H, W)`` output means, as float32: semseg ``(C, H, W)`` class probabilities,
    boundaries ``(H, W)`` boundary probability, depth and distance ``(H, W)`` values in the targets'
    units, instances the ``(C, H, W)`` embedding."""
    out = np.asarray(out, dtype=np.float64)
    if task == "semseg":
        e = np.exp(out - out.max(0, keepdims=True))
        return (e / e.sum(0, keepdims=True)).astype(np.float32)
    if task == "boundaries":
        return (1.0 / (1.0 + np.exp(-out[0]))).astype(np.float32)
    if task in ("depth", "distance"):
        return out[0].astype(np.float32)
    return out.astype(np.float32)
