"""The adapter's attention on CPU through a small C++ kernel (``probe/csrc/maxa_attention.cpp``).

Built on first use with ``torch.utils.cpp_extension`` (a C++ compiler is needed; the build is cached
per user, per CPU capability and per source), and used for float32 attention on CPU with 2, 4 or 8
dimensions per head. Without a compiler, or with ``MAXA_FUSED_ATTENTION=0``, the adapter falls back to
PyTorch's kernels (same results up to float rounding, slower): see ``probe.adapter``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "maxa_attention.cpp"
HEAD_DIMS = (2, 4, 8)
_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}

_ext: Any = None
_tried = False


def extension() -> Any:
    """The compiled kernel module, or ``None`` when it cannot be built here (reason printed once)."""
    global _ext, _tried
    if _tried:
        return _ext
    _tried = True
    if os.environ.get("MAXA_FUSED_ATTENTION", "1") == "0":
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
        name = f"maxa_attention_{cap.lower()}_{digest}"
        if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
            print("maxa: building the CPU attention kernel (once per machine, about 30 s)…", file=sys.stderr, flush=True)
        _ext = load(
            name=name, sources=[str(SOURCE)], extra_cflags=cflags,
            extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: PyTorch's kernels still work
        print(f"maxa: the fused CPU attention kernel could not be built ({str(e).splitlines()[0][:200]}); "
              "using PyTorch's attention kernels (slower)", file=sys.stderr)
        _ext = None
    return _ext


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

    ``sigma`` (S,) and ``d2`` (Q, N) squared query–token distances define the Gaussian term of eq. (3);
    its gradient reaches σ through ``∂M/∂σ = M·(d²/σ³ − 1/σ)``, accumulated inside the kernel.
    """

    @staticmethod
    def forward(ctx, q, k, v, sigma, d2):
        B, h, Q, d = q.shape
        N = k.shape[2]
        qf = q.reshape(B * h, Q, d).contiguous()
        kt = k.transpose(-1, -2).reshape(B * h, d, N).contiguous()
        vt = v.transpose(-1, -2).reshape(B * h, d, N).contiguous()
        mask = gaussian_logits(d2, sigma).contiguous() if sigma is not None else q.new_empty(0)
        out, lse = extension().forward(qf, kt, vt, mask, h, 1.0 / math.sqrt(d))
        ctx.save_for_backward(qf, kt, vt, mask, sigma, d2, out, lse)
        ctx.shape = (B, h, Q, d, N)
        return out.view(B, h, Q, d)

    @staticmethod
    def backward(ctx, grad):
        qf, kt, vt, mask, sigma, d2, out, lse = ctx.saved_tensors
        B, h, Q, d, N = ctx.shape
        want_sigma = sigma is not None and ctx.needs_input_grad[3]
        if want_sigma:
            s = sigma.view(-1, 1, 1)
            dmask = (mask * (d2 / s**3 - 1.0 / s)).contiguous()
        else:
            dmask = qf.new_empty(0)
        dq, dkt, dvt, dsig = extension().backward(qf, kt, vt, mask, dmask, h, 1.0 / math.sqrt(d), out, lse,
                                                  grad.reshape(B * h, Q, d).contiguous())
        dk = dkt.view(B, h, d, N).transpose(-1, -2)
        dv = dvt.view(B, h, d, N).transpose(-1, -2)
        dsigma = sigma_grad(dsig.view(B, h).sum(0), sigma) if want_sigma else None
        return dq.view(B, h, Q, d), dk, dv, dsigma, None
