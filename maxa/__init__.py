"""maxa's Python API: read stores, train and evaluate probes, predict — the same code the ``maxa``
command runs, for notebooks and scripts.

    import maxa

    fs = maxa.open_features("maxa-stores/features/…/train-….zarr")   # a path or an s3:// URL
    x = fs.read_batch([0, 5, 9])                                     # (3, h, w, C) float16
    ts = maxa.find_targets(fs)                                       # its aligned target store
    ds = maxa.StorePairDataset(fs, ts, names=["semantic"])           # a torch Dataset

    r = maxa.train_probe(fs.path, maxa.ProbeConfig(task="semseg"), write=False)
    r.metrics, r.model                                               # nothing written to the root
    out = maxa.predict_arrays(r.model, [x], [fs.token_centres()], (224, 224))  # (3, C, 224, 224)
    probs = maxa.output_values(out[0], "semseg")                     # class probabilities

The names in ``__all__`` are the public API and keep their meaning across versions; the
packages under them (``store``, ``extract``, ``probe``, ``pipelines``, ``runtime``) are the
implementation and may change. Nothing heavy is imported until a name is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: public name -> the module that defines it
_NAMES = {
    "open_features": "store.reader", "open_targets": "store.reader", "open_store": "store.reader",
    "FeatureStore": "store.reader", "TargetStore": "store.reader",
    "find_targets": "probe.pairing",
    "read_results": "store.results", "results_table": "store.results",
    "ProbeConfig": "probe.config", "train_probe": "probe.train", "ProbeResult": "probe.train",
    "ProbeData": "probe.data", "StorePairDataset": "probe.dataset",
    "load_adapter": "probe.predict", "predict": "probe.predict", "predict_arrays": "probe.predict",
    "output_values": "probe.predict", "predict_store": "probe.predict_store",
    "open_predictions": "store.predictions", "PredictionStore": "store.predictions",
    "run_extract": "extract.jobs",
    "MaxaError": "runtime.errors", "StoreError": "runtime.errors",
}

__all__ = sorted(_NAMES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from runtime.provenance import tool_version

        return tool_version()
    if name not in _NAMES:
        raise AttributeError(f"module 'maxa' has no attribute {name!r}")
    value = getattr(import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
