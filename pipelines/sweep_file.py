"""Sweep files: read and validate a TOML sweep into a :class:`~pipelines.sweep_jobs.SweepFile`.

A sweep file names datasets (reader, root, train/eval splits), backbones, tasks, variants, heads and
seeds in one or more ``[[experiment]]`` blocks. :func:`load_sweep` validates the whole file before any
work starts: an unknown name or key raises :class:`SweepFileError` naming the file and line.
Planning it against a store root is :func:`pipelines.sweep_plan.plan_sweep`.

Schema (every table and key optional unless marked)::

    name = "paper"                          # a label for progress and messages

    [extract]                               # how stores are extracted (every feature/target store)
    device = "auto"                         # auto, cpu, cuda (a worker per GPU gets its own)
    batch_size = 32                         # images per forward pass
    shard_size = 256                        # images per shard (default: ~256 MB of features)
    compression = "none"                    # none | zstd | int8 (lossy)
    target_size = 224                       # target (output) resolution, square
    decode_workers = 4                      # decode workers per task (default: a share of the CPUs)
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
import tomllib
from pathlib import Path
from typing import Any, Callable

from pipelines.sweep_jobs import DatasetDef, ProbeSpec, SplitRef, SweepFile, freeze
from pipelines.toml_lines import TomlLines
from runtime.errors import MaxaError
from store import COMPRESSIONS

__all__ = ["SweepFileError", "load_sweep", "parse_sweep", "parse_data_roots"]

# -- the schema as data -----------------------------------------------------------------------------
EXTRACT_KEYS = {"device", "batch_size", "shard_size", "compression", "target_size", "decode_workers", "skip_bad"}
#: Old spellings of keys, still read (with one notice): key -> (table, new key).
RENAMED_KEYS = {"num_workers": ("extract", "decode_workers")}
PROBE_KEYS = {"device", "max_epochs", "patience", "batch_size", "lr", "val_fraction", "max_train_images",
              "task_options"}
DATASET_KEYS = {"reader", "root", "options", "train", "eval", "limit"}
SPLIT_KEYS = {"split", "options", "limit"}
EXPERIMENT_KEYS = {"name", "backbones", "datasets", "tasks", "variants", "heads", "seeds", "weights", "layers"} | PROBE_KEYS
TOP_KEYS = {"name", "extract", "probe", "weights", "datasets", "experiment"}


def _count(least: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


_INTEGER = "{what} {key} must be a positive integer, got {value!r}."
#: key -> (valid value?, message, whether the message points at the value's line rather than the key's)
VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    **{k: (_count(1), _INTEGER, False) for k in ("batch_size", "shard_size", "target_size", "max_epochs",
                                                  "patience", "max_train_images", "limit")},
    "decode_workers": (_count(0), _INTEGER, False),
    "lr": (_positive_number, "{what} {key} must be a positive number, got {value!r}.", False),
    "val_fraction": (_positive_number, "{what} {key} must be a positive number, got {value!r}.", False),
    "device": (lambda v: isinstance(v, str), '{what} device must be a string such as "auto", "cpu" or "cuda".', False),
    "compression": (lambda v: v in COMPRESSIONS,
                    "{what} compression must be " + " or ".join(f'"{c}"' for c in COMPRESSIONS) + ", got {value!r}.", True),
    "skip_bad": (lambda v: isinstance(v, bool), "{what} skip_bad must be true or false.", False),
    "options": (lambda v: isinstance(v, dict), "{what} {key} must be a table, e.g. {key} = {{ ... }}.", False),
    "task_options": (lambda v: isinstance(v, dict), "{what} {key} must be a table, e.g. {key} = {{ ... }}.", False),
}


class SweepFileError(MaxaError):
    """A sweep file that cannot be run: the message names the file, the line and the fix."""


class _Checker:
    """Raises :class:`SweepFileError` naming the file and the line of the table, key or value at fault."""

    def __init__(self, path: str, text: str) -> None:
        self.path, self.loc = path, TomlLines(text)

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

    def check_table(self, d: dict[str, Any], allowed: set[str], table: tuple[Any, ...], what: str) -> None:
        """Unknown keys, then each value against :data:`VALUE_RULES`."""
        self.unknown_keys(d, allowed, table, what)
        for k, v in d.items():
            rule = VALUE_RULES.get(k)
            if rule is not None and not rule[0](v):
                raise self.fail(table, k, v if rule[2] else None, rule[1].format(what=what, key=k, value=v))

    def names(self, value: Any, table: tuple[Any, ...], key: str, what: str) -> list[str]:
        """A non-empty list of names (one name alone is a list of one), duplicates dropped."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.fail(table, key, None, f"{what} must be a non-empty list of names, e.g. {key} = [\"...\"].")
        return list(dict.fromkeys(value))


