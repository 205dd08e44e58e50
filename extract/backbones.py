"""The backbones of the MAXA paper (Tables 1–3) and a loaded backbone that yields NHWC token grids.

``load_backbone(name, weights)`` builds the timm model with pretrained weights from timm's hub, a local
file, or a fixed-seed random initialisation, and wraps it in :class:`LoadedBackbone`, whose ``forward``
returns one ``(B, h, w, C)`` tensor per feature layer with prefix (class, register) tokens dropped, and
which records what a feature store must know: input size, normalisation, grid, stride and token centres.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from extract.backbone_registry import (
    BackboneEntry,
    BackboneGeometry,
    CheckpointRecipe,
    backbone_table,
    entry_geometry,
    get_backbone_entry,
    list_backbones,
    register_backbone,
)
from extract.checkpoints import file_digest, load_weights_file
from extract.hub import create_pretrained
from extract.sam2_neck import SAM2_BPLUS_CHECKPOINT_URL, SAM2_BPLUS_FPN, pretrained_unavailable_message
from runtime.errors import WeightsUnavailableError

__all__ = [
    "BackboneEntry",
    "CheckpointRecipe",
    "LoadedBackbone",
    "RANDOM_SEED",
    "backbone_table",
    "get_backbone_entry",
    "list_backbones",
    "load_backbone",
    "register_backbone",
    "resolve_weights",
]

RANDOM_SEED = 0  # random weights are part of a store's identity: keep them reproducible
_OPENAI_CLIP = "natively QuickGELU: timm's *_clip_quickgelu_* architecture reproduces the original model"

# ---------------------------------------------------------------- entries (paper Tables 1–3)


@register_backbone
def random_b16() -> BackboneEntry:
    return BackboneEntry(
        name="random_b16", timm_name="vit_base_patch16_224.augreg2_in21k_ft_in1k", weights="random init (seed 0)",
        random_only=True, paper_row="Random (untrained)", paper_image_size=224, paper_feature_size=14,
        note="always random weights; normalisation from the supervised ViT-B/16 config",
    )


@register_backbone
def imagenet_b16() -> BackboneEntry:
    return BackboneEntry(name="imagenet_b16", timm_name="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                         paper_row="ImageNet", paper_image_size=224, paper_feature_size=14)


@register_backbone
def sam2_hiera_bplus() -> BackboneEntry:
    return BackboneEntry(
        name="sam2_hiera_bplus", timm_name=SAM2_BPLUS_FPN, input_size=1024,
        weights="official SAM2 checkpoint file sam2_hiera_base_plus.pt (--weights PATH)",
        checkpoint=CheckpointRecipe(source=SAM2_BPLUS_CHECKPOINT_URL, keep_prefix="image_encoder."),
        paper_row="SAM V2 B+", paper_image_size=1024, paper_feature_size=64,
        note="SAM2's image embedding (vision_features): timm's Hiera-B+ trunk + SAM2's FPN neck (extract/sam2_neck.py), "
             "256 ch at stride 16 (64x64 at 1024 px), SAM2's bilinear resize; timm's hub has no neck, so the weights "
             "come from the official checkpoint (a SAM2.1 file has the same keys). The trunk alone: sam2_hiera_bplus_trunk",
    )


@register_backbone
def sam2_hiera_bplus_trunk() -> BackboneEntry:
    return BackboneEntry(
        name="sam2_hiera_bplus_trunk", timm_name="sam2_hiera_base_plus.fb_r896", input_size=1024, layers=(2,),
        paper_row="SAM V2 B+", paper_image_size=1024, paper_feature_size=64,
        note="timm's Hiera-B+ trunk only (timm hub weights), stage 2 at 1024 px: stride 16, 64x64 as the paper but "
             "448 ch, not the paper's 256-ch neck output (sam2_hiera_bplus); timm's config says 896 px",
    )


@register_backbone
def mocov3_b16() -> BackboneEntry:
    return BackboneEntry(
        name="mocov3_b16", timm_name="vit_base_patch16_224", weights="MoCo v3 checkpoint file (--weights PATH)",
        checkpoint=CheckpointRecipe(
            source="https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
            keep_prefix="module.base_encoder.", drop_prefixes=("head.",),
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear",
        ),
        paper_row="MoCo V3", paper_image_size=224, paper_feature_size=14,
        note="not on the timm hub: the official checkpoint is loaded into timm's ViT-B/16 with MoCo's ImageNet "
             "normalisation and bilinear resizing (main_lincls.py)",
    )


@register_backbone
def dino_b8() -> BackboneEntry:
    return BackboneEntry(name="dino_b8", timm_name="vit_base_patch8_224.dino",
                         paper_row="Dino", paper_image_size=224, paper_feature_size=28)


@register_backbone
def dinov2_b14() -> BackboneEntry:
    return BackboneEntry(name="dinov2_b14", timm_name="vit_base_patch14_dinov2.lvd142m",
                         paper_row="Dino V2", paper_image_size=518, paper_feature_size=37)


@register_backbone
def dinov2_l14() -> BackboneEntry:
    return BackboneEntry(name="dinov2_l14", timm_name="vit_large_patch14_dinov2.lvd142m",
                         paper_row="Dino V2 (ViT-L)", paper_image_size=518, paper_feature_size=37)


@register_backbone
def mae_b16() -> BackboneEntry:
    return BackboneEntry(name="mae_b16", timm_name="vit_base_patch16_224.mae",
                         paper_row="MAE", paper_image_size=224, paper_feature_size=14)


@register_backbone
def hiera_bplus() -> BackboneEntry:
    return BackboneEntry(name="hiera_bplus", timm_name="hiera_base_plus_224.mae",
                         paper_row="Hiera B+", paper_image_size=224, paper_feature_size=7)


@register_backbone
def clip_b16() -> BackboneEntry:
    return BackboneEntry(name="clip_b16", timm_name="vit_base_patch16_clip_quickgelu_224.openai", note=_OPENAI_CLIP,
                         paper_row="CLIP", paper_image_size=224, paper_feature_size=14)


@register_backbone
def clip_l14_336() -> BackboneEntry:
    return BackboneEntry(name="clip_l14_336", timm_name="vit_large_patch14_clip_quickgelu_336.openai", note=_OPENAI_CLIP,
                         paper_row="CLIP (ViT-L)", paper_image_size=336, paper_feature_size=24)


@register_backbone
def metaclip_b16() -> BackboneEntry:
    return BackboneEntry(name="metaclip_b16", timm_name="vit_base_patch16_clip_quickgelu_224.metaclip_400m",
                         paper_row="MetaCLIP", paper_image_size=224, paper_feature_size=14)


@register_backbone
def siglip_224() -> BackboneEntry:
    return BackboneEntry(name="siglip_224", timm_name="vit_base_patch16_siglip_224.webli",
                         paper_row="SigLIP-224", paper_image_size=224, paper_feature_size=14)


@register_backbone
def siglip_384() -> BackboneEntry:
    return BackboneEntry(name="siglip_384", timm_name="vit_base_patch16_siglip_384.webli",
                         paper_row="SigLIP-384", paper_image_size=384, paper_feature_size=24)


@register_backbone
def siglip_512() -> BackboneEntry:
    return BackboneEntry(name="siglip_512", timm_name="vit_base_patch16_siglip_512.webli",
                         paper_row="SigLIP-512", paper_image_size=512, paper_feature_size=32)


@register_backbone
def siglip_so400m() -> BackboneEntry:
    return BackboneEntry(
        name="siglip_so400m", timm_name="vit_so400m_patch14_siglip_384.webli",
        paper_row="SigLIP-SO", paper_image_size=512, paper_feature_size=36,
        note="native 384 px -> 27x27. The paper's 512/36 is this patch-14 model run at 512 px (36 = 512 // 14): "
             "see siglip_so400m_512. timm has no SigLIP-1 so400m at 512 (SigLIP-2 so400m_patch16_512 gives 32x32)",
    )


@register_backbone
def siglip_so400m_512() -> BackboneEntry:
    return BackboneEntry(
        name="siglip_so400m_512", timm_name="vit_so400m_patch14_siglip_384.webli", input_size=512,
        model_kwargs={"img_size": 512},
        paper_row="SigLIP-SO", paper_image_size=512, paper_feature_size=36,
        note="the paper's setting: the 384 px model at 512 px, position embeddings resampled 27->36 by timm; "
             "36 patches of 14 px cover 504 of 512 px (the last 8 rows/columns are unseen; token centres say so)",
    )


@register_backbone
def aimv2_l336() -> BackboneEntry:
    return BackboneEntry(name="aimv2_l336", timm_name="aimv2_large_patch14_336.apple_pt",
                         paper_row="Aim2", paper_image_size=336, paper_feature_size=24)


@register_backbone
def vitamin_l2_384() -> BackboneEntry:
    return BackboneEntry(name="vitamin_l2_384", timm_name="vitamin_large2_384.datacomp1b_clip",
                         paper_row="ViTamin", paper_image_size=384, paper_feature_size=24)


@register_backbone
def convnext_l_320() -> BackboneEntry:
    return BackboneEntry(name="convnext_l_320", timm_name="convnext_large_mlp.clip_laion2b_ft_320",
                         paper_row="ConvNeXt", paper_image_size=320, paper_feature_size=10)


@register_backbone
def convnext_l_320_2layers() -> BackboneEntry:
    return BackboneEntry(name="convnext_l_320_2layers", timm_name="convnext_large_mlp.clip_laion2b_ft_320",
                         layers=(2, 3), paper_row="ConvNeXt (2 layers)", paper_image_size=320, paper_feature_size=20)


@register_backbone
def phi35v() -> BackboneEntry:
    return BackboneEntry(
        name="phi35v", timm_name="vit_large_patch14_clip_quickgelu_336.openai",
        weights="Phi-3.5-vision checkpoint (--weights PATH: HF snapshot folder or the shard with the vision tower)",
        checkpoint=CheckpointRecipe(
            source="https://huggingface.co/microsoft/Phi-3.5-vision-instruct",
            keep_prefix="model.vision_embed_tokens.img_processor.vision_model.", key_map="hf_clip_to_timm",
        ),
        paper_row="Phi-3.5V", paper_image_size=336, paper_feature_size=24,
        note="Phi-3.5-vision's CLIP ViT-L/14-336 (quick_gelu, OpenAI normalisation) from HF CLIPVisionModel names; "
             "last layer with post-layernorm as in the paper (Phi's LLM itself reads layer -2), one 336 px crop",
    )


@register_backbone
def test_vit() -> BackboneEntry:
    return BackboneEntry(name="test_vit", timm_name="test_vit", test_only=True, note="tiny model for tests")


@register_backbone
def test_convnext() -> BackboneEntry:
    return BackboneEntry(name="test_convnext", timm_name="test_convnext", test_only=True, note="tiny model for tests")


# timm has no tiny Hiera ("test_hiera"); Hiera's code path is covered with hiera_tiny_224 where needed.

# ---------------------------------------------------------------- the loaded backbone


class LoadedBackbone:
    """A frozen backbone in eval mode plus the geometry of its feature layers."""

    def __init__(self, entry: BackboneEntry, model: torch.nn.Module, weights_id: str, geometry: BackboneGeometry) -> None:
        self.entry = entry
        self.model = model
        self.weights_id = weights_id
        self._geo = geometry
        self._layers = {lg.name: lg for lg in geometry.layers}

    input_size = property(lambda self: self._geo.input_size, doc="(H, W) the model sees")
    mean = property(lambda self: self._geo.mean)
    std = property(lambda self: self._geo.std)
    interpolation = property(lambda self: self._geo.interpolation)
    num_params = property(lambda self: self._geo.num_params)
    layer_names = property(lambda self: tuple(self._layers))
    grids = property(lambda self: {n: lg.grid for n, lg in self._layers.items()})
    channels = property(lambda self: {n: lg.channels for n, lg in self._layers.items()})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _layer(self, layer: str):
        if layer not in self._layers:
            raise KeyError(f"{self.entry.name} has no layer {layer!r}; it has {', '.join(self._layers)}")
        return self._layers[layer]

    def stride(self, layer: str) -> int:
        """Pixels between neighbouring token centres (equals input / grid where the grid tiles the input)."""
        return self._layer(layer).stride

    def token_centres(self, layer: str) -> np.ndarray:
        """``(h, w, 2)`` float32: each token centre's (y, x) in normalised image coordinates [0, 1].

        Token (i, j) covers pixels [i·s, (i+1)·s) for stride s, so its centre is (i + 0.5)·s / H, which is
        (i + 0.5) / h when the grid tiles the input exactly.
        """
        lg = self._layer(layer)
        (h, w), (H, W), s = lg.grid, self.input_size, lg.stride
        ys = (np.arange(h) + 0.5) * s / H
        xs = (np.arange(w) + 0.5) * s / W
        grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)
        return grid.astype(np.float32)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of normalised images ``x`` (B, 3, H, W) at ``input_size``: layer → (B, h, w, C)."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.entry.name} expects (B, 3, {self.input_size[0]}, {self.input_size[1]}), got {tuple(x.shape)}")
        indices = [lg.index for lg in self._layers.values()]
        kwargs = {"norm": True} if self._geo.final_norm else {}
        outs = self.model.forward_intermediates(x, indices=indices, intermediates_only=True, output_fmt="NCHW", **kwargs)
        feats = {}
        for (name, lg), f in zip(self._layers.items(), outs):
            if tuple(f.shape[2:]) != lg.grid:  # geometry and model disagree: a bug, not bad input
                raise RuntimeError(f"{self.entry.name} {name}: grid {tuple(f.shape[2:])}, expected {lg.grid}")
            feats[name] = f.permute(0, 2, 3, 1).contiguous()
        return feats

    __call__ = forward

    def describe(self) -> dict[str, Any]:
        """What a feature store records about the backbone (JSON-serialisable)."""
        return {
            "name": self.entry.name,
            "timm_name": self.entry.timm_name,
            "weights_id": self.weights_id,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "layers": list(self.layer_names),
            "layer_indices": {n: lg.index for n, lg in self._layers.items()},
            "final_norm": self._geo.final_norm,
            "grids": {n: list(g) for n, g in self.grids.items()},
            "channels": dict(self.channels),
            "strides": {n: lg.stride for n, lg in self._layers.items()},
            "num_params": self.num_params,
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        }


def _create_random(entry: BackboneEntry) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(RANDOM_SEED)
        return timm.create_model(entry.timm_name, pretrained=False, **entry.create_kwargs())


def resolve_weights(entry: BackboneEntry, weights: str | Path) -> tuple[str, Path | None]:
    """The weights identity a store records for ``weights`` (``"pretrained"``, ``"random"`` or a
    file), and the file to load if any — without building a model (sweeps plan store keys with it).

    Raises:
        WeightsUnavailableError: where loading would fail for a reason known up front.
    """
    weights = str(weights)
    if entry.random_only and weights != "random":
        if weights != "pretrained":
            raise WeightsUnavailableError(f"backbone {entry.name} is untrained by definition: drop --weights {weights}.")
        weights = "random"
    if weights == "random":
        return f"random:seed{RANDOM_SEED}", None
    if weights == "pretrained":
        if entry.timm_name == SAM2_BPLUS_FPN:  # trunk on the hub, neck only in the official checkpoint
            raise WeightsUnavailableError(pretrained_unavailable_message(entry.name))
        if entry.checkpoint is not None:
            raise WeightsUnavailableError(
                f"weights for backbone {entry.name} are not on the timm hub: download {entry.checkpoint.source} "
                f"and pass --weights PATH (or --weights random)."
            )
        return f"pretrained:{entry_geometry(entry).pretrained_tag}", None
    path = Path(weights).expanduser()
    if not path.exists():
        source = f" Get it from {entry.checkpoint.source}." if entry.checkpoint else ""
        raise WeightsUnavailableError(
            f"weights file {path} for backbone {entry.name} does not exist: check the path, or use "
            f"--weights pretrained (timm hub / HF cache) or --weights random.{source}"
        )
    return f"file:{file_digest(path)}", path


def load_backbone(
    name_or_entry: str | BackboneEntry,
    weights: str | Path = "pretrained",
    device: str | torch.device = "cpu",
    layers: tuple[int, ...] | None = None,
) -> LoadedBackbone:
    """Build a frozen backbone by registry name (or ``timm:NAME``).

    Args:
        name_or_entry: short name, ``timm:NAME``, or an entry.
        weights: ``"pretrained"`` (timm's hub, or the HF cache offline), ``"random"`` (seed 0), or a path to a
            safetensors / torch checkpoint (passed through the entry's checkpoint recipe, if any).
        device: where the model runs.
        layers: override the entry's layers (block or stage indices), e.g. for a layer sweep.

    Raises:
        UnknownNameError: unknown backbone name.
        WeightsUnavailableError: the weights cannot be had; the message says how to get them.
    """
    entry = get_backbone_entry(name_or_entry)
    if layers is not None:
        entry = dataclasses.replace(entry, layers=tuple(layers))
    weights_id, path = resolve_weights(entry, weights)
    if weights_id.startswith("random:"):
        model = _create_random(entry)
    elif path is None:
        model = create_pretrained(entry)
    else:
        model = _create_random(entry)
        load_weights_file(model, entry, path)
    model = model.to(device).eval().requires_grad_(False)
    return LoadedBackbone(entry, model, weights_id, entry_geometry(entry))
