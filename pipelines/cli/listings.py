"""The listing commands: ``maxa backbones`` and ``maxa datasets`` (what can be extracted)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipelines.cli.errors import clean_errors
from pipelines.cli.render import _backbones_table, out


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
    out.print(_backbones_table(rows))


@clean_errors
def datasets() -> None:
    """The dataset readers and the targets each supports."""
    from extract.datasets import dataset_names, get_dataset_class

    for name in dataset_names():
        cls = get_dataset_class(name)
        out.print(f"[bold]{name}[/]: {', '.join(sorted(cls.targets))}  (splits: {', '.join(cls.splits)})")
