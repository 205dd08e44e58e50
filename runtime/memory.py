"""How much memory a job may use where it runs: the host's limit (a container's or SLURM job's
cgroup, not only the machine's RAM) and a GPU's free memory. No torch import at module level.

A batch job on a shared node sees the whole machine in ``sysconf`` while its cgroup allows a
fraction of it; sizing buffers from ``sysconf`` there gets the job killed by the OOM killer. The
limit is the smallest of: physical memory, every cgroup v2 ``memory.max`` from this process's
group up to the root, the cgroup v1 ``memory.limit_in_bytes``, and SLURM's ``--mem`` /
``--mem-per-cpu`` (``SLURM_MEM_PER_NODE``, ``SLURM_MEM_PER_CPU`` × CPUs) where set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MemoryLimit", "host_memory_limit", "device_free_bytes", "format_bytes"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryLimit:
    """``bytes`` this process may use in all, and ``source``: where that figure comes from."""

    bytes: int
    source: str


def _physical() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _read_limit(path: Path) -> int | None:
    """A cgroup limit file's value, ``None`` when unlimited or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < 2**60 else None  # v1 writes "no limit" as a huge number


def _cgroup_limits(root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> list[MemoryLimit]:
    """The memory limits of this process's cgroups (v2: its group and every parent; v1: the memory
    controller's group)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        rel = group.strip("/")
        if controllers == "":  # cgroup v2, unified hierarchy
            here = root / rel if rel else root
            while True:
                value = _read_limit(here / "memory.max")
                if value is not None:
                    found.append(MemoryLimit(value, f"cgroup memory.max ({here})"))
                if here == root or root not in here.parents:
                    break
                here = here.parent
        elif "memory" in controllers.split(","):  # cgroup v1
            for base in (root / "memory" / rel, root / "memory"):
                value = _read_limit(base / "memory.limit_in_bytes")
                if value is not None:
                    found.append(MemoryLimit(value, f"cgroup memory.limit_in_bytes ({base})"))
                    break
    return found


def _slurm_limits(env: Any = os.environ) -> list[MemoryLimit]:
    mib = 2**20
    out = []
    try:
        if env.get("SLURM_MEM_PER_NODE"):
            out.append(MemoryLimit(int(env["SLURM_MEM_PER_NODE"]) * mib, "SLURM_MEM_PER_NODE"))
        if env.get("SLURM_MEM_PER_CPU"):
            cpus = int(env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or 1)
            out.append(MemoryLimit(int(env["SLURM_MEM_PER_CPU"]) * mib * cpus, "SLURM_MEM_PER_CPU x CPUs"))
    except ValueError:
        pass
    return out


def host_memory_limit() -> MemoryLimit:
    """The smallest limit on this process's memory (see the module's docstring)."""
    physical = _physical()
    limits = [MemoryLimit(physical, "physical memory")] if physical else []
    limits += _cgroup_limits() + _slurm_limits()
    if not limits:
        return MemoryLimit(8 * 2**30, "an assumed 8 GiB (this system reports no memory size)")
    return min(limits, key=lambda m: m.bytes)


def device_free_bytes(device: Any) -> int | None:
    """Free memory on a CUDA device (``torch.cuda.mem_get_info``), ``None`` for the CPU."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
