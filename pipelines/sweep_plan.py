"""Sweep files: parse and validate a TOML sweep, then plan it against a store root.

A sweep file names datasets (reader, root, train/eval splits), backbones, tasks, variants, heads and
seeds in one or more ``[[experiment]]`` blocks. :func:`load_sweep` validates the whole file before any
work starts: an unknown name or key raises :class:`SweepFileError` naming the file and line.
:func:`plan_sweep` turns it into a job graph — target stores and feature stores (one per backbone ×
dataset split, extracted once however many experiments need it), then every probe — and marks what the
store root already holds (complete stores; finished result records) as skipped.

Schema (every table and key optional unless marked)::

    name = "paper"                          # a label for progress and messages

    [extract]                               # how stores are extracted (every feature/target store)
    device = "auto"                         # auto, cpu, cuda (a worker per GPU gets its own)
    batch_size = 32                         # images per forward pass
    shard_size = 256                        # images per shard (default: ~256 MB of features)
    compression = "none"                    # none | zstd
    target_size = 224                       # target (output) resolution, square
    num_workers = 4                         # decode workers per task (default: a share of the CPUs)
    skip_bad = false                        # record undecodable images instead of failing

    [probe]                                 # probe defaults; an [[experiment]] may override each
    device = "auto"
    max_epochs = 30
    patience = 5
    batch_size = 16
    lr = 1e-3                               # default: the task's
    val_fraction = 0.1
    max_train_images = 8000                 # default: 8,000 for instances, else all
    task_options = { instances = { min_large = 3 } }

    [weights]                               # per backbone: "pretrained" (default), "random" or a PATH
    sam2_hiera_bplus = "/weights/sam2_hiera_base_plus.pt"

    [datasets.coco]                         # a named dataset (the name is used below and by --data-root)
    reader = "coco"                         # reader name (default: the table's name)
    root = "/data/coco"                     # dataset root (--data-root coco=/elsewhere overrides)
    options = {}                            # reader options for both splits
    train = "train"                         # the training split: a name, or
    eval = { split = "val", options = { }, limit = 500 }  # a table with its own options/limit
    limit = 1000                            # first N images of each split

    [[experiment]]                          # required, one or more
    name = "tables-2-3"
    backbones = ["dinov2_b14", "timm:vit_small_patch16_224"]   # required
    tasks = { coco = ["instances", "boundaries"], voc = ["semseg"] }   # required: per dataset, or
    # datasets = ["coco"]; tasks = ["boundaries", "distance"]          # every task on every dataset
    variants = ["base"]                     # default ["base"]
    heads = ["maxa"]                        # default ["maxa"]; baseline heads take variant base only
    seeds = [0]                             # default [0]
    weights = "random"                      # overrides [weights] for this experiment
    layers = [-1]                           # feature layers (default: each backbone's own)
    max_epochs = 30                         # any [probe] key
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store._layout import COMPRESSIONS
from store.errors import MaxaError

__all__ = [
    "SweepFileError",
    "SplitRef",
    "DatasetDef",
    "ProbeSpec",
    "SweepFile",
    "TargetJob",
    "FeatureJob",
    "ProbeJob",
    "SweepPlan",
    "load_sweep",
    "parse_sweep",
    "plan_sweep",
    "parse_data_roots",
]

EXTRACT_KEYS = {"device", "batch_size", "shard_size", "compression", "target_size", "num_workers", "skip_bad"}
PROBE_KEYS = {"device", "max_epochs", "patience", "batch_size", "lr", "val_fraction", "max_train_images",
              "task_options"}
DATASET_KEYS = {"reader", "root", "options", "train", "eval", "limit"}
SPLIT_KEYS = {"split", "options", "limit"}
EXPERIMENT_KEYS = {"name", "backbones", "datasets", "tasks", "variants", "heads", "seeds", "weights", "layers"} | PROBE_KEYS
TOP_KEYS = {"name", "extract", "probe", "weights", "datasets", "experiment"}


class SweepFileError(MaxaError):
    """A sweep file that cannot be run: the message names the file, the line and the fix."""


# -- locating keys and values in the raw text (tomllib gives no positions) ----------------------
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")


def _split_dotted(text: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', text))


class _Locator:
    """Finds the line of a table, key or value in the TOML text by a simple line scan."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.sections: list[tuple[tuple[Any, ...], int, int]] = []  # (table path, first line, end line) 0-based
        counts: dict[tuple[str, ...], int] = {}
        current: tuple[Any, ...] = ()
        start = 0
        for i, line in enumerate(self.lines):
            m = _HEADER.match(line)
            if not m:
                continue
            self.sections.append((current, start, i))
            path = _split_dotted(m.group(2))
            if m.group(1) == "[[":
                n = counts.get(path, 0)
                counts[path] = n + 1
                current = (*path, n)
            else:
                current = path
            start = i
        self.sections.append((current, start, len(self.lines)))

    def _section(self, table: tuple[Any, ...]) -> tuple[int, int] | None:
        for path, a, b in self.sections:
            if path == table:
                return a, b
        return None

    def _search(self, pattern: str, a: int, b: int) -> int | None:
        rx = re.compile(pattern)
        for i in range(a, b):
            code = self.lines[i].split("#", 1)[0] if '"' not in self.lines[i] else self.lines[i]
            if rx.search(code):
                return i
        return None

    def _span(self, table: tuple[Any, ...]) -> tuple[int, int] | None:
        found = self._section(table)
        if found is not None:
            return found
        if table and isinstance(table[-1], str):  # an inline table: `name = { ... }` in its parent
            parent = self._span(table[:-1])
            if parent is not None:
                i = self._search(rf'^\s*"?{re.escape(table[-1])}"?\s*=', *parent)
                if i is not None:
                    return i, parent[1]
        return None

    def line(self, table: tuple[Any, ...], key: str | None = None, value: Any = None) -> int | None:
        """1-based line of ``value`` (or of ``key``, or of the table) inside ``table``; ``None`` if not found."""
        span = self._span(table)
        if span is None:
            span = (0, len(self.lines))
        a, b = span
        if key is not None:
            i = self._search(rf'(^|[{{,\s])"?{re.escape(key)}"?\s*=', a, b)
            if i is not None:
                a = i
        if value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            pat = (rf'["\']{re.escape(text)}["\']|(?<![\w.:-]){re.escape(text)}\s*=' if isinstance(value, str)
                   else rf"(?<![\w.]){re.escape(text)}(?![\w.])")
            i = self._search(pat, a, b)
            if i is not None:
                return i + 1
            i = self._search(pat, 0, len(self.lines))
            return i + 1 if i is not None else None
        return a + 1 if (key is not None or span != (0, len(self.lines))) else None


