"""The GPU check: one script for a lent accelerator (run by hand; CI has no GPU).

Everything here runs offline on the built-in ``shapes`` data with random weights, since a device
machine reaches no network and may not have ``../shared``:

1. **correctness** — the adapter's output and every gradient (σ included) on the device (PyTorch's
   SDPA with the Gaussian mask) against the CPU path (fused kernels + the custom σ backward);
2. **extraction** — ``run_extract`` images/s for random ViT-B/16 at 224 (a VOC-sized split of
   1,464 images plus a val split) and for SigLIP-384, each with the bare forward's images/s at the
   same batch size (``pipelines.bench.speed_benchmark``, as ``maxa bench speed``) for the ratio;
3. **probe epoch** — ``train_probe`` on the VOC-sized ViT-B/16 store (semseg and boundaries):
   seconds per epoch, trained and evaluated on the device.

    python benchmarks/gpu_check.py --out "$OUT/gpu_check.json"                 # on the device
    python benchmarks/gpu_check.py --device cpu --images 24 --val-images 8 --epochs 1 --siglip-images 0
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def check_adapter(device: str) -> dict:
    """Forward + backward of a ViT-B/16-sized adapter on ``device`` against the CPU."""
    from probe.adapter import AdapterConfig, MaxaAdapter

    torch.manual_seed(0)
    cfg = AdapterConfig(in_channels=(768,), grids=((14, 14),), out_channels=21)
    ref = MaxaAdapter(cfg)
    with torch.no_grad():  # distinct σ per head, so a head mix-up would show
        ref.log_sigma.copy_(torch.linspace(-3.0, -1.0, 8))
    ys, xs = torch.meshgrid((torch.arange(14) + 0.5) / 14, (torch.arange(14) + 0.5) / 14, indexing="ij")
    pos = [torch.stack([ys, xs], -1).reshape(-1, 2)]
    feats = [torch.randn(4, 196, 768)]
    target = torch.randint(0, 21, (4, 224, 224))
    out = {}
    for name, dev in (("cpu", "cpu"), ("device", device)):
        m = MaxaAdapter(cfg).to(dev)
        m.load_state_dict(ref.state_dict())
        logits = m([f.to(dev) for f in feats], [p.to(dev) for p in pos], (224, 224))
        loss = torch.nn.functional.cross_entropy(logits, target.to(dev))
        loss.backward()
        out[name] = (logits.detach().cpu(), {k: p.grad.detach().cpu() for k, p in m.named_parameters()})
    (a, ga), (b, gb) = out["cpu"], out["device"]
    rel = {k: float((ga[k] - gb[k]).norm() / ga[k].norm().clamp_min(1e-12)) for k in ga}
    worst = max(rel, key=rel.get)
    return {"max_abs_logit_diff": float((a - b).abs().max()), "sigma_grad_rel_diff": rel["log_sigma"],
            "worst_grad": worst, "worst_grad_rel_diff": rel[worst],
            "ok": bool((a - b).abs().max() < 1e-3 and rel[worst] < 1e-3)}


def extract(backbone: str, split: str, n: int, root: str, device: str, batch: int) -> dict:
    from extract.jobs import run_extract

    job = run_extract(backbone=backbone, dataset="shapes", split=split, store_root=root, weights="random",
                      device=device, batch_size=batch, dataset_options={"num_images": n}, show_progress=False)
    return {"path": job.features.path, "images": n, "images_per_s": job.features.images_per_second,
            "seconds": job.features.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=1464, help="training images (VOC 2012 train: 1,464)")
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--siglip-images", type=int, default=512, help="0 skips SigLIP-384")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="extraction batch")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "gpu_check.json"))
    args = p.parse_args()
    report: dict = {"device": args.device, "torch": torch.__version__, "host": platform.node()}
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: CUDA is not available here; pass --device cpu for a dry run.")
        report["gpu"] = torch.cuda.get_device_name(0)

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2), flush=True)

    report["adapter_check"] = check_adapter(args.device)
    save()
    root = tempfile.mkdtemp(prefix="maxa-gpu-check-")
    train = extract("random_b16", "train", args.images, root, args.device, args.batch_size)
    val = extract("random_b16", "val", args.val_images, root, args.device, args.batch_size)
    report["extract_vit_b16"] = {"train": train, "val": val}
    if args.siglip_images:
        report["extract_siglip_384"] = extract("siglip_384", "train", args.siglip_images, root, args.device,
                                               args.batch_size)
    # the bare forward at the same batch size, as `maxa bench speed` times it, for the pipeline/bare ratio
    from pipelines.bench import speed_benchmark

    rows = speed_benchmark(["siglip_384" if args.siglip_images else "random_b16"], reference="random_b16",
                           batches=5, batch_size=args.batch_size, device=args.device, weights="random")
    bare = {row["backbone"]: row["images_per_second"] for row in rows}
    train["bare_forward_images_per_s"] = bare["random_b16"]
    if args.siglip_images:
        report["extract_siglip_384"]["bare_forward_images_per_s"] = bare["siglip_384"]
    save()

    from probe.train import ProbeConfig, train_probe

    report["probe"] = {}
    for task in ("semseg", "boundaries"):
        r = train_probe(train["path"], ProbeConfig(task=task, max_epochs=args.epochs, patience=args.epochs),
                        eval_features=val["path"], device=args.device, show_progress=False)
        report["probe"][task] = {"epoch_s": r.record["timings"]["epoch_s"], "train_images": args.images,
                                 "epochs": r.record["epochs"], "metrics": r.metrics}
        save()


if __name__ == "__main__":
    main()
