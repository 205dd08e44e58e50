"""Line numbers in TOML text: ``tomllib`` gives values but no positions.

Sweep-file errors name the line to fix (:mod:`pipelines.sweep_file`); :class:`TomlLines` finds the
line of a table, key or value by a simple scan of the raw text. It knows TOML only: no sweep schema.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TomlLines"]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")


def _split_dotted(text: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', text))


class TomlLines:
    """Finds the line of a table, key or value in the TOML text by a simple line scan.

    A table is a path as ``tomllib`` nests it: ``("datasets", "coco")``, or ``("experiment", 0)`` for
    the first ``[[experiment]]``; an inline table (``eval = { ... }``) is found inside its parent.
    """

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
