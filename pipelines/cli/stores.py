"""``maxa stores``: list, inspect, verify, upgrade and delete feature and target stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines.cli.errors import clean_errors
from pipelines.cli.options import DEFAULT_STORE_ROOT, JsonFlag, StorageOptionList, _location
from pipelines.cli.render import _human_bytes, err, out
from runtime.errors import MaxaError
from store.location import Location


def _require_store(path: Location) -> Location:
    """``path`` if it is a store; else one line naming the fix (missing, a store root, not a maxa store)."""
    from runtime.errors import StoreError
    from store import read_attrs
    from store.catalogue import list_stores

    if read_attrs(path) is not None:
        return path
    if not path.exists():
        raise StoreError(f"no store at {path}; list stores with `maxa stores ls ROOT` and give one of their paths.")
    if path.isdir() and list_stores(path, with_size=False):
        raise StoreError(f"{path} is a store root, not a store; list its stores with `maxa stores ls {path}` "
                         "and give one of their ….zarr paths.")
    raise StoreError(f"{path} is not a maxa store (no 'maxa' attributes in its zarr.json); give a ….zarr path "
                     "listed by `maxa stores ls ROOT`.")


#: A store argument: a ….zarr folder or URL.
StorePath = Annotated[str, typer.Argument(help="A store (….zarr, a path or s3://… URL).")]


@clean_errors
def stores_ls(
    root: Annotated[str, typer.Argument(help="Store root: a folder or s3://bucket/prefix.")] = DEFAULT_STORE_ROOT,
    as_json: JsonFlag = False,
    storage_option: StorageOptionList = None,
) -> None:
    """Every store under ROOT: backbone, dataset, split, images, grid, size, complete?, results
    recorded under ROOT that used it, and who is writing it (lease)."""
    from store.catalogue import walk_stores, store_summary
    from store.lease import read_lease
    from store.results import result_counts
    from store.spec import FORMAT_VERSION

    loc = _location(root, storage_option)
    if loc.isfile():
        raise MaxaError(f"store root {root} is a file, not a folder; give the folder that holds features/ and targets/.")
    if not loc.isdir():
        raise MaxaError(f"store root {root} does not exist; extract something first (`maxa extract …`) "
                        "or give the root you extracted into.")
    stores = list(walk_stores(loc))
    rows = [store_summary(where, meta) for where, meta in stores]
    counts = result_counts(loc)
    for r, (where, _meta) in zip(rows, stores):
        r["results"] = counts.get(str(r["key"]), 0)
        lease = None if r["complete"] else read_lease(where)
        r["writer"] = lease.describe() if lease is not None else None
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    from rich.table import Table

    table = Table(title=f"stores under {root}")
    for col in ("kind", "backbone", "dataset", "split", "images", "bad", "grid / targets", "size", "complete", "results",
                "path"):
        table.add_column(col, overflow="fold")
    for r, (where, _meta) in zip(rows, stores):
        state = "yes" if r["complete"] else ("[yellow]writing[/]" if r["writer"] else "[red]no[/]")
        fmt = r["format"]
        if fmt != FORMAT_VERSION:
            older = isinstance(fmt, int) and fmt < FORMAT_VERSION
            state = f"[red]format {fmt}[/] ({'maxa stores upgrade' if older else 'not readable by this maxa'})"
        bad = f"[yellow]{r['bad_images']}[/]" if r["bad_images"] else "0"
        lossy = f" [yellow]({r['quantization']}, lossy)[/]" if r.get("quantization", "none") != "none" else ""
        table.add_row(r["kind"], str(r["backbone"]), str(r["dataset"]), str(r["split"]), str(r["images"]), bad,
                      r["grid"] + lossy, _human_bytes(r.get("bytes")), state, str(r["results"]), where.relative_to(loc))
    out.print(table if rows else f"no stores under {root}")
    for line in _look_alike_notes(rows, stores):
        err.print(f"[yellow]note:[/] {line}", highlight=False, soft_wrap=True)


def _flat_spec(spec: Any, prefix: str = "") -> dict[str, str]:
    """A spec's scalar settings by dotted name (per-token arrays and layer lists left out)."""
    out: dict[str, str] = {}
    if isinstance(spec, dict):
        for k, v in spec.items():
            if k in ("layers", "token_centres", "class_names"):
                continue
            out.update(_flat_spec(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(spec, default=str)}


def _look_alike_notes(rows: list[dict[str, Any]], stores: list) -> list[str]:
    """Stores that read alike in the table (same kind, backbone, dataset, split) but are different stores:
    what tells them apart (their specs' differing settings), so that a user picks the one they mean."""
    groups: dict[tuple, list[tuple[dict, Any]]] = {}
    for r, (where, meta) in zip(rows, stores):
        groups.setdefault((r["kind"], str(r["backbone"]), str(r["dataset"]), str(r["split"])), []).append(
            (_flat_spec((meta or {}).get("spec") or {}), where))
    notes = []
    for (kind, backbone, dataset, split), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        keys = sorted({k for flat, _ in members for k in flat})
        differ = [k for k in keys if len({flat.get(k) for flat, _ in members}) > 1
                  and not k.endswith(("dataset_id", "image_ids_hash"))]
        what = "; ".join(f"{k} " + " / ".join(flat.get(k, "–") for flat, _ in members) for k in differ[:4])
        who = "" if backbone in ("-", "None") else f" of {backbone}"
        word = {"features": "feature", "targets": "target", "predictions": "prediction"}.get(kind, kind)
        notes.append(f"{len(members)} {word} stores{who} on {dataset}/{split} differ"
                     + (f" in {what}" if what else " in their data (another dataset id)")
                     + " (in the order listed); `maxa stores info PATH` shows each one's settings.")
    return notes


@clean_errors
def stores_info(
    path: StorePath,
    as_json: JsonFlag = False,
    storage_option: StorageOptionList = None,
) -> None:
    """A store's spec, provenance and state (and its writer's lease, if one holds it)."""
    from store.lease import read_lease
    from store.reader import open_store

    loc = _require_store(_location(path, storage_option))
    s = open_store(loc, allow_incomplete=True)
    spec = dict(s.spec) if isinstance(s.spec, dict) else s.spec.to_dict()  # a prediction store's is a dict
    for layer in spec.get("layers", []):
        layer.pop("token_centres", None)  # recorded in the store; too long to print
    lease = read_lease(loc)
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


@clean_errors
def stores_verify(
    path: StorePath,
    as_json: JsonFlag = False,
    storage_option: StorageOptionList = None,
) -> None:
    """Re-read every chunk: checksums, completeness, shard flags. Exit 1 if anything is wrong."""
    from store.verify import verify_store

    report = verify_store(_require_store(_location(path, storage_option)))
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


@clean_errors
def stores_upgrade(
    path: Annotated[str, typer.Argument(help="A store written by an older maxa (….zarr, a path or s3://… URL).")],
    root: Annotated[Optional[Path], typer.Option(help="Root of the dataset the store was extracted from (not needed for shapes).")] = None,
    storage_option: StorageOptionList = None,
) -> None:
    """Bring a store from an older maxa to the current format: reads the dataset at --root to record
    its identity (checking it holds the store's images), then moves the store to its new key's path.
    Adds what xarray reads (dimension names, an image_id coordinate, the spec in each group's
    attributes, consolidated metadata) to a store written without it. The features and targets are
    not touched."""
    from pipelines.upgrade import upgrade_store

    loc = _require_store(_location(path, storage_option))
    changes: list[str] = []
    new_path = upgrade_store(loc, root, changes.append)
    if not changes and new_path == loc:
        out.print(f"{path} is already current: nothing to upgrade", highlight=False)
        return
    out.print(f"upgraded {path}" + (f" → {new_path}" if new_path != loc else ""), highlight=False)
    for change in changes:
        out.print(f"  {change}", highlight=False)


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

    loc = _location(path, storage_option)
    meta = check_removable(loc, force=force)
    spec = meta.get("spec", {})
    what = (f"{meta.get('kind')} store {spec.get('backbone', '')} {spec.get('dataset')}/{spec.get('split')} "
            f"({meta.get('num_images')} images, {'complete' if meta.get('complete') else 'incomplete'})")
    used = _results_that_used(loc, meta.get("key"))
    if not yes and not typer.confirm(f"delete {what} at {path}?{used and ' ' + used}", default=False):
        out.print("nothing deleted")
        raise typer.Exit(1)
    remove_store(loc, force=force)
    out.print(f"deleted {path}{used and ' (' + used + ')'}", highlight=False)


def _results_that_used(loc: Any, key: Any) -> str:
    """"N results recorded under ROOT used it; …" for a store under a root with a results table
    (the store's own root: up to two folders above it), else ""."""
    from store.results import result_counts, results_location

    root = loc.parent
    for _ in range(3):
        if results_location(root).isdir():
            n = result_counts(root).get(str(key), 0) if key else 0
            return (f"{n} result(s) recorded under {root} used it: their records stay, and a sweep needing it "
                    "extracts it again" if n else "")
        if root.parent == root:
            break
        root = root.parent
    return ""
