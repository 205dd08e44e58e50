"""NYU Depth v2 metric depth, from the labeled ``.mat`` file or from RGB-JPEG + 16-bit-PNG pairs.

Two layouts, detected from ``ROOT``:

* **labeled** — ``ROOT/nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5) and ``ROOT/splits.mat``
  (MATLAB v5 with 1-based ``trainNdxs``/``testNdxs``). HDF5 reverses MATLAB's axes: ``images[i]`` is
  ``(3, W, H)`` and ``depths[i]`` is ``(W, H)`` in metres. Image ids are ``nyu_{index:04d}`` (1-based).
* **pairs** — ``rgb_*.jpg`` files anywhere under ``ROOT`` with ``sync_depth_*.png`` beside them or in a
  sibling ``depth/`` folder (the BTS/Metric3D export; depth = value / 1000 m, 0 = invalid). A
  ``ROOT/{split}_annotations.json`` (Metric3D format) selects the split's pairs and their
  ``depth_scale``; a split without one is refused when another split has one (which pairs it holds is
  not known), and where there is no list at all every pair found belongs to every split. Image ids are the RGB paths
  relative to ``ROOT`` without suffix.

Splits are ``train`` and ``test``; ``val`` is an alias for ``test``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from extract.datasets.base import Annotation, DatasetReader, file_digest, files_digest, register_dataset
from extract.datasets.decode import header_size
from extract.datasets.segfolder import read_index_png
from runtime.errors import BadImageError, DatasetError

__all__ = ["NYUv2Dataset"]

_MAT = "nyu_depth_v2_labeled.mat"
_LAYOUT = (
    "expected ROOT/nyu_depth_v2_labeled.mat with ROOT/splits.mat, or ROOT/rgb/rgb_*.jpg with "
    "ROOT/depth/sync_depth_*.png"
)


@register_dataset
class NYUv2Dataset(DatasetReader):
    """NYU Depth v2: RGB images with ``depth`` in metres (float32, 0 = invalid).

    The HDF5 file is opened on first use in each process (DataLoader workers included) and never
    pickled, so the reader can be sent to worker processes.

    Fingerprint: labeled layout: the sha256 of ``splits.mat`` and the size in bytes of the labeled
    ``.mat`` (not its hash: it is 2.8 GB); pairs layout: the sha256 of every ``*_annotations.json``
    and the sorted relative names of every ``rgb_*.jpg`` and ``sync_depth_*.png``. Limit: a labeled
    ``.mat`` rewritten with other pixels but the same byte size, or pairs with the same names but
    other pixels, count as the same dataset.
    """

    name = "nyuv2"
    targets = frozenset({"depth"})
    splits = ("train", "test", "val")

    def __init__(self, root: str | Path | None, split: str, **options: Any) -> None:
        super().__init__(root, split, **options)
        if self.root is None or not self.root.is_dir():
            raise DatasetError(f"NYUv2 root {self.root} does not exist or is not a folder: pass --root with the NYUv2 folder; {_LAYOUT}.")
        self._h5: Any = None
        self._h5_pid: int | None = None
        self._indices: list[int] = []  # labeled layout: 0-based rows of the .mat
        self._pairs: list[tuple[str, str, float]] = []  # pairs layout: rgb, depth (relative), scale
        if (self.root / _MAT).is_file():
            self.layout = "labeled"
            self._init_labeled("test" if split == "val" else split)
            self.image_ids = [f"nyu_{i + 1:04d}" for i in self._indices]
        else:
            self.layout = "pairs"
            self._init_pairs("test" if split == "val" else split)
            self.image_ids = [str(Path(rgb).with_suffix("")) for rgb, _, _ in self._pairs]

    # -- labeled .mat ---------------------------------------------------------------------------

    def _init_labeled(self, split: str) -> None:
        import h5py
        import scipy.io

        splits_file = self.root / "splits.mat"
        if not splits_file.is_file():
            raise DatasetError(f"NYUv2 root {self.root} has {_MAT} but no splits.mat; {_LAYOUT}.")
        key = {"train": "trainNdxs", "test": "testNdxs"}[split]
        try:
            ndxs = scipy.io.loadmat(str(splits_file))[key]
        except (KeyError, ValueError, OSError) as err:
            raise DatasetError(f"NYUv2 splits file {splits_file} has no readable {key} ({err}).") from None
        # Validate the HDF5 file once; the handle used for reading is opened lazily per process.
        try:
            with h5py.File(self.root / _MAT, "r") as f:
                missing = [name for name in ("images", "depths") if name not in f]
                image_shape = f["images"].shape if not missing else (0, 3, 0, 0)
                depth_shape = f["depths"].shape if not missing else (0, 0, 0)
                count = image_shape[0]
        except OSError as err:
            raise DatasetError(f"NYUv2 file {self.root / _MAT} is not a readable HDF5 .mat ({err}).") from None
        if missing:
            raise DatasetError(f"NYUv2 file {self.root / _MAT} has no dataset {missing[0]!r}; {_LAYOUT}.")
        if tuple(image_shape[2:]) != tuple(depth_shape[1:]):
            raise DatasetError(
                f"NYUv2 file {self.root / _MAT}: images are {image_shape[3]}x{image_shape[2]} but depths are "
                f"{depth_shape[2]}x{depth_shape[1]} (height x width); they must be the same size: replace the file."
            )
        self._mat_size = (int(depth_shape[2]), int(depth_shape[1]))  # HDF5 stores (N, W, H)
        self._indices = [int(i) - 1 for i in np.asarray(ndxs).ravel()]
        if not self._indices or min(self._indices) < 0 or max(self._indices) >= count:
            raise DatasetError(f"NYUv2 {key} in {splits_file} is empty or out of range 1..{count}.")

    def _file(self) -> Any:
        # h5py handles must not cross fork(): reopen in each process.
        if self._h5 is None or self._h5_pid != os.getpid():
            import h5py

            self._h5 = h5py.File(self.root / _MAT, "r")
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        return state

    # -- rgb/depth pairs ------------------------------------------------------------------------

    def _init_pairs(self, split: str) -> None:
        listing = self.root / f"{split}_annotations.json"
        if listing.is_file():
            try:
                entries = json.loads(listing.read_text())["files"]
                resolve = self._resolve
                pairs = [
                    (resolve(e["rgb"], listing), resolve(e["depth"], listing), float(e.get("depth_scale", 1000)))
                    for e in entries
                ]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DatasetError(f"NYUv2 split file {listing} is not a Metric3D annotation list ({err}).") from None
        else:
            others = sorted(p.name for p in self.root.glob("*_annotations.json"))
            if others:  # the folder says which pairs are which split, but not this one: no guessing
                raise DatasetError(
                    f"NYUv2 root {self.root} lists its pairs by split ({', '.join(others)}) but has no {listing.name}: "
                    f"which pairs are {split} is not known. Add ROOT/{listing.name} (Metric3D format), or extract "
                    f"a split it lists (--split {others[0].removesuffix('_annotations.json')}).")
            pairs = []
            for rgb in sorted(self.root.rglob("rgb_*.jpg")):
                name = "sync_depth_" + rgb.stem[len("rgb_") :] + ".png"
                depth = rgb.with_name(name)
                if not depth.is_file():
                    depth = rgb.parent.parent / "depth" / name
                if not depth.is_file():
                    raise DatasetError(f"NYUv2 image {rgb} has no {name} beside it or in ../depth; {_LAYOUT}.")
                pairs.append((rgb.relative_to(self.root).as_posix(), depth.relative_to(self.root).as_posix(), 1000.0))
            if not pairs:
                raise DatasetError(f"NYUv2 root {self.root} has neither {_MAT} nor rgb_*.jpg files; {_LAYOUT}.")
        self._pairs = pairs

    def _resolve(self, listed: str, listing: Path) -> str:
        # Metric3D lists paths relative to its repository root ("data/nyu_demo/rgb/..."): use the
        # longest suffix of the listed path that exists under ROOT.
        parts = Path(listed).parts
        for start in range(len(parts)):
            candidate = Path(*parts[start:])
            if (self.root / candidate).is_file():
                return candidate.as_posix()
        raise DatasetError(f"NYUv2 split file {listing} lists {listed}, which is not under {self.root}.")

    # -- reading --------------------------------------------------------------------------------

    def image_path(self, index: int) -> Path | None:
        return self.root / self._pairs[index][0] if self.layout == "pairs" else None

    def annotation_path(self, index: int) -> Path:
        return self.root / self._pairs[index][1] if self.layout == "pairs" else self.root / _MAT

    def annotation_size(self, index: int) -> tuple[int, int]:
        if self.layout == "pairs":
            return header_size(self.root / self._pairs[index][1])
        return self._mat_size

    def fingerprint(self) -> dict[str, Any]:
        if self.layout == "labeled":
            return {"layout": "labeled", "splits_sha256": file_digest(self.root / "splits.mat"),
                    "mat_bytes": (self.root / _MAT).stat().st_size}
        lists = {p.name: file_digest(p) for p in sorted(self.root.glob("*_annotations.json"))}
        files = sorted(p.relative_to(self.root).as_posix()
                       for pattern in ("rgb_*.jpg", "sync_depth_*.png") for p in self.root.rglob(pattern))
        return {"layout": "pairs", "split_lists": lists, "files": files_digest(self.root, files), "num_files": len(files)}

    def read_image(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        """Decode image ``index`` as RGB (see :meth:`DatasetReader.read_image`)."""
        if self.layout == "pairs":
            return super().read_image(index, draft_size)
        pixels = np.asarray(self._file()["images"][self._indices[index]])
        return Image.fromarray(np.ascontiguousarray(pixels.transpose(2, 1, 0)).astype(np.uint8), mode="RGB")

    def read_annotation(self, index: int) -> Annotation:
        """Depth of image ``index`` in metres (float32, 0 = invalid) at its original size."""
        if self.layout == "pairs":
            _, depth_file, scale = self._pairs[index]
            raw = read_index_png(self.root / depth_file)
            if raw.dtype == np.uint8:
                raise BadImageError(str(self.root / depth_file), "depth PNG is 8-bit, expected 16-bit millimetres")
            depth = raw.astype(np.float32) / np.float32(scale)
        else:
            depth = np.asarray(self._file()["depths"][self._indices[index]], dtype=np.float32).T
            depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
        depth = np.ascontiguousarray(depth)
        return Annotation(size=(int(depth.shape[0]), int(depth.shape[1])), depth=depth)
