"""Batches of stored features and targets for training and evaluation (no images, no backbone).

A :class:`ProbeData` pairs a feature store with its aligned target store. When the arrays a task
needs fit in memory (:func:`plan_in_memory`: within the host's memory limit, cgroup-aware, or on
a GPU within its free memory) they are read once into tensors, and a batch is a single gather: on
the CPU the array read is the tensor; on a GPU the features (through one reused pinned buffer) and
the targets go over a block of images at a time, never a host copy of the whole set. Otherwise batches are read from the stores by a background
thread a few batches ahead, so the device never waits on a per-item loop.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from runtime.memory import device_free_bytes, format_bytes, host_memory_limit
from store.checks import check_aligned
from store.reader import FeatureStore, TargetStore

__all__ = ["ProbeData", "estimate_bytes", "load_to_device", "memory_budget_bytes", "plan_in_memory",
           "targets_to_device"]


#: Of the host's memory limit, the part the probe's in-memory data may take.
HOST_FRACTION = 0.4
#: Of a GPU's free memory, the part the probe's in-memory data may take (the rest: the adapter).
DEVICE_FRACTION = 0.5
#: Host bytes of the buffer through which in-memory features go to a GPU, a block of images at a time.
LOAD_BLOCK_BYTES = 256 << 20


def memory_budget_bytes(fraction: float = HOST_FRACTION) -> int:
    """A fraction of the memory this process may use (its cgroup's or SLURM job's limit, if lower
    than the machine's)."""
    return int(host_memory_limit().bytes * fraction)


def plan_in_memory(estimates: Sequence[int], device: torch.device | str = "cpu",
                   names: Sequence[str] | None = None) -> tuple[list[bool], str]:
    """Which of several data sets (in order of priority) to hold in memory, and a line saying why.

    They are taken in order while their sum fits the budget: 40 % of the host's memory limit
    (:func:`runtime.memory.host_memory_limit`: the cgroup or SLURM limit where there is one) or, on a
    GPU, half of the device's free memory: the tensors live there, and reach it a block of images at a
    time (:func:`load_to_device`, :func:`targets_to_device`), so the host holds one block, not the set.
    """
    free = device_free_bytes(torch.device(device))
    if free is not None:
        budget = int(free * DEVICE_FRACTION)
        why = f"{DEVICE_FRACTION:.0%} of {format_bytes(free)} free on {device}"
    else:
        limit = host_memory_limit()
        budget = int(limit.bytes * HOST_FRACTION)
        why = f"{HOST_FRACTION:.0%} of {format_bytes(limit.bytes)} ({limit.source})"
    names = list(names) if names is not None else [f"set {k + 1}" for k in range(len(estimates))]
    keep, used = [], 0
    for need in estimates:
        keep.append(used + need <= budget)
        used += need if keep[-1] else 0
    parts = [f"{n} {format_bytes(e)} {'in memory' if k else 'streamed'}" for n, e, k in zip(names, estimates, keep)]
    return keep, f"{', '.join(parts)} (budget {format_bytes(budget)}: {why})"


def estimate_bytes(features: FeatureStore, targets: TargetStore, needs: Sequence[str], count: int) -> int:
    """Bytes of ``count`` images' features (float16) and needed targets held in memory."""
    per_image = sum(l.grid[0] * l.grid[1] * l.channels * 2 for l in features.spec.layers)
    h, w = targets.spec.size
    per_image += sum(1 for n in needs if n in targets.array_names) * h * w * 4
    return per_image * count


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor that batches for ``device`` are read into, pinned for a CUDA device (the
    copy then goes straight from it, not through the driver's own staging buffer)."""
    pin = device.type == "cuda" and torch.cuda.is_available()
    return torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=pin)


def load_to_device(features: FeatureStore, indices: np.ndarray, layer: str, device: torch.device,
                   block_bytes: int = LOAD_BLOCK_BYTES) -> torch.Tensor:
    """Features of images ``indices`` of ``layer`` as one ``(n, h·w, C)`` tensor on ``device``,
    read a block of images at a time into one reused host buffer (pinned for CUDA) and copied over:
    the host holds one block, not the whole set (which would be fresh memory, touched page by
    page, before a byte reached the device)."""
    shape = features.layer_shape(layer)
    dtype = _torch_dtype(features.layer_dtype(layer))
    n, per_image = len(indices), int(np.prod(shape)) * dtype.itemsize
    step = max(1, min(n, block_bytes // per_image))
    dest = torch.empty((n, shape[0] * shape[1], shape[2]), dtype=dtype, device=device)
    host = _host_buffer((step, *shape), features.layer_dtype(layer), device)
    buf = host.numpy()
    for start in range(0, n, step):
        count = min(step, n - start)
        features.read_batch(indices[start:start + count], layer, out=buf[:count])
        dest[start:start + count].copy_(host[:count].view(count, -1, shape[2]))  # waits: the buffer is refilled next
    return dest


def targets_to_device(targets: TargetStore, name: str, indices: np.ndarray, device: torch.device,
                      block_bytes: int = LOAD_BLOCK_BYTES) -> torch.Tensor:
    """Targets ``name`` of images ``indices`` as one tensor on ``device``, read a block of images at
    a time and copied over (as :func:`load_to_device`): the host never holds the whole set."""
    n = len(indices)
    first = _to_tensor(targets.read(name, indices[:1]))
    dest = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=device)
    if n == 0:
        return dest
    dest[:1].copy_(first)
    step = max(1, min(n, block_bytes // max(1, first.element_size() * first[0].numel())))
    for start in range(1, n, step):
        got = _to_tensor(targets.read(name, indices[start:start + step]))
        dest[start:start + len(got)].copy_(got)
    return dest


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np.uint16:  # torch's uint16 support is thin; ids fit in int32
        a = a.astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(a))


def _float_batch(size: int, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 ``(size, h·w, C)`` batch of features of one image shape ``(h, w, C)``."""
    return torch.empty((size, int(np.prod(shape[:-1])), shape[-1]), dtype=torch.float32)


#: Elements per copy in :func:`_serial_copy`: torch copies fewer than its grain size (32,768) on the
#: calling thread alone.
_SERIAL_COPY = 32768


def _serial_copy(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (both contiguous, same shape) on the calling thread alone.

    A bigger copy is shared among torch's threads; from the prefetch thread that parallel region
    competes with the training's own and stalls whenever one of its threads waits for a core (on 2
    busy cores a streamed epoch ran 2-3x slower so). Copied in slices below torch's grain size
    instead, the conversion runs on the prefetch thread only, with no global thread setting changed.
    """
    d, s = dst.view(-1), src.reshape(-1)
    for i in range(0, d.numel(), _SERIAL_COPY):
        d[i:i + _SERIAL_COPY].copy_(s[i:i + _SERIAL_COPY])
    return dst


class _Converter:
    """``put(k, values)`` for :meth:`FeatureStore.read_batch_each`: one image's ``(h, w, C)``
    float16 values into row ``k`` of a float32 ``(B, h·w, C)`` batch given as its flat rows
    (:func:`_flat_rows`, made once per buffer), on the calling thread (``copy``: the compiled F16C
    copy, :func:`probe.fused.half_to_float`; ``None``: torch's). Safe to call from several
    threads at once for different ``k`` (the reader's worker threads, on a compressed store)."""

    def __init__(self, rows: Sequence[torch.Tensor], copy: Callable[[torch.Tensor, torch.Tensor], None] | None) -> None:
        self.rows = rows
        self._views: dict[int, tuple[np.ndarray, torch.Tensor]] = {}  # per buffer the reader hands on
        self._copy = copy

    def __call__(self, k: int, values: np.ndarray) -> None:
        view = self._views.get(id(values))
        if view is None or view[0] is not values:  # the reader hands on one buffer per thread: view it once
            view = self._views[id(values)] = (values, torch.from_numpy(values).view(-1))
        src = view[1]
        if self._copy is not None and src.dtype == torch.float16:
            self._copy(self.rows[k], src)
        else:
            _serial_copy(self.rows[k], src)


def _flat_rows(batch: torch.Tensor) -> list[torch.Tensor]:
    """Each image's row of a ``(B, N, C)`` batch as a flat view (a view costs a few µs to make:
    a reused buffer makes its views once)."""
    return [row.view(-1) for row in batch.unbind(0)]


class ProbeData:
    """Features and targets of images ``indices`` of an aligned (feature, target) store pair.

    Args:
        features: the feature store.
        targets: the target store (same images, same order: checked).
        needs: target arrays to read (a task's ``needs`` minus derived fields).
        indices: which images (default: all).
        device: where batches go.
        in_memory: force (True) or forbid (False) the in-memory path; default: if it fits.
        prefetch: batches read ahead on the streaming path.
    """

    def __init__(
        self,
        features: FeatureStore,
        targets: TargetStore,
        needs: Sequence[str],
        *,
        indices: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        in_memory: bool | None = None,
        prefetch: int = 4,
    ) -> None:
        check_aligned(features, targets)
        self.features, self.targets = features, targets
        self.needs = [n for n in needs if n in targets.array_names]
        self.indices = np.arange(len(features)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.layers = features.spec.layer_names
        self.token_pos = [
            torch.from_numpy(features.token_centres(l).reshape(-1, 2)).to(self.device) for l in self.layers
        ]
        if in_memory is None:
            in_memory = plan_in_memory([self.nbytes_estimate()], self.device)[0][0]
        self.in_memory = in_memory
        self._feat: list[torch.Tensor] = []
        self._tgt: dict[str, torch.Tensor] = {}
        if self.in_memory:
            self._load()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def in_channels(self) -> tuple[int, ...]:
        return tuple(self.features.spec.layer(l).channels for l in self.layers)

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.features.spec.layer(l).grid for l in self.layers)

    def nbytes_estimate(self) -> int:
        return estimate_bytes(self.features, self.targets, self.needs, len(self.indices))

    def _load(self) -> None:
        idx = self.indices
        contiguous = len(idx) == len(self.features) and np.array_equal(idx, np.arange(len(idx)))
        for l in self.layers:
            if self.device.type != "cpu":
                self._feat.append(load_to_device(self.features, idx, l, self.device))
                continue
            a = self.features.read_all(l) if contiguous else self.features.read_batch(idx, l)
            self._feat.append(torch.from_numpy(a.reshape(a.shape[0], -1, a.shape[-1])))
        for name in self.needs:
            if self.device.type != "cpu":
                self._tgt[name] = targets_to_device(self.targets, name, idx, self.device)
                continue
            a = self.targets.read_all(name) if contiguous else self.targets.read(name, idx)
            self._tgt[name] = _to_tensor(a)

    def _read(self, positions: np.ndarray) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """A batch by position in ``self.indices``, from memory (the in-memory path)."""
        pos = torch.from_numpy(positions).to(self.device)
        feats = [f.index_select(0, pos).float() for f in self._feat]
        tgts = {k: v.index_select(0, pos) for k, v in self._tgt.items()}
        return feats, tgts

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
        reuse_buffers: bool = False,
    ) -> Iterator[tuple[np.ndarray, list[torch.Tensor], dict[str, torch.Tensor]]]:
        """Yield ``(store_indices, features per layer (B, N, C), targets (B, ...))``.

        ``reuse_buffers``: on the streamed path on a CPU, the float32 features of a batch live in
        one of a few buffers used in turn (fresh memory for every batch costs about as much as
        reading it), so a batch's feature tensors hold their values only until the next batch is
        asked for: for a loop that is done with each batch in its step (training, scoring).
        """
        n = len(self.indices)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if self.in_memory:
            for pos in chunks:
                yield (self.indices[pos], *self._read(pos))
            return
        yield from self._prefetched(chunks, batch_size, reuse_buffers)

    def _prefetched(self, chunks: list[np.ndarray], batch_size: int, reuse: bool = False) -> Iterator[Any]:
        """Batches read from the stores by a background thread, ``prefetch`` batches ahead.

        On a CPU the thread converts each image's float16 features into the float32 batch as soon
        as they are read, while still in the CPU's cache (:meth:`FeatureStore.read_batch_each`): on
        this thread alone for uncompressed values, on the reader's worker threads beside the
        decoding for zstd-compressed ones (:func:`_serial_copy`, or the compiled copy); with ``reuse`` the batches are a ring of
        ``prefetch + 2`` buffers per layer (fresh memory for every batch costs about as much as
        reading it; the queue holds at most ``prefetch`` batches and the thread fills one more, so
        the batch the consumer holds is not written until it asks for the next one). On a GPU the
        thread reads each batch's float16 into one reused buffer per layer and moves it, and the
        device converts it (half the bytes cross the bus).
        """
        depth = max(1, self.prefetch)
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()
        shapes = [self.features.layer_shape(l) for l in self.layers]
        on_cpu = self.device.type == "cpu"
        scratch = [] if on_cpu else [_host_buffer((batch_size, *shape), self.features.layer_dtype(l), self.device).numpy()
                                     for l, shape in zip(self.layers, shapes)]
        ring = [[_float_batch(batch_size, shape) for shape in shapes] for _ in range(depth + 2)] if reuse and on_cpu else []
        ring_rows = [[_flat_rows(b) for b in bufs] for bufs in ring]
        if on_cpu:
            from probe import fused

            copy = fused.half_to_float()  # looked up once per pass, not per batch

        def features(k: int, idx: np.ndarray) -> list[torch.Tensor]:
            feats = []
            for j, l in enumerate(self.layers):
                if not on_cpu:
                    got = torch.from_numpy(self.features.read_batch(idx, l, out=scratch[j][: len(idx)]))
                    feats.append(got.flatten(1, -2).to(self.device).float())
                    continue
                if ring:
                    out, rows = ring[k % len(ring)][j][: len(idx)], ring_rows[k % len(ring)][j]
                else:
                    out = _float_batch(len(idx), shapes[j])
                    rows = _flat_rows(out)
                self.features.read_batch_each(idx, _Converter(rows, copy), l)
                feats.append(out)
            return feats

        def work() -> None:
            try:
                for k, pos in enumerate(chunks):
                    if stop.is_set():
                        return
                    idx = self.indices[pos]
                    tgts = {name: _to_tensor(self.targets.read(name, idx)).to(self.device) for name in self.needs}
                    q.put((idx, features(k, idx), tgts))
                q.put(None)
            except BaseException as e:  # hand errors to the consumer
                q.put(e)

        t = threading.Thread(target=work, name="maxa-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(timeout=0.05)

    def numpy_batches(self, names: Sequence[str], batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
        """Target arrays only, as NumPy (for the trivial baselines); from memory when loaded."""
        for i in range(0, len(self.indices), batch_size):
            if self.in_memory:
                yield {n: self._tgt[n][i : i + batch_size].cpu().numpy() for n in names if n in self._tgt}
                continue
            idx = self.indices[i : i + batch_size]
            yield {n: self.targets.read(n, idx) for n in names if n in self.targets.array_names}
