"""``maxa sweep``: validation with line numbers, planning and skipping, dask execution, failures, worker loss."""

from __future__ import annotations

import os
import signal
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines.sweep import SweepSummary, plan_from_file, run_sweep
from probe.config import config_identity
from pipelines.sweep_file import SweepFileError, load_sweep, parse_sweep
from store.results import read_results

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "sweeps" / "smoke.toml"
PAPER = REPO / "sweeps" / "paper.toml"

TINY = """
name = "tiny"
[extract]
device = "cpu"
batch_size = 4
shard_size = 4
decode_workers = 0
target_size = 32
[probe]
device = "cpu"
max_epochs = 1
batch_size = 8
[weights]
test_vit = "random"
[datasets.shapes]
train = { split = "train", options = { num_images = 12 } }
eval = { split = "val", options = { num_images = 6 } }
"""


def _write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _identity_counts(root: Path) -> Counter:
    return Counter((r["backbone"], r["dataset"], r["task"], r["variant"], r["head"], r["seed"])
                   for r in read_results(root))


def _run_counts(root: Path) -> Counter:
    """Records by what they ran: the ``_identity_counts`` fields and the whole probe configuration."""
    return Counter((r["backbone"], r["dataset"], r["task"], r["variant"], r["head"], r["seed"],
                    config_identity(r["config"]["probe"])) for r in read_results(root))


def _planned_runs(plan) -> set:
    return {(p.spec.backbone, plan.sweep.datasets[p.spec.dataset].reader, p.spec.task, p.spec.variant, p.spec.head,
             p.spec.seed, config_identity(p.config)) for p in plan.probes}


def _expected(plan) -> set:
    return {(p.spec.backbone, plan.sweep.datasets[p.spec.dataset].reader, p.spec.task, p.spec.variant, p.spec.head,
             p.spec.seed) for p in plan.probes}


# -- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("snippet, line, words", [
    ('[[experiment]]\nbackbones = ["test_vit", "dinov3_b14"]\ntasks = { shapes = ["depth"] }\n', 2, "unknown backbone 'dinov3_b14'"),
    ('[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth", "normals"] }\n', 3, "unknown task 'normals'"),
    ('[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\nvariants = ["base",\n  "d32"]\n', 5, "unknown variant 'd32'"),
    ('[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\nheads = ["dpt"]\n', 4, "unknown head 'dpt'"),
    ('[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\nmax_epoch = 3\n', 4, "unknown key 'max_epoch'"),
    ('[[experiment]]\nbackbones = ["test_vit"]\ntasks = { voc = ["semseg"] }\n', 3, "dataset 'voc'"),
    ('[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\n[[experiment]]\nbackbones = ["test_vit"]\n'
     'tasks = { shapes = ["depth"] }\nvariants = ["d16"]\nheads = ["linear"]\n', 8, "takes variant base only"),
])
def test_bad_names_are_rejected_naming_the_line(snippet, line, words):
    text = TINY + snippet
    with pytest.raises(SweepFileError) as info:
        parse_sweep(text, "x.toml")
    msg = str(info.value)
    lines = TINY.count("\n")
    assert f"x.toml line {lines + line}:" in msg and words in msg and "\n" not in msg


def test_bad_dataset_table_and_data_root_are_rejected():
    bad = TINY.replace("[datasets.shapes]", "[datasets.shapes]\nreader = \"shapez\"") + \
        '[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\n'
    with pytest.raises(SweepFileError, match=r"line 16: unknown dataset reader 'shapez'.*did you mean shapes"):
        parse_sweep(bad, "x.toml")
    ok = TINY + '[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\n'
    with pytest.raises(SweepFileError, match="no \\[datasets.coco\\]"):
        parse_sweep(ok, "x.toml", ["coco=/data/coco"])
    with pytest.raises(SweepFileError, match="not valid TOML"):
        parse_sweep(ok + "oops = [\n", "x.toml")


