"""Every ``MAXA_*`` environment variable maxa reads, and the only code that reads them.

Each switch is a small function that reads the environment when called, not at import, so a
variable set by a test, a parent process or a dask worker's ``env`` takes effect without a
re-import. A value that is not understood raises a one-line :class:`~runtime.errors.MaxaError`
(:class:`~runtime.errors.StoreError` for the lease timings). The table of switches, their
defaults and where each matters is ``docs/settings.md``.

Code that sets a variable for a child process (the local dask cluster) takes its name from the
``*_VAR`` constants here.
"""

from __future__ import annotations

import os

from runtime.errors import MaxaError, StoreError

__all__ = [
    "CPU_KERNELS_VAR",
    "DEBUG_VAR",
    "LEASE_POLL_S_VAR",
    "LEASE_STALE_S_VAR",
    "LEASE_WAIT_S_VAR",
    "PROGRESS_S_VAR",
    "STORE_ROOT_VAR",
    "WORKER_BACKBONES_VAR",
    "WORKER_THREADS_VAR",
    "DEFAULT_LEASE_POLL_S",
    "DEFAULT_LEASE_STALE_S",
    "DEFAULT_PROGRESS_S",
    "DEFAULT_STORE_ROOT",
    "DEFAULT_WORKER_BACKBONES",
    "cpu_kernels",
    "debug",
    "lease_poll_s",
    "lease_stale_s",
    "lease_wait_s",
    "progress_s",
    "store_root",
    "worker_backbones",
    "worker_threads",
]

STORE_ROOT_VAR = "MAXA_STORE_ROOT"
DEBUG_VAR = "MAXA_DEBUG"
CPU_KERNELS_VAR = "MAXA_CPU_KERNELS"
WORKER_BACKBONES_VAR = "MAXA_WORKER_BACKBONES"
WORKER_THREADS_VAR = "MAXA_WORKER_THREADS"
LEASE_WAIT_S_VAR = "MAXA_LEASE_WAIT_S"
LEASE_STALE_S_VAR = "MAXA_LEASE_STALE_S"
LEASE_POLL_S_VAR = "MAXA_LEASE_POLL_S"
PROGRESS_S_VAR = "MAXA_PROGRESS_S"

DEFAULT_STORE_ROOT = "maxa-stores"
DEFAULT_WORKER_BACKBONES = 1
DEFAULT_LEASE_STALE_S = 300.0
DEFAULT_LEASE_POLL_S = 2.0
DEFAULT_PROGRESS_S = 30.0


def _get(name: str) -> str | None:
    """The variable's value, ``None`` when it is unset or empty."""
    value = os.environ.get(name)
    return None if value in (None, "") else value


def _seconds(name: str, default: float | None) -> float | None:
    value = _get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise StoreError(f"${name}={value!r} is not a number of seconds.") from None


def _count(name: str, default: int | None) -> int | None:
    value = _get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise MaxaError(f"${name}={value!r} is not a whole number.") from None


def store_root() -> str:
    """``$MAXA_STORE_ROOT``: where stores and results live when ``--store-root`` is not given (a
    folder or ``s3://bucket/prefix``; default ``maxa-stores``)."""
    return os.environ.get(STORE_ROOT_VAR, DEFAULT_STORE_ROOT)


def debug() -> bool:
    """``$MAXA_DEBUG``: any non-empty value makes the command line show the traceback instead of
    its one-line error."""
    return bool(os.environ.get(DEBUG_VAR))


def cpu_kernels() -> bool:
    """``$MAXA_CPU_KERNELS``: ``0`` keeps the adapter on PyTorch's kernels instead of building and
    using the C++ CPU kernels (``probe.fused``); anything else leaves them on (the default)."""
    return os.environ.get(CPU_KERNELS_VAR, "1") != "0"


def worker_backbones() -> int:
    """``$MAXA_WORKER_BACKBONES``: backbones a sweep's worker process keeps loaded (default 1; big
    ones: keep one, since a sweep submits shards backbone by backbone)."""
    return int(_count(WORKER_BACKBONES_VAR, DEFAULT_WORKER_BACKBONES))


def worker_threads() -> int | None:
    """``$MAXA_WORKER_THREADS``: torch threads in a sweep's worker process (``None``: torch's own
    choice). The local cluster sets it to share the CPU cores out between its workers."""
    return _count(WORKER_THREADS_VAR, None)


def lease_wait_s() -> float | None:
    """``$MAXA_LEASE_WAIT_S``: seconds to wait for another live writer of the same store before
    giving up (``None``, the default: as long as that writer is alive)."""
    return _seconds(LEASE_WAIT_S_VAR, None)


def lease_stale_s() -> float:
    """``$MAXA_LEASE_STALE_S``: seconds without a heartbeat after which a writer's lease is stale and
    may be taken over (default 300)."""
    return float(_seconds(LEASE_STALE_S_VAR, DEFAULT_LEASE_STALE_S))


def lease_poll_s() -> float:
    """``$MAXA_LEASE_POLL_S``: seconds between looks at a store another writer holds (default 2)."""
    return float(_seconds(LEASE_POLL_S_VAR, DEFAULT_LEASE_POLL_S))


def progress_s() -> float:
    """``$MAXA_PROGRESS_S``: seconds between progress lines when stderr is not a terminal (default 30)."""
    return float(_seconds(PROGRESS_S_VAR, DEFAULT_PROGRESS_S))
