"""Errors that reach the user as one line: what went wrong and how to fix it.

Every package raises :class:`MaxaError` (or a subclass) for bad input; the command line prints
``str(err)`` and exits non-zero without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

__all__ = [
    "MaxaError",
    "UnknownNameError",
    "DatasetError",
    "BadImageError",
    "WeightsUnavailableError",
    "StoreError",
    "StoreMismatchError",
    "StoreBusyError",
]


class MaxaError(Exception):
    """Bad input or environment: the message names the problem and the fix."""

    exit_code = 2


class UnknownNameError(MaxaError, KeyError):
    """An unknown registry name (backbone, dataset, task, variant)."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class DatasetError(MaxaError):
    """A dataset root is missing or not in the expected layout."""


class BadImageError(DatasetError):
    """An image file is corrupt, truncated or unreadable. ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot decode image {self.path}: {reason}. Replace the file, or pass --skip-bad to record it in the store and go on."
        )

    def __reduce__(self):  # survive pickling across DataLoader worker processes
        return (type(self), (self.path, self.reason))


class WeightsUnavailableError(MaxaError):
    """Pretrained weights cannot be loaded (offline, no cache, bad file)."""


class StoreError(MaxaError):
    """A store path is missing, incomplete, corrupt or holds something else."""


class StoreMismatchError(StoreError):
    """A feature store and a target store do not index the same images."""


class StoreBusyError(StoreError):
    """Another live writer holds the store's lease and the wait for it ran out. ``holder`` describes it."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder

    def __reduce__(self):
        return (type(self), (str(self), self.holder))
