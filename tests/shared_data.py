"""The real sample sets in ``../shared/data`` (beside the repository) that some tests read.

They are never copied into the repository: CI has them, a fresh clone may not. A test that needs
one gets its folder from :func:`shared_data`. Without the folder the test fails where
``MAXA_REQUIRE_SHARED_DATA=1`` (``.ci/run`` sets it, so CI never passes without them) and is
otherwise skipped with a reason naming the folder, which ``pytest -ra`` lists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """``../shared/data/<name>``, or a failure / a skip saying it is missing (see the module docstring)."""
    path = SHARED_DATA / name
    if path.is_dir():
        return path
    reason = f"real sample data {path} not found (expected ../shared/data beside the repository)"
    if os.environ.get("MAXA_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(f"{reason}; MAXA_REQUIRE_SHARED_DATA=1 requires it", pytrace=False)
    pytest.skip(reason)
