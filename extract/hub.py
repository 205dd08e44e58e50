"""Pretrained weights through timm's hub loading, failing within seconds when they cannot come.

timm downloads with huggingface_hub, so its configuration is what counts here: the endpoint
(``HF_ENDPOINT``, for a lab's mirror), ``HF_HUB_OFFLINE``, proxies from the environment (``HTTPS_PROXY``,
``NO_PROXY``) and the cache (``HF_HUB_CACHE`` / ``HF_HOME``). Before timm is called we look in the cache and
send one short request to the endpoint through huggingface_hub's own HTTP session, so a machine that can
reach neither fails in well under a second with one line naming the endpoint, instead of retrying for
~15 s; errors from the download itself become the same line.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import timm
import torch

from extract.backbone_registry import BackboneEntry
from extract.checkpoints import first_line
from runtime.errors import WeightsUnavailableError

__all__ = ["create_pretrained", "hf_cache_dir", "hub_endpoint"]

_HUB_FILENAMES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment now (not at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _offline_requested() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return flag


def hub_endpoint() -> tuple[str, str]:
    """The endpoint huggingface_hub downloads from (``HF_ENDPOINT`` as read at its import), and where it came from."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    from_env = os.environ.get("HF_ENDPOINT", "").rstrip("/") == endpoint
    return endpoint, "HF_ENDPOINT" if from_env else "the default endpoint"


def _weights_origin(pretrained_cfg: dict[str, Any]) -> tuple[str, str]:
    """Where timm fetches these weights from: the hub endpoint for a hub id, else the origin of the URL."""
    if pretrained_cfg.get("hf_hub_id"):
        return hub_endpoint()
    parts = urllib.parse.urlsplit(pretrained_cfg.get("url") or "")
    return f"{parts.scheme}://{parts.netloc}", "timm's URL for these weights"


def _proxy_variable(url: str) -> str | None:
    """The environment variable holding the proxy a request to ``url`` goes through, if any."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    for name in (f"{parts.scheme}_proxy", f"{parts.scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(name):
            return name
    return None


def _unreachable(url: str, timeout: float) -> str | None:
    """Why an HTTP request to ``url`` gets no answer within ``timeout`` seconds, or None if it gets one.

    The request goes through huggingface_hub's own HTTP session, so proxies from the environment apply
    as they do to its downloads; any HTTP status counts as an answer. The request runs in a daemon thread
    so that a stalled DNS look-up delays neither the error nor the interpreter's exit.
    """
    from huggingface_hub.utils import get_session

    outcome: list[Exception | None] = []

    def request() -> None:
        try:
            get_session().head(url, timeout=timeout, follow_redirects=False)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - a probe: any failure is the answer, reported not raised
            outcome.append(err)

    thread = threading.Thread(target=request, name="maxa-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return None if outcome[0] is None else first_line(outcome[0])


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


_WAYS_OUT = (
    "use a cached copy (run once online, then set HF_HUB_OFFLINE=1), or pass --weights PATH "
    "(a local safetensors or torch checkpoint), or --weights random."
)


def _unavailable(entry: BackboneEntry, why: str, fix: str = "") -> WeightsUnavailableError:
    ways = fix + _WAYS_OUT if fix else _WAYS_OUT[0].upper() + _WAYS_OUT[1:]
    return WeightsUnavailableError(
        f"pretrained weights for backbone {entry.name} ({entry.timm_name}) are not available: {why}. {ways}"
    )


def _route(url: str, label: str) -> str:
    """How ``url`` is reached, for a message: the setting that chose it, and the proxy variable if one applies."""
    proxy = _proxy_variable(url)
    return f"{label}, through the proxy in {proxy}" if proxy else label


def _network_fix(url: str, label: str) -> str:
    """The first way out when ``url`` cannot be reached: the setting that chose it, and the proxy if any."""
    proxy = _proxy_variable(url)
    scheme = urllib.parse.urlsplit(url).scheme.upper() or "HTTPS"
    via = f"check the proxy in {proxy}" if proxy else f"set {scheme}_PROXY if this network needs a proxy"
    what = {"HF_ENDPOINT": "Point HF_ENDPOINT at a reachable hub or mirror",
            "the default endpoint": "Set HF_ENDPOINT to your hub mirror if you have one"}.get(label, "Check the network")
    return f"{what} ({via}), "


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, RuntimeError, ValueError]
    try:
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
        )

        errors += [HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:
        pass
    for mod, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _download_failure(err: BaseException) -> str:
    """``Type: first line`` of the error, or of its cause where huggingface_hub wraps the real one."""
    err = err.__cause__ if err.__cause__ is not None else err
    return f"{type(err).__name__}: {first_line(err)}"


def create_pretrained(entry: BackboneEntry, hub_timeout: float = 2.0) -> torch.nn.Module:
    """``timm.create_model(..., pretrained=True)``, failing within seconds when the weights cannot come.

    The hub endpoint, offline flag and proxies are huggingface_hub's own (``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE``, ``HTTPS_PROXY``); the cache is the one it would use, read from the environment now.

    Raises:
        WeightsUnavailableError: one line naming the backbone, the endpoint where it matters, and the ways out.
    """
    kwargs = entry.create_kwargs()
    pcfg = timm.models.get_pretrained_cfg(entry.timm_name)
    if pcfg is None:
        raise _unavailable(entry, "timm has no pretrained weights for this name")
    pcfg = pcfg.to_dict()
    cache_dir = hf_cache_dir()
    cached = _cached_hub_file(pcfg, cache_dir) or _cached_url_file(pcfg, cache_dir)
    origin, label = _weights_origin(pcfg)
    offline = _offline_requested()
    if cached is None:
        if offline:
            raise _unavailable(entry, f"HF_HUB_OFFLINE is set and the hub cache {cache_dir} has no copy")
        why = _unreachable(origin, hub_timeout)
        if why is not None:
            raise _unavailable(entry, f"cannot reach {origin} ({_route(origin, label)}: {why}); the hub cache {cache_dir} has no copy",
                               _network_fix(origin, label))
    elif offline or _unreachable(origin, hub_timeout) is not None:
        # read the cached file directly: offline, huggingface_hub would return the same file (and it may
        # have read HF_HUB_OFFLINE before it was set); unreachable, it would retry its metadata request.
        kwargs["pretrained_cfg_overlay"] = {"file": cached}
    try:
        return timm.create_model(entry.timm_name, pretrained=True, cache_dir=str(cache_dir), **kwargs)
    except _download_errors() as err:
        fix = "Check that the mirror in HF_ENDPOINT holds these weights in the hub's layout, " \
            if label == "HF_ENDPOINT" else _network_fix(origin, label)
        raise _unavailable(entry, f"loading them from {origin} ({_route(origin, label)}) failed with "
                           f"{_download_failure(err)}", fix) from err
