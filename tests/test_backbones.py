"""Backbone registry and loading: tiny timm models at random init, offline, no pretrained downloads."""

from __future__ import annotations

import csv
import io
import time

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from extract.backbone_registry import CheckpointRecipe
from extract.backbones import (
    BackboneEntry,
    backbone_table,
    get_backbone_entry,
    list_backbones,
    load_backbone,
)
from extract.checkpoints import hf_clip_to_timm, timm_to_hf_clip
from probe.variants import reference_csv
from runtime.errors import UnknownNameError, WeightsUnavailableError

def _paper_rows() -> dict[str, dict[str, str]]:
    """The paper's Table 2 as shipped in the package (``probe/paper/``)."""
    text = reference_csv().read_text(encoding="utf-8")
    return {r["backbone"]: r for r in csv.DictReader(io.StringIO(text))}


def test_table_lists_every_entry_without_weights():
    rows = {r["name"]: r for r in backbone_table(include_test=True)}
    assert set(rows) == set(list_backbones())
    for r in rows.values():
        assert r["num_params"] > 0 and r["layers"]
        for layer in r["layers"]:
            h, w = r["grid"][layer]
            assert h > 0 and w > 0 and r["channels"][layer] > 0
    assert rows["convnext_l_320_2layers"]["grid"] == {"stage2": [20, 20], "stage3": [10, 10]}
    assert rows["dinov2_b14"]["grid"] == {"last": [37, 37]}


def test_registry_matches_paper_sizes_or_says_why():
    paper = _paper_rows()
    covered = set()
    for name in list_backbones(include_test=False):
        e = get_backbone_entry(name)
        assert e.paper_row in paper, f"{name}: paper row {e.paper_row!r} not in the paper's table"
        covered.add(e.paper_row)
        row = paper[e.paper_row]
        assert (e.paper_image_size, e.paper_feature_size) == (int(row["image_size"]), int(row["feature_size"]))
        table = next(r for r in backbone_table() if r["name"] == name)
        size = table["input_size"]
        finest = max(g[0] for g in table["grid"].values())
        if (size, finest) != (e.paper_image_size, e.paper_feature_size):
            assert e.note, f"{name}: {size}/{finest} differs from the paper's {e.paper_image_size}/{e.paper_feature_size} without a note"
    assert covered == set(paper), f"paper rows without an entry: {set(paper) - covered}"


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownNameError) as info:
        get_backbone_entry("siglip384")
    msg = str(info.value)
    assert "siglip_384" in msg and "timm:NAME" in msg
    with pytest.raises(UnknownNameError):
        get_backbone_entry("timm:no_such_model_xyz")


def test_vit_forward_matches_timm_and_is_deterministic():
    b = load_backbone("test_vit", weights="random")
    assert b.weights_id == "random:seed0" and not b.model.training
    assert all(not p.requires_grad for p in b.model.parameters())
    h, w = b.model.patch_embed.grid_size
    x = torch.randn(2, 3, *b.input_size)
    feats = b.forward(x)
    assert list(feats) == ["last"] and feats["last"].shape == (2, h, w, 64)
    with torch.no_grad():
        tokens = b.model.forward_features(x)
    assert tokens.shape[1] - b.model.num_prefix_tokens == h * w
    ref = tokens[:, b.model.num_prefix_tokens:].reshape(2, h, w, -1)
    torch.testing.assert_close(feats["last"], ref)
    again = load_backbone("timm:test_vit", weights="random")
    torch.testing.assert_close(again.forward(x)["last"], feats["last"], rtol=0, atol=0)
    assert b.mean == tuple(timm.data.resolve_model_data_config(b.model)["mean"])
    with pytest.raises(ValueError):
        b.forward(torch.randn(1, 3, 64, 64))


def test_convnext_nchw_becomes_nhwc_with_two_stages():
    b = load_backbone("timm:test_convnext", weights="random", layers=(2, 3))
    assert b.layer_names == ("stage2", "stage3")
    x = torch.randn(2, 3, *b.input_size)
    feats = b.forward(x)
    assert feats["stage2"].shape == (2, 10, 10, 48) and feats["stage3"].shape == (2, 5, 5, 64)
    assert b.grids == {"stage2": (10, 10), "stage3": (5, 5)} and b.stride("stage3") == 32
    with torch.no_grad():
        ref = b.model.forward_features(x)  # NCHW
    torch.testing.assert_close(feats["stage3"], ref.permute(0, 2, 3, 1))
    last = load_backbone("test_convnext", weights="random")
    torch.testing.assert_close(last.forward(x)["last"], feats["stage3"])


