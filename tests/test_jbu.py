"""The image-guided joint bilateral upsampling head (``--head jbu``): the operator, the probe, refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probe.adapter import AdapterConfig, count_parameters
from probe.heads import JbuHead, build_head, head_inputs
from probe.jbu import JbuStage
from probe.train import ProbeConfig, train_probe
from runtime.errors import MaxaError

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import extract_shapes, make_synthetic_root  # noqa: E402


def _config(out: int = 3, channels=(8,), grids=((4, 5),)) -> AdapterConfig:
    return AdapterConfig(in_channels=tuple(channels), grids=tuple(grids), out_channels=out)


def _inputs(cfg: AdapterConfig, b: int = 2, size=(32, 40), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(b, h * w, c, generator=g) for c, (h, w) in zip(cfg.in_channels, cfg.grids)]
    pos = [torch.rand(h * w, 2, generator=g) for h, w in cfg.grids]
    image = torch.randint(0, 256, (b, *size, 3), generator=g, dtype=torch.uint8)
    return feats, pos, image


def test_shapes_stages_and_parameters():
    cfg = _config(out=3, channels=(8, 6), grids=((4, 5), (2, 3)))
    head = build_head("jbu", cfg, out_size=(32, 40))
    assert isinstance(head, JbuHead) and head.num_stages == 3  # 5 → 40 is 8×: three doublings
    assert head.stage_sizes((32, 40)) == [(8, 10), (16, 20), (32, 40)]
    feats, pos, image = _inputs(cfg)
    out = head(feats, pos, (32, 40), image=image)
    assert out.shape == (2, 3, 32, 40) and torch.isfinite(out).all()
    # classifier (8 + 6 weights per output channel, one bias) + per stage 3·16+16 + 16·16+16 + 2
    assert count_parameters(head) == (8 + 6) * 3 + 3 + 3 * (3 * 16 + 16 + 16 * 16 + 16 + 2)
    assert head_inputs(head, {"input_image": image}) == {"image": image}
    # another output size renders with the same parameters (the image resized to it)
    assert head(feats, pos, (48, 60), image=image).shape == (2, 3, 48, 60)


def test_gradients_reach_every_parameter():
    cfg = _config()
    head = JbuHead(cfg, out_size=(32, 40))
    feats, pos, image = _inputs(cfg)
    head(feats, pos, (32, 40), image=image).square().mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_kernel_is_normalised_and_edge_aware():
    """A projection that gives the two sides of an edge opposite keys: a pixel beside the edge puts
    (almost) no weight across it, the same pixel in a flat image does."""
    stage = JbuStage(radius=2, key_dim=1)
    with torch.no_grad():
        first, second = stage.range_proj[0], stage.range_proj[2]
        first.weight.zero_()
        first.weight[0, 0] = 1.0
        first.bias.zero_()
        second.weight.fill_(1.0)
        second.bias.fill_(-float(F.gelu(torch.tensor(-1.0)) + F.gelu(torch.tensor(1.0))) / 2)  # keys ±0.5
        stage.range_temp.fill_(3.0)
    image = torch.full((1, 3, 12, 12), -1.0)
    image[:, 0, :, 6:] = 1.0  # a vertical edge between columns 5 and 6
    k = stage.kernel(image)
    assert k.shape == (1, 25, 12, 12) and torch.allclose(k.sum(1), torch.ones(1, 12, 12), atol=1e-5)
    flat = stage.kernel(torch.full((1, 3, 12, 12), -1.0))
    across = [p for p, (dy, dx) in enumerate(stage.offsets) if dx > 0]
    assert flat[0, across, 6, 5].sum() > 0.2 and k[0, across, 6, 5].sum() < 0.01 * flat[0, across, 6, 5].sum()


def _gaussian_smooth(x: torch.Tensor, radius: int, sigma: float) -> torch.Tensor:
    """Reference: normalised Gaussian window (offsets in units of the radius), edges replicated."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float32) / radius
    w = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    w = (w / w.sum()).expand(x.shape[1], 1, -1, -1)
    return F.conv2d(F.pad(x, [radius] * 4, mode="replicate"), w, groups=x.shape[1])


def test_constant_image_is_smoothed_bilinear_upsampling():
    """With a constant image the range kernel is flat: each stage is a bilinear resize followed by a
    normalised Gaussian smoothing; with a narrow σ, plain bilinear upsampling."""
    cfg = _config(out=2)
    head = JbuHead(cfg, out_size=(32, 40))
    feats, pos, _ = _inputs(cfg)
    image = torch.full((2, 32, 40, 3), 117, dtype=torch.uint8)
    with torch.no_grad():
        for k, stage in enumerate(head.stages):
            stage.sigma_spatial.fill_(0.4 + 0.3 * k)
            stage.range_temp.fill_(1.5)
        out = head(feats, pos, (32, 40), image=image)
        ref = head.probe[0](feats[0].transpose(1, 2).reshape(2, 8, 4, 5))
        for stage, size in zip(head.stages, head.stage_sizes((32, 40))):
            ref = _gaussian_smooth(F.interpolate(ref, size=size, mode="bilinear", align_corners=False), 3,
                                   float(stage.sigma_spatial))
        ref = ref + head.bias.view(1, -1, 1, 1)
        assert torch.allclose(out, ref, atol=1e-5)
        for stage in head.stages:
            stage.sigma_spatial.fill_(0.05)
        sharp = head(feats, pos, (32, 40), image=image)
        bilinear = head.probe[0](feats[0].transpose(1, 2).reshape(2, 8, 4, 5))
        for size in head.stage_sizes((32, 40)):
            bilinear = F.interpolate(bilinear, size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(sharp, bilinear, atol=1e-5)
        # and the smoothing did something: the two differ
        assert (out - sharp).abs().max() > 1e-3


def test_probe_before_upsampling_equals_probe_after():
    """The head classifies on the token grid and upsamples D_out channels: the same function as
    upsampling the C feature channels, then the 1×1 linear probe at the output resolution."""
    cfg = _config(out=3, channels=(8,), grids=((4, 5),))
    head = JbuHead(cfg, out_size=(32, 40))
    feats, pos, image = _inputs(cfg, seed=3)
    with torch.no_grad():
        head.bias.normal_()
        for stage in head.stages:
            stage.range_temp.fill_(1.0)
        out = head(feats, pos, (32, 40), image=image)
        up = head.upsample(feats[0].transpose(1, 2).reshape(2, 8, 4, 5), head.guidance(image, (32, 40)))
        after = F.conv2d(up, head.probe[0].weight) + head.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, after, atol=1e-4)