class _Checker:
    def __init__(self, path: str, text: str) -> None:
        self.path, self.loc = path, _Locator(text)

    def fail(self, table: tuple[Any, ...], key: str | None, value: Any, message: str) -> SweepFileError:
        line = self.loc.line(table, key, value)
        where = f"{self.path} line {line}" if line else self.path
        return SweepFileError(f"{where}: {message}")

    def unknown_keys(self, d: dict[str, Any], allowed: set[str], table: tuple[Any, ...], what: str) -> None:
        for k in d:
            if k not in allowed:
                close = difflib.get_close_matches(k, sorted(allowed), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.fail(table, k, None, f"unknown key {k!r} in {what}; {hint}valid keys: {', '.join(sorted(allowed))}.")


def _closest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}? " if close else ""


# -- the parsed file ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitRef:
    """One dataset split as extraction sees it (small and hashable: it travels in dask tasks)."""

    dataset: str  # the sweep's dataset name
    reader: str
    root: str | None
    split: str
    options: tuple[tuple[str, Any], ...] = ()
    limit: int | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.split}"

    def options_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.options}


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v) and v:
            return {k: _thaw(x) for k, x in v}
        return [_thaw(x) for x in v]
    return v


@dataclass
class DatasetDef:
    name: str
    reader: str
    root: str | None
    train: SplitRef
    eval: SplitRef


