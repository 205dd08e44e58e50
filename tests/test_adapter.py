"""MAXA adapter, baseline heads and variants (probe/adapter.py, probe/heads.py, probe/variants.py)."""

from __future__ import annotations

import csv
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from probe.adapter import (
    AdapterConfig,
    MaxaAdapter,
    count_parameters,
    query_grid,
    sinusoidal_encoding,
)
from probe.heads import CnnHead, LinearHead, build_head
from probe.variants import PAPER_BACKBONES, TASK_OUTPUTS, VARIANTS, parameter_table, reference_csv, variant_config
from runtime.errors import UnknownNameError



def grid_pos(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([ys, xs], -1).reshape(-1, 2)


def inputs(channels=(48,), grids=((6, 6),), batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, h * w, c, generator=g, dtype=dtype) for c, (h, w) in zip(channels, grids)]
    return feats, [grid_pos(h, w).to(dtype) for h, w in grids]


def make(channels=(48,), grids=((6, 6),), out=3, **kw) -> MaxaAdapter:
    torch.manual_seed(0)
    return MaxaAdapter(AdapterConfig(in_channels=channels, grids=grids, out_channels=out, **kw))


# ---------------------------------------------------------------- reference implementation of eqs. (2)-(3)


def ref_attention(layer, q, f, sigma, qpos, tpos):
    """Loop over heads and queries: softmax(W_q q · W_k F / √d_k + M) W_v F, then W_o (and residual)."""
    H = layer.heads
    Wq, bq, Wk, bk, Wv, bv = (t.detach() for t in (layer.q.weight, layer.q.bias, layer.k.weight,
                                                    layer.k.bias, layer.v.weight, layer.v.bias))  # fmt: skip
    D = Wk.shape[0]
    dk = D // H
    B, Q, N = f.shape[0], q.shape[-2], f.shape[1]
    out = torch.zeros(B, Q, D, dtype=f.dtype)
    for b in range(B):
        qb = q[0] if q.shape[0] == 1 else q[b]
        for h in range(H):
            rows = slice(h * dk, (h + 1) * dk)
            keys = f[b] @ Wk[rows].T + bk[rows]  # (N, dk)
            vals = f[b] @ Wv[rows].T + bv[rows]
            s = None if sigma is None else float(sigma[h if len(sigma) > 1 else 0])
            for j in range(Q):
                qj = Wq[rows] @ qb[j] + bq[rows]
                logits = []
                for i in range(N):
                    l_ij = float(qj @ keys[i]) / math.sqrt(dk)
                    if s is not None:
                        d2 = float(((qpos[j] - tpos[i]) ** 2).sum())
                        l_ij += math.exp(-d2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi))
                    logits.append(l_ij)
                m = max(logits)
                e = [math.exp(v - m) for v in logits]
                z = sum(e)
                out[b, j, rows] = sum((e[i] / z) * vals[i] for i in range(N))
    out = out @ layer.o.weight.detach().T + layer.o.bias.detach()
    if layer.residual:
        out = out + (q if q.shape[0] == B else q.expand(B, -1, -1))
    return out


@pytest.mark.parametrize("sigma", ["per-head", "shared", "none"])
def test_masked_attention_matches_loop_reference(sigma):
    m = make(channels=(12,), grids=((3, 4),), sigma=sigma).double()
    if m.log_sigma is not None:  # distinct σ per head so a head mix-up would show
        with torch.no_grad():
            m.log_sigma.copy_(torch.linspace(-3, -0.5, m.log_sigma.numel(), dtype=torch.float64))
    feats, tpos = inputs(channels=(12,), grids=((3, 4),), dtype=torch.float64)
    qpos = torch.rand(5, 2, dtype=torch.float64)
    got = m.forward_queries(feats, tpos, qpos)

    f, _ = m.encode(feats, tpos)
    q = sinusoidal_encoding(qpos, 16).unsqueeze(0)
    sig = None if m.sigma is None else m.sigma.detach()
    q1 = ref_attention(m.layers[0], q, f.detach(), sig, qpos, tpos[0])
    q2 = ref_attention(m.layers[1], q1, f.detach(), None, qpos, tpos[0])
    torch.testing.assert_close(got, q2, rtol=1e-9, atol=1e-10)
    if sigma != "none":  # the mask really changes the result
        q1_nomask = ref_attention(m.layers[0], q, f.detach(), None, qpos, tpos[0])
        assert not torch.allclose(q1, q1_nomask)


