"""The packages' layers, checked on the source: which package may import which.

``runtime`` is the bottom (errors, settings, devices, provenance); ``store`` is the on-disk format
over it; ``extract`` and ``probe`` stand side by side over both and never import each other;
``pipelines`` ties everything together. Every import statement counts, including those inside
functions; the standard library and third-party packages are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> (the other first-party packages its modules may import, why). A package may always
#: import itself.
MAY_IMPORT: dict[str, tuple[tuple[str, ...], str]] = {
    "runtime": ((), "runtime is the bottom layer: it imports no other maxa package"),
    "store": (("runtime",), "store imports only runtime"),
    "extract": (("store", "runtime"), "extract imports store and runtime, never probe or pipelines"),
    "probe": (("store", "runtime"), "probe imports store and runtime, never extract or pipelines"),
    "pipelines": (("extract", "probe", "store", "runtime"), "pipelines may import every package"),
}


def _packages() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def _imports(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, imported name) for every import in a module of ``package``; ``from a import b`` gives
    ``a.b``, relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
    return found


def violations(rel_path: str, source: str) -> list[str]:
    """One message per import in ``source`` (the file at ``rel_path``) that breaks its package's rule."""
    parts = Path(rel_path).parts
    owner, package = parts[0], ".".join(parts[:-1])
    allowed, why = MAY_IMPORT[owner]
    out = []
    for line, name in _imports(ast.parse(source, filename=rel_path), package):
        top = name.split(".")[0]
        if top in MAY_IMPORT and top != owner and top not in allowed:
            out.append(f"{rel_path}:{line}: imports {name} — rule {owner!r}: {why}")
    return out


def test_every_package_has_a_rule():
    assert _packages() == sorted(MAY_IMPORT), "a new top-level package needs a line in MAY_IMPORT"


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_follow_the_layers(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    found = []
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        found += violations(rel, f.read_text(encoding="utf-8"))
    assert not found, "\n".join(found)


def test_a_violation_names_file_line_and_rule():
    src = "import os\n\ndef f():\n    from extract.jobs import run_extract\n"
    assert violations("probe/train.py", src) == [
        "probe/train.py:4: imports extract.jobs.run_extract — rule 'probe': probe imports store and "
        "runtime, never extract or pipelines"
    ]
    assert violations("runtime/x.py", "import store.reader\n") == [
        "runtime/x.py:1: imports store.reader — rule 'runtime': runtime is the bottom layer: it imports no "
        "other maxa package"
    ]
    assert violations("store/sub/y.py", "from .. import reader\nfrom runtime import errors\n") == []
    assert violations("pipelines/cli.py", "from extract import jobs\nfrom probe import train\n") == []
