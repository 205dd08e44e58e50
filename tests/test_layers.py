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
    "maxa": (("extract", "probe", "store", "runtime"), "maxa (the public API) re-exports the libraries, not pipelines"),
}


def test_public_api_names_only_library_modules():
    """``maxa`` resolves its names lazily by module path (strings the import scan does not see)."""
    import maxa

    for name, module in maxa._NAMES.items():
        top = module.split(".")[0]
        assert top in MAY_IMPORT["maxa"][0], f"maxa.{name} comes from {module}: {MAY_IMPORT['maxa'][1]}"


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


# -- storage stays in store/ -------------------------------------------------------------------------
#: Modules only ``store/`` may import: the on-disk layout and the storage libraries. Everything else
#: reaches storage through ``store`` (a ``Location`` carries a path or URL with its options).
STORE_ONLY_IMPORTS = ("store._layout", "zarr", "fsspec", "s3fs")
#: Names that mean storage plumbing: a store ``Location`` carries them instead.
STORE_ONLY_NAMES = ("storage_options", "is_remote")


def storage_violations(rel_path: str, source: str, *, libraries: bool = True) -> list[str]:
    """Imports of the layout (and, with ``libraries``, of zarr/fsspec/s3fs) and storage-plumbing
    names (parameters, keywords, variables, attributes) in a file outside store/."""
    tree = ast.parse(source, filename=rel_path)
    package = ".".join(Path(rel_path).parts[:-1])
    banned = STORE_ONLY_IMPORTS if libraries else ("store._layout",)
    out = []
    for line, name in _imports(tree, package):
        if any(name == b or name.startswith(b + ".") for b in banned) or name == "store._layout":
            out.append(f"{rel_path}:{line}: imports {name} — only store/ knows the layout and does storage I/O")
    for node in ast.walk(tree):
        ident = (node.arg if isinstance(node, (ast.arg, ast.keyword)) else node.id if isinstance(node, ast.Name)
                 else node.attr if isinstance(node, ast.Attribute) else None)
        if ident in STORE_ONLY_NAMES:
            out.append(f"{rel_path}:{node.lineno}: names {ident} — pass a store Location (it carries the options)")
    return out


@pytest.mark.parametrize("folder", [p for p in MAY_IMPORT if p != "store"] + ["benchmarks", "tests"])
def test_only_store_does_storage(folder):
    found = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel == "tests/test_layers.py":
            continue
        # tests and benchmarks may open stores with zarr to damage or time them; never the layout module
        found += storage_violations(rel, f.read_text(encoding="utf-8"), libraries=folder in MAY_IMPORT)
    assert not found, "\n".join(found)


def test_a_storage_violation_is_named():
    src = "from store import _layout as L\n\ndef f(storage_options=None):\n    return g(storage_options=1)\n"
    assert storage_violations("probe/x.py", src) == [
        "probe/x.py:1: imports store._layout — only store/ knows the layout and does storage I/O",
        "probe/x.py:3: names storage_options — pass a store Location (it carries the options)",
        "probe/x.py:4: names storage_options — pass a store Location (it carries the options)",
    ]
    assert storage_violations("probe/x.py", "import zarr\n") != []
    assert storage_violations("tests/x.py", "import zarr\n", libraries=False) == []