def _closest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}? " if close else ""


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


#: The sweep files that come with maxa, by name: ``maxa sweep smoke`` / ``maxa sweep paper``.
BUILTIN_SWEEPS = ("smoke", "paper")


def builtin_sweep(name: str) -> Path | None:
    """The file of built-in sweep ``name`` (``smoke``, ``paper``, with or without ``.toml``): packaged
    beside this module in a wheel (``pipelines/builtin_sweeps``), ``sweeps/`` in a source checkout."""
    stem = name.removesuffix(".toml")
    if stem not in BUILTIN_SWEEPS:
        return None
    here = Path(__file__).resolve().parent
    for folder in (here / "builtin_sweeps", here.parent / "sweeps"):
        if (folder / f"{stem}.toml").is_file():
            return folder / f"{stem}.toml"
    return None


def load_sweep(path: str | Path, data_roots: dict[str, str] | list[str] | None = None) -> SweepFile:
    """Read and validate the sweep file at ``path`` (see the module docstring for the schema); a path
    that is no file but a built-in sweep's name (``smoke``, ``paper``) reads that sweep."""
    p = Path(path)
    if not p.is_file():
        builtin = builtin_sweep(str(path)) if p.parent == Path(".") else None
        if builtin is None:
            raise SweepFileError(f"sweep file {p} does not exist; pass a TOML file, or a built-in sweep: "
                                 f"{' or '.join(BUILTIN_SWEEPS)} (`maxa sweep smoke`).")
        p = builtin
    return parse_sweep(p.read_text(), str(p), data_roots)


def parse_sweep(text: str, path: str = "<sweep>", data_roots: dict[str, str] | list[str] | None = None) -> SweepFile:
    """Validate sweep-file ``text``; raises :class:`SweepFileError` (one line, naming the line) on any error."""
    import extract.backbones  # noqa: F401 - registers the entries

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SweepFileError(f"{path}: not valid TOML: {e}.") from None
    chk = _Checker(path, text)
    roots = parse_data_roots(data_roots)
    chk.unknown_keys(doc, TOP_KEYS, (), "the sweep file")
    notices: list[str] = []
    for section, allowed in (("extract", EXTRACT_KEYS), ("probe", PROBE_KEYS)):
        sec = doc.get(section, {})
        if not isinstance(sec, dict):
            raise chk.fail((), section, None, f"{section} must be a table: [{section}].")
        for old, (table, new) in RENAMED_KEYS.items():
            if table == section and old in sec:
                if new in sec:
                    raise chk.fail((section,), old, None, f"[{section}] has both {new} and its old spelling {old}; keep {new}.")
                line = chk.loc.line((section,), old, None)
                notices.append(f"{path}{f' line {line}' if line else ''}: [{section}] {old} is now {new}; "
                               "the old spelling goes in a later version.")
                sec[new] = sec.pop(old)
        chk.check_table(sec, allowed, (section,), f"[{section}]")
    weights = _weights_table(chk, doc)
    datasets = _datasets(chk, doc, roots, path)
    experiments = doc.get("experiment")
    if not isinstance(experiments, list) or not experiments:
        raise SweepFileError(f"{path}: no [[experiment]] block; add one with backbones and tasks.")
    probes: list[ProbeSpec] = []
    names: list[str] = []
    for i, ex in enumerate(experiments):
        label, specs = _experiment(chk, i, ex, datasets, dict(doc.get("probe", {})), weights)
        names.append(label)
        probes += specs
    extract = dict(doc.get("extract", {}))
    if "decode_workers" in extract:  # ExtractConfig's name for it
        extract["num_workers"] = extract.pop("decode_workers")
    return SweepFile(path=path, name=str(doc.get("name", Path(path).stem)), extract=extract,
                     datasets=datasets, probes=probes, experiments=names, notices=notices)


def _check_backbone(chk: _Checker, name: str, table: tuple[Any, ...], key: str) -> None:
    from extract.backbone_registry import get_backbone_entry

    try:
        get_backbone_entry(name)
    except MaxaError as e:
        raise chk.fail(table, key, name, f"{e} (see `maxa backbones`)") from None


def _weights_table(chk: _Checker, doc: dict[str, Any]) -> dict[str, Any]:
    weights = doc.get("weights", {})
    if not isinstance(weights, dict):
        raise chk.fail((), "weights", None, "weights must be a table: [weights] with backbone = \"pretrained\" | \"random\" | PATH.")
    for b, w in weights.items():
        _check_backbone(chk, b, ("weights",), b)
        if not isinstance(w, str) or not w:
            raise chk.fail(("weights",), b, None, f"weights for {b} must be \"pretrained\", \"random\" or a file path.")
    return weights


