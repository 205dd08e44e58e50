"""SAM2's FPN neck (extract/sam2_neck.py) and the ``sam2_hiera_bplus`` entry: random init, CPU, no downloads.

The reference below is written from the equations of the official ``FpnNeck.forward``
(facebookresearch/sam2, ``sam2/modeling/backbones/image_encoder.py``) with other primitives than the module
(einsum for the 1×1 convs, ``repeat_interleave`` for nearest ×2 upsampling).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

from extract.backbone_registry import entry_geometry, meta_model
from extract.backbones import backbone_table, get_backbone_entry, load_backbone
from extract.checkpoints import load_weights_file
from extract.sam2_neck import SAM2_BPLUS_CHECKPOINT_URL, SAM2_BPLUS_FPN, FpnNeck, Sam2ImageEncoder
from probe.variants import PAPER_BACKBONES
from runtime.errors import WeightsUnavailableError

SIZE = 128  # a full 1024-px forward is slow on CPU; 128 px gives an 8x8 stride-16 grid


def _conv1x1(neck: FpnNeck, j: int, x: torch.Tensor) -> torch.Tensor:
    conv = neck.convs[j].conv
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]


def _up2(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def _reference_bplus(neck: FpnNeck, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """sam2_hiera_b+.yaml: top-down levels [2, 3], nearest, sum; xs high resolution first."""
    out3 = _conv1x1(neck, 0, xs[3])
    out2 = _conv1x1(neck, 1, xs[2]) + _up2(out3)
    out1 = _conv1x1(neck, 2, xs[1])  # not a top-down level: lateral only
    out0 = _conv1x1(neck, 3, xs[0])
    return [out0, out1, out2, out3]


def _stages(channels=(2, 4, 8, 16), size=16, batch=2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, size >> i, size >> i, generator=g) for i, c in enumerate(channels)]


def test_neck_matches_official_equations():
    torch.manual_seed(0)
    neck = FpnNeck(d_model=8, backbone_channel_list=[16, 8, 4, 2], fpn_top_down_levels=[2, 3])
    xs = _stages()
    with torch.no_grad():
        out = neck(xs)
        ref = _reference_bplus(neck, xs)
    assert [tuple(o.shape) for o in out] == [(2, 8, 16, 16), (2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    # levels below min_level are skipped; the others are unchanged
    with torch.no_grad():
        part = neck(xs, min_level=2)
    assert part[0] is None and part[1] is None
    torch.testing.assert_close(part[2], ref[2])


def test_neck_hand_computed_case():
    """Two levels, one channel, unit weights: level 0 = x0 + b0 + nearest-up(x1 + b1)."""
    neck = FpnNeck(d_model=1, backbone_channel_list=[1, 1], fpn_top_down_levels=None)
    with torch.no_grad():
        for j, b in enumerate((10.0, 100.0)):  # convs[0] sees the coarse level, convs[1] the fine one
            neck.convs[j].conv.weight.fill_(1.0)
            neck.convs[j].conv.bias.fill_(b)
        fine = torch.arange(16.0).reshape(1, 1, 4, 4)
        coarse = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        out = neck([fine, coarse])
    expect_coarse = coarse + 10
    expect_fine = fine + 100 + torch.tensor([[11.0, 11, 12, 12], [11, 11, 12, 12], [13, 13, 14, 14], [13, 13, 14, 14]])
    torch.testing.assert_close(out[1], expect_coarse)
    torch.testing.assert_close(out[0], expect_fine)
    avg = FpnNeck(d_model=1, backbone_channel_list=[1, 1], fpn_top_down_levels=None, fuse_type="avg")
    avg.load_state_dict(neck.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(avg([fine, coarse])[0], expect_fine / 2)


def test_neck_keys_are_the_official_names():
    neck = FpnNeck()
    assert sorted(neck.state_dict()) == sorted(f"convs.{i}.conv.{k}" for i in range(4) for k in ("weight", "bias"))
    assert [neck.convs[i].conv.in_channels for i in range(4)] == [896, 448, 224, 112]


def test_geometry_at_1024_matches_the_paper_row():
    rows = {r["name"]: r for r in backbone_table()}
    neck, trunk = rows["sam2_hiera_bplus"], rows["sam2_hiera_bplus_trunk"]
    assert neck["timm_name"] == SAM2_BPLUS_FPN and neck["input_size"] == 1024
    assert neck["grid"] == {"last": [64, 64]} and neck["channels"] == {"last": 256} and neck["stride"] == {"last": 16}
    assert neck["interpolation"] == "bilinear"  # SAM2Transforms' Resize
    entry = get_backbone_entry("sam2_hiera_bplus")
    assert (entry.paper_image_size, entry.paper_feature_size) == (1024, 64)  # matched: no note needed
    channels, grids, _ = PAPER_BACKBONES[entry.paper_row]
    assert (tuple(neck["channels"].values()), tuple(tuple(g) for g in neck["grid"].values())) == (channels, grids)
    # the trunk alone: 448 channels on the same grid; the neck adds 256 * (896 + 448 + 224 + 112 + 4) parameters
    # and drops timm's (unused, not in SAM2) head LayerNorm of 2 * 896
    assert trunk["grid"] == {"stage2": [64, 64]} and trunk["channels"] == {"stage2": 448} and trunk["input_size"] == 1024
    assert neck["num_params"] - trunk["num_params"] == 256 * (896 + 448 + 224 + 112 + 4) - 2 * 896


@pytest.fixture(scope="module")
def small_bplus():
    entry = dataclasses.replace(get_backbone_entry("sam2_hiera_bplus"), name="sam2_hiera_bplus_128", input_size=SIZE)
    return entry, load_backbone(entry, weights="random")


def test_forward_is_the_stride16_neck_level(small_bplus):
    entry, b = small_bplus
    assert isinstance(b.model, Sam2ImageEncoder) and b.weights_id == "random:seed0"
    assert b.grids == {"last": (8, 8)} and b.channels == {"last": 256} and b.stride("last") == 16
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    feats = b.forward(x)
    assert list(feats) == ["last"] and feats["last"].shape == (1, 8, 8, 256)
    with torch.no_grad():
        stages = b.model.trunk.forward_intermediates(x, intermediates_only=True)
        ref = _reference_bplus(b.model.neck, stages)
    assert [s.shape[1] for s in stages] == [112, 224, 448, 896]
    assert [s.shape[-1] for s in stages] == [SIZE // 4, SIZE // 8, SIZE // 16, SIZE // 32]
    torch.testing.assert_close(feats["last"], ref[2].permute(0, 2, 3, 1))  # scalp=1 drops ref[3]
    d = b.describe()
    assert d["channels"] == {"last": 256} and d["grids"] == {"last": [8, 8]} and d["timm_name"] == SAM2_BPLUS_FPN


def test_random_init_is_reproducible(small_bplus):
    from extract.backbones import _create_random

    entry, b = small_bplus
    again = _create_random(entry).state_dict()
    ref = b.model.state_dict()
    assert again.keys() == ref.keys()
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def _official_key(key: str) -> str:
    key = key.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1")
    return f"image_encoder.{key}"


def test_official_checkpoint_loads(tmp_path, small_bplus):
    entry, b = small_bplus
    src = copy.deepcopy(b.model)  # other weights than the seed-0 random ones (cheaper than a fresh init)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    model = {_official_key(k): v for k, v in src.state_dict().items()}
    assert "image_encoder.trunk.blocks.0.mlp.layers.0.weight" in model and "image_encoder.neck.convs.3.conv.bias" in model
    assert not any(".head." in k for k in model)
    model["sam_mask_decoder.conv_s0.weight"] = torch.zeros(32, 256, 1, 1)  # the rest of SAM2 is ignored
    model["no_mem_embed"] = torch.zeros(1, 1, 256)
    torch.save({"model": model}, tmp_path / "sam2_hiera_base_plus.pt")
    b = load_backbone(entry, weights=tmp_path / "sam2_hiera_base_plus.pt")
    assert b.weights_id.startswith("file:")
    loaded = b.model.state_dict()
    assert loaded.keys() == src.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items())
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = src.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(b.forward(x)["last"], ref.permute(0, 2, 3, 1), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_incomplete_checkpoints_fail_in_one_line(tmp_path, small_bplus):
    """Through load_weights_file into a meta-device model: the errors come before any value is copied."""
    entry, b = small_bplus

    def load(path):
        load_weights_file(meta_model(entry), entry, path)

    neck_only = {f"image_encoder.{k}": v for k, v in b.model.state_dict().items() if k.startswith("neck.")}
    torch.save({"model": neck_only}, tmp_path / "neck_only.pt")
    with pytest.raises(WeightsUnavailableError, match="does not fit") as info:
        load(tmp_path / "neck_only.pt")
    assert "missing trunk." in str(info.value) and "\n" not in str(info.value)
    trunk_only = {"image_encoder.trunk.pos_embed": b.model.trunk.pos_embed.detach().clone()}
    torch.save({"model": trunk_only}, tmp_path / "trunk_only.pt")
    with pytest.raises(WeightsUnavailableError, match="no SAM2 neck weights") as info:
        load(tmp_path / "trunk_only.pt")
    assert SAM2_BPLUS_CHECKPOINT_URL in str(info.value) and "\n" not in str(info.value)
    torch.save({"model": {"sam_mask_decoder.x": torch.zeros(1)}}, tmp_path / "no_encoder.pt")
    with pytest.raises(WeightsUnavailableError, match="holds no tensors under 'image_encoder.'"):
        load(tmp_path / "no_encoder.pt")


@pytest.mark.parametrize("name", ["sam2_hiera_bplus", f"timm:{SAM2_BPLUS_FPN}"])
def test_pretrained_fails_fast_with_the_fix(name, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # must not depend on, or try, the network
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone(name, weights="pretrained")
    assert time.monotonic() - start < 1
    msg = str(info.value)
    assert "\n" not in msg and name in msg
    assert SAM2_BPLUS_CHECKPOINT_URL in msg and "--weights PATH" in msg and "neck" in msg and "trunk" in msg


def test_meta_forward_of_other_levels():
    """Neck levels after scalp: strides 4, 8, 16 (0 and 1 are lateral-only in the B+ config)."""
    entry = dataclasses.replace(get_backbone_entry("sam2_hiera_bplus"), name="sam2_levels", layers=(0, 1, 2))
    g = entry_geometry(entry)
    assert [(lg.name, lg.grid, lg.channels, lg.stride) for lg in g.layers] == [
        ("stage0", (256, 256), 256, 4), ("stage1", (128, 128), 256, 8), ("stage2", (64, 64), 256, 16)]
