"""The adapter's two hot spots on CPU through small C++ kernels (``probe/csrc/maxa_kernels.cpp``).

* :class:`FusedAttention`: the cross-attention, with the Gaussian term of eq. (3) and its σ gradient,
  for float32 on CPU with 2, 4 or 8 dimensions per head;
* :func:`upsample_tail`: the upsampling CNN's full-resolution tail (transposed conv with kernel =
  stride, ReLU, 1×1 conv) in one pass, for float32 on CPU;
* :func:`half_to_float`: the streamed probe's float16 → float32 copy of one image (``probe.data``).

Built on first use with ``torch.utils.cpp_extension`` (a C++ compiler is needed; the build is cached
per user, per CPU capability and per source). Without a compiler, or with ``MAXA_CPU_KERNELS=0``, the
adapter uses PyTorch's kernels and modules (same results up to float rounding, slower): see
``probe.adapter``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from runtime import settings

SOURCE = Path(__file__).resolve().parent / "csrc" / "maxa_kernels.cpp"
HEAD_DIMS = (2, 4, 8)
_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}

_ext: Any = None
_tried = False
_LOCK = threading.Lock()


def extension() -> Any:
    """The compiled kernels, or ``None`` when they cannot be built here (reason printed once).
    Thread-safe: a second thread (the streamed probe's reader) waits for the build, so every caller
    sees the same answer."""
    with _LOCK:
        return _extension()


def _extension() -> Any:
    global _ext, _tried
    if _tried:
        return _ext
    _tried = True
    if not settings.cpu_kernels():
        return None
    try:
        # torch.utils.cpp_extension warns at import that there is no CUDA toolkit: irrelevant here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import _get_build_directory, load

        cap = torch.backends.cpu.get_cpu_capability()
        flags = _FLAGS.get(cap, [])
        # The name carries the CPU capability and a source hash, so a build cached on a shared home
        # directory is never loaded on a CPU that lacks its instructions, nor after the source changed.
        cflags = ["-O3", "-ffast-math", "-fopenmp", *flags]  # -ffast-math: glibc's vector expf
        digest = hashlib.sha1(SOURCE.read_bytes() + f"{torch.__version__} {cflags}".encode()).hexdigest()[:10]
        name = f"maxa_kernels_{cap.lower()}_{digest}"
        if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
            print("maxa: building the CPU kernels (once per machine, about 25 s)…", file=sys.stderr, flush=True)
        _ext = load(
            name=name, sources=[str(SOURCE)], extra_cflags=cflags,
            extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: PyTorch's kernels still work
        print(f"maxa: the fused CPU kernels could not be built ({str(e).splitlines()[0][:200]}); "
              "using PyTorch's kernels (slower)", file=sys.stderr)
        _ext = None
    return _ext


def half_to_float() -> Any:
    """The compiled float16 → float32 copy ``fn(dst, src)`` (contiguous, same size; on the calling
    thread, the GIL released) where it uses F16C instructions, else ``None`` (torch's copy is as fast)."""
    ext = extension()
    if ext is None or not hasattr(ext, "has_f16c") or not ext.has_f16c():
        return None
    return ext.half_to_float


def gaussian_logits(d2: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Eq. (3): (Q, N) squared distances, (S,) σ → (S, Q, N) ``exp(-d²/2σ²)/(σ√2π)``."""
    s = sigma.view(-1, 1, 1)
    return torch.exp(-d2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi))


def sigma_grad(per_head: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """∂L/∂σ from its (h,) per-head sums: one σ shared by every head gets their total."""
    return per_head.sum().view(1) if sigma.numel() == 1 else per_head


def usable(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] in HEAD_DIMS and extension() is not None


class FusedAttention(torch.autograd.Function):
    """``softmax(q·kᵀ/√d + M) v`` for (B, h, L, d) heads, with M = :func:`gaussian_logits` (S, Q, N) or no mask.

    ``sigma`` (S,) and ``d2`` (Q, N) squared query–token distances define the Gaussian term of eq. (3),
    built inside the kernel; its gradient reaches σ through ``∂M/∂σ = M·(d²/σ³ − 1/σ)``, accumulated
    inside the kernel's backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, sigma, d2):
        B, h, Q, d = q.shape
        N = k.shape[2]
        qf = q.reshape(B * h, Q, d).contiguous()
        kt = k.transpose(-1, -2).reshape(B * h, d, N).contiguous()
        vt = v.transpose(-1, -2).reshape(B * h, d, N).contiguous()
        if sigma is not None:
            sigma, d2 = sigma.detach().contiguous(), d2.contiguous()
        else:
            sigma = d2 = q.new_empty(0)
        out, lse, mask = extension().attention_forward(qf, kt, vt, d2, sigma, h, 1.0 / math.sqrt(d))
        ctx.save_for_backward(qf, kt, vt, mask, sigma, d2, out, lse)
        ctx.shape = (B, h, Q, d, N)
        return out.view(B, h, Q, d)

    @staticmethod
    def backward(ctx, grad):
        qf, kt, vt, mask, sigma, d2, out, lse = ctx.saved_tensors
        B, h, Q, d, N = ctx.shape
        want_sigma = mask.numel() > 0 and ctx.needs_input_grad[3]
        dq, dkt, dvt, dsig = extension().attention_backward(
            qf, kt, vt, mask, d2, sigma, want_sigma, h, 1.0 / math.sqrt(d), out, lse,
            grad.reshape(B * h, Q, d).contiguous(),
        )
        dk = dkt.view(B, h, d, N).transpose(-1, -2)
        dv = dvt.view(B, h, d, N).transpose(-1, -2)
        dsigma = sigma_grad(dsig.view(B, h).sum(0), sigma) if want_sigma else None
        return dq.view(B, h, Q, d), dk, dv, dsigma, None


def tail_usable(x: torch.Tensor, up: torch.nn.ConvTranspose2d, proj: torch.nn.Conv2d) -> bool:
    """Whether :func:`upsample_tail` can run ``proj(relu(up(x)))`` here."""
    s = up.kernel_size[0]
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and up.weight.dtype == torch.float32
        and up.kernel_size == (s, s) and up.stride == (s, s) and up.padding == (0, 0)
        and up.output_padding == (0, 0) and up.dilation == (1, 1) and up.groups == 1 and up.bias is not None
        and proj.kernel_size == (1, 1) and proj.stride == (1, 1) and proj.padding == (0, 0)
        and proj.groups == 1 and proj.bias is not None and extension() is not None
    )  # fmt: skip


def upsample_tail(x: torch.Tensor, up: torch.nn.ConvTranspose2d, proj: torch.nn.Conv2d) -> torch.Tensor:
    """``proj(relu(up(x)))`` in one pass (see :func:`tail_usable`); gradients reach every weight."""
    C, M, s, _ = up.weight.shape
    wm = up.weight.permute(0, 2, 3, 1).reshape(C, s * s * M)  # wm[k, (i·s + j)·M + c] = weight[k, c, i, j]
    return _FusedTail.apply(x, wm, up.bias.repeat(s * s), proj.weight.view(proj.out_channels, M), proj.bias, s)


class _FusedTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wm, b1, w2, b2, s):
        x, wm, b1, w2 = x.contiguous(), wm.contiguous(), b1.contiguous(), w2.contiguous()
        ctx.save_for_backward(x, wm, b1, w2)
        ctx.s = s
        return extension().tail_forward(x, wm, b1, w2, b2.contiguous(), s)

    @staticmethod
    def backward(ctx, grad):
        x, wm, b1, w2 = ctx.saved_tensors
        dx, dwm, db1, dw2, db2 = extension().tail_backward(x, wm, b1, w2, grad.contiguous(), ctx.s)
        return dx, dwm, db1, dw2, db2, None
