"""The lossy feature encoding (``--compression int8``): int8 values with a per-image, per-channel scale.

A layer of a quantised store is two arrays (names in ``store._layout``):

* ``features/<layer>``: ``(N, h, w, C)`` int8, ``q = round(x / s)`` (round half to even), in
  ``-QMAX..QMAX``;
* ``feature_scales/<layer>``: ``(N, C)`` float32, ``s = max over the image's tokens of |x| / QMAX``
  for each channel (0 for a channel that is 0 everywhere in the image; its values are then 0).

Both are zstd-compressed (level 1) before their crc32c. ``QMAX`` is 100, not 127: int8 values
alone are 2.04× smaller than float16 less the scales (4 bytes per channel and image), which leaves
1.96× at a 14 × 14 grid; 201 levels instead of 255 let zstd's entropy coding take the rest (2.07×
on the features of a ViT-S, measured in docs/performance.md) for an error 1.27× as large.

Readers return ``float16(float32(q) * s)``, the same array a plain zarr user gets with
:func:`dequantize`. For every value ``|x - float32(q) * s| <= s / 2`` (up to float32 rounding): the
error is at most half a step of that image's channel, 1/200 of its largest magnitude. The
quantisation is part of the feature spec (``FeatureSpec.quantization``) and so of the store's key:
a quantised store never stands in for a lossless one.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

__all__ = ["LOSSLESS", "QUANTIZATIONS", "QMAX", "quantization_for", "quantize", "dequantize"]

#: ``FeatureSpec.quantization`` of a lossless store (the default; it leaves the key as it was).
LOSSLESS = "none"
#: The lossy encodings: ``--compression`` choice → ``FeatureSpec.quantization``.
QUANTIZATIONS = {"int8": "int8"}
#: The largest stored magnitude (symmetric; see the module's docstring for why not 127).
QMAX = 100


def quantization_for(compression: str) -> str:
    """The feature spec's ``quantization`` for a ``--compression`` choice (``"none"`` unless lossy)."""
    return QUANTIZATIONS.get(compression, LOSSLESS)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)`` of ``x`` (``(B, h, w, C)``, finite): ``q`` int8 of ``x``'s shape, ``s`` ``(B, C)`` float32.

    One image at a time, its float32 values in one buffer while they are in the CPU's cache
    (float16 widened by torch: NumPy's float16 cast runs about 20x slower); the same bits as the
    whole-array formula ``rint(float32(x) / s)``, clipped, 0 where ``s`` is 0.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"quantize needs (images, ..., channels) values, got shape {x.shape}")
    images, channels = x.shape[0], x.shape[-1]
    xv = np.ascontiguousarray(x).reshape(images, -1, channels)
    q = np.empty(xv.shape, dtype=np.int8)
    scale = np.empty((images, channels), dtype=np.float32)
    x32 = np.empty(xv.shape[1:], dtype=np.float32)  # one image's values, reused
    work = np.empty_like(x32)
    for i in range(images):
        _to_float32(xv[i], x32)
        np.abs(x32, out=work)
        absmax = work.max(axis=0)
        scale[i] = absmax / np.float32(QMAX)
        # a channel that is 0 in the whole image has scale 0: its values are stored as 0, never x / 0
        # (``where`` leaves ``work`` there as it is: |x|, which is 0 in that channel)
        np.divide(x32, scale[i], out=work, where=scale[i] > 0)
        np.rint(work, out=work)
        np.clip(work, -QMAX, QMAX, out=work)
        q[i] = work
    return q.reshape(x.shape), scale


@functools.cache
def _torch() -> Any:
    """torch where it is installed (it converts float16 about 20-40x faster than NumPy, with the
    same bits), else ``None``: the store itself needs only NumPy."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _to_float32(values: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = values`` (exact): float16 widened by torch a block at a time (below its grain
    size: one thread per call), any other dtype, or without torch, by NumPy."""
    torch = _torch() if values.dtype == np.float16 else None
    if torch is None:
        out[...] = values
        return
    src, dst = torch.from_numpy(values.reshape(-1)), torch.from_numpy(out.reshape(-1))
    for k in range(0, src.numel(), _BLOCK_VALUES):
        dst[k:k + _BLOCK_VALUES].copy_(src[k:k + _BLOCK_VALUES])


