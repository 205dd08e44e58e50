"""Provenance recorded in every store and result: tool and library versions, host, date, command."""

from __future__ import annotations

import platform
import shlex
import socket
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

__all__ = ["provenance", "tool_version"]


def tool_version() -> str:
    try:
        return metadata.version("maxa-probe")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(**extra: Any) -> dict[str, Any]:
    """Versions, host, date and command line, plus ``extra`` (e.g. the device)."""
    return {
        "tool": "maxa",
        "tool_version": tool_version(),
        "torch": _version("torch"),
        "timm": _version("timm"),
        "zarr": _version("zarr"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        **extra,
    }
