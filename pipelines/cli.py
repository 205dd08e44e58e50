"""The ``maxa`` command line: thin typer commands over library functions.

Bad input (``MaxaError``) prints one line naming the problem and the fix, and exits 2; set
``MAXA_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from typer.exceptions import TyperException

from extract.config import DEFAULT_BATCH_SIZE
from store._layout import COMPRESSIONS
from store.errors import MaxaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Dense evaluation of frozen vision backbones with masked cross-attention adapters.")
stores_app = typer.Typer(no_args_is_help=True, help="List, inspect and verify feature and target stores.")
app.add_typer(stores_app, name="stores")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: backbone and adapter inference speed (paper §4.5).")
app.add_typer(bench_app, name="bench")

# Piped output gets a wide, stable layout instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

DEFAULT_STORE_ROOT = os.environ.get("MAXA_STORE_ROOT", "maxa-stores")


class Weights(StrEnum):
    pretrained = "pretrained"
    random = "random"


Compression = StrEnum("Compression", {name: name for name in COMPRESSIONS})


#: Long-running commands: SIGTERM (``kill``, a batch scheduler's stop) is handled like Ctrl-C, so
#: the same cleanup runs (leases released, writer pools drained); what a re-run finds of each.
_INTERRUPTIBLE = {
    "extract": "finished shards are kept; re-run the same command to resume.",
    "sweep": "finished shards and probes are kept; re-run the same command to resume.",
    "probe": "nothing was recorded for the unfinished probe; re-run the same command to train it again.",
    "quickstart": "finished stores and probes are kept; re-run the same command to resume.",
}


class _SigtermAsInterrupt:
    """While a long command runs, SIGTERM raises ``KeyboardInterrupt`` in the main thread (once: a
    second SIGTERM during the cleanup is ignored, so it cannot cut the cleanup short).

    When the whole process group is signalled, DataLoader workers die of it too, and torch's SIGCHLD
    handler would raise "worker killed" in the middle of the cleanup, or print it from the loader's
    ``__del__`` after the command returned: it is silenced from the first SIGTERM on, and stays so
    (the process is exiting; the loaders still notice dead workers on their own)."""

    def __init__(self, enabled: bool) -> None:
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.received:
            return
        self.received = True
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise KeyboardInterrupt("SIGTERM")

    def __enter__(self) -> "_SigtermAsInterrupt":
        if self.enabled:
            import signal

            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            import signal

            signal.signal(signal.SIGTERM, self._previous)


#: Command options that name where a command writes, by their flag (for an OSError without a file name).
_PATH_OPTIONS = {"store_root": "--store-root", "results_root": "--results-root", "out_dir": "--out",
                 "out_path": "--out", "store": "--store"}


def _os_error_line(e: OSError, kwargs: dict[str, Any]) -> str:
    """One line for an OSError: the file the system names or, when it names none (a write on a full
    disk), the path the command writes under; and the fix."""
    import errno

    reason, kind = e.strerror or str(e) or type(e).__name__, type(e).__name__
    known = next(((flag, kwargs[k]) for k, flag in _PATH_OPTIONS.items() if kwargs.get(k) not in (None, "")), None)
    if e.filename:
        where = f": {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") + f" ({kind})"
    elif known:
        where = f" ({kind}) while writing under {known[0]} {known[1]} (the system named no file)"
    else:
        where = f" ({kind}; the system named no file)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space there or choose another {known[0] if known else '--store-root'}, then re-run"
    else:
        fix = "check that path, its permissions and free space, then re-run"
    return f"{reason}{where}; {fix} (MAXA_DEBUG=1 shows the traceback)."


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MaxaError, Ctrl-C and (for long commands) SIGTERM into one line and a non-zero exit (no
    traceback): 2 for bad input, 130 for Ctrl-C, 143 for SIGTERM (128 + the signal), 1 for a bug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sigterm = _SigtermAsInterrupt(fn.__name__ in _INTERRUPTIBLE)
        try:
            with sigterm:
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):  # typer's own exits and usage errors
            raise
        except BaseException as e:
            # after a SIGTERM, whatever surfaces (e.g. a DataLoader worker killed by the same signal) is the interruption
            if sigterm.received or isinstance(e, KeyboardInterrupt):
                signal_name = "SIGTERM" if sigterm.received else "SIGINT, Ctrl-C"
                tail = _INTERRUPTIBLE.get(fn.__name__, "re-run the same command.")
                err.print(f"[yellow]interrupted[/] ({signal_name}): {tail}", soft_wrap=True, highlight=False)
                raise typer.Exit(143 if sigterm.received else 130) from None
            if not isinstance(e, Exception) or os.environ.get("MAXA_DEBUG"):
                raise
            if isinstance(e, MaxaError):
                _error_line(str(e))
                raise typer.Exit(e.exit_code) from None
            if isinstance(e, OSError):  # disk full, permissions, a file where a folder should be, ...
                _error_line(_os_error_line(e, kwargs))
                raise typer.Exit(2) from None
            unwrapped = _worker_error(e)
            if unwrapped is not None:  # a MaxaError raised in a DataLoader worker, re-raised by torch
                _error_line(unwrapped[0])
                raise typer.Exit(unwrapped[1]) from None
            # a bug: still one line by default, the traceback on request
            _error_line(f"unexpected {type(e).__name__}: {e}; this is a bug in maxa: re-run with MAXA_DEBUG=1 "
                        "for the traceback and report it.")
            raise typer.Exit(1) from None

    return wrapper


def _worker_error(e: BaseException) -> tuple[str, int] | None:
    """``(message, exit code)`` of a MaxaError that torch re-raised from a DataLoader worker.

    torch re-raises worker exceptions as ``RuntimeError("Caught X in DataLoader worker process N.
    Original Traceback ...")`` when ``X`` cannot be rebuilt from that text; its last line is
    ``module.X: message``.
    """
    text = str(e)
    if not text.startswith("Caught ") or "DataLoader worker" not in text.splitlines()[0]:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    qualname, sep, message = lines[-1].partition(": ")
    module, _, name = qualname.rpartition(".")
    if not sep or not module:
        return None
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - not ours: leave it to the generic handler
        return None
    if isinstance(cls, type) and issubclass(cls, MaxaError):
        return message.strip(), cls.exit_code
    return None


def _error_line(message: str) -> None:
    """Print ``message`` as one ``error:`` line (newlines in wrapped library messages are folded)."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err.print(f"[bold red]error:[/] {rich_escape(text)}", soft_wrap=True, highlight=False, markup=True)


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (before torch loads, unless set).

    On a CPU the forward pass fills every core and the decode workers must slot in between its
    parallel regions; spinning threads take those gaps. Measured on 2 cores (ViT-S/16): the
    pipeline/bare ratio rose from 0.91 to 0.95. Probing keeps the default (spinning is ~13 %
    faster for the adapter's many small ops)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    hint = "give comma-separated layer indices, e.g. --layers 2,3 or -1"
    try:
        layers = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise MaxaError(f"--layers {text!r}: {hint}.") from None
    if not layers:
        raise MaxaError(f"--layers {text!r} names no layer: {hint} (or leave it out for the backbone's default).")
    if len(set(layers)) != len(layers):
        raise MaxaError(f"--layers {text!r} repeats a layer: {hint}, each once.")
    return layers


def _human_bytes(n: int | None) -> str:
    if n is None or n < 0:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


StorageOptionList = Annotated[
    Optional[list[str]],
    typer.Option("--storage-option", metavar="KEY=VALUE",
                 help="fsspec option for s3://… stores (repeatable): endpoint_url=…, key=…, secret=…, anon=true, "
                      "client_kwargs.region_name=…; the AWS_* environment variables work without it."),
]


def _params(n: int) -> str:
    """A parameter count as the paper writes it (0.184 M), or exact when that would read 0.000 M."""
    return f"{n / 1e6:.3f} M" if n >= 1000 else f"{n:,}"


def _storage_options(items: list[str] | None) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` pairs as a dict; values are JSON where they parse (true, 3,
    {...}), else text; ``a.b=v`` nests (``client_kwargs.region_name=eu-west-1``)."""
    if not items:
        return None
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MaxaError(f"--storage-option {item!r}: give KEY=VALUE, e.g. --storage-option endpoint_url=http://host:9000.")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *outer, last = key.strip().split(".")
        d = options
        for part in outer:
            d = d.setdefault(part, {})
            if not isinstance(d, dict):
                raise MaxaError(f"--storage-option {item!r}: {part} is set both as a value and as a group.")
        d[last] = value
    return options


# -- backbones ------------------------------------------------------------------------------------
@app.command()
@clean_errors
def backbones(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    include_test: Annotated[bool, typer.Option("--all", help="Also list the tiny test aliases.")] = False,
) -> None:
    """The backbone registry: every row of the paper's Tables 1-3, plus tiny test models."""
    from extract.backbones import backbone_table

    rows = backbone_table(include_test=include_test)
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    from rich.table import Table

    table = Table(title="maxa backbones (any timm model also works as timm:NAME)")
    for col in ("name", "timm model", "input", "grid", "channels", "params (M)", "paper I/F", "weights"):
        table.add_column(col)
    for r in rows:
        paper = f"{r.get('paper_image_size') or '-'}/{r.get('paper_feature_size') or '-'}"
        many = len(r["grid"]) > 1  # name the layers only when there are several
        grids = "; ".join(f"{name + ' ' if many else ''}{g[0]}x{g[1]}" for name, g in r["grid"].items())
        chans = "; ".join(str(c) for c in r["channels"].values())
        table.add_row(r["name"], r["timm_name"], str(r["input_size"]), grids, chans,
                      f"{r['num_params'] / 1e6:.1f}", paper, str(r.get("weights", "")))
    out.print(table)


@app.command()
@clean_errors
def datasets() -> None:
    """The dataset readers and the targets each supports."""
    from extract.datasets import dataset_names, get_dataset_class

    for name in dataset_names():
        cls = get_dataset_class(name)
        out.print(f"[bold]{name}[/]: {', '.join(sorted(cls.targets))}  (splits: {', '.join(cls.splits)})")


# -- extract --------------------------------------------------------------------------------------
@app.command()
@clean_errors
def extract(
    backbone: Annotated[str, typer.Option(help="Registry name (see `maxa backbones`) or timm:NAME.")],
    dataset: Annotated[str, typer.Option(help="Dataset reader: coco, voc, cocostuff, nyuv2, segfolder, shapes.")],
    split: Annotated[str, typer.Option(help="Dataset split.")] = "val",
    root: Annotated[Optional[Path], typer.Option(help="Dataset root directory (not needed for shapes).")] = None,
    store_root: Annotated[str, typer.Option(help="Where stores live: a folder or s3://bucket/prefix ($MAXA_STORE_ROOT).")] = DEFAULT_STORE_ROOT,
    weights: Annotated[str, typer.Option(help="pretrained (timm hub / HF cache), random, or a checkpoint PATH.")] = "pretrained",
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated layer indices (default: the entry's).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = DEFAULT_BATCH_SIZE,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N images.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Decode workers (default: up to 4).")] = None,
    shard_size: Annotated[Optional[int], typer.Option(min=1, help="Images per shard (default: ~256 MB).")] = None,
    compression: Annotated[Compression, typer.Option(help="Feature compression.")] = Compression.none,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Record undecodable images and go on.")] = False,
    targets: Annotated[bool, typer.Option(help="Also build the split's target store.")] = True,
    target_size: Annotated[int, typer.Option(min=8, help="Target (output) resolution, square.")] = 224,
    num_classes: Annotated[Optional[int], typer.Option(help="segfolder: number of classes.")] = None,
    ignore_index: Annotated[Optional[int], typer.Option(help="segfolder: label value to ignore.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="shapes: scene seed.")] = None,
    num_images: Annotated[Optional[int], typer.Option(help="shapes: images in the split.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    storage_option: StorageOptionList = None,
) -> None:
    """Run a frozen backbone once over a dataset split into a feature store (and its targets).

    Two people asking for the same extraction share one store: the second waits for the first
    (its lease beside the store), then reuses the finished store."""
    _passive_openmp()
    import warnings

    from extract.datasets.base import DatasetWarning
    from extract.jobs import run_extract

    shown: set[str] = set()
    show_other = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        # A reader's oddities (e.g. annotations of unknown images) as one yellow line each, once.
        if not issubclass(category, DatasetWarning):
            return show_other(message, category, filename, lineno, file, line)
        text = " ".join(str(message).split())
        if text not in shown:
            shown.add(text)
            err.print(f"[bold yellow]warning:[/] {rich_escape(text)}", soft_wrap=True, highlight=False)

    options = {"num_classes": num_classes, "ignore_index": ignore_index, "seed": seed, "num_images": num_images}
    with warnings.catch_warnings():
        warnings.simplefilter("always", DatasetWarning)
        warnings.showwarning = show_warning
        result = run_extract(
            backbone=backbone, dataset=dataset, split=split, root=root, store_root=store_root,
            dataset_options={k: v for k, v in options.items() if v is not None}, weights=weights,
            layers=_parse_layers(layers), batch_size=batch_size, device=device, limit=limit,
            num_workers=workers, shard_size=shard_size, compression=compression.value, skip_bad=skip_bad,
            targets=targets, target_size=(target_size, target_size), show_progress=progress,
            storage_options=_storage_options(storage_option),
        )
    f = result.features
    if f.reused:
        out.print(f"features: [green]complete store found[/] {f.path}")
    else:
        out.print(f"features: wrote {f.images_written} images in {f.seconds:.1f} s "
                  f"({f.images_per_second:.1f} img/s) → {f.path}")
    if f.bad_images:
        out.print(f"[yellow]{len(f.bad_images)} undecodable image(s) recorded as bad[/]: {', '.join(f.bad_images[:5])}")
    if result.targets is not None:
        t = result.targets
        state = "complete store found" if t.reused else f"built {t.images_written} images"
        out.print(f"targets:  {state} → {t.path}")


# -- stores ---------------------------------------------------------------------------------------
def _require_store(path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
    """One line naming the fix when ``path`` is missing, a store root, or not a maxa store at all."""
    from store import _layout as L
    from store.catalogue import list_stores
    from store.errors import StoreError

    path = str(path)
    if L.read_attrs(path, storage_options) is not None:
        return
    if not L.exists(path, storage_options):
        raise StoreError(f"no store at {path}; list stores with `maxa stores ls ROOT` and give one of their paths.")
    if L.isdir(path, storage_options) and list_stores(path, with_size=False, storage_options=storage_options):
        raise StoreError(f"{path} is a store root, not a store; list its stores with `maxa stores ls {path}` "
                         "and give one of their ….zarr paths.")
    raise StoreError(f"{path} is not a maxa store (no 'maxa' attributes in its zarr.json); give a ….zarr path "
                     "listed by `maxa stores ls ROOT`.")


@stores_app.command("ls")
@clean_errors
def stores_ls(
    root: Annotated[str, typer.Argument(help="Store root: a folder or s3://bucket/prefix.")] = DEFAULT_STORE_ROOT,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    storage_option: StorageOptionList = None,
) -> None:
    """Every store under ROOT: backbone, dataset, split, images, grid, size, complete?, results
    recorded under ROOT that used it, and who is writing it (lease)."""
    from probe.results import result_counts
    from store import _layout as L
    from store.catalogue import list_stores
    from store.lease import read_lease
    from store.spec import FORMAT_VERSION

    root = str(root)
    so = _storage_options(storage_option)
    if not L.is_remote(root) and Path(root).exists() and not Path(root).is_dir():
        raise MaxaError(f"store root {root} is a file, not a folder; give the folder that holds features/ and targets/.")
    if not L.isdir(root, so):
        raise MaxaError(f"store root {root} does not exist; extract something first (`maxa extract …`) "
                        "or give the root you extracted into.")
    rows = list_stores(root, storage_options=so)
    counts = result_counts(root, storage_options=so)
    for r in rows:
        r["results"] = counts.get(str(r["key"]), 0)
        lease = None if r["complete"] else read_lease(r["path"], so)
        r["writer"] = lease.describe() if lease is not None else None
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    from rich.table import Table

    table = Table(title=f"stores under {root}")
    for col in ("kind", "backbone", "dataset", "split", "images", "bad", "grid / targets", "size", "complete", "results",
                "path"):
        table.add_column(col, overflow="fold")
    for r in rows:
        state = "yes" if r["complete"] else ("[yellow]writing[/]" if r["writer"] else "[red]no[/]")
        fmt = r["format"]
        if fmt != FORMAT_VERSION:
            older = isinstance(fmt, int) and fmt < FORMAT_VERSION
            state = f"[red]format {fmt}[/] ({'maxa stores upgrade' if older else 'not readable by this maxa'})"
        bad = f"[yellow]{r['bad_images']}[/]" if r["bad_images"] else "0"
        table.add_row(r["kind"], str(r["backbone"]), str(r["dataset"]), str(r["split"]), str(r["images"]), bad,
                      r["grid"], _human_bytes(r.get("bytes")), state, str(r["results"]), L.relative(r["path"], root))
    out.print(table if rows else f"no stores under {root}")


@stores_app.command("info")
@clean_errors
def stores_info(
    path: Annotated[str, typer.Argument(help="A store (….zarr, a path or s3://… URL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    storage_option: StorageOptionList = None,
) -> None:
    """A store's spec, provenance and state (and its writer's lease, if one holds it)."""
    from store.lease import read_lease
    from store.reader import open_store

    so = _storage_options(storage_option)
    _require_store(path, so)
    s = open_store(str(path), allow_incomplete=True, storage_options=so)
    spec = s.spec.to_dict()
    for layer in spec.get("layers", []):
        layer.pop("token_centres", None)  # recorded in the store; too long to print
    lease = read_lease(str(path), so)
    info = {"path": str(path), "kind": s.kind, "key": s.key, "complete": s.complete, "images": len(s),
            "shard_size": s.shard_size, "shards_done": int(s.shard_done().sum()),
            "num_shards": int(s.meta["num_shards"]), "bad_images": int(len(s.bad)),
            "bytes": s.nbytes_stored(), "compression": s.meta.get("compression"),
            "writer": lease.describe() if lease is not None else None,
            "spec": spec, "provenance": s.provenance}
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    for k, v in info.items():
        if isinstance(v, dict):
            out.print(f"[bold]{k}[/]:")
            for kk, vv in v.items():
                out.print(f"  {kk}: {vv}", highlight=False, soft_wrap=True)
        else:
            out.print(f"[bold]{k}[/]: {_human_bytes(v) if k == 'bytes' else v}", highlight=False)


@stores_app.command("verify")
@clean_errors
def stores_verify(
    path: Annotated[str, typer.Argument(help="A store (….zarr, a path or s3://… URL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    storage_option: StorageOptionList = None,
) -> None:
    """Re-read every chunk: checksums, completeness, shard flags. Exit 1 if anything is wrong."""
    from store.verify import verify_store

    so = _storage_options(storage_option)
    _require_store(path, so)
    report = verify_store(str(path), storage_options=so)
    if as_json:
        out.print_json(json.dumps(report.to_dict(), default=str))
    else:
        status = "[green]OK[/]" if report.ok else "[red]PROBLEMS[/]"
        out.print(f"{status} {report.path}: {report.kind}, {report.num_images} images, "
                  f"{report.shards_done}/{report.num_shards} shards done, {report.arrays_checked} arrays, "
                  f"{report.chunks_read} chunks read, {report.bad_images} image(s) recorded as bad", highlight=False)
        if report.bad_images:
            out.print(f"  note: {report.bad_images} image(s) could not be decoded at extraction (stored as zeros; "
                      "probes exclude them): " + ", ".join(report.bad_image_ids[:5])
                      + (" …" if report.bad_images > 5 else ""), highlight=False)
        for p in report.problems:
            out.print(f"  - {p}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@stores_app.command("upgrade")
@clean_errors
def stores_upgrade(
    path: Annotated[str, typer.Argument(help="A store written by an older maxa (….zarr, a path or s3://… URL).")],
    root: Annotated[Optional[Path], typer.Option(help="Root of the dataset the store was extracted from (not needed for shapes).")] = None,
    storage_option: StorageOptionList = None,
) -> None:
    """Bring a store from an older maxa to the current format: reads the dataset at --root to record
    its identity (checking it holds the store's images), then moves the store to its new key's path.
    The features and targets are not touched."""
    from pipelines.upgrade import upgrade_store

    so = _storage_options(storage_option)
    _require_store(path, so)
    new_path = upgrade_store(path, root, storage_options=so)
    out.print(f"upgraded {path}" + (f" → {new_path}" if new_path != str(path) else " (already current)"), highlight=False)


@stores_app.command("rm")
@clean_errors
def stores_rm(
    path: Annotated[str, typer.Argument(help="The store to delete (….zarr, a path or s3://… URL).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete even while a live writer holds the store's lease.")] = False,
    storage_option: StorageOptionList = None,
) -> None:
    """Delete one store: refuses anything that is not a maxa store, and a store being written
    (unless --force). The completion mark goes first, so readers never see a half-deleted store
    as complete."""
    from store.writer import check_removable, remove_store

    so = _storage_options(storage_option)
    path = str(path)
    meta = check_removable(path, force=force, storage_options=so)
    spec = meta.get("spec", {})
    what = (f"{meta.get('kind')} store {spec.get('backbone', '')} {spec.get('dataset')}/{spec.get('split')} "
            f"({meta.get('num_images')} images, {'complete' if meta.get('complete') else 'incomplete'})")
    if not yes and not typer.confirm(f"delete {what} at {path}?", default=False):
        out.print("nothing deleted")
        raise typer.Exit(1)
    remove_store(path, force=force, storage_options=so)
    out.print(f"deleted {path}", highlight=False)


# -- probe ----------------------------------------------------------------------------------------
def _results_table(records: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("backbone", "dataset", "task", "variant", "head", "seed", "metrics", "trivial", "P_learn", "epochs", "time"):
        table.add_column(col, overflow="fold")
    for r in records:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items() if not k.startswith("n_"))
        trivial = "  ".join(f"{k} {v:.4g}" for k, v in r["trivial"].items() if not k.startswith("n_"))
        table.add_row(r["backbone"], r["dataset"], r["task"], r["variant"], r["head"], str(r["seed"]), metrics,
                      trivial, _params(r["p_learn"]), str(r["epochs"]), f"{r['timings']['total_s']:.1f} s")
    return table


@app.command()
@clean_errors
def probe(
    store: Annotated[str, typer.Option(help="Training feature store (….zarr, a path or s3://… URL).")],
    task: Annotated[str, typer.Option(help="boundaries, distance, instances, semseg or depth.")],
    eval_store: Annotated[Optional[str], typer.Option(help="Eval feature store (default: same backbone+dataset, val/test split).")] = None,
    variant: Annotated[str, typer.Option(help="base, d16, no-sigma, shared-sigma, single-layer, paper-budget.")] = "base",
    head: Annotated[str, typer.Option(help="Readout: maxa (the MAXA adapter) or a baseline head (linear, cnn).")] = "maxa",
    seed: Annotated[int, typer.Option(help="Seed: initialisation, validation split, shuffling.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_epochs: Annotated[int, typer.Option(min=1, help="Epoch cap (early stopping on validation loss).")] = 30,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without improvement before stopping.")] = 5,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: the task's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    targets: Annotated[Optional[str], typer.Option(help="Training target store (default: found by image ids).")] = None,
    eval_targets: Annotated[Optional[str], typer.Option(help="Eval target store (default: found by image ids).")] = None,
    results_root: Annotated[Optional[str], typer.Option(help="Where runs and results go (default: the store root); "
                                                        "use your own with read-only access to a shared root.")] = None,
    min_large: Annotated[Optional[int], typer.Option(help="instances: eval images need this many large objects (3).")] = None,
    progress: Annotated[bool, typer.Option(help="Print per-epoch progress.")] = True,
    storage_option: StorageOptionList = None,
) -> None:
    """Train the MAXA adapter (or a baseline head) on a store and evaluate it; record the result."""
    from probe.train import ProbeConfig, train_probe

    options = {"min_large": min_large} if min_large is not None else {}
    config = ProbeConfig(task=task, variant=variant, head=head, seed=seed, batch_size=batch_size,
                         max_epochs=max_epochs, patience=patience, lr=lr, task_options=options)
    result = train_probe(str(store), config, eval_features=str(eval_store) if eval_store else None,
                         targets=str(targets) if targets else None,
                         eval_targets=str(eval_targets) if eval_targets else None,
                         results_root=str(results_root) if results_root else None, device=device,
                         show_progress=progress, storage_options=_storage_options(storage_option))
    out.print(_results_table([result.record], "probe result"))
    out.print(f"adapter: {result.run_dir}\nresult:  {result.result_path}", highlight=False)


@app.command()
@clean_errors
def predict(
    adapter: Annotated[str, typer.Option(help="Run directory written by `maxa probe` (a path or s3://… URL).")],
    store: Annotated[str, typer.Option(help="Feature store holding the image (a path or s3://… URL).")],
    index: Annotated[int, typer.Option(help="Image index in the store.")] = 0,
    size: Annotated[int, typer.Option(min=8, help="Output resolution (any; the adapter takes positions).")] = 224,
    out_path: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("pred.png"),
    storage_option: StorageOptionList = None,
) -> None:
    """Render a trained adapter's prediction for one stored image at any output size."""
    from probe.predict import colourise, predict as run_predict

    raw, meta = run_predict(adapter, store, index, (size, size), storage_options=_storage_options(storage_option))
    colourise(raw, meta["task"]).save(out_path)
    out.print(f"wrote {out_path} ({size}x{size}, task {meta['task']})")


# -- report ---------------------------------------------------------------------------------------
@app.command()
@clean_errors
def report(
    roots: Annotated[list[Path], typer.Argument(help="Store root(s) whose results/ to report.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for results.md, index.html and img/.")] = Path("maxa-report"),
    max_feature_images: Annotated[int, typer.Option(min=0, help="Images per backbone in the feature PCA figure.")] = 4,
) -> None:
    """Paper-style tables (with the paper's numbers and Δ), plots, feature PCA and predictions as Markdown + HTML."""
    from pipelines.report import write_report

    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise MaxaError(f"store root {', '.join(missing)} does not exist; pass the --store-root you extracted into.")
    paths = write_report([str(r) for r in roots], str(out_dir), max_feature_images=max_feature_images)
    for note in paths.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    out.print(f"wrote {paths.markdown}\nwrote {paths.html} ({len(paths.images)} images in {out_dir / 'img'})",
              highlight=False)


# -- bench ----------------------------------------------------------------------------------------
@bench_app.command("speed")
@clean_errors
def bench_speed(
    backbones: Annotated[str, typer.Option(help="Comma-separated registry names or timm:NAME, e.g. dinov2_b14,siglip_384.")],
    reference: Annotated[str, typer.Option(help="Reference backbone (ViT-B/16 at 224), always timed in the same run.")] = "imagenet_b16",
    batches: Annotated[int, typer.Option(min=1, help="Timed batches (paper: 10); shrink for large models on a CPU.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch (paper: 8).")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    store_root: Annotated[Optional[Path], typer.Option(help="Also append one task='speed' record per backbone to ROOT/results.")] = None,
    weights: Annotated[Weights, typer.Option(help="random (default: runtime does not depend on the weights, nothing "
                                                  "to download) or pretrained.")] = Weights.random,
    task_dim: Annotated[int, typer.Option(min=1, help="Adapter output channels D_out for its timing (1 = depth, boundaries).")] = 1,
    warmup: Annotated[Optional[int], typer.Option(min=0, help="Untimed warm-up batches (default: 1 on CPU, 2 on CUDA).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
) -> None:
    """Time backbones (and the MAXA adapter on their features) relative to ViT-B/16 at 224, as paper Fig. 6/8."""
    from pipelines.bench import speed_benchmark, write_speed_records

    rows = speed_benchmark(backbones.split(","), reference=reference, batches=batches, batch_size=batch_size,
                           device=device, weights=weights.value, task_dim=task_dim, warmup=warmup,
                           log=lambda m: err.print(m, highlight=False))
    paths = write_speed_records(store_root, rows) if store_root is not None else []
    if as_json:
        out.print_json(json.dumps(rows, default=str))
    else:
        from rich.table import Table

        r0 = rows[0]
        table = Table(title=f"inference speed on {r0['device_name']} ({r0['device']}, {r0['dtype']}, "
                            f"{r0['torch_threads']} threads), {r0['batches']} batches x {r0['batch_size']} images, "
                            f"median per batch",
                      caption=f"relative = time / {r0['reference']} (same run, timed first and last: drift "
                              f"{r0['reference_drift']:.2f}); adapter = MAXA base, "
                              f"D_out {r0['task_dim']}, 224x224 output; adapter rel. in units of the reference "
                              "backbone's time. Weights: " + ", ".join(sorted({r['weights'] for r in rows})))
        for col in ("backbone", "input", "grid", "params (M)", "s / batch", "img / s", "rel. ViT-B/16",
                    "adapter s / batch", "adapter rel.", "adapter P_learn"):
            table.add_column(col, overflow="fold")
        for r in rows:
            grid = "; ".join(f"{g[0]}x{g[1]}" for g in r["grids"].values())
            name = r["backbone"] + (" (ref)" if r["is_reference"] else "")
            table.add_row(name, f"{r['input_size'][0]}x{r['input_size'][1]}", grid, f"{r['backbone_params'] / 1e6:.1f}",
                          f"{r['seconds_per_batch']:.4f}", f"{r['images_per_second']:.2f}",
                          f"{r['relative_to_vitb16']:.2f}", f"{r['adapter_seconds_per_batch']:.4f}",
                          f"{r['adapter_relative']:.3f}", _params(r["p_learn"]))
        out.print(table)
    drift = rows[0]["reference_drift"]
    if not 0.83 <= drift <= 1.2:
        err.print(f"[yellow]note:[/] the reference ran {drift:.2f}x as long the second time (timed first and last): "
                  "the machine's speed changed during the run (other load?), so the ratios are noisy.",
                  highlight=False, soft_wrap=True)
    if paths:
        err.print(f"wrote {len(paths)} speed record(s) under {store_root / 'results'}", highlight=False)


# -- sweep ----------------------------------------------------------------------------------------
@app.command()
@clean_errors
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep TOML file (see sweeps/paper.toml, sweeps/smoke.toml).")],
    store_root: Annotated[str, typer.Option(help="Where stores and results live: a folder or s3://bucket/prefix ($MAXA_STORE_ROOT).")] = DEFAULT_STORE_ROOT,
    workers: Annotated[Optional[int], typer.Option(min=0, help="LocalCluster workers (default: one per GPU, else a few CPU workers); 0 runs in this process.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing dask scheduler, e.g. tcp://head:8786.")] = None,
    data_root: Annotated[Optional[list[str]], typer.Option("--data-root", metavar="NAME=PATH", help="Override a [datasets.NAME] root (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (what would be extracted, probed, skipped) and stop.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    storage_option: StorageOptionList = None,
) -> None:
    """Run a sweep file: every store extracted once, then every probe, on dask; finished work is skipped."""
    from pipelines.sweep import format_plan, plan_from_file, run_sweep

    plan = plan_from_file(sweep_file, store_root, data_roots=data_root, storage_options=_storage_options(storage_option))
    if dry_run:
        out.print(format_plan(plan))
    summary = run_sweep(plan, workers=workers, scheduler=scheduler, dry_run=dry_run, show_progress=progress)
    out.print(summary.describe(), highlight=False)
    for line in summary.failure_lines():
        err.print(f"[bold red]failed:[/] {rich_escape(line)}", soft_wrap=True, highlight=False)
    if summary.failures and not dry_run:
        raise typer.Exit(1)


# -- quick start ----------------------------------------------------------------------------------
@app.command()
@clean_errors
def quickstart(
    store_root: Annotated[Path, typer.Option(help="Where stores, adapters and results go.")] = Path(DEFAULT_STORE_ROOT),
    backbone: Annotated[str, typer.Option(help="Backbone (random init).")] = "test_vit",
    max_epochs: Annotated[int, typer.Option(min=1, help="Epoch cap per task.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """The built-in default job, offline: extract `shapes` with a tiny random backbone, then train and
    evaluate the MAXA adapter on every task from the stores, and print the results."""
    from pipelines.quickstart import run_quickstart

    result = run_quickstart(store_root, backbone=backbone, max_epochs=max_epochs, device=device,
                            show_progress=progress, log=lambda m: err.print(m, highlight=False))
    stores_ls(store_root, as_json=False)
    out.print(_results_table(result.records, "MAXA on shapes (metrics on the val split; trivial = constant/majority predictor)"))


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
