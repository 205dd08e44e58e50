"""Decode and resize images for a backbone, inside DataLoader workers.

Every image is resized whole to the backbone's native input size (``squash``: no crop, aspect
ratio not kept), so the token grid covers exactly the field of view of the targets, which are
resized the same way. Normalisation uses the backbone's own mean and std.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from extract.datasets.base import DatasetReader
from runtime.errors import BadImageError

__all__ = ["BackboneImages", "PIL_FILTERS", "collate_images", "default_decode_workers"]

#: Most DataLoader decode workers a task starts unless told: beyond a few, the forward pass or the
#: writes bound the rate, and each worker is a process holding its own copy of the reader.
MAX_DECODE_WORKERS = 4


def default_decode_workers(processes: int = 1, *, at_least: int = 0) -> int:
    """DataLoader decode workers for one of ``processes`` tasks sharing this machine's cores.

    A task's share of the cores less one for its own main thread, at most :data:`MAX_DECODE_WORKERS`
    and at least ``at_least``. An extraction alone on the machine takes ``processes=1``; a sweep's
    dask worker takes ``processes=2`` (it shares the cores with other dask workers, so takes half).
    """
    return max(at_least, min(MAX_DECODE_WORKERS, (os.cpu_count() or 2) // processes - 1))

PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class BackboneImages(Dataset):
    """Item ``k`` is image ``indices[k]`` of ``reader`` as a normalised ``(3, H, W)`` float tensor.

    With ``normalize=False`` the item is the resized ``(3, H, W)`` uint8 image instead, and
    :meth:`normalize` turns a batch of them into exactly (bitwise) the same float32 values: the
    extraction runner does that on the main thread / device, so DataLoader workers do less work
    and send 4x fewer bytes between processes.

    A bad image does not raise inside the worker (exceptions lose their type crossing processes):
    the item carries the file and reason, and the caller decides (raise, or ``--skip-bad``). An
    image whose size is not its annotation's (``ImageSizeError``) is not a bad image but a wrong
    dataset: it raises, so extraction stops with one line even under ``--skip-bad``.

    Args:
        reader: the dataset reader.
        input_size: ``(H, W)`` backbone input.
        mean, std: per-channel normalisation (0–1 pixel scale).
        interpolation: PIL filter name.
        normalize: return normalised float32 pixels (default) or uint8 pixels.
    """

    def __init__(
        self,
        reader: DatasetReader,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        normalize: bool = True,
    ) -> None:
        self.reader = reader
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.inv_std = 1.0 / (np.asarray(std, dtype=np.float32).reshape(3, 1, 1) * 255.0)
        self.filter = PIL_FILTERS.get(interpolation, Image.Resampling.BICUBIC)
        self.normalize_in_worker = bool(normalize)
        self._device_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        h, w = self.input_size
        try:
            # draft lets libjpeg decode at a reduced scale no smaller than the target size
            image = self.reader.read_image(index, draft_size=(w, h))
        except BadImageError as err:  # ImageSizeError is a DatasetError, not a BadImageError: it stops
            dtype = torch.float32 if self.normalize_in_worker else torch.uint8
            return {"index": index, "pixels": torch.zeros(3, h, w, dtype=dtype), "bad": f"{err.path}\t{err.reason}"}
        if image.size != (w, h):
            image = image.resize((w, h), self.filter)
        if not self.normalize_in_worker:
            return {"index": index, "pixels": torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))),
                    "bad": ""}
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        pixels = torch.from_numpy((array - self.mean) * self.inv_std)
        return {"index": index, "pixels": pixels, "bad": ""}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise a ``(B, 3, H, W)`` uint8 batch (on any device) to float32.

        The same float32 operations as the worker path (subtract ``mean·255``, then multiply by
        ``1/(std·255)``, each rounded once), so the values are bitwise those of ``normalize=True``.
        """
        if pixels.dtype != torch.uint8:
            return pixels  # already normalised in the workers
        consts = self._device_constants.get(pixels.device)
        if consts is None:
            consts = (torch.from_numpy(self.mean).to(pixels.device), torch.from_numpy(self.inv_std).to(pixels.device))
            self._device_constants[pixels.device] = consts
        mean, inv_std = consts
        return pixels.to(torch.float32).sub_(mean).mul_(inv_std)


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "pixels": torch.stack([it["pixels"] for it in items]),
        "bad": [it["bad"] for it in items],
    }
