"""Weights for a backbone: timm's hub (failing fast offline), a local file, or a checkpoint recipe.

Three sources, one error type. ``pretrained`` goes through timm's own hub loading, so the Hugging Face
cache and ``HF_HUB_OFFLINE`` behave as timm users expect; before timm is called we check the cache and the
network cheaply, so a machine without either fails in well under a second instead of retrying for ~15 s.
A local file is read here (safetensors or torch), passed through the checkpoint recipe if the entry has
one (MoCo v3, Phi-3.5-vision, SAM2), then through the ``checkpoint_filter_fn`` of the model's module
(timm's own for timm architectures; :mod:`extract.sam2_neck`'s for the SAM2 image encoder, which maps the
official ``image_encoder.trunk.*`` / ``image_encoder.neck.*`` names), and loaded with missing or unexpected
keys treated as an error: timm itself loads head-less models with ``strict=False`` and would silently keep
random weights for a wrong file.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import timm
import torch

from extract.backbone_registry import BackboneEntry, CheckpointRecipe
from runtime.errors import WeightsUnavailableError

__all__ = [
    "KEY_MAPS",
    "hf_clip_to_timm",
    "timm_to_hf_clip",
    "create_pretrained",
    "load_weights_file",
    "read_state_dict",
    "apply_recipe",
    "file_digest",
    "hf_cache_dir",
]

HUB_HOST = ("huggingface.co", 443)
_HUB_FILENAMES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


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

def _first_line(err: BaseException) -> str:
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
                    f"cannot read weights file {f}: {_first_line(err)}; replace it with a valid safetensors file "
                    "(or use --weights random)."
                ) from err
        else:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # pickle, zip or format errors all mean "not a usable checkpoint"
                why = (
                    "not a torch checkpoint, or it pickles objects other than tensors, which torch.load(weights_only=True) refuses"
                    if "weights only load failed" in str(err).lower() else _first_line(err)
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
            f"weights file {path} does not fit backbone {entry.name} ({entry.timm_name}): {_first_line(err)}; "
            "pass this backbone's checkpoint, or the backbone this file belongs to."
        ) from err
    bad = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if bad:
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        raise WeightsUnavailableError(
            f"weights file {path} does not fit backbone {entry.name} ({entry.timm_name}): {', '.join(bad[:4])}{more}; "
            "pass this backbone's checkpoint, or the backbone this file belongs to."
        )


# ---------------------------------------------------------------- the hub

def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline_requested() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return flag


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A TCP connect to the hub, DNS included, bounded by ``timeout`` seconds."""
    def connect() -> None:
        socket.create_connection(HUB_HOST, timeout=timeout).close()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout)
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def _cached_hub_file(pretrained_cfg: dict[str, Any], cache_dir: Path) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    names = [pretrained_cfg["hf_hub_filename"]] if pretrained_cfg.get("hf_hub_filename") else list(_HUB_FILENAMES)
    for name in names:
        hit = try_to_load_from_cache(repo, name, cache_dir=str(cache_dir), revision=revision or None)
        if isinstance(hit, str):
            return hit
    return None


def _cached_url_file(pretrained_cfg: dict[str, Any], cache_dir: Path) -> str | None:
    url = pretrained_cfg.get("url")
    if not url:
        return None
    for folder in (cache_dir, Path(torch.hub.get_dir()) / "checkpoints"):
        if (folder / os.path.basename(url)).is_file():
            return str(folder / os.path.basename(url))
    return None


def _unavailable(entry: BackboneEntry, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for backbone {entry.name} ({entry.timm_name}) are not available: {why}. "
        f"Use a cached copy (run once online, then set HF_HUB_OFFLINE=1), or pass --weights PATH "
        f"(a local safetensors or torch checkpoint), or --weights random."
    )


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, RuntimeError, ValueError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:
        pass
    for mod, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def create_pretrained(entry: BackboneEntry, hub_timeout: float = 2.0) -> torch.nn.Module:
    """``timm.create_model(..., pretrained=True)``, failing within seconds when the weights cannot come.

    Raises:
        WeightsUnavailableError: one line naming the backbone and the three ways out.
    """
    kwargs = entry.create_kwargs()
    pcfg = timm.models.get_pretrained_cfg(entry.timm_name)
    if pcfg is None:
        raise _unavailable(entry, "timm has no pretrained weights for this name")
    pcfg = pcfg.to_dict()
    cache_dir = hf_cache_dir()
    cached = _cached_hub_file(pcfg, cache_dir) or _cached_url_file(pcfg, cache_dir)
    if cached is None:
        if _offline_requested():
            raise _unavailable(entry, f"HF_HUB_OFFLINE is set and the hub cache {cache_dir} has no copy")
        if not _hub_reachable(hub_timeout):
            raise _unavailable(entry, f"{HUB_HOST[0]} cannot be reached and the hub cache {cache_dir} has no copy")
    elif not _offline_requested() and not _hub_reachable(hub_timeout):
        # cached but offline without HF_HUB_OFFLINE: read the cached file directly instead of letting
        # huggingface_hub retry its metadata request.
        kwargs["pretrained_cfg_overlay"] = {"file": cached}
    try:
        return timm.create_model(entry.timm_name, pretrained=True, cache_dir=str(cache_dir), **kwargs)
    except _download_errors() as err:
        raise _unavailable(entry, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
