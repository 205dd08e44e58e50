"""Joint bilateral upsampling (JBU) guided by the image, then a linear probe: the paper's FeatUp baseline, from stores.

The paper (Fig. 3) compares MAXA with "FeatUp for image-aware feature upsampling, then linear
probing". FeatUp's upsampler is a stack of joint bilateral upsampling layers (FeatUp's
``JBULearnedRange``), trained by multi-view reconstruction through the live backbone. That needs
the backbone; a probe reads stores only. ``JbuHead`` keeps FeatUp's upsampling operator and trains
it with the task's loss instead, guided by the image the target store keeps (``input_image``: the input
image resized onto the targets' pixel grid):

* **stages** — ``n`` stages, each doubling the resolution, the last at the output size:
  ``n = max(1, ⌈log2(output / finest grid)⌉)`` for the output size the head is built for
  (stage ``k`` of ``n`` works at ``⌈output / 2^(n-1-k)⌉``). Each stage resizes its input
  bilinearly (``align_corners=False``) to its size, then filters it with a joint bilateral
  kernel over a ``(2r + 1)²`` window (``r = 3``, FeatUp's 7 × 7):

      k_p(x) = softmax_p( t · ⟨q(x), q(x + p)⟩ − |p / r|² / (2σ²) )
      out(x) = Σ_p k_p(x) · in(x + p)

  ``q`` is a learned projection of the image (at the stage's size: adaptive average pooling of
  the output-size image) — ``1×1 conv(3 → 16) → GELU → 1×1 conv(16 → 16)`` — ``t = exp(τ)`` the
  learned range temperature (τ = 0 at start), ``σ`` the learned spatial width (1 at start,
  offsets in units of ``r``). The softmax is FeatUp's range kernel times its spatial kernel,
  normalised over the window, in one step. Borders replicate the edge pixels.
* **linear probe** — a 1×1 conv to the task's channels at the output resolution. Every stage is
  linear in its input with weights that depend on the image only and sum to 1 over the window, so
  ``probe(upsample(features)) = upsample(W · features) + b`` exactly: the head applies ``W`` on each
  layer's token grid (summing layers after a bilinear resize to the finest grid) and upsamples the
  ``D_out`` channels rather than the ``C`` feature channels — the same function, C / D_out times
  less memory (768 → 1 channel for boundaries on ViT-B). ``tests/test_jbu.py`` checks the identity.
* **memory** — each stage holds ``(B, (2r+1)², h, w)`` kernel logits and weights (float32) for
  the backward; the window is visited offset by offset (views of one padded tensor), never
  unfolded, so no ``(B, C, (2r+1)², h, w)`` tensor exists. At a 224² output and batch 16: about
  0.16 GB per saved kernel tensor at the last stage. Measured figures: docs/performance.md.

How it differs from FeatUp: no multi-view reconstruction training (it would need the live
backbone; here the upsampler learns from the task's loss alone, like the probe), the task's
classifier applied before the upsampling (identical, see above), no learned kernel correction
(FeatUp's ``fixup_proj``) or final residual 1×1 conv, no dropout, bilinear rather than bicubic
resizing between stages, and replicate rather than reflect padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from probe.adapter import AdapterConfig, tokens_to_grid
from runtime.errors import MaxaError

__all__ = ["JbuHead", "JbuStage", "IMAGE_MEAN", "IMAGE_STD"]

#: The guidance image's normalisation (ImageNet's, as FeatUp's guidance).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class JbuStage(nn.Module):
    """One joint bilateral filter at the resolution of its input, guided by an image of that size."""

    def __init__(self, radius: int = 3, key_dim: int = 16, guidance_dim: int = 3) -> None:
        super().__init__()
        self.radius = int(radius)
        self.range_proj = nn.Sequential(nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Conv2d(key_dim, key_dim, 1))
        self.range_temp = nn.Parameter(torch.tensor(0.0))  # log of the range kernel's temperature
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))  # in units of the radius
        r = self.radius
        self.offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]

    def _terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The range temperature ``t``, ``σ²`` and each offset's squared distance ``|p / r|²``."""
        r = self.radius
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        sigma2 = self.sigma_spatial.square().clamp_min(1e-6)
        dist2 = torch.tensor([(dy / r) ** 2 + (dx / r) ** 2 for dy, dx in self.offsets])
        return temp, sigma2, dist2

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """``(B, (2r+1)², H, W)`` weights of each pixel's window, summing to 1 over the window
        (plain PyTorch: the reference :class:`_JbuFilter` is tested against)."""
        r = self.radius
        q = self.range_proj(guidance)
        h, w = q.shape[-2:]
        padded = F.pad(q, [r] * 4, mode="replicate")
        temp, sigma2, dist2 = self._terms()
        logits = []
        for p, (dy, dx) in enumerate(self.offsets):
            neighbour = padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w]
            logits.append(temp * (q * neighbour).sum(1) - dist2[p] / (2 * sigma2))
        return torch.softmax(torch.stack(logits, 1), dim=1)

    def reference(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in plain PyTorch (autograd through every window offset): the reference."""
        r = self.radius
        k = self.kernel(guidance)
        h, w = x.shape[-2:]
        padded = F.pad(x, [r] * 4, mode="replicate")
        out = None
        for p, (dy, dx) in enumerate(self.offsets):
            term = k[:, p : p + 1] * padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w]
            out = term if out is None else out + term
        return out

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """``x`` filtered by the kernel of ``guidance`` (both ``(B, ·, H, W)``)."""
        r = self.radius
        q = self.range_proj(guidance)
        temp, sigma2, dist2 = self._terms()
        return _JbuFilter.apply(F.pad(q, [r] * 4, mode="replicate"), F.pad(x, [r] * 4, mode="replicate"),
                                temp, sigma2, dist2.to(x.device), r)


class _JbuFilter(torch.autograd.Function):
    """The joint bilateral filter on padded inputs, with a hand-written backward.

    Autograd through the window's offsets (:meth:`JbuStage.reference`) gives every offset's slice
    of the padded inputs a gradient as large as the padded input: at a 224² output, 49 full-size
    tensors per input and stage, most of the head's time. Here the backward adds each offset's
    gradient into one buffer in place; the kernel ``k`` is kept from the forward.

        k = softmax_p(t ⟨q, q_p⟩ − d_p / (2σ²)),   out = Σ_p k_p x_p
        ∂k_p = ⟨g, x_p⟩,   ∂x_p += k_p g,   ∂ℓ_p = k_p (∂k_p − Σ_p' k_p' ∂k_p')
        ∂q += t ∂ℓ_p q_p,   ∂q_p += t ∂ℓ_p q,   ∂t = Σ ∂ℓ_p ⟨q, q_p⟩,   ∂σ² = Σ ∂ℓ_p d_p / (2σ⁴)
    """

    @staticmethod
    def forward(ctx, qp, xp, temp, sigma2, dist2, r):  # noqa: ANN001 - autograd's signature
        h, w = qp.shape[-2] - 2 * r, qp.shape[-1] - 2 * r
        q = qp[:, :, r:r + h, r:r + w]
        n = 2 * r + 1
        logits = qp.new_empty((qp.shape[0], n * n, h, w))
        for p in range(n * n):
            dy, dx = divmod(p, n)
            torch.sum(q * qp[:, :, dy:dy + h, dx:dx + w], 1, out=logits[:, p])
        dots = logits.clone() if ctx.needs_input_grad[2] else None
        logits.mul_(temp).sub_((dist2 / (2 * sigma2)).view(1, -1, 1, 1))
        k = torch.softmax(logits, dim=1)
        out = xp.new_zeros((xp.shape[0], xp.shape[1], h, w))
        for p in range(n * n):
            dy, dx = divmod(p, n)
            out.addcmul_(k[:, p:p + 1], xp[:, :, dy:dy + h, dx:dx + w])
        ctx.save_for_backward(qp, xp, temp, sigma2, dist2, k, dots)
        ctx.r = r
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001 - autograd's signature
        qp, xp, temp, sigma2, dist2, k, dots = ctx.saved_tensors
        r = ctx.r
        n = 2 * r + 1
        h, w = grad.shape[-2:]
        grad = grad.contiguous()
        gk = torch.empty_like(k)
        gxp = torch.zeros_like(xp) if ctx.needs_input_grad[1] else None
        for p in range(n * n):
            dy, dx = divmod(p, n)
            torch.sum(grad * xp[:, :, dy:dy + h, dx:dx + w], 1, out=gk[:, p])
            if gxp is not None:
                gxp[:, :, dy:dy + h, dx:dx + w].addcmul_(k[:, p:p + 1], grad)
        glogits = k * (gk - (k * gk).sum(1, keepdim=True))
        gtemp = (glogits * dots).sum().view_as(temp) if dots is not None else None
        gsigma2 = (glogits.sum((0, 2, 3)) * dist2).sum().div(2 * sigma2.square()).view_as(sigma2) \
            if ctx.needs_input_grad[3] else None
        gqp = None
        if ctx.needs_input_grad[0]:
            q = qp[:, :, r:r + h, r:r + w]
            glogits.mul_(temp)
            gqp = torch.zeros_like(qp)
            gq = gqp[:, :, r:r + h, r:r + w]  # q is the centre of qp: its gradient goes there too
            for p in range(n * n):
                dy, dx = divmod(p, n)
                gp = glogits[:, p:p + 1]
                gqp[:, :, dy:dy + h, dx:dx + w].addcmul_(gp, q)
                gq.addcmul_(gp, qp[:, :, dy:dy + h, dx:dx + w])
        return gqp, gxp, gtemp, gsigma2, None, None


class JbuHead(nn.Module):
    """Image-guided joint bilateral upsampling of the stored features, then a linear probe.

    Forward ``(features, token_pos, out_size, image) → (B, D_out, H, W)``, ``image`` the target
    store's ``(B, H, W, 3)`` uint8 (resized here if ``out_size`` differs). See the module docstring.
    """

    #: The training loop passes the target store's ``input_image`` to heads that say so.
    needs_image = True

    def __init__(self, config: AdapterConfig, out_size: tuple[int, int] = (224, 224), radius: int = 3,
                 key_dim: int = 16) -> None:
        super().__init__()
        self.config = config
        self.grid = max(config.grids, key=lambda g: g[0] * g[1])
        self.out_size = (int(out_size[0]), int(out_size[1]))
        ratio = max(self.out_size[0] / self.grid[0], self.out_size[1] / self.grid[1])
        self.num_stages = max(1, math.ceil(math.log2(ratio))) if ratio > 1 else 1
        self.probe = nn.ModuleList(nn.Conv2d(c, config.out_channels, 1, bias=False) for c in config.in_channels)
        self.bias = nn.Parameter(torch.zeros(config.out_channels))
        self.stages = nn.ModuleList(JbuStage(radius, key_dim) for _ in range(self.num_stages))
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def stage_sizes(self, out_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Each stage's ``(h, w)``: doubling up to ``out_size``."""
        n = self.num_stages
        return [(math.ceil(out_size[0] / 2 ** (n - 1 - k)), math.ceil(out_size[1] / 2 ** (n - 1 - k)))
                for k in range(n)]

    def guidance(self, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """The normalised ``(B, 3, H, W)`` float guidance at ``out_size`` from ``(B, H, W, 3)`` uint8."""
        if image.dim() != 4 or image.shape[-1] != 3:
            raise MaxaError(f"the jbu head's image must be (B, H, W, 3), got {tuple(image.shape)}")
        g = image.permute(0, 3, 1, 2).float().div(255.0)
        if tuple(g.shape[-2:]) != tuple(out_size):
            g = F.interpolate(g, size=out_size, mode="bilinear", align_corners=False, antialias=True)
        return (g - self.mean) / self.std

    def upsample(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """``x`` on the finest grid ``(B, ·, h, w)`` through every stage, to ``guidance``'s size."""
        out_size = tuple(guidance.shape[-2:])
        for stage, size in zip(self.stages, self.stage_sizes(out_size)):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            g = guidance if size == out_size else F.adaptive_avg_pool2d(guidance, size)
            x = stage(x, g)
        return x

    def forward(self, features, token_pos, out_size: tuple[int, int],
                image: torch.Tensor | None = None) -> torch.Tensor:
        if len(features) != len(self.config.in_channels) or len(token_pos) != len(features):
            raise ValueError(f"expected {len(self.config.in_channels)} feature layers with positions, got {len(features)}")
        if image is None:
            raise MaxaError("the jbu head is guided by the input image and none was given: it reads the target "
                            "store's `input_image` (`maxa probe` and `maxa predict` pass it).")
        size = (int(out_size[0]), int(out_size[1]))
        coarse = None
        for conv, x, grid in zip(self.probe, features, self.config.grids):
            y = conv(tokens_to_grid(x, grid))
            if tuple(grid) != tuple(self.grid):
                y = F.interpolate(y, size=self.grid, mode="bilinear", align_corners=False)
            coarse = y if coarse is None else coarse + y
        out = self.upsample(coarse, self.guidance(image.to(coarse.device), size))
        return out + self.bias.view(1, -1, 1, 1)
