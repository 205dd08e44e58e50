"""SAM2's image encoder for the feature store: timm's Hiera trunk plus SAM2's FPN neck.

The paper's "SAM V2 B+" features (1024 px, 64×64 grid, 256 channels) are SAM2's ``vision_features``: the
output of the image encoder of ``sam2/configs/sam2/sam2_hiera_b+.yaml``,

    ImageEncoder(scalp=1, trunk=Hiera(embed_dim=112, num_heads=2),
                 neck=FpnNeck(d_model=256, backbone_channel_list=[896, 448, 224, 112],
                              fpn_top_down_levels=[2, 3], fpn_interp_model="nearest"))

timm's ``sam2_hiera_base_plus`` is that trunk (same parameter names up to ``mlp.layers.{0,1}`` →
``mlp.fc{1,2}``) but has no neck. :class:`FpnNeck` below re-implements
``sam2/modeling/backbones/image_encoder.py::FpnNeck`` without its sine position encoding, which the
image encoder returns separately (``vision_pos_enc``) and which is not part of the features:

* the trunk returns its four stage outputs high resolution first (B+ at 1024 px: 112 @ 256², 224 @ 128²,
  448 @ 64², 896 @ 32²); ``backbone_channel_list`` lists them low resolution first, so trunk level ``i``
  goes through ``convs[n - i]`` (a 1×1 conv to ``d_model``), ``n = 3``;
* levels are visited from ``i = n`` down to 0; a level in ``fpn_top_down_levels`` that has a coarser result
  adds it, cast to float32 and upsampled ×2 (``nearest``, no antialias), to its lateral conv ("sum"; "avg"
  halves the sum); any other level is its lateral conv alone, and the chain restarts from it;
* ``ImageEncoder`` with ``scalp=1`` drops the lowest-resolution level (stride 32), and ``vision_features``
  is the last remaining one: stride 16, ``conv_1(stage 2) + up2(conv_0(stage 3))``.

:class:`Sam2ImageEncoder` wraps trunk and neck with timm's ``forward_intermediates`` / ``feature_info``
interface, so the backbone registry treats it as any timm model: its levels are the post-scalp neck
outputs (0: stride 4, 1: stride 8, 2: stride 16 = ``vision_features``; levels 0 and 1 are the neck's, before
SAM2's mask decoder applies its own ``conv_s0`` / ``conv_s1`` to them). SAM2's image predictor adds the
learned ``no_mem_embed`` vector to the stride-16 features before its mask decoder; that is outside the
image encoder and not applied here.

It is registered with timm as ``maxa_sam2_hiera_base_plus_fpn`` (created by ``timm.create_model`` once this
module is imported). No pretrained weights come from timm's hub for it: the neck exists only in the official
SAM2 checkpoint, which :func:`checkpoint_filter_fn` maps onto this module (official
``image_encoder.trunk.*`` through timm's own SAM2-Hiera filter, ``image_encoder.neck.convs.*`` as is).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models import hieradet_sam2
from torch import nn

from runtime.errors import WeightsUnavailableError

__all__ = [
    "FpnNeck",
    "Sam2ImageEncoder",
    "SAM2_BPLUS_FPN",
    "SAM2_BPLUS_CHECKPOINT_URL",
    "checkpoint_filter_fn",
    "pretrained_unavailable_message",
]

SAM2_BPLUS_FPN = "maxa_sam2_hiera_base_plus_fpn"
SAM2_BPLUS_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_base_plus.pt"


class FpnNeck(nn.Module):
    """SAM2's FPN neck (features only, no position encoding); ``convs.{i}.conv`` as in the official names.

    Args:
        d_model: output channels of every level.
        backbone_channel_list: trunk channels, lowest resolution first (SAM2's order).
        fpn_top_down_levels: levels (0 = highest resolution) that add the upsampled coarser output;
            ``None``: all levels.
        fpn_interp_model: ``F.interpolate`` mode of the ×2 upsampling.
        fuse_type: ``"sum"`` or ``"avg"``.
    """

    def __init__(
        self,
        d_model: int = 256,
        backbone_channel_list: Sequence[int] = (896, 448, 224, 112),
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "nearest",
        fuse_type: str = "sum",
        fpn_top_down_levels: Sequence[int] | None = (2, 3),
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(
                conv=nn.Conv2d(dim, d_model, kernel_size, stride, padding, device=device, dtype=dtype)
            ))
            for dim in self.backbone_channel_list
        )
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = list(levels)

    def forward(self, xs: Sequence[torch.Tensor], min_level: int = 0) -> list[torch.Tensor | None]:
        """Neck outputs, high resolution first, for trunk outputs ``xs`` (high resolution first).

        Levels below ``min_level`` are not computed (``None``): no finer level feeds a coarser one.
        """
        if len(xs) != len(self.convs):
            raise ValueError(f"FpnNeck expects {len(self.convs)} trunk levels, got {len(xs)}")
        n = len(self.convs) - 1
        out: list[torch.Tensor | None] = [None] * len(self.convs)
        prev = None
        for i in range(n, min_level - 1, -1):  # top-down: from low to high resolution
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                top_down = F.interpolate(
                    prev.to(dtype=torch.float32), scale_factor=2.0, mode=self.fpn_interp_model,
                    align_corners=None if self.fpn_interp_model == "nearest" else False, antialias=False,
                )
                prev = lateral + top_down
                if self.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
        return out


def _take_indices(n: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's convention: ``None`` all levels, an int the last ``indices`` levels, else those (negative ok)."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"take the last 1..{n} levels, not {indices}")
        return list(range(n - indices, n))
    take = [int(i) % n if -n <= int(i) < n else -1 for i in indices]
    if not take or min(take) < 0:
        raise ValueError(f"level indices {list(indices)} out of range for {n} levels")
    return take


class Sam2ImageEncoder(nn.Module):
    """Hiera trunk (timm) + :class:`FpnNeck`, minus the ``scalp`` lowest-resolution levels, timm-style.

    ``forward`` returns SAM2's ``vision_features`` (NCHW); ``forward_intermediates`` the selected neck levels.
    """

    def __init__(
        self, trunk: nn.Module, neck: FpnNeck, scalp: int = 1, pretrained_cfg: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        trunk_channels = [int(f["num_chs"]) for f in trunk.feature_info][::-1]
        if trunk_channels != neck.backbone_channel_list:
            raise ValueError(
                f"trunk channels {trunk_channels} (low resolution first) differ from the neck's {neck.backbone_channel_list}"
            )
        if not 0 <= scalp < len(trunk_channels):
            raise ValueError(f"scalp must be in [0, {len(trunk_channels)}), got {scalp}")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp
        last = len(trunk_channels) - 1
        self.feature_info = [  # neck levels after scalp, high resolution first; level i comes from convs[last - i]
            dict(num_chs=neck.d_model, reduction=int(trunk.feature_info[i]["reduction"]), module=f"neck.convs.{last - i}")
            for i in range(last + 1 - scalp)
        ]
        self.num_features = self.head_hidden_size = neck.d_model
        self.num_classes = 0
        self.pretrained_cfg = self.default_cfg = dict(pretrained_cfg or {})

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = True,
    ):
        """Neck levels ``indices`` (after scalp; ``None``: all) of images ``x``; timm's conventions.

        ``norm=True`` raises AssertionError, as timm's SAM2-Hiera does: SAM2 has no final norm.
        """
        if norm:
            raise AssertionError("normalization of features not supported")
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take = _take_indices(len(self.feature_info), indices)
        stages = self.trunk.forward_intermediates(x, indices=None, intermediates_only=True, output_fmt="NCHW")
        levels = self.neck(stages, min_level=min(take) if stop_early else 0)
        levels = levels[: len(levels) - self.scalp]  # SAM2's ImageEncoder: drop the lowest-resolution levels
        feats = [levels[i] if output_fmt == "NCHW" else levels[i].permute(0, 2, 3, 1) for i in take]
        if intermediates_only:
            return feats
        return levels[-1], feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """SAM2's ``vision_features``: the last neck level after scalp (NCHW)."""
        return self.forward_intermediates(x, indices=[len(self.feature_info) - 1], intermediates_only=True)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


# ---------------------------------------------------------------- weights


def pretrained_unavailable_message(name: str) -> str:
    """The one-line error for ``--weights pretrained`` on the neck entry."""
    return (
        f"pretrained weights for backbone {name} are not on the timm hub: timm's sam2_hiera_base_plus.fb_r896 "
        f"holds only the Hiera trunk, and SAM2's FPN neck (the 256-channel features) is only in the official "
        f"SAM2 checkpoint: download {SAM2_BPLUS_CHECKPOINT_URL} and pass --weights PATH (or --weights random; "
        f"sam2_hiera_bplus_trunk loads the trunk alone from the hub)."
    )


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Official SAM2 image-encoder keys → :class:`Sam2ImageEncoder` keys.

    Accepts the official file's ``model`` dict (``image_encoder.`` prefix present: everything else, the
    mask decoder and memory modules, is dropped), or image-encoder keys with the prefix already stripped
    (``trunk.*``, ``neck.*``). Trunk keys go through timm's SAM2-Hiera filter (``mlp.layers.{0,1}`` →
    ``mlp.fc{1,2}``); neck keys (``neck.convs.{i}.conv.{weight,bias}``) keep their names. Other keys are
    passed on, so the loader reports them as unexpected.

    Raises:
        WeightsUnavailableError: the file holds no neck weights (e.g. timm's trunk-only checkpoint).
    """
    sd = state_dict.get("model", state_dict)
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not any(k.startswith("neck.") for k in sd):
        raise WeightsUnavailableError(
            "weights file holds no SAM2 neck weights (image_encoder.neck.convs.*): it is a trunk-only checkpoint "
            f"(such as timm's sam2_hiera_base_plus); pass the official SAM2 checkpoint {SAM2_BPLUS_CHECKPOINT_URL}, "
            "or use backbone sam2_hiera_bplus_trunk for the trunk's 448-channel features."
        )
    trunk = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
    out = {f"trunk.{k}": v for k, v in hieradet_sam2.checkpoint_filter_fn(trunk).items()}
    out.update({k: v for k, v in sd.items() if not k.startswith("trunk.")})
    return out


# ---------------------------------------------------------------- timm registration


def _create_sam2_fpn(
    trunk_name: str, pretrained: bool, neck_kwargs: dict[str, Any], scalp: int, **kwargs
) -> Sam2ImageEncoder:
    if pretrained:
        raise WeightsUnavailableError(pretrained_unavailable_message(f"timm:{SAM2_BPLUS_FPN}"))
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs.pop("num_classes", 0):
        raise ValueError(f"{SAM2_BPLUS_FPN} is a feature extractor: it has no classifier (num_classes=0)")
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    trunk = timm.create_model(trunk_name, pretrained=False, num_classes=0, **kwargs)
    trunk.reset_classifier(0, reset_other=True)  # SAM2's trunk has no head norm: keep the state dict official
    channels = [int(f["num_chs"]) for f in trunk.feature_info][::-1]
    neck = FpnNeck(backbone_channel_list=channels, device=device, dtype=dtype, **neck_kwargs)
    cfg = dict(trunk.pretrained_cfg)
    cfg.update(
        architecture=SAM2_BPLUS_FPN, tag=None, hf_hub_id=None, url=None, classifier=None, num_classes=0,
        # SAM2Transforms: Resize((1024, 1024)) (torchvision's default, bilinear) + ImageNet normalisation
        input_size=(3, 1024, 1024), interpolation="bilinear", pool_size=None, first_conv="trunk.patch_embed.proj",
    )
    return Sam2ImageEncoder(trunk, neck, scalp=scalp, pretrained_cfg=cfg)


@register_model
def maxa_sam2_hiera_base_plus_fpn(pretrained: bool = False, **kwargs) -> Sam2ImageEncoder:
    """SAM2 Hiera-B+ image encoder (``sam2_hiera_b+.yaml``): trunk + FPN neck, ``scalp=1``."""
    neck = dict(d_model=256, fpn_top_down_levels=(2, 3), fpn_interp_model="nearest", fuse_type="sum")
    return _create_sam2_fpn("sam2_hiera_base_plus", pretrained, neck, scalp=1, **kwargs)
