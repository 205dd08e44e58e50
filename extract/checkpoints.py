"""Weights for a backbone from a local file, passed through a checkpoint recipe where the entry has one.

``pretrained`` weights come through timm's hub loading in :mod:`extract.hub`; both raise the same error type.
A local file is read here (safetensors or torch), passed through the checkpoint recipe if the entry has
one (MoCo v3, Phi-3.5-vision, SAM2), then through the ``checkpoint_filter_fn`` of the model's module
(timm's own for timm architectures; :mod:`extract.sam2_neck`'s for the SAM2 image encoder, which maps the
official ``image_encoder.trunk.*`` / ``image_encoder.neck.*`` names), and loaded with missing or unexpected
keys treated as an error: timm itself loads head-less models with ``strict=False`` and would silently keep
random weights for a wrong file.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from extract.backbone_registry import BackboneEntry, CheckpointRecipe
from runtime.errors import WeightsUnavailableError

__all__ = [
    "KEY_MAPS",
    "hf_clip_to_timm",
    "timm_to_hf_clip",
    "load_weights_file",
    "read_state_dict",
    "apply_recipe",
    "file_digest",
    "first_line",
]


# ---------------------------------------------------------------- key maps (HF CLIPVisionModel ↔ timm ViT)

def hf_clip_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``CLIPVisionModel`` state dict (``vision_model.`` prefix stripped) to timm ViT names.

    q/k/v projections are concatenated into timm's fused ``qkv``; the class embedding and position
    embedding gain timm's leading batch dimensions; ``position_ids`` buffers are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "pre_layrnorm.weight": "norm_pre.weight",
        "pre_layrnorm.bias": "norm_pre.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    block_parts = {
        "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif k.endswith("position_ids"):
            continue
        elif k.startswith("encoder.layers."):
            i, rest = k[len("encoder.layers."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)  # kind: weight | bias
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[part[len("self_attn.")]] = v  # "q", "k" or "v"
            elif part in block_parts:
                out[f"blocks.{i}.{block_parts[part]}.{kind}"] = v
            else:
                out[k] = v  # left unmapped: reported as unexpected by the loader
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsUnavailableError(f"checkpoint layer {i} has an incomplete q/k/v projection ({sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def timm_to_hf_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_clip_to_timm` (for tests and for writing converted checkpoints)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm_pre.weight": "pre_layrnorm.weight", "norm_pre.bias": "pre_layrnorm.bias",
        "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias",
    }
    block_parts = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif k == "cls_token":
            out["embeddings.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["embeddings.position_embedding.weight"] = v.squeeze(0)
        elif k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)
            if part == "attn.qkv":
                for name, chunk in zip("qkv", v.chunk(3, dim=0)):
                    out[f"encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = chunk.clone()
            else:
                out[f"encoder.layers.{i}.{block_parts[part]}.{kind}"] = v
        else:
            out[k] = v
    return out


KEY_MAPS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "hf_clip_to_timm": hf_clip_to_timm,
}


# ---------------------------------------------------------------- local files

def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can run to many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(err).__name__


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key])
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise WeightsUnavailableError(
        f"checkpoint holds a {type(obj).__name__}, not a state dict; pass a safetensors file or a torch file "
        "holding a dict of tensors (or --weights random)."
    )


def read_state_dict(path: str | Path, keep_prefix: str = "") -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors or torch file, or every ``*.safetensors`` shard in a folder.

    Only keys starting with ``keep_prefix`` are read (safetensors reads them lazily, so a vision encoder
    can be taken from a multi-gigabyte language-model shard); the prefix is kept in the returned names.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightsUnavailableError(
                f"weights folder {path} holds no *.safetensors files; pass the checkpoint file itself, or a folder "
                "of *.safetensors shards."
            )
    elif path.is_file():
        files = [path]
    else:
        raise WeightsUnavailableError(
            f"weights file {path} does not exist; check the path, or use --weights pretrained or --weights random."
        )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for k in fh.keys():
                        if k.startswith(keep_prefix):
                            sd[k] = fh.get_tensor(k)
            except Exception as err:  # SafetensorError: truncated or not a safetensors file at all
                raise WeightsUnavailableError(
                    f"cannot read weights file {f}: {first_line(err)}; replace it with a valid safetensors file "
                    "(or use --weights random)."
                ) from err
        else:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # pickle, zip or format errors all mean "not a usable checkpoint"
                why = (
                    "not a torch checkpoint, or it pickles objects other than tensors, which torch.load(weights_only=True) refuses"
                    if "weights only load failed" in str(err).lower() else first_line(err)
                )
                raise WeightsUnavailableError(
                    f"cannot read weights file {f}: {why}; re-save just the state dict (torch.save(model.state_dict(), "
                    "PATH)) or convert it to safetensors, or use --weights random."
                ) from err
            sd.update({k: v for k, v in _unwrap(obj).items() if k.startswith(keep_prefix)})
    return sd


def apply_recipe(sd: dict[str, torch.Tensor], recipe: CheckpointRecipe) -> dict[str, torch.Tensor]:
    """Strip the recipe's prefix, drop its heads and rename keys to timm's names."""
    n = len(recipe.keep_prefix)
    out = {k[n:]: v for k, v in sd.items() if k.startswith(recipe.keep_prefix)}
    out = {k: v for k, v in out.items() if not k.startswith(recipe.drop_prefixes)} if recipe.drop_prefixes else out
    if recipe.key_map:
        out = KEY_MAPS[recipe.key_map](out)
    return out


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of a weights file (or of a folder's safetensors shards)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    digests = [_digest(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    if len(digests) == 1:
        return digests[0][:16]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def load_weights_file(model: torch.nn.Module, entry: BackboneEntry, path: str | Path) -> None:
    """Load a local checkpoint into ``model`` (head removed), refusing any missing or unexpected key."""
    recipe = entry.checkpoint
    sd = read_state_dict(path, keep_prefix=recipe.keep_prefix if recipe else "")
    if not sd:
        raise WeightsUnavailableError(
            f"weights file {path} holds no tensors" + (f" under {recipe.keep_prefix!r}" if recipe and recipe.keep_prefix else "")
            + f" for backbone {entry.name}; pass this backbone's checkpoint (or --weights random)."
        )
    if recipe is not None:
        sd = apply_recipe(sd, recipe)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own conversions: OpenAI CLIP, DINOv2, pos-embed resampling, ...
        sd = filter_fn(sd, model)
    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        sd = {k: v for k, v in sd.items() if not k.startswith(name + ".")}
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsUnavailableError(
            f"weights file {path} does not fit backbone {entry.name} ({entry.timm_name}): {first_line(err)}; "
            "pass this backbone's checkpoint, or the backbone this file belongs to."
        ) from err
    bad = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if bad:
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        raise WeightsUnavailableError(
            f"weights file {path} does not fit backbone {entry.name} ({entry.timm_name}): {', '.join(bad[:4])}{more}; "
            "pass this backbone's checkpoint, or the backbone this file belongs to."
        )