@dataclass(frozen=True)
class ProbeSpec:
    """One probe the file asks for (before store keys are known)."""

    experiment: str
    backbone: str
    weights: str
    layers: tuple[int, ...] | None
    dataset: str
    task: str
    variant: str
    head: str
    seed: int
    settings: tuple[tuple[str, Any], ...]  # frozen probe settings (max_epochs, ...)

    def settings_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.settings}


@dataclass
class SweepFile:
    path: str
    name: str
    extract: dict[str, Any]
    datasets: dict[str, DatasetDef]
    probes: list[ProbeSpec]
    experiments: list[str]


def parse_data_roots(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    """``NAME=PATH`` items (``--data-root``) as a dict."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SweepFileError(f"--data-root {item!r}: give NAME=PATH with NAME a [datasets.NAME] of the sweep file, "
                                 "e.g. --data-root coco=/data/coco.")
        out[name.strip()] = path.strip()
    return out


def load_sweep(path: str | Path, data_roots: dict[str, str] | list[str] | None = None) -> SweepFile:
    """Read and validate the sweep file at ``path`` (see the module docstring for the schema)."""
    p = Path(path)
    if not p.is_file():
        raise SweepFileError(f"sweep file {p} does not exist; pass a TOML file such as sweeps/smoke.toml.")
    return parse_sweep(p.read_text(), str(path), data_roots)


def _str_list(chk: _Checker, value: Any, table: tuple[Any, ...], key: str, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise chk.fail(table, key, None, f"{what} must be a non-empty list of names, e.g. {key} = [\"...\"].")
    return list(dict.fromkeys(value))


def _check_types(chk: _Checker, d: dict[str, Any], table: tuple[Any, ...], what: str) -> None:
    ints = {"batch_size", "shard_size", "target_size", "num_workers", "max_epochs", "patience", "max_train_images",
            "limit"}
    for k, v in d.items():
        if k in ints and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "num_workers" else 1)):
            raise chk.fail(table, k, None, f"{what} {k} must be a positive integer, got {v!r}.")
        if k in ("lr", "val_fraction") and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise chk.fail(table, k, None, f"{what} {k} must be a positive number, got {v!r}.")
        if k == "device" and not isinstance(v, str):
            raise chk.fail(table, k, None, f"{what} device must be a string such as \"auto\", \"cpu\" or \"cuda\".")
        if k == "compression" and v not in COMPRESSIONS:
            names = " or ".join(f'"{c}"' for c in COMPRESSIONS)
            raise chk.fail(table, k, v, f"{what} compression must be {names}, got {v!r}.")
        if k == "skip_bad" and not isinstance(v, bool):
            raise chk.fail(table, k, None, f"{what} skip_bad must be true or false.")
        if k in ("options", "task_options") and not isinstance(v, dict):
            raise chk.fail(table, k, None, f"{what} {k} must be a table, e.g. {k} = {{ ... }}.")


def parse_sweep(text: str, path: str = "<sweep>", data_roots: dict[str, str] | list[str] | None = None) -> SweepFile:
    """Validate sweep-file ``text``; raises :class:`SweepFileError` (one line, naming the line) on any error."""
    from extract.backbone_registry import get_backbone_entry
    import extract.backbones  # noqa: F401 - registers the entries
    from extract.datasets import dataset_names, get_dataset_class
    from probe.tasks import task_names, tasks_for_targets
    from probe.train import HEADS
    from probe.variants import VARIANTS

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SweepFileError(f"{path}: not valid TOML: {e}.") from None
    chk = _Checker(path, text)
    roots = parse_data_roots(data_roots)
    chk.unknown_keys(doc, TOP_KEYS, (), "the sweep file")
    for section, allowed in (("extract", EXTRACT_KEYS), ("probe", PROBE_KEYS)):
        sec = doc.get(section, {})
        if not isinstance(sec, dict):
            raise chk.fail((), section, None, f"{section} must be a table: [{section}].")
        chk.unknown_keys(sec, allowed, (section,), f"[{section}]")
        _check_types(chk, sec, (section,), f"[{section}]")
    extract_settings = dict(doc.get("extract", {}))
    probe_defaults = dict(doc.get("probe", {}))

    def check_backbone(name: str, table: tuple[Any, ...], key: str) -> None:
        try:
            get_backbone_entry(name)
        except MaxaError as e:
            raise chk.fail(table, key, name, f"{e} (see `maxa backbones`)") from None

    weights_table = doc.get("weights", {})
    if not isinstance(weights_table, dict):
        raise chk.fail((), "weights", None, "weights must be a table: [weights] with backbone = \"pretrained\" | \"random\" | PATH.")
    for b, w in weights_table.items():
        check_backbone(b, ("weights",), b)
        if not isinstance(w, str) or not w:
            raise chk.fail(("weights",), b, None, f"weights for {b} must be \"pretrained\", \"random\" or a file path.")

    # datasets
    datasets: dict[str, DatasetDef] = {}
    raw_ds = doc.get("datasets", {})
    if not isinstance(raw_ds, dict):
        raise chk.fail((), "datasets", None, "datasets must be tables: [datasets.NAME] with reader, root, train, eval.")
    readers = dataset_names()
    for name, d in raw_ds.items():
        table = ("datasets", name)
        if not isinstance(d, dict):
            raise chk.fail(("datasets",), name, None, f"[datasets.{name}] must be a table.")
        chk.unknown_keys(d, DATASET_KEYS, table, f"[datasets.{name}]")
        _check_types(chk, d, table, f"[datasets.{name}]")
        reader = d.get("reader", name)
        if reader not in readers:
            key = "reader" if "reader" in d else None
            raise chk.fail(table, key, reader if key else None,
                           f"unknown dataset reader {reader!r} in [datasets.{name}]; {_closest(reader, readers)}"
                           f"valid readers: {', '.join(readers)} (set reader = \"...\").")
        cls = get_dataset_class(reader)
        root = roots.get(name, d.get("root"))
        if root is not None and not isinstance(root, str):
            raise chk.fail(table, "root", None, f"[datasets.{name}] root must be a path string.")
        refs = {}
        for which, default in (("train", "train"), ("eval", "val" if "val" in cls.splits else cls.splits[-1])):
            s = d.get(which, default)
            opts = dict(d.get("options", {}))
            limit = d.get("limit")
            if isinstance(s, dict):
                chk.unknown_keys(s, SPLIT_KEYS, (*table, which), f"[datasets.{name}] {which}")
                _check_types(chk, s, (*table, which), f"[datasets.{name}] {which}")
                opts.update(s.get("options", {}))
                limit = s.get("limit", limit)
                s = s.get("split", default)
            if not isinstance(s, str) or s not in cls.splits:
                raise chk.fail(table, which, s if isinstance(s, str) else None,
                               f"dataset {reader!r} has no split {s!r} ({which} of [datasets.{name}]); "
                               f"choose one of {', '.join(cls.splits)}.")
            refs[which] = SplitRef(dataset=name, reader=reader, root=root, split=s, options=_freeze(opts), limit=limit)
        if refs["train"] == refs["eval"]:
            raise chk.fail(table, "eval", None, f"[datasets.{name}] trains and evaluates on the same split; "
                           "choose another eval split.")
        datasets[name] = DatasetDef(name=name, reader=reader, root=root, train=refs["train"], eval=refs["eval"])
    for name in roots:
        if name not in datasets:
            raise SweepFileError(f"--data-root {name}=…: the sweep file {path} has no [datasets.{name}]; "
                                 f"its datasets: {', '.join(datasets) or 'none'}.")

    # experiments
    experiments = doc.get("experiment")
    if not isinstance(experiments, list) or not experiments:
        raise SweepFileError(f"{path}: no [[experiment]] block; add one with backbones and tasks.")
    tasks_valid = task_names()
    probes: list[ProbeSpec] = []
    names: list[str] = []
    for i, ex in enumerate(experiments):
        table = ("experiment", i)
        chk.unknown_keys(ex, EXPERIMENT_KEYS, table, "[[experiment]]")
        _check_types(chk, ex, table, "[[experiment]]")
        label = str(ex.get("name", f"experiment {i + 1}"))
        names.append(label)
        for required in ("backbones", "tasks"):
            if required not in ex:
                raise chk.fail(table, None, None, f"[[experiment]] {label!r} has no {required} = [...].")
        backbones = _str_list(chk, ex["backbones"], table, "backbones", "backbones")
        for b in backbones:
            check_backbone(b, table, "backbones")
        # tasks: a table dataset → tasks, or a list with datasets = [...]
        raw_tasks = ex["tasks"]
        pairs: list[tuple[str, str]] = []
        if isinstance(raw_tasks, dict):
            if "datasets" in ex:
                raise chk.fail(table, "datasets", None, f"[[experiment]] {label!r}: tasks is a table per dataset, "
                               "so drop datasets = [...] (or make tasks a list).")
            for ds, ts in raw_tasks.items():
                pairs += [(ds, t) for t in _str_list(chk, ts, table, "tasks", f"tasks.{ds}")]
        else:
            ts = _str_list(chk, raw_tasks, table, "tasks", "tasks")
            if "datasets" not in ex:
                raise chk.fail(table, "tasks", None, f"[[experiment]] {label!r}: with tasks = [...] give datasets = [...], "
                               "or write tasks = { DATASET = [...] }.")
            dss = _str_list(chk, ex["datasets"], table, "datasets", "datasets")
            pairs = [(ds, t) for ds in dss for t in ts]
        for ds, t in pairs:
            if ds not in datasets:
                raise chk.fail(table, "tasks" if isinstance(raw_tasks, dict) else "datasets", ds,
                               f"[[experiment]] {label!r} names dataset {ds!r}, which has no [datasets.{ds}] table; "
                               f"{_closest(ds, list(datasets))}defined: {', '.join(datasets) or 'none'}.")
            if t not in tasks_valid:
                raise chk.fail(table, "tasks", t, f"unknown task {t!r} in [[experiment]] {label!r}; "
                               f"{_closest(t, tasks_valid)}valid tasks: {', '.join(tasks_valid)}.")
            supported = tasks_for_targets(get_dataset_class(datasets[ds].reader).targets)
            if t not in supported:
                raise chk.fail(table, "tasks", t, f"dataset {ds!r} ({datasets[ds].reader}) has no targets for task {t!r}; "
                               f"it supports {', '.join(supported)}.")
        variants = _str_list(chk, ex.get("variants", ["base"]), table, "variants", "variants")
        for v in variants:
            if v not in VARIANTS:
                raise chk.fail(table, "variants", v, f"unknown variant {v!r} in [[experiment]] {label!r}; "
                               f"{_closest(v, list(VARIANTS))}valid variants: {', '.join(VARIANTS)}.")
        heads = _str_list(chk, ex.get("heads", ["maxa"]), table, "heads", "heads")
        for h in heads:
            if h not in HEADS:
                raise chk.fail(table, "heads", h, f"unknown head {h!r} in [[experiment]] {label!r}; "
                               f"{_closest(h, list(HEADS))}valid heads: {', '.join(HEADS)}.")
            if h != "maxa" and any(v != "base" for v in variants):
                raise chk.fail(table, "heads", h, f"[[experiment]] {label!r}: head {h!r} takes variant base only; "
                               "put baseline heads in an experiment with variants = [\"base\"].")
        seeds = ex.get("seeds", [0])
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise chk.fail(table, "seeds", None, f"[[experiment]] {label!r}: seeds must be a list of integers.")
        layers = ex.get("layers")
        if layers is not None:
            if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers) \
                    or len(set(layers)) != len(layers):
                raise chk.fail(table, "layers", None, f"[[experiment]] {label!r}: layers must be a list of distinct "
                               "block/stage indices, e.g. layers = [-1].")
            layers = tuple(layers)
        exp_weights = ex.get("weights")
        if exp_weights is not None and (not isinstance(exp_weights, str) or not exp_weights):
            raise chk.fail(table, "weights", None, f"[[experiment]] {label!r}: weights must be \"pretrained\", "
                           "\"random\" or a path.")
        settings = {**probe_defaults, **{k: v for k, v in ex.items() if k in PROBE_KEYS}}
        for t_name, opts in settings.get("task_options", {}).items():
            if t_name not in tasks_valid or not isinstance(opts, dict):
                raise chk.fail(table, "task_options", t_name if isinstance(t_name, str) else None,
                               f"task_options must map task names ({', '.join(tasks_valid)}) to tables.")
        frozen = _freeze(settings)
        for b in backbones:
            if layers is not None:
                from extract.jobs import _check_layers

                try:
                    _check_layers(b, layers)
                except MaxaError as e:
                    raise chk.fail(table, "layers", None, str(e).replace("--layers", "layers")) from None
            w = exp_weights or weights_table.get(b, "pretrained")
            for ds, t in pairs:
                for v in variants:
                    for h in heads:
                        for s in seeds:
                            probes.append(ProbeSpec(experiment=label, backbone=b, weights=w, layers=layers, dataset=ds,
                                                    task=t, variant=v, head=h, seed=int(s), settings=frozen))
    return SweepFile(path=path, name=str(doc.get("name", Path(path).stem)), extract=extract_settings,
                     datasets=datasets, probes=probes, experiments=names)


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class TargetJob:
    id: str
    split: SplitRef
    size: tuple[int, int]
    path: str | None = None
    status: str = "todo"  # todo | skip | failed
    error: str = ""


@dataclass
class FeatureJob:
    id: str
    backbone: str
    weights: str
    layers: tuple[int, ...] | None
    split: SplitRef
    path: str | None = None
    key: str | None = None
    num_shards: int = 0
    missing_shards: list[int] = field(default_factory=list)
    status: str = "todo"
    error: str = ""
    planned_backbone: Any = None  # a model-less LoadedBackbone (coordinator only)
    reader: Any = None  # the DatasetReader (coordinator only)


@dataclass
class ProbeJob:
    id: str
    spec: ProbeSpec
    train: str  # FeatureJob ids
    eval: str
    train_targets: str  # TargetJob ids
    eval_targets: str
    status: str = "todo"
    error: str = ""

    @property
    def config(self) -> dict[str, Any]:
        s = self.spec.settings_dict()
        cfg = {"task": self.spec.task, "variant": self.spec.variant, "head": self.spec.head, "seed": self.spec.seed}
        for k in ("max_epochs", "patience", "batch_size", "lr", "val_fraction", "max_train_images"):
            if k in s:
                cfg[k] = s[k]
        opts = s.get("task_options", {}).get(self.spec.task)
        if opts:
            cfg["task_options"] = dict(opts)
        return cfg


@dataclass
class SweepPlan:
    sweep: SweepFile
    store_root: str
    targets: dict[str, TargetJob]
    features: dict[str, FeatureJob]
    probes: list[ProbeJob]
    storage_options: dict[str, Any] | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for kind, jobs in (("targets", self.targets.values()), ("features", self.features.values()), ("probes", self.probes)):
            c = {"todo": 0, "skip": 0, "failed": 0}
            for j in jobs:
                c[j.status] += 1
            out[kind] = c
        return out


def planned_weights_id(entry: Any, weights: str) -> str:
    """The weights id :func:`extract.backbones.load_backbone` gives, without loading anything (a weights
    file is hashed). Raises :class:`WeightsUnavailableError` where loading would."""
    from extract.backbones import resolve_weights

    return resolve_weights(entry, weights)[0]


def planned_backbone(name: str, weights: str, layers: tuple[int, ...] | None) -> Any:
    """A :class:`LoadedBackbone` without a model: enough for a store's spec, key and path."""
    import dataclasses

    from extract.backbone_registry import entry_geometry, get_backbone_entry
    from extract.backbones import LoadedBackbone

    entry = get_backbone_entry(name)
    if layers is not None:
        entry = dataclasses.replace(entry, layers=tuple(layers))
    return LoadedBackbone(entry, None, planned_weights_id(entry, weights), entry_geometry(entry))  # type: ignore[arg-type]


def make_reader(ref: SplitRef) -> Any:
    from extract.datasets import create_dataset

    return create_dataset(ref.reader, ref.root, ref.split, **ref.options_dict())


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def plan_sweep(sweep: SweepFile, store_root: str | Path, *, storage_options: dict[str, Any] | None = None) -> SweepPlan:
    """Every store and probe ``sweep`` needs, each once, marked ``skip`` where ``store_root`` holds it.

    Nothing is written. A dataset split that cannot be read or a backbone whose weights cannot be had
    marks its jobs (and the probes needing them) ``failed`` with the reason; the rest plan normally.
    """
    from extract.runner import check_reusable, default_shard_size, feature_spec_for
    from extract.target_store import target_spec_for
    from extract.targets import TargetConfig
    from probe.results import finished_runs
    from store import _layout as L
    from store.catalogue import feature_store_path, target_store_path

    root = str(store_root)
    size = int(sweep.extract.get("target_size", 224))
    readers: dict[SplitRef, Any] = {}
    reader_errors: dict[SplitRef, str] = {}

    def reader_for(ref: SplitRef) -> Any:
        if ref not in readers and ref not in reader_errors:
            try:
                readers[ref] = make_reader(ref)
            except Exception as e:  # noqa: BLE001 - a bad root fails its jobs, not the sweep
                reader_errors[ref] = _first_line(e).replace("pass --root", f"pass --data-root {ref.dataset}=PATH")
        return readers.get(ref)

    def image_ids(ref: SplitRef) -> list[str]:
        r = readers[ref]
        return list(r.image_ids[:ref.limit] if ref.limit is not None else r.image_ids)

    targets: dict[str, TargetJob] = {}
    features: dict[str, FeatureJob] = {}
    backbones: dict[tuple[str, str, Any], Any] = {}
    backbone_errors: dict[tuple[str, str, Any], str] = {}

    def target_job(ref: SplitRef) -> str:
        jid = f"targets {ref.label}"
        if jid in targets:
            return jid
        job = targets[jid] = TargetJob(id=jid, split=ref, size=(size, size))
        reader = reader_for(ref)
        if reader is None:
            job.status, job.error = "failed", reader_errors[ref]
        else:
            spec = target_spec_for(reader, image_ids(ref), TargetConfig(size=(size, size)))
            job.path = target_store_path(root, spec)
            meta = L.read_attrs(job.path, storage_options)
            if meta and meta.get("complete") and meta.get("key") == spec.key:
                job.status = "skip"
        return jid

    def feature_job(b: str, w: str, layers: Any, ref: SplitRef) -> str:
        jid = f"features {b} {ref.label}" + (f" layers {','.join(map(str, layers))}" if layers else "") \
            + ("" if w == "pretrained" else f" ({Path(w).name if '/' in w else w})")
        if jid in features:
            return jid
        job = features[jid] = FeatureJob(id=jid, backbone=b, weights=w, layers=layers, split=ref)
        bk = (b, w, layers)
        if bk not in backbones and bk not in backbone_errors:
            try:
                backbones[bk] = planned_backbone(b, w, layers)
            except Exception as e:  # noqa: BLE001
                backbone_errors[bk] = _first_line(e)
        reader = reader_for(ref)
        if bk in backbone_errors:
            job.status, job.error = "failed", backbone_errors[bk]
            return jid
        if reader is None:
            job.status, job.error = "failed", reader_errors[ref]
            return jid
        ids = image_ids(ref)
        if not ids:
            job.status, job.error = "failed", f"dataset {ref.reader!r} split {ref.split!r} has no images"
            return jid
        spec = feature_spec_for(backbones[bk], reader, ids)
        job.planned_backbone, job.reader = backbones[bk], reader
        job.path, job.key = feature_store_path(root, spec), spec.key
        meta = L.read_attrs(job.path, storage_options)
        if meta and meta.get("key") == spec.key:
            job.num_shards = int(meta["num_shards"])
            if meta.get("complete"):
                job.status = "skip"
                if meta.get("num_bad"):
                    try:
                        check_reusable(job.path, reader, skip_bad=bool(sweep.extract.get("skip_bad", False)),
                                       storage_options=storage_options)
                    except Exception as e:  # noqa: BLE001 - reported as this job's failure
                        job.status, job.error = "failed", _first_line(e)
            else:
                import numpy as np

                done = np.asarray(L.open_group(job.path, "r", storage_options)[L.SHARD_DONE][:])
                job.missing_shards = [int(s) for s in np.flatnonzero(done == 0)]
        else:
            shard = int(sweep.extract.get("shard_size") or default_shard_size(spec.layers))
            job.num_shards = -(-len(ids) // shard)
            job.missing_shards = list(range(job.num_shards))
        return jid

    finished = finished_runs(root, storage_options=storage_options)
    probes: list[ProbeJob] = []
    seen: set[tuple[Any, ...]] = set()
    for ps in sweep.probes:
        ds = sweep.datasets[ps.dataset]
        ftr = feature_job(ps.backbone, ps.weights, ps.layers, ds.train)
        fev = feature_job(ps.backbone, ps.weights, ps.layers, ds.eval)
        ttr, tev = target_job(ds.train), target_job(ds.eval)
        ident = (ftr, fev, ps.task, ps.variant, ps.head, ps.seed)
        if ident in seen:
            continue  # asked for by two experiments: run once
        seen.add(ident)
        job = ProbeJob(id=f"probe {ps.backbone} {ps.dataset} {ps.task} {ps.variant} {ps.head} seed {ps.seed}",
                       spec=ps, train=ftr, eval=fev, train_targets=ttr, eval_targets=tev)
        deps = [features[ftr], features[fev], targets[ttr], targets[tev]]
        failed = [d for d in deps if d.status == "failed"]
        if failed:
            job.status, job.error = "failed", f"needs {failed[0].id}: {failed[0].error}"
        elif features[ftr].key and features[fev].key and \
                (features[ftr].key, features[fev].key, ps.task, ps.variant, ps.head, ps.seed) in finished:
            job.status = "skip"
        probes.append(job)
    # stores whose every probe is finished need no extraction (a probe already read them)
    needed_f = {j.train for j in probes if j.status == "todo"} | {j.eval for j in probes if j.status == "todo"}
    needed_t = {j.train_targets for j in probes if j.status == "todo"} | {j.eval_targets for j in probes if j.status == "todo"}
    for jid, fj in features.items():
        if fj.status == "todo" and jid not in needed_f:
            fj.status = "skip"
    for jid, tj in targets.items():
        if tj.status == "todo" and jid not in needed_t:
            tj.status = "skip"
    return SweepPlan(sweep=sweep, store_root=root, targets=targets, features=features, probes=probes,
                     storage_options=storage_options)