def test_positional_encoding_formula():
    pos = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    enc = sinusoidal_encoding(pos, 16)[0]
    w = [math.pi * 2**k for k in range(4)]
    expect = [math.sin(v * 0.25) for v in w] + [math.cos(v * 0.25) for v in w]
    expect += [math.sin(v * 0.75) for v in w] + [math.cos(v * 0.75) for v in w]
    torch.testing.assert_close(enc, torch.tensor(expect, dtype=torch.float64))


# ---------------------------------------------------------------- σ


@pytest.mark.parametrize("sigma,n", [("per-head", 8), ("shared", 1), ("none", 0)])
def test_sigma_gets_gradient(sigma, n):
    m = make(sigma=sigma)
    feats, tpos = inputs()
    m(feats, tpos, (32, 32)).square().mean().backward()
    if n == 0:
        assert m.log_sigma is None and m.sigma is None
        assert not any("sigma" in name for name, _ in m.named_parameters())
        return
    assert m.log_sigma.shape == (n,)
    torch.testing.assert_close(m.sigma.detach(), torch.full((n,), 0.1))
    assert m.log_sigma.grad is not None and torch.all(m.log_sigma.grad != 0)


def _compiler() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def test_cpu_kernels_build_where_there_is_a_compiler():
    from probe import fused

    if not _compiler():
        pytest.skip("no C++ compiler on PATH: the adapter uses PyTorch's kernels (tested below)")
    if os.environ.get("MAXA_CPU_KERNELS") == "0":
        pytest.skip("MAXA_CPU_KERNELS=0 turns the kernels off")
    assert fused.extension() is not None
    assert fused.usable(torch.zeros(1, 8, 3, 4)) and not fused.usable(torch.zeros(1, 8, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("head_dim", [4, 2, 8])
@pytest.mark.parametrize("heads_sigma", [8, 1, 0])
def test_cpu_attention_kernel_matches_autograd(heads_sigma, head_dim):
    """The C++ kernel (probe/csrc): output and the q, k, v and σ gradients against autograd."""
    from probe import fused
    from probe.adapter import gaussian_mask

    if fused.extension() is None:
        pytest.skip("the CPU kernels are not built here (no compiler): see the test above")
    g = torch.Generator().manual_seed(2)
    B, H, Q, N = 2, 8, 37, 20
    leaves = [torch.randn(B, H, L, head_dim, generator=g, requires_grad=True) for L in (Q, N, N)]
    qpos, tpos = torch.rand(Q, 2, generator=g), grid_pos(4, 5)
    sigma = torch.linspace(0.03, 0.6, max(heads_sigma, 1)).requires_grad_(True) if heads_sigma else None
    d2 = torch.cdist(qpos, tpos).square()
    dout = torch.randn(B, H, Q, head_dim, generator=g)
    got = fused.FusedAttention.apply(*leaves, sigma, d2)
    q, k, v = leaves
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if sigma is not None:
        logits = logits + gaussian_mask(qpos, tpos, sigma).unsqueeze(0)
    ref = torch.softmax(logits, -1) @ v
    wrt = [*leaves] + ([sigma] if sigma is not None else [])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, wrt, dout), torch.autograd.grad(ref, wrt, dout)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_channels,hidden,stride", [(1, 8, 4), (3, 8, 4), (21, 21, 4), (2, 5, 2), (8, 8, 2), (40, 32, 4)])
def test_cpu_upsampling_tail_kernel_matches_modules(out_channels, hidden, stride):
    """The C++ tail (transposed conv k = s, ReLU, 1×1 conv): output and every gradient against the modules."""
    import torch.nn as nn
    import torch.nn.functional as F

    from probe import fused

    if fused.extension() is None:
        pytest.skip("the CPU kernels are not built here (no compiler): the modules run instead")
    torch.manual_seed(3)
    up, proj = nn.ConvTranspose2d(hidden, hidden, stride, stride=stride), nn.Conv2d(hidden, out_channels, 1)
    x = torch.randn(3, hidden, 5, 7, requires_grad=True)
    dout = torch.randn(3, out_channels, 5 * stride, 7 * stride)
    wrt = [x, *up.parameters(), *proj.parameters()]
    assert fused.tail_usable(x, up, proj)
    got = fused.upsample_tail(x, up, proj)
    ref = proj(F.relu(up(x)))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, wrt, dout), torch.autograd.grad(ref, wrt, dout)):
        assert torch.count_nonzero(b) > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not fused.tail_usable(x.double(), up, proj)
    assert not fused.tail_usable(x, nn.ConvTranspose2d(hidden, hidden, 3, stride=2), proj)


