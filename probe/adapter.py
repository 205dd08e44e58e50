"""The masked cross-attention adapter (MAXA), paper §3, §4.3 and Appendix A.1/A.6.

Pure torch. Inputs are feature tokens read from a store: ``features`` is a list over stored layers of
``(B, N_l, C_l)`` tensors (row-major over the layer's ``(h_l, w_l)`` grid) and ``token_pos`` a list of
``(N_l, 2)`` tensors, each token centre's normalised ``(y, x)`` in [0, 1]².

Design (``base``, the paper's text):

* Fixed positional encoding (no parameters), used for the features (``pos_dim``) and the queries (16-d)::

      K = dim / 4,  ω_k = π · 2^k  (k = 0 … K-1)
      P(y, x) = [sin(ω_k y)]_k ‖ [cos(ω_k y)]_k ‖ [sin(ω_k x)]_k ‖ [cos(ω_k x)]_k

  Frequencies are fixed in normalised image units, so an encoding means the same place at every output
  resolution (periods 2, 1, 1/2, 1/4 for K = 4; ``cos(π y)`` alone is already injective on [0, 1]).
* ψ (eq. 1): per layer ``Linear(C_l + pos_dim, D)`` on ``[φ ‖ P]``; the layers' tokens are concatenated along N.
* Queries: one per ``region × region`` output block, at the block centre ``((8j + 4) / H, (8i + 4) / W)``
  in normalised coordinates of the requested ``(H, W)`` output; ``ceil(H/8) × ceil(W/8)`` of them; the
  rendered ``(8·hq, 8·wq)`` image is cropped to ``(H, W)``. Queries are independent of each other, so the
  same trained adapter renders any output size (Fig. 4).
* Cross-attention (eq. 2), ``num_layers`` of them, 8 heads of ``D/8``: per head
  ``softmax((W_q Q)(W_k F)ᵀ / √d_k + M) W_v F``, heads concatenated, then an output projection ``W_o`` (D×D)
  — standard multi-head attention, all projections with bias. Layer 1 maps the 16-d query encodings to D
  (no residual: the dimensions differ); later layers take the previous layer's output as queries and add
  a parameter-free residual. No LayerNorm, no MLP. Only layer 1 adds the mask.
* Mask (eq. 3): ``M_ij = exp(-d_ij² / 2σ²) / (σ √(2π))`` with ``d_ij`` the Euclidean distance between query
  j and token centre i in normalised image units; ``σ = exp(s)`` with ``s`` learned per head (or one shared,
  or none at all), initialised to ``sigma_init`` (0.1 = a tenth of the image side).
* CNN (Appendix A.6) on the ``(hq, wq)`` grid of query outputs; ``D_CNN = max(D/4, D_out)`` unless given.

For ViT-B/16 at 224 (C = 768, 14×14) and D_out = 1 this has 37,298 learnable parameters (paper text: ~0.037 M).

``paper_budget=True`` reproduces the parameter counts of the paper's tables (0.184 M for that case), which
grow by ~195 per backbone channel and ~8 per feature-grid position. It adds, per layer l, a LayerNorm on φ
(2·C_l), a learned positional embedding of ``D/4`` (= 8) dims per grid position concatenated next to P, and
ψ as an MLP ``Linear(C_l + pos_dim + D/4, 6D) → GELU → Linear(6D, D)`` (6D = 192 per channel); and after
each attention layer a pre-LN residual feed-forward block ``LN → Linear(D, 2D) → GELU → Linear(2D, D)``.
See ``probe.variants.parameter_table`` for the per-row comparison.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from probe import fused

__all__ = [
    "AdapterConfig",
    "MaxaAdapter",
    "MaskedCrossAttention",
    "UpsampleCNN",
    "count_parameters",
    "gaussian_attention",
    "gaussian_mask",
    "query_grid",
    "sinusoidal_encoding",
    "tokens_to_grid",
]

QUERY_DIM = 16
SIGMA_MODES = ("per-head", "shared", "none")


def sinusoidal_encoding(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D Fourier features of ``pos`` (..., 2) = normalised (y, x) → (..., dim); formula above."""
    if dim == 0:
        return pos.new_zeros(*pos.shape[:-1], 0)
    if dim % 4:
        raise ValueError(f"positional-encoding dim must be a multiple of 4, got {dim}")
    freqs = math.pi * 2.0 ** torch.arange(dim // 4, dtype=pos.dtype, device=pos.device)
    y = pos[..., :1] * freqs
    x = pos[..., 1:2] * freqs
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)