def test_old_spelling_num_workers_is_read_with_a_notice(tmp_path):
    exp = '[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\n'
    new = parse_sweep(TINY + exp, "x.toml")
    assert new.extract["num_workers"] == 0 and not new.notices
    old = parse_sweep(TINY.replace("decode_workers = 0", "num_workers = 3") + exp, "x.toml")
    assert old.extract["num_workers"] == 3 and "decode_workers" not in old.extract
    assert old.notices == ["x.toml line 7: [extract] num_workers is now decode_workers; the old spelling goes in a later version."]
    from typer.testing import CliRunner

    from pipelines.cli import app

    sweep = _write(tmp_path, TINY.replace("decode_workers = 0", "num_workers = 0") + exp)
    dry = CliRunner().invoke(app, ["sweep", str(sweep), "--store-root", str(tmp_path / "fresh"), "--dry-run"])
    assert dry.exit_code == 0 and "warning: " in dry.output and "num_workers is now decode_workers" in dry.output
    with pytest.raises(SweepFileError, match="line 8: .*both decode_workers and its old spelling num_workers"):
        parse_sweep(TINY.replace("decode_workers = 0", "decode_workers = 0\nnum_workers = 3") + exp, "x.toml")


def test_shipped_sweep_files_validate():
    paper = load_sweep(PAPER, ["coco=/elsewhere/coco"])
    assert paper.datasets["coco"].train.root == "/elsewhere/coco"
    backbones = {p.backbone for p in paper.probes if p.experiment == "tables-2-3"}
    assert len(backbones) == 21
    ablation = {(p.backbone, p.variant) for p in paper.probes if p.experiment == "table-4-ablation"}
    assert len(ablation) == 18  # 3 backbones x 6 variants (base and paper-budget among them)
    assert {p.head for p in paper.probes if p.experiment == "fig-3-baselines"} == {"linear", "cnn", "maxa"}
    smoke = load_sweep(SMOKE)
    assert {p.backbone for p in smoke.probes} == {"test_vit", "timm:test_convnext"}


def test_built_in_sweeps_by_name(tmp_path, monkeypatch):
    """`maxa sweep smoke` / `paper` read the shipped files wherever maxa runs; a file of that name in
    the working folder comes first; an unknown name is one line naming the built-in ones."""
    from pipelines.sweep_file import builtin_sweep

    monkeypatch.chdir(tmp_path)
    assert builtin_sweep("smoke") == builtin_sweep("smoke.toml") == SMOKE.resolve()
    assert builtin_sweep("paper") == PAPER.resolve() and builtin_sweep("other") is None
    assert load_sweep("smoke").probes == load_sweep(SMOKE).probes
    assert len(load_sweep("paper", ["coco=/elsewhere/coco"]).probes) == len(load_sweep(PAPER).probes)
    (tmp_path / "smoke.toml").write_text(SMOKE.read_text().replace("timm:test_convnext", "timm:test_vit"))
    assert {p.backbone for p in load_sweep("smoke.toml").probes} == {"test_vit", "timm:test_vit"}
    with pytest.raises(SweepFileError, match="sweep file other does not exist; .* built-in sweep: smoke or paper"):
        load_sweep("other")
    with pytest.raises(SweepFileError, match="does not exist"):
        load_sweep(tmp_path / "sub" / "smoke")  # a path, not a name: not replaced by the built-in one


