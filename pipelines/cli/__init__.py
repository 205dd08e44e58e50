"""The ``maxa`` command line: thin typer commands over library functions.

Bad input (``MaxaError``) prints one line naming the problem and the fix, and exits 2; set
``MAXA_DEBUG=1`` for the traceback.

This module builds the typer apps and registers the commands, in the order ``maxa --help`` lists
them; the commands live in :mod:`.listings`, :mod:`.run`, :mod:`.stores` and :mod:`.results`, the
failure handling in :mod:`.errors`, shared options in :mod:`.options` and the output formats in
:mod:`.render`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pipelines.cli.errors import OneLineUsageErrors, _worker_error, clean_errors  # noqa: F401 - tests import _worker_error from here
from pipelines.cli.listings import backbones, datasets
from pipelines.cli.results import ListByDefault, results_ls, results_upgrade
from pipelines.cli.run import bench_speed, extract, predict, probe, quickstart, report, sweep
from pipelines.cli.stores import stores_info, stores_ls, stores_rm, stores_upgrade, stores_verify

__all__ = ["app", "main", "clean_errors"]

#: ``-h`` beside ``--help`` on every command
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings=HELP,
                  help="Dense evaluation of frozen vision backbones with masked cross-attention adapters.")
stores_app = typer.Typer(no_args_is_help=True, context_settings=HELP,
                         help="List, inspect and verify feature and target stores.")
app.add_typer(stores_app, name="stores")
results_app = typer.Typer(cls=ListByDefault, no_args_is_help=True, context_settings=HELP,
                          help="The results table: `maxa results ROOT [--task T] [--format table|csv|json] …` lists, "
                               "filters and exports it (the same as `maxa results ls ROOT …`: its filters and "
                               "options are in `maxa results ls -h`); `maxa results upgrade ROOT` rewrites old "
                               "record files.")
app.add_typer(results_app, name="results")
bench_app = typer.Typer(no_args_is_help=True, context_settings=HELP,
                        help="Benchmarks: backbone and adapter inference speed (paper §4.5).")
app.add_typer(bench_app, name="bench")

def _version(value: bool) -> None:
    if value:
        from runtime.provenance import tool_version

        typer.echo(f"maxa {tool_version()}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print maxa's version and exit.")] = False) -> None:
    """Dense evaluation of frozen vision backbones with masked cross-attention adapters."""


def _summary(command) -> str:
    """A command's line in its group's list: the docstring's first paragraph as one line (typer's rich
    help keeps a docstring's line breaks there, which broke sentences mid-line)."""
    import inspect

    return " ".join(inspect.cleandoc(command.__doc__ or "").split("\n\n")[0].split())


for _command in (backbones, datasets, extract, probe, predict, report, sweep, quickstart):
    app.command(short_help=_summary(_command))(_command)
for _name, _command in (("ls", stores_ls), ("info", stores_info), ("verify", stores_verify),
                        ("upgrade", stores_upgrade), ("rm", stores_rm)):
    stores_app.command(_name, short_help=_summary(_command))(_command)
bench_app.command("speed", short_help=_summary(bench_speed))(bench_speed)
results_app.command("ls", short_help=_summary(results_ls))(results_ls)
results_app.command("upgrade", short_help=_summary(results_upgrade))(results_upgrade)


def main() -> None:  # pragma: no cover - console entry point alias
    app()