# -- [datasets.NAME] ------------------------------------------------------------------------------
def _datasets(chk: _Checker, doc: dict[str, Any], roots: dict[str, str], path: str) -> dict[str, DatasetDef]:
    from extract.datasets import dataset_names

    raw = doc.get("datasets", {})
    if not isinstance(raw, dict):
        raise chk.fail((), "datasets", None, "datasets must be tables: [datasets.NAME] with reader, root, train, eval.")
    readers = dataset_names()
    datasets = {name: _dataset(chk, name, d, roots, readers) for name, d in raw.items()}
    for name in roots:
        if name not in datasets:
            raise SweepFileError(f"--data-root {name}=…: the sweep file {path} has no [datasets.{name}]; "
                                 f"its datasets: {', '.join(datasets) or 'none'}.")
    return datasets


def _dataset(chk: _Checker, name: str, d: Any, roots: dict[str, str], readers: list[str]) -> DatasetDef:
    from extract.datasets import get_dataset_class

    table = ("datasets", name)
    if not isinstance(d, dict):
        raise chk.fail(("datasets",), name, None, f"[datasets.{name}] must be a table.")
    chk.check_table(d, DATASET_KEYS, table, f"[datasets.{name}]")
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
    refs = {which: _split_ref(chk, name, d, which, default, reader, root, cls.splits)
            for which, default in (("train", "train"), ("eval", "val" if "val" in cls.splits else cls.splits[-1]))}
    if refs["train"] == refs["eval"]:
        raise chk.fail(table, "eval", None, f"[datasets.{name}] trains and evaluates on the same split; "
                       "choose another eval split.")
    return DatasetDef(name=name, reader=reader, root=root, train=refs["train"], eval=refs["eval"])


def _split_ref(chk: _Checker, name: str, d: dict[str, Any], which: str, default: str, reader: str,
               root: str | None, splits: Any) -> SplitRef:
    """The ``train`` or ``eval`` split of ``[datasets.NAME]``: a split name, or a table with its own options/limit."""
    table = ("datasets", name)
    s = d.get(which, default)
    opts = dict(d.get("options", {}))
    limit = d.get("limit")
    if isinstance(s, dict):
        chk.check_table(s, SPLIT_KEYS, (*table, which), f"[datasets.{name}] {which}")
        opts.update(s.get("options", {}))
        limit = s.get("limit", limit)
        s = s.get("split", default)
    if not isinstance(s, str) or s not in splits:
        raise chk.fail(table, which, s if isinstance(s, str) else None,
                       f"dataset {reader!r} has no split {s!r} ({which} of [datasets.{name}]); "
                       f"choose one of {', '.join(splits)}.")
    return SplitRef(dataset=name, reader=reader, root=root, split=s, options=freeze(opts), limit=limit)


# -- [[experiment]] -------------------------------------------------------------------------------
def _experiment(chk: _Checker, i: int, ex: dict[str, Any], datasets: dict[str, DatasetDef],
                probe_defaults: dict[str, Any], weights_table: dict[str, Any]) -> tuple[str, list[ProbeSpec]]:
    """One ``[[experiment]]`` block: its label and every probe it asks for (checked in file order)."""
    from probe.tasks import task_names
    from probe.variants import VARIANTS

    table = ("experiment", i)
    chk.check_table(ex, EXPERIMENT_KEYS, table, "[[experiment]]")
    label = str(ex.get("name", f"experiment {i + 1}"))
    for required in ("backbones", "tasks"):
        if required not in ex:
            raise chk.fail(table, None, None, f"[[experiment]] {label!r} has no {required} = [...].")
    backbones = chk.names(ex["backbones"], table, "backbones", "backbones")
    for b in backbones:
        _check_backbone(chk, b, table, "backbones")
    pairs = _task_pairs(chk, ex, table, label, datasets)
    variants = chk.names(ex.get("variants", ["base"]), table, "variants", "variants")
    for v in variants:
        _check_known(chk, v, list(VARIANTS), table, "variants", "variant", label)
    heads = _heads(chk, ex.get("heads", ["maxa"]), table, label, variants)
    seeds = _seeds(chk, ex.get("seeds", [0]), table, label)
    layers = _layers(chk, ex.get("layers"), table, label)
    exp_weights = ex.get("weights")
    if exp_weights is not None and (not isinstance(exp_weights, str) or not exp_weights):
        raise chk.fail(table, "weights", None, f"[[experiment]] {label!r}: weights must be \"pretrained\", "
                       "\"random\" or a path.")
    settings = {**probe_defaults, **{k: v for k, v in ex.items() if k in PROBE_KEYS}}
    tasks_valid = task_names()
    for t_name, opts in settings.get("task_options", {}).items():
        if t_name not in tasks_valid or not isinstance(opts, dict):
            raise chk.fail(table, "task_options", t_name if isinstance(t_name, str) else None,
                           f"task_options must map task names ({', '.join(tasks_valid)}) to tables.")
    frozen = freeze(settings)
    probes = []
    for b in backbones:
        _check_layers(chk, b, layers, table)
        w = exp_weights or weights_table.get(b, "pretrained")
        probes += [ProbeSpec(experiment=label, backbone=b, weights=w, layers=layers, dataset=ds, task=t, variant=v,
                             head=h, seed=int(s), settings=frozen)
                   for ds, t in pairs for v in variants for h in heads for s in seeds]
    return label, probes


