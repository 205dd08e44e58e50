"""runtime/settings.py: every MAXA_* variable read there, at call time, documented in docs/settings.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from runtime import settings
from runtime.errors import MaxaError, StoreError

ROOT = Path(__file__).resolve().parents[1]
VARS = {getattr(settings, n) for n in settings.__all__ if n.endswith("_VAR")}


def test_defaults(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    assert settings.store_root() == "maxa-stores"
    assert settings.debug() is False
    assert settings.cpu_kernels() is True
    assert settings.worker_backbones() == 1
    assert settings.worker_threads() is None
    assert settings.lease_wait_s() is None
    assert settings.lease_stale_s() == 300.0
    assert settings.lease_poll_s() == 2.0


def test_read_when_called(monkeypatch):
    monkeypatch.setenv("MAXA_STORE_ROOT", "s3://lab/stores")
    monkeypatch.setenv("MAXA_DEBUG", "0")  # any non-empty value
    monkeypatch.setenv("MAXA_CPU_KERNELS", "0")
    monkeypatch.setenv("MAXA_WORKER_BACKBONES", "3")
    monkeypatch.setenv("MAXA_WORKER_THREADS", "2")
    monkeypatch.setenv("MAXA_LEASE_WAIT_S", "0.5")
    monkeypatch.setenv("MAXA_LEASE_STALE_S", "")  # empty: the default
    monkeypatch.setenv("MAXA_LEASE_POLL_S", "0.2")
    assert settings.store_root() == "s3://lab/stores"
    assert settings.debug() is True
    assert settings.cpu_kernels() is False
    assert (settings.worker_backbones(), settings.worker_threads()) == (3, 2)
    assert (settings.lease_wait_s(), settings.lease_stale_s(), settings.lease_poll_s()) == (0.5, 300.0, 0.2)


def test_bad_values_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("MAXA_LEASE_WAIT_S", "soon")
    with pytest.raises(StoreError, match=re.escape("$MAXA_LEASE_WAIT_S='soon' is not a number of seconds.")):
        settings.lease_wait_s()
    monkeypatch.setenv("MAXA_WORKER_BACKBONES", "two")
    with pytest.raises(MaxaError, match=re.escape("$MAXA_WORKER_BACKBONES='two' is not a whole number.")):
        settings.worker_backbones()


def test_every_variable_is_documented():
    doc = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(MAXA_[A-Z_]+)` \|", doc, flags=re.M))
    assert rows == VARS


def test_only_settings_names_the_variables():
    """No other module of the packages holds a MAXA_* name as a string of its own (it would read or
    set the variable behind settings' back)."""
    found = []
    for package in ("runtime", "store", "extract", "probe", "pipelines"):
        for f in sorted((ROOT / package).rglob("*.py")):
            if f == ROOT / "runtime" / "settings.py":
                continue
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"MAXA_[A-Z_]+", node.value):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)
