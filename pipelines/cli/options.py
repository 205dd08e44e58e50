"""What several ``maxa`` commands share in their signatures: defaults, choices and option types, and
the parsers of the options typer cannot convert itself (``--layers``, ``--storage-option``)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from runtime import settings
from store import COMPRESSIONS

from runtime.errors import MaxaError

#: ``--store-root`` (and ``stores ls ROOT``) when not given.
DEFAULT_STORE_ROOT = settings.store_root()  # typer option defaults are fixed when the commands are defined
#: The ``--device`` default of every command that runs a model.
DEFAULT_DEVICE = "auto"


class Weights(StrEnum):
    pretrained = "pretrained"
    random = "random"


#: ``--compression`` choices: the store's codecs, named once in the store package.
Compression = StrEnum("Compression", {name: name for name in COMPRESSIONS})


StorageOptionList = Annotated[
    Optional[list[str]],
    typer.Option("--storage-option", metavar="KEY=VALUE",
                 help="fsspec option for s3://… stores (repeatable): endpoint_url=…, key=…, secret=…, anon=true, "
                      "client_kwargs.region_name=…; the AWS_* environment variables work without it."),
]

#: ``--json``: print JSON instead of a table.
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _option_pairs(items: list[str] | None) -> dict[str, Any] | None:
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


def _location(path: str | Path, items: list[str] | None) -> Any:
    """``path`` (a folder or URL) with the ``--storage-option`` pairs, as one store Location."""
    from store.location import as_location

    return as_location(path, _option_pairs(items))


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