def _task_pairs(chk: _Checker, ex: dict[str, Any], table: tuple[Any, ...], label: str,
                datasets: dict[str, DatasetDef]) -> list[tuple[str, str]]:
    """``(dataset, task)`` pairs: ``tasks`` as a table dataset → tasks, or a list with ``datasets = [...]``."""
    from extract.datasets import get_dataset_class
    from probe.tasks import task_names, tasks_for_targets

    raw_tasks = ex["tasks"]
    pairs: list[tuple[str, str]] = []
    if isinstance(raw_tasks, dict):
        if "datasets" in ex:
            raise chk.fail(table, "datasets", None, f"[[experiment]] {label!r}: tasks is a table per dataset, "
                           "so drop datasets = [...] (or make tasks a list).")
        for ds, ts in raw_tasks.items():
            pairs += [(ds, t) for t in chk.names(ts, table, "tasks", f"tasks.{ds}")]
    else:
        ts = chk.names(raw_tasks, table, "tasks", "tasks")
        if "datasets" not in ex:
            raise chk.fail(table, "tasks", None, f"[[experiment]] {label!r}: with tasks = [...] give datasets = [...], "
                           "or write tasks = { DATASET = [...] }.")
        dss = chk.names(ex["datasets"], table, "datasets", "datasets")
        pairs = [(ds, t) for ds in dss for t in ts]
    tasks_valid = task_names()
    for ds, t in pairs:
        if ds not in datasets:
            raise chk.fail(table, "tasks" if isinstance(raw_tasks, dict) else "datasets", ds,
                           f"[[experiment]] {label!r} names dataset {ds!r}, which has no [datasets.{ds}] table; "
                           f"{_closest(ds, list(datasets))}defined: {', '.join(datasets) or 'none'}.")
        _check_known(chk, t, tasks_valid, table, "tasks", "task", label)
        supported = tasks_for_targets(get_dataset_class(datasets[ds].reader).targets)
        if t not in supported:
            raise chk.fail(table, "tasks", t, f"dataset {ds!r} ({datasets[ds].reader}) has no targets for task {t!r}; "
                           f"it supports {', '.join(supported)}.")
    return pairs


def _check_known(chk: _Checker, name: str, valid: list[str], table: tuple[Any, ...], key: str, noun: str,
                 label: str) -> None:
    if name not in valid:
        raise chk.fail(table, key, name, f"unknown {noun} {name!r} in [[experiment]] {label!r}; "
                       f"{_closest(name, valid)}valid {noun}s: {', '.join(valid)}.")


def _heads(chk: _Checker, value: Any, table: tuple[Any, ...], label: str, variants: list[str]) -> list[str]:
    """Probe heads, each known; a baseline head (not ``maxa``) takes variant base only."""
    from probe.train import HEADS

    heads = chk.names(value, table, "heads", "heads")
    for h in heads:
        _check_known(chk, h, list(HEADS), table, "heads", "head", label)
        if h != "maxa" and any(v != "base" for v in variants):
            raise chk.fail(table, "heads", h, f"[[experiment]] {label!r}: head {h!r} takes variant base only; "
                           "put baseline heads in an experiment with variants = [\"base\"].")
    return heads


def _seeds(chk: _Checker, seeds: Any, table: tuple[Any, ...], label: str) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise chk.fail(table, "seeds", None, f"[[experiment]] {label!r}: seeds must be a list of integers.")
    return seeds


def _layers(chk: _Checker, layers: Any, table: tuple[Any, ...], label: str) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers) \
            or len(set(layers)) != len(layers):
        raise chk.fail(table, "layers", None, f"[[experiment]] {label!r}: layers must be a list of distinct "
                       "block/stage indices, e.g. layers = [-1].")
    return tuple(layers)


def _check_layers(chk: _Checker, backbone: str, layers: tuple[int, ...] | None, table: tuple[Any, ...]) -> None:
    if layers is None:
        return
    from extract.jobs import _check_layers as check

    try:
        check(backbone, layers)
    except MaxaError as e:
        raise chk.fail(table, "layers", None, str(e).replace("--layers", "layers")) from None
