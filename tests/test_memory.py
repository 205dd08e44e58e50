"""Memory budgets where jobs run: the cgroup / SLURM limit, not only the machine's RAM, and one
budget shared by the probe's three image sets, the training set first."""

from __future__ import annotations

from pathlib import Path

import pytest

import probe.data as data
import runtime.memory as memory
from runtime.memory import MemoryLimit

GB = 10**9


def _proc(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cgroup"
    p.write_text(text)
    return p


def test_cgroup_v2_limits_of_the_group_and_its_parents(tmp_path):
    root = tmp_path / "fs"
    (root / "slurm" / "job_7" / "step_0").mkdir(parents=True)
    (root / "slurm" / "memory.max").write_text("max\n")
    (root / "slurm" / "job_7" / "memory.max").write_text(f"{8 * GB}\n")
    (root / "slurm" / "job_7" / "step_0" / "memory.max").write_text("max\n")
    found = memory._cgroup_limits(root, _proc(tmp_path, "0::/slurm/job_7/step_0\n"))
    assert [m.bytes for m in found] == [8 * GB] and "job_7" in found[0].source


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    root = tmp_path / "fs"
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{3 * GB}\n")
    proc = _proc(tmp_path, "4:memory:/docker/abc\n0::/\n")
    assert [m.bytes for m in memory._cgroup_limits(root, proc)] == [3 * GB]
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory._cgroup_limits(root, proc) == []
    assert memory._cgroup_limits(root, tmp_path / "absent") == []


def test_slurm_limits():
    got = memory._slurm_limits({"SLURM_MEM_PER_CPU": "4000", "SLURM_CPUS_ON_NODE": "4"})
    assert got == [MemoryLimit(16000 * 2**20, "SLURM_MEM_PER_CPU x CPUs")]
    assert memory._slurm_limits({"SLURM_MEM_PER_NODE": "512"})[0].bytes == 512 * 2**20
    assert memory._slurm_limits({"SLURM_MEM_PER_NODE": "lots"}) == []


def test_the_smallest_limit_wins(monkeypatch):
    monkeypatch.setattr(memory, "_physical", lambda: 64 * GB)
    monkeypatch.setattr(memory, "_cgroup_limits", lambda: [MemoryLimit(6 * GB, "cgroup memory.max (/x)")])
    monkeypatch.setattr(memory, "_slurm_limits", lambda: [MemoryLimit(10 * GB, "SLURM_MEM_PER_NODE")])
    assert memory.host_memory_limit() == MemoryLimit(6 * GB, "cgroup memory.max (/x)")
    assert data.memory_budget_bytes() == int(6 * GB * data.HOST_FRACTION)


@pytest.fixture
def limited(monkeypatch):
    monkeypatch.setattr(data, "host_memory_limit", lambda: MemoryLimit(10 * GB, "cgroup memory.max (/job)"))


def test_one_budget_for_the_three_sets_training_first(limited):
    keep, why = data.plan_in_memory([3 * GB, 2 * GB, 1 * GB], "cpu", ["fit", "held-out", "eval"])
    assert keep == [True, False, True]  # 4 GB budget: fit, then eval still fits beside it
    assert why == ("fit 3.0 GB in memory, held-out 2.0 GB streamed, eval 1.0 GB in memory "
                   "(budget 4.0 GB: 40% of 10.0 GB (cgroup memory.max (/job)))")
    assert data.plan_in_memory([5 * GB], "cpu")[0] == [False]


def test_a_gpu_budget_is_its_free_memory(limited, monkeypatch):
    monkeypatch.setattr(data, "device_free_bytes", lambda dev: 2 * GB if dev.type == "cuda" else None)
    keep, why = data.plan_in_memory([0.9 * GB, 0.2 * GB], "cuda")
    assert keep == [True, False] and "budget 1.0 GB: 50% of 2.0 GB free on cuda" in why


def test_a_gpu_budget_is_not_held_to_the_hosts(limited, monkeypatch):
    """A GPU's sets reach it a block of images at a time (the host never holds a whole set), so a
    device with more free memory than the host's budget (4 GB here) keeps more than that."""
    monkeypatch.setattr(data, "device_free_bytes", lambda dev: 20 * GB if dev.type == "cuda" else None)
    keep, why = data.plan_in_memory([6 * GB, 3 * GB, 2 * GB], "cuda")
    assert keep == [True, True, False] and "budget 10.0 GB: 50% of 20.0 GB free on cuda" in why
    assert data.plan_in_memory([6 * GB], "cpu")[0] == [False]
