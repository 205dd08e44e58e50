"""The extraction settings as one frozen value, with their defaults defined here once.

Kept free of torch so that the command line can show the defaults without loading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["DEFAULT_BATCH_SIZE", "ExtractConfig"]

#: Images per forward pass unless asked otherwise.
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """How one extraction runs: what it extracts, and how the work is done and stored.

    Where a store goes, how its files are reached, whether a bar is drawn, and which shards a
    coordinated worker writes are per call, not here (see ``extract.runner.extract_features``).

    Attributes:
        weights: ``"pretrained"``, ``"random"`` or a checkpoint path (used when the backbone is
            given by name).
        layers: layer indices (``None``: the backbone entry's layers; used when given by name).
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        limit: only the first ``limit`` images.
        num_workers: DataLoader decode workers (``None``: up to 4, fewer on small machines).
        shard_size: images per shard (``None``: ~256 MB of features).
        compression: one of ``store.COMPRESSIONS``.
        skip_bad: record undecodable images (zeros, flagged ``bad``) instead of stopping.
        wait_timeout: seconds to wait for another live writer of the same store (``None``: while
            its lease is live).
    """

    weights: str = "pretrained"
    layers: tuple[int, ...] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    limit: int | None = None
    num_workers: int | None = None
    shard_size: int | None = None
    compression: str = "none"
    skip_bad: bool = False
    wait_timeout: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractConfig":
        """The config from the keys of ``d`` that name a field (others, e.g. ``target_size``, are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
