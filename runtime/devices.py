"""Choosing a torch device from a user's ``--device`` (shared by extraction, probing and benchmarks; torch only)."""

from __future__ import annotations

import platform

import torch

from runtime.errors import MaxaError

__all__ = ["device_name", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; refuse CUDA where there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MaxaError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MaxaError(f"device {device!r} requested but CUDA is not available here; use --device cpu.")
    return dev


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo where there is one): what a record says it
    was computed on (a probe's numbers can move with the hardware's arithmetic)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return str(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
