"""``maxa results``: list and filter the results table of a root, export it as CSV or JSON, and
rewrite record files of the older schema (``maxa results upgrade ROOT``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from typer.core import TyperGroup

from pipelines.cli.errors import clean_errors
from pipelines.cli.options import DEFAULT_STORE_ROOT, StorageOptionList, _location
from pipelines.cli.render import _record_lines_table, out
from runtime.errors import MaxaError


class ListByDefault(TyperGroup):
    """``maxa results ROOT …`` is ``maxa results ls ROOT …``: anything but a subcommand's name (or
    ``--help``) first runs ``ls`` (a root named like a subcommand: ``maxa results ls NAME``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["ls", *args]
        return super().parse_args(ctx, args)


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


Root = Annotated[str, typer.Argument(help="Root of the results table (a store root or --results-root): "
                                          "a folder or s3://bucket/prefix.")]


def _filter_option(field: str) -> Any:
    return typer.Option(f"--{field}", metavar=field.upper(),
                        help=f"Only records of this {field} (repeatable: any of them).")


def _results_root(root: str, storage_option: list[str] | None) -> Any:
    """The root's Location, if it has a results table; else one line naming the fix."""
    from store.results import results_location

    loc = _location(root, storage_option)
    if not loc.isdir():
        raise MaxaError(f"{root} does not exist; give a store root (or a --results-root) that probes recorded "
                        "results under.")
    if not results_location(loc).isdir():
        raise MaxaError(f"no results under {root} (it has no results/ folder); probe first (`maxa probe …`), or give "
                        "the root you probed into (its --results-root).")
    return loc


@clean_errors
def results_ls(
    root: Root = DEFAULT_STORE_ROOT,
    backbone: Annotated[Optional[list[str]], _filter_option("backbone")] = None,
    task: Annotated[Optional[list[str]], _filter_option("task")] = None,
    dataset: Annotated[Optional[list[str]], _filter_option("dataset")] = None,
    variant: Annotated[Optional[list[str]], _filter_option("variant")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="A table (one line per record, primary metric), or CSV "
                                        "/ JSON with every field and metric.<name> columns.")] = Format.table,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write the CSV / JSON to this file instead "
                                                     "of printing it.")] = None,
    storage_option: StorageOptionList = None,
) -> None:
    """The results table under ROOT: every finished probe (and speed benchmark), oldest first;
    filter by backbone, task, dataset, variant; export as CSV or JSON."""
    from pipelines.results_view import filter_records, flat_rows, to_csv, to_json
    from store.results import read_results

    loc = _results_root(root, storage_option)
    where = {"backbone": backbone, "task": task, "dataset": dataset, "variant": variant}
    records = filter_records(read_results(loc), where, root)
    if fmt == Format.table:
        if out_path is not None:
            raise MaxaError("--out writes CSV or JSON: add --format csv or --format json.")
        shown = ", ".join(f"{k} {'/'.join(v)}" for k, v in where.items() if v)
        out.print(_record_lines_table(records, f"results under {root}{': ' + shown if shown else ''} "
                                               f"({len(records)} record{'' if len(records) == 1 else 's'})"))
        return
    text = (to_csv if fmt == Format.csv else to_json)(flat_rows(records))
    if out_path is None:
        print(text, end="")
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text, encoding="utf-8")
    out.print(f"{len(records)} records written to {out_path}", highlight=False)


@clean_errors
def results_upgrade(root: Root, storage_option: StorageOptionList = None) -> None:
    """Rewrite the record files of ROOT's results table that an older maxa wrote (JSON-text fields)
    in the typed schema, each in one atomic write; typed files are left alone."""
    from store.results import upgrade_results

    done = upgrade_results(_results_root(root, storage_option))
    out.print(f"{len(done)} record file(s) rewritten in the typed schema under {root}" if done
              else f"every record file under {root} is already in the typed schema", highlight=False)
