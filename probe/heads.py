"""Baseline heads with MAXA's forward signature ``(features, token_pos, out_size) → (B, D_out, H, W)``.

* ``LinearHead`` — linear probing: a 1×1 conv per layer on its ``(h_l, w_l)`` token grid to ``D_out``,
  bilinear up to ``out_size`` (align_corners=False), summed over layers.
* ``CnnHead`` — the paper's Fig. 3 baseline: per layer ``Linear(C_l, D)`` plus the fixed sinusoidal
  positional encoding (``probe.adapter.sinusoidal_encoding``, ``D`` dims) added, one pre-LN self-attention
  layer (``heads`` heads, residual) over all layers' tokens together, then every layer's tokens back on its
  grid, bilinearly resized to the finest grid and summed; then ``n_up`` stages of
  ``ConvTranspose2d(k=2, s=2) → ReLU → Conv2d(3×3) → ReLU`` (D → D_CNN → D_CNN …), with ``n_up`` the
  smallest number such that ``finest grid · 2^n_up ≥ target_size`` (default 224, fixed at construction so the
  parameters do not depend on the request); a 1×1 conv to ``D_out`` and a bilinear resize to exactly
  ``out_size``. Unlike MAXA its output resolution is tied to the feature grid (resizing only interpolates).
* ``JbuHead`` (``probe.jbu``) — the paper's FeatUp baseline from stores: joint bilateral upsampling
  guided by the target store's ``input_image``, then a linear probe.
* ``build_head(head, config, out_size=...)`` with head in {"maxa", "linear", "cnn", "jbu"};
  ``head_inputs(model, batch)`` the extra inputs a head takes from the batch (the image for ``jbu``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from probe.adapter import AdapterConfig, MaxaAdapter, sinusoidal_encoding, tokens_to_grid
from probe.jbu import JbuHead
from runtime.errors import MaxaError, UnknownNameError

__all__ = ["LinearHead", "CnnHead", "JbuHead", "build_head", "check_has_image", "head_inputs", "head_needs_image",
           "HEADS", "IMAGE_INPUT"]

#: The target-store array image-guided heads read (``extract.target_store.IMAGE_ARRAY``).
IMAGE_INPUT = "input_image"


def _check_layers(config: AdapterConfig, features, token_pos) -> None:
    if len(features) != len(config.in_channels) or len(token_pos) != len(features):
        raise ValueError(f"expected {len(config.in_channels)} feature layers with positions, got {len(features)}")


class LinearHead(nn.Module):
    """1×1 conv per layer, bilinear to the output size, summed over layers."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.convs = nn.ModuleList(nn.Conv2d(c, config.out_channels, 1) for c in config.in_channels)

    def forward(self, features, token_pos, out_size: tuple[int, int]) -> torch.Tensor:
        _check_layers(self.config, features, token_pos)
        size = (int(out_size[0]), int(out_size[1]))
        out = None
        for conv, x, grid in zip(self.convs, features, self.config.grids):
            y = F.interpolate(conv(tokens_to_grid(x, grid)), size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return out


class CnnHead(nn.Module):
    """Self-attention over the feature tokens, then a transposed-conv CNN up to the output size."""

    def __init__(self, config: AdapterConfig, target_size: int = 224) -> None:
        super().__init__()
        self.config = cfg = config
        D, Dc = cfg.dim, cfg.cnn_dim
        if D % 4:
            raise ValueError("CnnHead needs dim to be a multiple of 4 (positional encoding)")
        self.proj = nn.ModuleList(nn.Linear(c, D) for c in cfg.in_channels)
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, cfg.heads, batch_first=True)
        self.grid = max(cfg.grids, key=lambda g: g[0] * g[1])
        self.n_up = max(0, math.ceil(math.log2(target_size / min(self.grid))))
        stages: list[nn.Module] = []
        c_in = D
        for _ in range(self.n_up):
            stages += [nn.ConvTranspose2d(c_in, Dc, 2, stride=2), nn.ReLU(), nn.Conv2d(Dc, Dc, 3, padding=1), nn.ReLU()]
            c_in = Dc
        self.up = nn.Sequential(*stages)
        self.out = nn.Conv2d(c_in, cfg.out_channels, 1)

    def forward(self, features, token_pos, out_size: tuple[int, int]) -> torch.Tensor:
        _check_layers(self.config, features, token_pos)
        D = self.config.dim
        tokens = [
            proj(x) + sinusoidal_encoding(p.to(device=x.device, dtype=x.dtype), D)
            for proj, x, p in zip(self.proj, features, token_pos)
        ]
        t = torch.cat(tokens, dim=1)
        n = self.norm(t)
        t = t + self.attn(n, n, n, need_weights=False)[0]
        grid, start = None, 0
        for x, g in zip(tokens, self.config.grids):
            y = tokens_to_grid(t[:, start : start + x.shape[1]], g)
            start += x.shape[1]
            if g != self.grid:
                y = F.interpolate(y, size=self.grid, mode="bilinear", align_corners=False)
            grid = y if grid is None else grid + y
        y = self.out(self.up(grid))
        size = (int(out_size[0]), int(out_size[1]))
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


HEADS = {"maxa": MaxaAdapter, "linear": LinearHead, "cnn": CnnHead, "jbu": JbuHead}


def build_head(head: str, config: AdapterConfig, *, out_size: tuple[int, int] = (224, 224)) -> nn.Module:
    """The head ``head`` ("maxa", "linear", "cnn" or "jbu") built from ``config``; ``out_size``
    (the targets' resolution) sizes the heads whose parameters depend on it (``jbu``'s stages)."""
    if head not in HEADS:
        raise UnknownNameError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if head == "jbu":
        return JbuHead(config, out_size=out_size)
    return HEADS[head](config)


def check_has_image(targets: Any, head: str) -> None:
    """Refuse a target store without the input images for an image-guided ``head``, naming the way out."""
    if IMAGE_INPUT not in targets.array_names:
        raise MaxaError(f"--head {head} is guided by the image, and the target store {targets.path} holds "
                        "none (built before target stores kept it, or with --no-target-image); run "
                        f"`maxa extract` for the {targets.spec.split} split again (it builds targets with images "
                        "beside it and reuses the features), or pass --targets / --eval-targets.")


def head_needs_image(head: str) -> bool:
    """Whether head ``head`` is guided by the target store's image."""
    return bool(getattr(HEADS[head], "needs_image", False))


def head_inputs(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """The keyword inputs ``model`` takes from a batch beyond the features (the image, for ``jbu``)."""
    return {"image": batch[IMAGE_INPUT]} if getattr(model, "needs_image", False) else {}
