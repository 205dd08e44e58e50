"""Choosing a torch device from a user's ``--device`` (shared by extraction, probing and benchmarks; torch only)."""

from __future__ import annotations

import torch

from runtime.errors import MaxaError

__all__ = ["resolve_device"]


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