def test_token_centres_on_a_10x10_grid():
    b = load_backbone("test_vit", weights="random")  # 160 px, patch 16 -> 10 x 10
    c = b.token_centres("last")
    assert c.shape == (10, 10, 2)
    np.testing.assert_allclose(c[:, 0, 0], (np.arange(10) + 0.5) / 10, rtol=1e-6)
    np.testing.assert_allclose(c[0, :, 1], (np.arange(10) + 0.5) / 10, rtol=1e-6)
    assert c[3, 7].tolist() == pytest.approx([0.35, 0.75])
    d = b.describe()
    assert d["grids"] == {"last": [10, 10]} and d["strides"] == {"last": 16} and d["weights_id"] == "random:seed0"


def test_pretrained_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("timm:test_vit", weights="pretrained")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "timm:test_vit" in msg and "--weights random" in msg and "--weights PATH" in msg and "\n" not in msg


def test_pretrained_from_hf_cache_offline(tmp_path, monkeypatch):
    """A pre-filled hub cache with HF_HUB_OFFLINE=1 loads through timm as usual."""
    ref = load_backbone("test_vit", weights="random")
    sd = {k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}
    sd.update(ref.model.state_dict())  # same trunk, plus a 1000-class head as the hub file has
    snap = tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    safetensors.torch.save_file(sd, str(snap / "model.safetensors"))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    b = load_backbone("timm:test_vit", weights="pretrained")
    assert b.weights_id == "pretrained:test_vit.r160_in1k"
    x = torch.randn(1, 3, *b.input_size)
    torch.testing.assert_close(b.forward(x)["last"], ref.forward(x)["last"])


def test_weights_from_safetensors_and_torch_files(tmp_path):
    torch.manual_seed(123)
    src = timm.create_model("test_vit", num_classes=0)  # other weights than the seed-0 random ones
    safetensors.torch.save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        ref = src.forward_features(x)[:, 1:].reshape(1, 10, 10, -1)
    a = load_backbone("test_vit", weights=tmp_path / "w.safetensors")
    b = load_backbone("test_vit", weights=str(tmp_path / "w.pth"))
    torch.testing.assert_close(a.forward(x)["last"], ref)
    torch.testing.assert_close(b.forward(x)["last"], ref)
    assert a.weights_id.startswith("file:") and len(a.weights_id) == len("file:") + 16
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone("test_vit", weights=tmp_path / "missing.safetensors")
    safetensors.torch.save_file({"foo": torch.zeros(3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        load_backbone("test_vit", weights=tmp_path / "wrong.safetensors")


def test_moco_style_recipe(tmp_path):
    entry = BackboneEntry(
        name="moco_tiny", timm_name="test_vit",
        checkpoint=CheckpointRecipe(source="https://example.invalid/moco.pth.tar",
                                    keep_prefix="module.base_encoder.", drop_prefixes=("head.",),
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    )
    torch.manual_seed(7)
    src = timm.create_model("test_vit", num_classes=0)
    ckpt = {f"module.base_encoder.{k}": v for k, v in src.state_dict().items()}
    ckpt["module.base_encoder.head.0.weight"] = torch.randn(32, 64)  # MoCo's projection MLP
    ckpt.update({f"module.momentum_encoder.{k}": v + 1 for k, v in src.state_dict().items()})
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": ckpt}, tmp_path / "moco.pth.tar")
    b = load_backbone(entry, weights=tmp_path / "moco.pth.tar")
    assert b.mean == (0.485, 0.456, 0.406)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v)
    with pytest.raises(WeightsUnavailableError, match="example.invalid"):
        load_backbone(entry, weights="pretrained")


def test_hf_clip_remap_round_trip(tmp_path):
    src = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=0,
                            depth=2, embed_dim=64, num_heads=2, img_size=64)
    sd = src.state_dict()
    hf = timm_to_hf_clip(sd)
    assert "encoder.layers.1.self_attn.k_proj.weight" in hf and "pre_layrnorm.weight" in hf
    assert hf["embeddings.class_embedding"].shape == (64,)
    back = hf_clip_to_timm(hf)
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)
    # through the recipe mechanism, as a Phi-3.5-vision shard would hold it
    prefix = "model.vision_embed_tokens.img_processor.vision_model."
    shard = {prefix + k: v.contiguous() for k, v in hf.items()}
    shard["model.embed_tokens.weight"] = torch.zeros(4, 4)  # language-model weights are ignored
    safetensors.torch.save_file(shard, str(tmp_path / "model-00001-of-00002.safetensors"))
    entry = BackboneEntry(
        name="phi_tiny", timm_name="vit_base_patch16_clip_quickgelu_224",
        model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64},
        checkpoint=CheckpointRecipe(source="hf", keep_prefix=prefix, key_map="hf_clip_to_timm"),
    )
    b = load_backbone(entry, weights=tmp_path)  # a snapshot folder of shards
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src.forward_features(x)[:, 1:].reshape(1, 4, 4, -1)
    torch.testing.assert_close(b.forward(x)["last"], ref)