def query_grid(out_size: tuple[int, int], region: int = 8) -> tuple[int, int, torch.Tensor]:
    """``(hq, wq, pos)``: the query grid for an ``(H, W)`` output; ``pos`` is (hq·wq, 2) row-major (y, x)."""
    H, W = int(out_size[0]), int(out_size[1])
    if H < 1 or W < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    hq, wq = -(-H // region), -(-W // region)
    ys = (torch.arange(hq, dtype=torch.float64) * region + region / 2) / H
    xs = (torch.arange(wq, dtype=torch.float64) * region + region / 2) / W
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
    return hq, wq, pos.float()


def gaussian_mask(query_pos: torch.Tensor, token_pos: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``(S, Q, N)`` additive logits ``exp(-d²/2σ²)/(σ√2π)`` for ``sigma`` of shape (S,)."""
    return fused.gaussian_logits(torch.cdist(query_pos, token_pos).square(), sigma)


def _flash_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


class _GaussianFlashAttention(torch.autograd.Function):
    """Eqs. (2)–(3) on CPU with fused (flash) kernels, including the gradient of σ.

    PyTorch's fused attention kernels give no gradient for an additive mask, so a mask that depends on a
    learned σ would otherwise force the unfused path, which materialises every (B, h, Q, N) logit several
    times. Here the forward and the q/k/v gradients use the fused CPU kernels, and the σ gradient is
    assembled from two more fused forward passes. With ``P = softmax(S)``, ``S = q·kᵀ/√d + M``,
    ``D_q = Σ dO⊙O`` and ``∂M/∂σ = M·(d²/σ³ − 1/σ) = W₁ − W₀`` (both non-negative)::

        ∂L/∂σ = Σ_{b,q,k} P·(dO·v_k − D_q)·(W₁ − W₀)
        Σ_k P·W·v_k = O_W · exp(lse_W − lse),   Σ_k P·W = exp(lse_W − lse)

    where ``O_W, lse_W`` are the fused forward's output and log-sum-exp with the mask ``M + log W``. Exact
    up to float rounding; tests compare it with autograd through the direct formula.
    """

    @staticmethod
    def forward(ctx, q, k, v, sigma, d2):  # q (B,h,Q,d) k,v (B,h,N,d) sigma (S,) d2 (Q,N)
        mask = fused.gaussian_logits(d2, sigma).unsqueeze(0)  # (1, S, Q, N)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)
        ctx.save_for_backward(q, k, v, sigma, d2, mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sigma, d2, mask, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=mask
        )
        dsigma = None
        if ctx.needs_input_grad[3]:
            s = sigma.view(1, -1, 1, 1)
            tiny = torch.finfo(d2.dtype).tiny
            log_m = mask.clamp_min(tiny).log()
            rowdot = (dout * out).sum(-1)  # D_q, (B, h, Q)

            def term(log_w: torch.Tensor) -> torch.Tensor:  # Σ_{q} Σ_k P·W·(dO·v_k − D_q), per (b, h)
                o_w, lse_w = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, False, attn_mask=mask + log_m + log_w
                )
                return (torch.exp(lse_w - lse) * ((dout * o_w).sum(-1) - rowdot)).sum(-1)

            log_w1 = d2.clamp_min(tiny).log() - 3 * s.log()  # W₁ = M·d²/σ³
            dsigma = fused.sigma_grad((term(log_w1) - term(-s.log())).sum(0), sigma)  # W₀ = M/σ
        return dq, dk, dv, dsigma, None


def gaussian_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, token_pos: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """``softmax(q·kᵀ/√d + M(σ)) v`` for (B, h, L, d) heads.

    On CPU: the C++ kernel of :mod:`probe.fused` when it is built (float32), else PyTorch's fused
    kernels with the σ gradient of :class:`_GaussianFlashAttention`; elsewhere SDPA with the mask.
    """
    d2 = torch.cdist(query_pos, token_pos).square()
    if fused.usable(q):
        return fused.FusedAttention.apply(q, k, v, sigma, d2)
    if q.device.type == "cpu" and _flash_cpu_available() and q.dtype in (torch.float32, torch.float64):
        return _GaussianFlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), sigma, d2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=fused.gaussian_logits(d2, sigma).unsqueeze(0).to(q.dtype))


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) row-major tokens → (B, C, h, w)."""
    B, N, C = tokens.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"got {N} tokens for a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    in_channels: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    out_channels: int
    dim: int = 32
    heads: int = 8
    query_dim: int = QUERY_DIM
    pos_dim: int = 16
    cnn_channels: int | None = None
    num_layers: int = 2
    sigma: str = "per-head"
    sigma_init: float = 0.1
    paper_budget: bool = False
    region: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_channels", tuple(int(c) for c in self.in_channels))
        object.__setattr__(self, "grids", tuple((int(g[0]), int(g[1])) for g in self.grids))
        if not self.in_channels or len(self.in_channels) != len(self.grids):
            raise ValueError("in_channels and grids need one entry per feature layer")
        if any(c < 1 for c in self.in_channels) or any(min(g) < 1 for g in self.grids):
            raise ValueError("channels and grid sizes must be positive")
        for name in ("out_channels", "dim", "heads", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.query_dim < 4 or self.query_dim % 4 or self.pos_dim < 0 or self.pos_dim % 4:
            raise ValueError("query_dim (>0) and pos_dim (>=0) must be multiples of 4")
        if self.cnn_channels is not None and self.cnn_channels < 1:
            raise ValueError("cnn_channels must be >= 1 or None")
        if self.sigma not in SIGMA_MODES:
            raise ValueError(f"sigma must be one of {', '.join(SIGMA_MODES)}; got {self.sigma!r}")
        if not self.sigma_init > 0:
            raise ValueError("sigma_init must be > 0")
        if self.region < 4 or self.region % 2:
            raise ValueError("region must be an even number >= 4 (CNN up factors 2 and region/2)")

    @property
    def cnn_dim(self) -> int:
        return self.cnn_channels if self.cnn_channels is not None else max(self.dim // 4, self.out_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["in_channels"] = list(self.in_channels)
        d["grids"] = [list(g) for g in self.grids]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown adapter config keys: {sorted(unknown)}")
        return cls(**d)


class MaskedCrossAttention(nn.Module):
    """Multi-head cross-attention (eq. 2), optionally with the Gaussian distance term M of eq. (3)."""

    def __init__(self, q_dim: int, dim: int, heads: int, residual: bool, ffn: bool = False) -> None:
        super().__init__()
        self.heads, self.residual = heads, residual and q_dim == dim
        self.q, self.k, self.v = nn.Linear(q_dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.ffn = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            if ffn
            else None
        )

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) → (B, h, L, D/h)
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, f: torch.Tensor, gaussian: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """q (B or 1, Q, q_dim), f (B, N, D) → (B, Q, D); ``gaussian = (query_pos, token_pos, σ)`` adds M."""
        B = f.shape[0]
        qh = self.split(self.q(q).expand(B, -1, -1))
        kh, vh = self.split(self.k(f)), self.split(self.v(f))
        if gaussian is not None:
            out = gaussian_attention(qh, kh, vh, *gaussian)
        elif fused.usable(qh):
            out = fused.FusedAttention.apply(qh, kh, vh, None, None)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        out = self.o(out.transpose(1, 2).reshape(B, q.shape[1], -1))
        if self.residual:
            out = out + q
        if self.ffn is not None:
            out = out + self.ffn(out)
        return out


class UpsampleCNN(nn.Module):
    """Appendix A.6 with Conv2d for the paper's singleton-depth Conv3d: CNN path + bilinear skip path."""

    def __init__(self, dim: int, hidden: int, out_channels: int, region: int = 8) -> None:
        super().__init__()
        up = (2, region // 2)
        self.region = region
        self.cnn = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden, up[0], stride=up[0]), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden, up[1], stride=up[1]), nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1),
        )  # fmt: skip
        self.skip = nn.Conv2d(dim, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bilinear interpolation (weights sum to 1) commutes with the 1×1 conv, bias included, so the
        # skip path projects on the coarse grid first when that is the smaller tensor: the same output
        # at a fraction of the cost for few output channels.
        if self.skip.out_channels <= self.skip.in_channels:
            skip = upsample_bilinear(self.skip(x), self.region)
        else:
            skip = self.skip(upsample_bilinear(x, self.region))
        if fused.tail_usable(x, self.cnn[6], self.cnn[8]):  # the full-resolution tail in one pass on CPU
            return skip + fused.upsample_tail(self.cnn[:6](x), self.cnn[6], self.cnn[8])
        return skip + self.cnn(x)


@functools.lru_cache(maxsize=32)
def _linear_weights(n: int, factor: int) -> torch.Tensor:
    """(n·factor, n): row i holds the weights of 1-D linear upsampling (align_corners=False) for output i."""
    eye = torch.eye(n, dtype=torch.float64).unsqueeze(0)  # n one-hot signals of length n
    return F.interpolate(eye, scale_factor=factor, mode="linear", align_corners=False)[0].T.contiguous()


def upsample_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)`` as two small matmuls.

    Bilinear interpolation is separable, so it is ``A_h · x · A_wᵀ`` with the fixed 1-D weight matrices;
    forward and backward are then two GEMMs instead of PyTorch's per-pixel CPU loops (whose backward
    alone took ≈ 3 ms per batch of 8 at 224 px here).
    """
    a_h = _linear_weights(x.shape[-2], factor).to(device=x.device, dtype=x.dtype)
    a_w = _linear_weights(x.shape[-1], factor).to(device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(a_h, x), a_w.T)


class FeatureProjection(nn.Module):
    """ψ for one layer: ``[φ ‖ P]`` → D (base), or the paper-budget MLP with a learned positional term."""

    def __init__(self, cfg: AdapterConfig, channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.pos_dim, self.grid = cfg.pos_dim, grid
        if cfg.paper_budget:
            learned = cfg.dim // 4
            self.norm = nn.LayerNorm(channels)
            self.learned_pos = nn.Parameter(torch.randn(grid[0] * grid[1], learned) * 0.02)
            hidden = 6 * cfg.dim
            self.proj = nn.Sequential(
                nn.Linear(channels + cfg.pos_dim + learned, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim)
            )
        else:
            self.norm, self.learned_pos = None, None
            self.proj = nn.Linear(channels + cfg.pos_dim, cfg.dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # ψ([φ ‖ P ‖ learned]) with the image-independent part computed once for the batch: the first
        # linear layer splits into W_φ·φ + (W_P·P + b), the same sum without concatenating per image.
        shared = [sinusoidal_encoding(pos.to(device=x.device, dtype=x.dtype), self.pos_dim)]
        if self.learned_pos is not None:
            if N != self.learned_pos.shape[0]:
                raise ValueError(
                    f"paper-budget adapter was built for a {self.grid[0]}x{self.grid[1]} grid, got {N} tokens"
                )
            shared.append(self.learned_pos.to(x.dtype))
        first = self.proj if isinstance(self.proj, nn.Linear) else self.proj[0]
        w = first.weight.to(x.dtype)
        y = F.linear(x if self.norm is None else self.norm(x), w[:, :C]) + F.linear(
            torch.cat(shared, dim=-1), w[:, C:], first.bias.to(x.dtype)
        )
        return y if isinstance(self.proj, nn.Linear) else self.proj[1:](y)


class MaxaAdapter(nn.Module):
    """MAXA: ``forward(features, token_pos, out_size) → (B, out_channels, H, W)``."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.psi = nn.ModuleList(FeatureProjection(cfg, c, g) for c, g in zip(cfg.in_channels, cfg.grids))
        self.layers = nn.ModuleList(
            MaskedCrossAttention(cfg.query_dim if i == 0 else cfg.dim, cfg.dim, cfg.heads, i > 0, cfg.paper_budget)
            for i in range(cfg.num_layers)
        )
        n_sigma = {"per-head": cfg.heads, "shared": 1, "none": 0}[cfg.sigma]
        self.log_sigma = (
            nn.Parameter(torch.full((n_sigma,), math.log(cfg.sigma_init))) if n_sigma else None
        )
        self.head = UpsampleCNN(cfg.dim, cfg.cnn_dim, cfg.out_channels, cfg.region)

    @property
    def sigma(self) -> torch.Tensor | None:
        """Current σ per head (or shared), in normalised image units; None without a mask."""
        return None if self.log_sigma is None else self.log_sigma.exp()

    def _check(self, features, token_pos) -> None:
        cfg = self.config
        if len(features) != len(cfg.in_channels) or len(token_pos) != len(features):
            raise ValueError(f"expected {len(cfg.in_channels)} feature layers with positions, got {len(features)}")
        for i, (f, p) in enumerate(zip(features, token_pos)):
            if f.ndim != 3 or f.shape[-1] != cfg.in_channels[i] or p.shape != (f.shape[1], 2):
                raise ValueError(
                    f"layer {i}: features {tuple(f.shape)} / positions {tuple(p.shape)} do not match "
                    f"(B, N, {cfg.in_channels[i]}) / (N, 2)"
                )

    def encode(self, features, token_pos) -> tuple[torch.Tensor, torch.Tensor]:
        """ψ for every layer, concatenated: ``F`` (B, N, D) and the token positions (N, 2)."""
        self._check(features, token_pos)
        f = torch.cat([psi(x, p) for psi, x, p in zip(self.psi, features, token_pos)], dim=1)
        return f, torch.cat([p.to(device=f.device, dtype=f.dtype) for p in token_pos], dim=0)

    def forward_queries(self, features, token_pos, query_pos: torch.Tensor) -> torch.Tensor:
        """Attention outputs (B, Q, D) for arbitrary query positions ``query_pos`` (Q, 2) in [0, 1]²."""
        f, tpos = self.encode(features, token_pos)
        qpos = query_pos.to(device=f.device, dtype=f.dtype)
        q = sinusoidal_encoding(qpos, self.config.query_dim).unsqueeze(0)
        sigma = self.sigma
        for i, layer in enumerate(self.layers):
            q = layer(q, f, (qpos, tpos, sigma.to(f.dtype)) if i == 0 and sigma is not None else None)
        return q

    def forward(self, features, token_pos, out_size: tuple[int, int]) -> torch.Tensor:
        H, W = int(out_size[0]), int(out_size[1])
        hq, wq, qpos = query_grid((H, W), self.config.region)
        q = self.forward_queries(features, token_pos, qpos)  # (B, hq·wq, D)
        grid = q.transpose(1, 2).reshape(q.shape[0], -1, hq, wq)
        return self.head(grid)[:, :, :H, :W]


def count_parameters(module: nn.Module) -> int:
    """Number of learnable (requires_grad) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