# -- the smoke sweep on a 2-worker LocalCluster, then a re-run that does nothing ------------------
@pytest.mark.slow
def test_smoke_sweep_every_result_once_and_rerun_does_nothing(tmp_path):
    root = tmp_path / "stores"
    summary = run_sweep(SMOKE, root, workers=2)
    assert summary.ok, summary.failure_lines()
    plan = summary.plan
    # 31 probes, and the base adapter once more at the ablation's and baselines' 1 epoch (tables: 2)
    assert summary.extractions == 6 and summary.probes == len(plan.probes) == 34
    counts = _run_counts(root)
    assert set(counts) == _planned_runs(plan) and set(counts.values()) == {1}
    semseg_base = sorted(r["config"]["probe"]["max_epochs"] for r in read_results(root)
                         if (r["task"], r["variant"], r["head"], r["backbone"]) == ("semseg", "base", "maxa", "test_vit"))
    assert semseg_base == [1, 2]
    again = run_sweep(SMOKE, root, workers=2)
    assert again.ok and again.extractions == 0 and again.probes == 0 and again.shards == 0
    assert again.skipped == again.planned
    assert _run_counts(root) == counts
    # another epoch budget is another experiment: the probes it changes are planned again, none skipped
    longer = tmp_path / "longer.toml"
    longer.write_text(SMOKE.read_text().replace("max_epochs = 2\npatience = 2", "max_epochs = 3\npatience = 2"))
    replanned = plan_from_file(longer, root)
    todo = [p for p in replanned.probes if p.status == "todo"]
    assert len(todo) == 10 and {p.spec.experiment for p in todo} == {"tables"}


def test_a_probe_with_other_settings_is_another_run(tmp_path):
    """Two experiments asking for the same probe with other settings plan two runs (the second named
    by what differs); a record is taken for a planned run only with the same whole configuration."""
    from pipelines.sweep_jobs import recorded_run_identity, run_identity

    plan = plan_from_file(SMOKE, tmp_path / "none")
    twice = [p for p in plan.probes if p.id.startswith("probe test_vit shapes semseg base maxa seed 0")]
    assert [p.id for p in twice] == ["probe test_vit shapes semseg base maxa seed 0",
                                     "probe test_vit shapes semseg base maxa seed 0 (max_epochs 1)"]
    config = {"task": "semseg", "seed": 0, "max_epochs": 2, "patience": 2, "batch_size": 8}
    record = {"train_store": "a", "eval_store": "b", "task": "semseg",
              "config": {"probe": {**config, "variant": "base", "head": "maxa", "lr": None, "val_fraction": 0.1,
                                   "max_train_images": None, "task_options": {}}}}
    assert recorded_run_identity(record) == run_identity("a", "b", {**config, "max_epochs": 2.0})
    assert recorded_run_identity(record) != run_identity("a", "b", {**config, "max_epochs": 3})
    assert recorded_run_identity(record) != run_identity("a", "b", {**config, "lr": 1e-3})
    assert recorded_run_identity({k: v for k, v in record.items() if k != "config"}) is None  # never taken for a run
    assert recorded_run_identity({**record, "task": "speed"}) is None


# -- distributed extraction equals a single-process one ---------------------------------------------
@pytest.mark.slow
def test_two_worker_extraction_is_bitwise_equal_to_single_process(tmp_path):
    import torch
    import zarr

    from extract.datasets import create_dataset
    from extract.runner import ExtractConfig, extract_features
    from store import open_features, verify_store

    sweep = _write(tmp_path, TINY.replace("shard_size = 4", "shard_size = 3") +
                   '[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\nheads = ["linear"]\n')
    summary = run_sweep(sweep, tmp_path / "dist", workers=2)
    assert summary.ok, summary.failure_lines()
    assert summary.shards == 4 + 2  # 12 train images / 3, 6 val images / 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker
    try:
        for split, n in (("train", 12), ("val", 6)):
            reader = create_dataset("shapes", None, split, num_images=n)
            ref = extract_features("test_vit", reader, str(tmp_path / "single"), ExtractConfig(weights="random", device="cpu",
                                   batch_size=4, shard_size=3, num_workers=0), show_progress=False)
            job = next(f for f in summary.plan.features.values() if f.split.split == split)
            assert str(job.path).replace(str(tmp_path / "dist"), "") == ref.path.replace(str(tmp_path / "single"), "")
            a, b = open_features(job.path), open_features(ref.path)
            assert a.key == b.key and a.complete and b.complete
            assert np.array_equal(a.read_all().view(np.uint16), b.read_all().view(np.uint16))
            ga, gb = zarr.open_group(str(job.path), mode="r"), zarr.open_group(ref.path, mode="r")
            assert np.array_equal(ga["shard_done"][:], gb["shard_done"][:]) and np.array_equal(ga["bad"][:], gb["bad"][:])
            assert verify_store(job.path).ok and verify_store(ref.path).ok
    finally:
        torch.set_num_threads(threads)
    assert not list((tmp_path / "dist").rglob("*.lease*"))  # the coordinator released every lease