@pytest.mark.parametrize("heads_sigma", [8, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_gaussian_attention_gradients_match_autograd(heads_sigma, dtype, monkeypatch):
    """PyTorch's fused CPU kernels with the σ gradient from two extra fused passes (the path without the
    C++ kernel) against autograd through the direct formula."""
    from probe import fused
    from probe.adapter import gaussian_attention, gaussian_mask

    monkeypatch.setattr(fused, "usable", lambda q: False)

    g = torch.Generator().manual_seed(1)
    B, H, Q, N, d = 2, 8, 37, 20, 4
    leaves = [torch.randn(B, H, L, d, generator=g, dtype=dtype, requires_grad=True) for L in (Q, N, N)]
    qpos, tpos = torch.rand(Q, 2, generator=g, dtype=dtype), grid_pos(4, 5).to(dtype)
    tpos[3] = qpos[5]  # a query exactly on a token centre (d = 0)
    sigma = torch.linspace(0.03, 0.6, heads_sigma, dtype=dtype).requires_grad_(True)
    dout = torch.randn(B, H, Q, d, generator=g, dtype=dtype)

    got = gaussian_attention(*leaves, qpos, tpos, sigma)
    got_grads = torch.autograd.grad(got, [*leaves, sigma], dout)
    q, k, v = leaves
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + gaussian_mask(qpos, tpos, sigma).unsqueeze(0)
    ref = torch.softmax(logits, -1) @ v
    ref_grads = torch.autograd.grad(ref, [*leaves, sigma], dout)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(got, ref, **tol)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)
    assert torch.all(got_grads[-1].abs() > 1e-6)


# ---------------------------------------------------------------- output resolution


def test_query_grid_positions():
    hq, wq, pos = query_grid((224, 224))
    assert (hq, wq) == (28, 28)
    torch.testing.assert_close(pos[:28, 1], (torch.arange(28) + 0.5) / 28)
    hq, wq, pos = query_grid((100, 61))
    assert (hq, wq) == (13, 8)
    assert math.isclose(float(pos[0, 0]), 4 / 100, rel_tol=1e-6) and math.isclose(float(pos[0, 1]), 4 / 61, rel_tol=1e-6)


def test_same_adapter_renders_any_resolution():
    """The adapter is a function of query *position*: queries never interact, so a 672 output's queries at
    the 224 output's positions (every third one, offset 1: (3j+1.5)/84 = (j+0.5)/28) give identical attention
    outputs, and rendering only chooses where to sample. The 224 and 448 grids share no position, so there we
    check the rendered images: 448 average-pooled ×2 vs 224, after removing each image's per-channel mean (so a
    constant bias cannot make the correlation high), must correlate > 0.9."""
    m = make(channels=(64,), grids=((14, 14),))
    feats, tpos = inputs(channels=(64,), grids=((14, 14),))
    with torch.no_grad():
        _, _, p224 = query_grid((224, 224))
        _, _, p672 = query_grid((672, 672))
        o224 = m.forward_queries(feats, tpos, p224).reshape(2, 28, 28, -1)
        o672 = m.forward_queries(feats, tpos, p672).reshape(2, 84, 84, -1)
        torch.testing.assert_close(o672[:, 1::3, 1::3], o224, rtol=1e-5, atol=1e-6)
        both = m.forward_queries(feats, tpos, torch.cat([p224, p672[:5]]))  # batching queries changes nothing
        torch.testing.assert_close(both[:, : 28 * 28], o224.reshape(2, -1, o224.shape[-1]), rtol=1e-5, atol=1e-6)

        a, b = m(feats, tpos, (224, 224)), m(feats, tpos, (448, 448))
        assert a.shape == (2, 3, 224, 224) and b.shape == (2, 3, 448, 448)
        b = F.avg_pool2d(b, 2)
        a, b = a - a.mean((-2, -1), keepdim=True), b - b.mean((-2, -1), keepdim=True)
        corr = float((a * b).sum() / (a.norm() * b.norm()))
        assert corr > 0.9, corr


@pytest.mark.parametrize("size", [(224, 224), (100, 61), (9, 8), (1, 1)])
def test_non_multiple_of_8_outputs(size):
    m = make()
    feats, tpos = inputs()
    assert m(feats, tpos, size).shape == (2, 3, *size)


# ---------------------------------------------------------------- parameter counts


def vitb(out=1, cnn=None, variant="base"):
    return variant_config(variant, in_channels=(768,), grids=((14, 14),), out_channels=out, cnn_channels=cnn)


def test_base_parameter_count_matches_text():
    n = count_parameters(MaxaAdapter(vitb()))
    assert abs(n - 37_000) / 37_000 < 0.15, n


def test_cnn_parameter_differences_match_tables():
    def n(out, cnn=None):
        return count_parameters(MaxaAdapter(vitb(out, cnn)))

    assert count_parameters(MaxaAdapter(vitb(1)).head) == 4_234
    assert n(32) - n(1) == 36_918  # instances − boundaries
    assert n(21) - n(1) == 15_842  # VOC − boundaries
    assert count_parameters(MaxaAdapter(vitb(171, 64)).head) == 154_230


def test_count_parameters_learnable_only():
    m = MaxaAdapter(vitb())
    total = count_parameters(m)
    m.log_sigma.requires_grad_(False)
    assert count_parameters(m) == total - 8


def test_paper_budget_matches_every_reference_row():
    reference = list(csv.DictReader(io.StringIO(reference_csv().read_text(encoding="utf-8"))))
    assert {r["backbone"] for r in reference} <= set(PAPER_BACKBONES)
    rows = parameter_table(file=None)
    checked = 0
    for r in rows:
        if r["backbone"] not in PAPER_BACKBONES:  # extra, documented non-matching row (timm's SAM2 trunk)
            continue
        assert 0.9 <= r["ratio"] <= 1.1, r
        assert r["base"] < r["paper"]
        checked += 1
    assert checked == len(reference) * len(TASK_OUTPUTS)


# ---------------------------------------------------------------- variants, heads, multi-layer


def test_variant_names():
    assert set(VARIANTS) == {"base", "d16", "no-sigma", "shared-sigma", "single-layer", "paper-budget"}
    with pytest.raises(UnknownNameError, match="base"):
        variant_config("nope", in_channels=(8,), grids=((2, 2),), out_channels=1)
    with pytest.raises(ValueError):
        variant_config("d16", in_channels=(8,), grids=((2, 2),), out_channels=1, dim=32)
    assert variant_config("d16", in_channels=(8,), grids=((2, 2),), out_channels=1).dim == 16


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_build_and_run(name):
    cfg = variant_config(name, in_channels=(48,), grids=((6, 6),), out_channels=2)
    m = MaxaAdapter(cfg)
    feats, tpos = inputs()
    y = m(feats, tpos, (40, 24))
    assert y.shape == (2, 2, 40, 24) and torch.isfinite(y).all()
    assert len(m.layers) == (1 if name == "single-layer" else 2)


def test_config_roundtrip_and_validation():
    cfg = variant_config("paper-budget", in_channels=[768, 1536], grids=[[20, 20], [10, 10]], out_channels=171, cnn_channels=64)
    assert cfg.grids == ((20, 20), (10, 10)) and cfg.cnn_dim == 64
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert AdapterConfig(in_channels=(8,), grids=((2, 2),), out_channels=1).cnn_dim == 8
    assert AdapterConfig(in_channels=(8,), grids=((2, 2),), out_channels=21).cnn_dim == 21
    for bad in ({"dim": 30}, {"sigma": "per-pixel"}, {"grids": ((2, 2), (1, 1))}, {"pos_dim": 6}, {"sigma_init": 0}):
        with pytest.raises(ValueError):
            AdapterConfig(**{"in_channels": (8,), "grids": ((2, 2),), "out_channels": 1, **bad})


TWO = dict(channels=(16, 24), grids=((8, 8), (4, 4)))


def test_multi_layer_tokens():
    m = make(**TWO, out=4)
    assert len(m.psi) == 2
    feats, tpos = inputs(**TWO)
    y = m(feats, tpos, (50, 50))
    assert y.shape == (2, 4, 50, 50)
    f, p = m.encode(feats, tpos)
    assert f.shape == (2, 64 + 16, 32) and p.shape == (80, 2)
    feats[1] = feats[1] + 1.0  # the second layer's tokens matter
    assert not torch.allclose(m(feats, tpos, (50, 50)), y)
    with pytest.raises(ValueError):
        m(feats[:1], tpos[:1], (50, 50))


@pytest.mark.parametrize("head", ["maxa", "linear", "cnn"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("size", [(64, 64), (50, 37)])
def test_heads_forward_shapes(head, layers, size):
    spec = TWO if layers == 2 else dict(channels=(48,), grids=((6, 6),))
    cfg = AdapterConfig(in_channels=spec["channels"], grids=spec["grids"], out_channels=5)
    m = build_head(head, cfg)
    feats, tpos = inputs(**spec)
    y = m(feats, tpos, size)
    assert y.shape == (2, 5, *size) and torch.isfinite(y).all()
    y.mean().backward()


def test_build_head_types_and_unknown():
    cfg = AdapterConfig(in_channels=(8,), grids=((14, 14),), out_channels=1)
    assert isinstance(build_head("linear", cfg), LinearHead)
    cnn = build_head("cnn", cfg)
    assert isinstance(cnn, CnnHead) and cnn.n_up == 4  # 14 · 2^4 = 224
    with pytest.raises(UnknownNameError, match="maxa"):
        build_head("dpt", cfg)


@pytest.mark.parametrize("out_channels", [1, 64])
def test_cnn_skip_path_equals_upsample_then_project(out_channels):
    """Both orders of the skip path (project then upsample, or the reverse) give the appendix's output."""
    import torch.nn.functional as F

    from probe.adapter import UpsampleCNN

    torch.manual_seed(0)
    cnn = UpsampleCNN(32, 8, out_channels)
    x = torch.randn(2, 32, 7, 5)
    reference = cnn.skip(F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)) + cnn.cnn(x)
    torch.testing.assert_close(cnn(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,factor", [((2, 3, 7, 5), 8), ((1, 1, 28, 28), 8), ((2, 4, 3, 6), 2)])
def test_bilinear_upsampling_as_matmuls_equals_interpolate(shape, factor):
    from probe.adapter import upsample_bilinear

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    got = upsample_bilinear(x, factor)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, g)[0] for y in (got, ref)))


@pytest.mark.parametrize("paper_budget", [False, True])
def test_feature_projection_is_psi_of_the_concatenation(paper_budget):
    """ψ splits its first linear layer (features, and the image-independent positional part once per
    batch): the result is ψ applied to ``[φ ‖ P (‖ learned)]`` as written in the paper."""
    from probe.adapter import FeatureProjection

    torch.manual_seed(0)
    cfg = AdapterConfig(in_channels=(48,), grids=((6, 6),), out_channels=1, paper_budget=paper_budget)
    psi = FeatureProjection(cfg, 48, (6, 6))
    x, pos = torch.randn(3, 36, 48), grid_pos(6, 6)
    parts = [x if psi.norm is None else psi.norm(x), sinusoidal_encoding(pos, cfg.pos_dim).expand(3, 36, -1)]
    if paper_budget:
        parts.append(psi.learned_pos.expand(3, 36, -1))
    torch.testing.assert_close(psi(x, pos), psi.proj(torch.cat(parts, dim=-1)), rtol=1e-5, atol=1e-5)