#: Values per block of :func:`dequantize`: below torch's grain size (32,768), so that torch works
#: on the calling thread alone.
_BLOCK_VALUES = 1 << 15


def dequantize(q: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``float16(float32(q) * s)``: the values readers return for int8 ``q`` and scales ``s`` ``(B, C)``
    (into ``out``, a C-contiguous float16 array of ``q``'s shape, if given).

    Computed by torch in one pass, a block of tokens at a time (each product in float32, rounded to
    float16 as it is stored; F16C where the CPU has it, where NumPy's own float16 cast runs about
    40x slower): the same bits as the whole-array NumPy formula (both round to nearest, ties to
    even), without its two full-size float32 temporaries. Blocks stay below torch's grain size, so
    each call works on its calling thread alone (the readers call it from their worker threads).
    Without torch, NumPy computes the same a block at a time.
    """
    q = np.ascontiguousarray(q)
    s = np.ascontiguousarray(scale, dtype=np.float32)
    if q.dtype != np.int8 or q.ndim < 2 or s.shape != (q.shape[0], q.shape[-1]):
        raise ValueError(f"dequantize needs (images, ..., channels) int8 values and (images, channels) scales, "
                         f"got {q.shape} {q.dtype} and {s.shape}")
    if out is None:
        out = np.empty(q.shape, dtype=np.float16)
    elif out.shape != q.shape or out.dtype != np.float16 or not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out= for dequantize must be a writeable C-contiguous {q.shape} float16 array")
    if q.size == 0:
        return out
    channels = q.shape[-1]
    rows = max(1, _BLOCK_VALUES // channels)
    torch = _torch()
    if torch is None:
        qv, ov = q.reshape(q.shape[0], -1, channels), out.reshape(q.shape[0], -1, channels)
        products = np.empty((min(rows, qv.shape[1]), channels), dtype=np.float32)
        with np.errstate(over="ignore"):  # a product past float16's range is inf, as in the formula
            _numpy_blocks(qv, s, ov, products, rows)
        return out
    if q.flags.writeable and s.flags.writeable:
        tq, ts = torch.from_numpy(q.reshape(q.shape[0], -1, channels)), torch.from_numpy(s)
    else:
        with warnings.catch_warnings():  # values read from a store are read-only buffers: only read here
            warnings.simplefilter("ignore", UserWarning)
            tq, ts = torch.from_numpy(q.reshape(q.shape[0], -1, channels)), torch.from_numpy(s)
    to = torch.from_numpy(out.reshape(q.shape[0], -1, channels))
    for i in range(tq.shape[0]):
        si = ts[i]
        for t in range(0, tq.shape[1], rows):
            torch.mul(tq[i, t:t + rows], si, out=to[i, t:t + rows])  # float32(q) * s, stored as float16
    return out


def _numpy_blocks(qv: np.ndarray, s: np.ndarray, ov: np.ndarray, products: np.ndarray, rows: int) -> None:
    for i in range(qv.shape[0]):
        for t in range(0, qv.shape[1], rows):
            block = qv[i, t:t + rows]
            np.multiply(block, s[i], out=products[:len(block)])  # float32(q) * s, in float32
            ov[i, t:t + rows] = products[:len(block)]  # rounded to float16 as astype rounds


def _per_token(per_channel: np.ndarray, ndim: int) -> np.ndarray:
    """``(B, C)`` broadcast over the token axes of a ``(B, ..., C)`` array of ``ndim`` axes."""
    return per_channel.reshape(per_channel.shape[0], *([1] * (ndim - 2)), per_channel.shape[-1])