def test_forward_without_image_is_refused():
    cfg = _config()
    feats, pos, _ = _inputs(cfg)
    with pytest.raises(MaxaError, match="guided by the input image"):
        JbuHead(cfg, out_size=(32, 40))(feats, pos, (32, 40))


@pytest.fixture(scope="module")
def shapes_stores(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("jbu-stores")
    jobs = extract_shapes(root, {"train": 16, "val": 6}, target_size=(64, 64))
    return {"root": str(root), **{split: job.features.path for split, job in jobs.items()}}


def test_cli_probe_head_jbu_end_to_end(shapes_stores):
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "probe", "--store", shapes_stores["train"], "--task", "boundaries",
         "--head", "jbu", "--max-epochs", "1", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    from store.results import read_results

    rows = [r for r in read_results(shapes_stores["root"]) if r["head"] == "jbu"]
    assert len(rows) == 1 and rows[0]["task"] == "boundaries" and np.isfinite(rows[0]["metrics"]["ce"])
    # test_vit: 64 channels on a 10×10 grid, 64² output: three stages of 338 parameters, 64 weights, 1 bias
    assert rows[0]["p_learn"] == 64 + 1 + 3 * 338
    from probe.predict import load_adapter

    model, meta = load_adapter(rows[0]["run_dir"])
    assert isinstance(model, JbuHead) and count_parameters(model) == rows[0]["p_learn"]
    # predict gives the head the image of the target store beside the eval features, one image or all
    from probe.pairing import find_targets
    from probe.predict import predict, predict_arrays
    from probe.predict_store import predict_store
    from store import open_features

    ev = open_features(shapes_stores["val"])
    one, _ = predict(rows[0]["run_dir"], ev.path, 2, (64, 64))
    image = find_targets(ev).read("input_image", [2])
    layers = ev.spec.layer_names
    direct = predict_arrays(model, [ev.read(2, l) for l in layers], [ev.token_centres(l) for l in layers], (64, 64),
                            image=image)[0]
    assert one.shape == (1, 64, 64) and np.allclose(one, direct)
    other = predict_arrays(model, [ev.read(2, l) for l in layers], [ev.token_centres(l) for l in layers], (64, 64),
                           image=255 - image)[0]
    assert not np.allclose(one, other)  # the image guides the output
    with pytest.raises(MaxaError, match="guided by the input image"):
        predict_arrays(model, [ev.read(2, l) for l in layers], [ev.token_centres(l) for l in layers], (64, 64))
    res = predict_store(rows[0]["run_dir"], ev.path, shapes_stores["root"] + "/preds.zarr", size=(64, 64),
                        show_progress=False)
    from store.predictions import open_predictions

    assert res.images_written == len(ev)
    assert np.allclose(open_predictions(res.path).read([2])[0], 1 / (1 + np.exp(-one[0])), atol=1e-6)


def test_store_without_images_is_refused_in_one_line(tmp_path):
    stores = make_synthetic_root(tmp_path, n_train=8, n_val=4)  # target stores as built before images
    with pytest.raises(MaxaError, match="holds none .* run `maxa extract`"):
        train_probe(stores["train"], ProbeConfig(task="semseg", head="jbu", max_epochs=1), device="cpu",
                    show_progress=False, write=False)
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "probe", "--store", stores["train"], "--task", "semseg",
         "--head", "jbu", "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() + out.stdout.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "--head jbu" in lines[0] and "maxa extract" in lines[0], lines
    # every other head still trains on it
    r = train_probe(stores["train"], ProbeConfig(task="semseg", head="linear", max_epochs=1), device="cpu",
                    show_progress=False, write=False)
    assert np.isfinite(r.metrics["miou"])


@pytest.mark.parametrize("radius, channels, grads", [(3, 1, "all"), (2, 5, "all"), (1, 2, "params-only")])
def test_hand_written_backward_equals_autograd(radius, channels, grads):
    """The filter's hand-written backward (one buffer per input, added into in place) gives what
    autograd through every window offset gives (float64), for the output and every gradient."""
    torch.manual_seed(radius)
    stage = JbuStage(radius=radius, key_dim=4).double()
    with torch.no_grad():
        stage.range_temp.fill_(0.4)
        stage.sigma_spatial.fill_(0.7)
    x = torch.randn(2, channels, 9, 8, dtype=torch.float64, requires_grad=grads == "all")
    g = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=grads == "all")
    fast, ref = stage(x, g), stage.reference(x, g)
    assert torch.allclose(fast, ref, atol=1e-12)
    w = torch.randn_like(fast)
    inputs = ([x, g] if grads == "all" else []) + list(stage.parameters())
    for a, b in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        assert torch.allclose(a, b, atol=1e-10)