# -- failures: the rest finishes, each failure is one line ------------------------------------------
def test_failing_jobs_do_not_stop_the_others(tmp_path):
    sweep = _write(tmp_path, TINY + """
        [datasets.coco]
        root = "/nonexistent/coco"
        [[experiment]]
        name = "ok"
        backbones = ["test_vit"]
        tasks = { shapes = ["depth"] }
        heads = ["linear"]
        [[experiment]]
        name = "bad root"
        backbones = ["test_vit"]
        tasks = { coco = ["boundaries"] }
        heads = ["linear"]
        [[experiment]]
        name = "bad weights"
        backbones = ["timm:test_convnext"]
        tasks = { shapes = ["depth"] }
        heads = ["linear"]
        weights = "/nonexistent/weights.safetensors"
    """)
    root = tmp_path / "stores"
    summary = run_sweep(sweep, root, workers=0)
    assert not summary.ok
    assert summary.probes == 1 and _identity_counts(root) == Counter({("test_vit", "shapes", "depth", "base", "linear", 0): 1})
    lines = summary.failure_lines()
    assert all("\n" not in line for line in lines)
    assert any("probe test_vit coco boundaries" in l and "/nonexistent/coco" in l for l in lines)
    assert any("probe timm:test_convnext shapes depth" in l and "weights.safetensors" in l for l in lines)
    # each cause once: every job the missing COCO root stops (its stores, the probe needing them) in one line
    coco = [f.job for f in summary.failures if "/nonexistent/coco" in f.reason]
    grouped = summary.grouped_failure_lines()
    assert len(coco) >= 3 and len(grouped) == 2 and all("\n" not in line for line in grouped)
    assert grouped[0].startswith(f"{len(coco)} jobs ({coco[0]}; {coco[1]}; and {len(coco) - 2} more): COCO root "), grouped
    convnext = [f.job for f in summary.failures if "weights.safetensors" in f.reason]
    assert grouped[1].startswith(f"{len(convnext)} jobs ({convnext[0]}; {convnext[1]}") and "does not exist" in grouped[1]
    one = SweepSummary(plan=summary.plan, failures=summary.failures[-1:])
    assert one.grouped_failure_lines() == [summary.failures[-1].line()]  # a cause of one job: its own line
    # the CLI: a summary, one line per cause, non-zero exit; --dry-run writes nothing
    from typer.testing import CliRunner

    from pipelines.cli import app

    res = CliRunner().invoke(app, ["sweep", str(sweep), "--store-root", str(root), "--workers", "0", "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "0 probes" in res.output and f"failed: {len(convnext)} jobs (features timm:test_convnext" in res.output
    dry = CliRunner().invoke(app, ["sweep", str(sweep), "--store-root", str(tmp_path / "fresh"), "--dry-run"])
    assert dry.exit_code == 0 and "would run" in dry.output and not (tmp_path / "fresh").exists()
    assert "failed:" not in dry.output and f"cannot run: {len(coco)} jobs" in " ".join(dry.output.split())
    bad = _write(tmp_path, TINY + '[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["dpeth"] }\n', "bad.toml")
    res = CliRunner().invoke(app, ["sweep", str(bad), "--store-root", str(tmp_path / "never")])
    assert res.exit_code == 2 and f"line {TINY.count(chr(10)) + 3}: unknown task 'dpeth'" in res.output and not (tmp_path / "never").exists()


# -- a store another coordinator is writing: wait for it, do not fail ------------------------------
HOLD_LEASE = """
import sys, time
from store.lease import StoreLease
lease = StoreLease(sys.argv[1])
assert lease.try_claim()
lease.start_heartbeat()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lease.release()
"""


def _hold_lease(path: str, seconds: float):
    """Another process (another sweep, a `maxa extract`) holding a live, heartbeating lease on ``path``."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, path, str(seconds)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_store_held_by_another_writer_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("MAXA_LEASE_POLL_S", "0.2")
    sweep = _write(tmp_path, TINY + '[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\n'
                                    'heads = ["linear"]\n')
    plan = plan_from_file(sweep, tmp_path / "stores")
    busy = next(f for f in plan.features.values() if f.split.split == "train")
    other = _hold_lease(busy.path, 3.0)  # lets go after 3 s
    events = []
    try:
        summary = run_sweep(plan, workers=0, on_event=lambda name, jid: events.append((name, jid)))
    finally:
        other.kill()
        other.wait()
    assert summary.ok, summary.failure_lines()
    assert ("waiting", busy.id) in events and ("done", busy.id) in events
    assert events.index(("waiting", busy.id)) < events.index(("done", busy.id))
    assert summary.probes == 1 and summary.extractions == 4  # 2 feature + 2 target stores, nothing failed

    # With a bound on the wait ($MAXA_LEASE_WAIT_S), a writer that never lets go fails the store and
    # its probe with one line each; nothing else stops.
    monkeypatch.setenv("MAXA_LEASE_WAIT_S", "0.5")
    sweep2 = _write(tmp_path, TINY.replace("num_images = 12", "num_images = 10") +
                    '[[experiment]]\nbackbones = ["test_vit"]\ntasks = { shapes = ["depth"] }\nheads = ["linear"]\n',
                    "sweep2.toml")
    plan2 = plan_from_file(sweep2, tmp_path / "stores")
    busy2 = next(f for f in plan2.features.values() if f.split.split == "train")
    stuck = _hold_lease(busy2.path, 120.0)
    try:
        summary2 = run_sweep(plan2, workers=0)
    finally:
        stuck.kill()
        stuck.wait()
    lines = summary2.failure_lines()
    assert not summary2.ok and len(lines) == 2 and all("\n" not in line for line in lines)
    assert any(busy2.id in line and "$MAXA_LEASE_WAIT_S" in line and "pid" in line for line in lines)


# -- a worker killed mid-sweep ----------------------------------------------------------------------
@pytest.mark.slow
def test_killed_worker_still_every_result_once(tmp_path):
    import dask
    from distributed import Client, LocalCluster

    sweep = _write(tmp_path, TINY + """
        [[experiment]]
        backbones = ["test_vit"]
        tasks = { shapes = ["boundaries", "distance", "semseg", "depth"] }
        heads = ["linear", "maxa"]
    """)
    env = {"MAXA_WORKER_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=env,
                               silence_logs=50)
    client = Client(cluster, set_as_default=False)
    killed: list[int] = []
    try:
        pids = client.run(os.getpid)

        def on_event(event: str, job: str) -> None:
            if killed:
                return
            busy = [a for a, keys in client.processing().items() if keys]
            victim = (busy or list(pids))[0]
            killed.append(pids[victim])
            os.kill(pids[victim], signal.SIGKILL)

        root = tmp_path / "stores"
        summary = run_sweep(sweep, root, scheduler=cluster.scheduler_address, on_event=on_event)
        assert killed
        assert summary.ok, summary.failure_lines()
        counts = _identity_counts(root)
        assert set(counts) == _expected(summary.plan) and set(counts.values()) == {1}
        again = run_sweep(sweep, root, scheduler=cluster.scheduler_address)
        assert again.extractions == 0 and again.probes == 0
    finally:
        client.close()
        cluster.close()
