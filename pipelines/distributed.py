"""The tasks a sweep runs on dask workers, and the cluster they run on.

Tasks carry only names, paths and small tuples; model weights never enter the task graph. Each
worker process loads a backbone once and keeps it (:func:`worker_backbone`, keyed by backbone,
weights, layers and device) for every shard of that backbone it is given; readers are cached the
same way. A feature store is written shard by shard: the sweep's coordinator creates the store and
holds its lease (``extract.runner.open_feature_store``), workers write whole shards with
``extract_features(..., coordinated=True)`` — which never claims the lease, so they never wait on
their coordinator — and the coordinator finalizes. Every task is idempotent: a shard already
flagged done is not written again, and a probe whose result is already recorded returns that
record, so dask may re-run a task whose worker died.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
from collections import OrderedDict
from typing import Any

from runtime import settings

__all__ = [
    "extract_shards_task",
    "build_targets_task",
    "probe_task",
    "worker_backbone",
    "start_local_cluster",
    "default_workers",
]

_LOCK = threading.Lock()
_BACKBONES: "OrderedDict[tuple[Any, ...], Any]" = OrderedDict()
_READERS: "OrderedDict[Any, Any]" = OrderedDict()
_SETUP_DONE = False


def _setup_process() -> None:
    """Once per worker process: torch threads as the cluster asked (``MAXA_WORKER_THREADS``)."""
    global _SETUP_DONE
    if _SETUP_DONE:
        return
    _SETUP_DONE = True
    threads = settings.worker_threads()
    if threads:
        import torch

        torch.set_num_threads(max(1, threads))


def _worker_index() -> int | None:
    try:
        from distributed import get_worker

        name = get_worker().name
    except Exception:  # noqa: BLE001 - not inside a dask worker
        return None
    try:
        return int(str(name).rsplit("-", 1)[-1])
    except ValueError:
        return None


def worker_device(device: str) -> str:
    """``auto``/``cuda`` inside a dask worker: one GPU per worker (worker i → ``cuda:i % n``)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        idx = _worker_index()
        if idx is not None and torch.cuda.device_count() > 1:
            return f"cuda:{idx % torch.cuda.device_count()}"
        return "cuda"
    return "cpu" if device == "auto" else device


def worker_backbone(name: str, weights: str, layers: tuple[int, ...] | None, device: str) -> Any:
    """The backbone, loaded once per worker process and kept for the next task of the same backbone."""
    from extract.backbones import load_backbone

    key = (name, weights, tuple(layers) if layers else None, device)
    with _LOCK:
        if key in _BACKBONES:
            _BACKBONES.move_to_end(key)
            return _BACKBONES[key]
        while len(_BACKBONES) >= max(1, settings.worker_backbones()):
            _BACKBONES.popitem(last=False)
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        model = load_backbone(name, weights=weights, device=device, layers=layers)
        _BACKBONES[key] = model
        return model


def _reader(ref: Any) -> Any:
    from pipelines.sweep_plan import make_reader

    with _LOCK:
        if ref in _READERS:
            _READERS.move_to_end(ref)
            return _READERS[ref]
        reader = make_reader(ref)
        _READERS[ref] = reader
        while len(_READERS) > 8:
            _READERS.popitem(last=False)
        return reader


def _decode_workers(requested: int | None) -> int:
    """DataLoader workers: none inside a daemonic process (it cannot have children)."""
    if multiprocessing.current_process().daemon:
        return 0
    from extract.images import default_decode_workers

    return requested if requested is not None else default_decode_workers(processes=2)


def extract_shards_task(backbone: str, weights: str, layers: tuple[int, ...] | None, ref: Any, store_root: Any,
                        shards: tuple[int, ...], settings: tuple[tuple[str, Any], ...],
                        ) -> tuple[tuple[int, ...], int, tuple[str, ...], int]:
    """Write ``shards`` of the coordinated feature store; returns ``(shards, images, bad images, clipped)``."""
    from extract.runner import ExtractConfig, extract_features

    _setup_process()
    s = dict(settings)
    device = worker_device(s.get("device", "auto"))
    model = worker_backbone(backbone, weights, layers, device)
    config = ExtractConfig.from_dict({**s, "weights": weights, "layers": layers, "device": device, "limit": ref.limit,
                                      "num_workers": _decode_workers(s.get("num_workers"))})
    result = extract_features(model, _reader(ref), store_root, config, show_progress=False, shards=list(shards),
                              coordinated=True)
    return tuple(shards), int(result.images_written), tuple(result.bad_images), int(result.clipped_values)


def build_targets_task(ref: Any, store_root: Any, size: tuple[int, int],
                       settings: tuple[tuple[str, Any], ...]) -> tuple[str, bool, int]:
    """Build (or find) a split's target store; returns ``(path, reused, images written)``.
    ``store_root`` (like every path these tasks take) may be a store Location: it carries its
    storage options to the worker."""
    from extract.target_store import build_target_store

    _setup_process()
    s = dict(settings)
    result = build_target_store(_reader(ref), store_root, size=tuple(size), limit=ref.limit,
                                num_workers=_decode_workers(s.get("num_workers")), show_progress=False,
                                skip_bad=bool(s.get("skip_bad", False)))
    return result.path, bool(result.reused), int(result.images_written)


def probe_task(train: Any, eval_: Any, train_targets: Any, eval_targets: Any, config: dict[str, Any],
               identity: tuple[Any, ...], results_root: Any, device: str = "auto") -> dict[str, Any]:
    """Train and evaluate one probe; returns its (small) result record.

    If the results table already holds a run with this ``identity`` (a worker that died after
    recording it), that record is returned instead of training again: every result exists once.
    """
    from pipelines.sweep_jobs import recorded_run_identity
    from probe.train import ProbeConfig, train_probe
    from store.results import read_results

    _setup_process()
    for r in read_results(results_root):
        if recorded_run_identity(r) == tuple(identity):
            return {**r, "_reused": True}
    result = train_probe(train, ProbeConfig.from_dict(config), eval_features=eval_, targets=train_targets,
                         eval_targets=eval_targets, results_root=results_root, device=worker_device(device),
                         show_progress=False)
    return result.record


# -- clusters -------------------------------------------------------------------------------------
def default_workers() -> int:
    """One worker per GPU, else a few CPU workers (half the cores, 1 to 4).

    A count of dask worker processes, not of DataLoader decode workers: each of these processes
    starts ``extract.images.default_decode_workers(processes=2)`` of its own, hence its own formula.
    """
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        pass
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def start_local_cluster(workers: int | None = None) -> Any:
    """A ``LocalCluster`` of ``workers`` single-threaded processes (non-daemonic, so DataLoader
    workers work inside them), the CPU cores shared out between them."""
    import dask
    from distributed import LocalCluster

    n = workers or default_workers()
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {settings.WORKER_THREADS_VAR: str(threads), "OMP_NUM_THREADS": str(threads)}
    with dask.config.set({"distributed.worker.daemon": False}):
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                            env=env, silence_logs=40)
