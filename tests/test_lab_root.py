"""A lab store root: stores shared by content key (one writer per store, a lease), `stores ls/rm`,
and read-only use of a shared root (results elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from extract.datasets import create_dataset
from extract.jobs import run_extract
from extract.runner import ExtractConfig, extract_features
from pipelines.cli import app
from store.results import append_result, read_results
from probe.train import ProbeConfig, train_probe
from store import open_features, verify_store
from runtime.errors import StoreError
from store.lease import StoreLease, lease_location
from store.spec import FeatureSpec, LayerSpec
from store.writer import ArrayDef, StoreWriter

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import extract_shapes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

EXTRACT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from extract.datasets import create_dataset
    from extract.runner import ExtractConfig, extract_features

    root, log = sys.argv[1], sys.argv[2]

    def slow(shard):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {shard}\\n")
        time.sleep(1.0)

    reader = create_dataset("shapes", None, "val", num_images=16)
    r = extract_features("test_vit", reader, root, ExtractConfig(weights="random", device="cpu", batch_size=2, shard_size=4,
                         num_workers=0), show_progress=False, on_shard=slow)
    print(json.dumps({"pid": os.getpid(), "path": r.path, "reused": r.reused, "written": r.images_written}))
    """
)


def _kw():
    config = ExtractConfig(weights="random", device="cpu", batch_size=2, shard_size=4, num_workers=0)
    return dict(config=config, show_progress=False)


def test_two_processes_share_one_store(tmp_path):
    ref = extract_features("test_vit", create_dataset("shapes", None, "val", num_images=16), str(tmp_path / "ref"), **_kw())
    script = tmp_path / "extract_same_store.py"
    script.write_text(EXTRACT_SCRIPT)
    root, log = tmp_path / "lab", tmp_path / "writes.log"
    env = {**os.environ, "MAXA_LEASE_POLL_S": "0.2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(log)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    writes = [line.split() for line in log.read_text().splitlines()]
    # one store, each of its 4 shards written exactly once, all by one process
    assert sorted(int(s) for _, s in writes) == [0, 1, 2, 3]
    writer_pid = {int(p) for p, _ in writes}
    assert len(writer_pid) == 1
    assert results[0]["path"] == results[1]["path"]
    waiter = next(r for r, o in zip(results, outs) if r["pid"] not in writer_pid)
    waiter_err = outs[[r["pid"] for r in results].index(waiter["pid"])][1]
    assert waiter["reused"] and waiter["written"] == 0
    assert "waiting for pid" in waiter_err and "extracting this store" in waiter_err
    path = results[0]["path"]
    assert verify_store(path).ok
    assert not os.path.exists(lease_location(path))
    np.testing.assert_array_equal(open_features(path).read_all(), open_features(ref.path).read_all())
    assert len(list((root / "features").rglob("*.zarr"))) == 1


def test_stale_lease_of_a_dead_writer_is_taken_over(tmp_path, capsys):
    reader = create_dataset("shapes", None, "val", num_images=16)
    ref = extract_features("test_vit", reader, str(tmp_path / "ref"), **_kw())
    root = tmp_path / "lab"

    def crash(shard):
        if shard == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        extract_features("test_vit", reader, str(root), **_kw(), on_shard=crash)
    path = ref.path.replace(str(tmp_path / "ref"), str(root))
    assert not os.path.exists(lease_location(path))  # released on the way out
    # a writer on this host that died (kill -9) without releasing: its pid is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = StoreLease(path)
    lease.info.owner["pid"] = dead.pid
    assert lease.try_claim()
    missing = np.flatnonzero(~open_features(path, allow_incomplete=True).shard_done()).tolist()
    assert 0 < len(missing) < 4 and 0 not in missing
    written = []
    again = extract_features("test_vit", reader, str(root), **_kw(), on_shard=written.append)
    assert "took over the stale lease" in capsys.readouterr().err
    assert not again.reused and sorted(written) == missing  # only the missing shards
    np.testing.assert_array_equal(open_features(path).read_all(), open_features(ref.path).read_all())
    assert not os.path.exists(lease_location(path))


def _tiny_writer(tmp_path: Path, **kw) -> StoreWriter:
    spec = FeatureSpec(backbone="b", timm_name="b", weights_id="random:0", input_size=(8, 8), mean=(0, 0, 0),
                       std=(1, 1, 1), interpolation="bilinear", dataset="d", split="val", num_images=4,
                       image_ids_hash="h", layers=(LayerSpec(name="last", grid=(2, 2), channels=3, stride=(4, 4)),))
    return StoreWriter(str(tmp_path / "s.zarr"), kind="features", key=spec.key, spec=spec.to_dict(),
                       arrays=[ArrayDef("features/last", (2, 2, 3), "float16")], image_ids=list("abcd"),
                       shard_size=2, **kw)


def test_live_lease_of_another_process_waits_then_times_out(tmp_path):
    w = _tiny_writer(tmp_path)
    lease = StoreLease(w.path)
    lease.info.owner["pid"] = os.getppid()  # alive, on this host, not us
    assert lease.try_claim()
    messages = []
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="timed out after .* waiting for pid"):
        _tiny_writer(tmp_path, wait_timeout=0.6, log=messages.append).open()
    assert time.monotonic() - t0 >= 0.6
    assert len(messages) == 1 and "waiting for pid" in messages[0]
    assert not os.path.exists(w.path)  # the waiter created nothing
    # a lease without heartbeat for longer than stale_after is stale: taken over
    os.environ["MAXA_LEASE_STALE_S"] = "0.5"
    try:
        time.sleep(0.6)
        w2 = _tiny_writer(tmp_path, log=messages.append).open()
        assert w2.missing_shards() == [0, 1] and "no heartbeat" in messages[-1]
        w2.close()
    finally:
        del os.environ["MAXA_LEASE_STALE_S"]


def _invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_stores_rm_is_safe(tmp_path, monkeypatch):
    other = tmp_path / "not-a-store"
    other.mkdir()
    r = _invoke("stores", "rm", other, "--yes")
    assert r.exit_code == 2 and "not a maxa store" in r.output and other.exists()

    w = _tiny_writer(tmp_path).open()  # holds a live lease, as a writer in another process would
    w._lease.info.owner["pid"] = os.getppid()
    w._lease.refresh()
    r = _invoke("stores", "rm", w.path, "--yes")
    assert r.exit_code == 2 and "being written by pid" in r.output and os.path.exists(w.path)
    r = _invoke("stores", "rm", w.path, "--force", input="n\n")
    assert r.exit_code == 1 and "nothing deleted" in r.output and os.path.exists(w.path)

    seen = {}
    import store.location_local as location_mod

    real_rmtree = location_mod.shutil.rmtree

    def spy(path, *a, **k):  # the completion mark is gone before any data
        from store import read_attrs

        seen["complete"] = read_attrs(path)["complete"]
        seen["moved_away"] = not os.path.exists(w.path)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(location_mod.shutil, "rmtree", spy)
    for shard in range(2):
        w.write_shard(shard, {"features/last": np.ones((2, 2, 2, 3), np.float16)})
    w.finalize()
    r = _invoke("stores", "rm", w.path, "--yes")
    assert r.exit_code == 0, r.output
    assert seen == {"complete": False, "moved_away": True}
    assert not os.path.exists(w.path) and not os.path.exists(lease_location(w.path))
    assert not list(tmp_path.glob(".s.zarr*"))


def test_stores_rm_says_which_results_used_the_store(tmp_path):
    """Asked (or told, with --yes) how many results recorded under the store's root used it."""
    from store.results import append_result

    paths = {split: job.features for split, job in extract_shapes(tmp_path, {"train": 4, "val": 2}).items()}
    record = {"task": "depth", "variant": "base", "head": "maxa", "seed": 0, "backbone": "test_vit",
              "train_store": paths["train"].spec.key, "eval_store": paths["val"].spec.key, "metrics": {"mse": 1.0}}
    for seed in (0, 1):
        append_result(tmp_path, {**record, "seed": seed})
    r = _invoke("stores", "rm", paths["val"].path, input="n\n")
    assert r.exit_code == 1 and f"2 result(s) recorded under {tmp_path} used it" in " ".join(r.output.split())
    r = _invoke("stores", "rm", paths["val"].path, "--yes")
    assert r.exit_code == 0 and "2 result(s)" in r.output and not os.path.exists(paths["val"].path)
    append_result(tmp_path / "elsewhere", record)  # a results table not under the store's root: not counted
    r = _invoke("stores", "rm", paths["train"].path, "--yes")
    assert r.exit_code == 0 and "result(s)" in r.output  # 2 under its own root
    other = extract_shapes(tmp_path / "bare", {"val": 2})["val"].features
    r = _invoke("stores", "rm", other.path, "--yes")
    assert r.exit_code == 0 and "result" not in r.output  # a root without results: nothing to say


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lab")
    paths = {"root": str(root)}
    for split, job in extract_shapes(root, {"train": 16, "val": 8}).items():
        paths[split] = job.features.path
        paths[split + "_key"] = job.features.spec.key
    return paths


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size if name in files else 0)
    return out


def test_read_only_root_probe_writes_only_to_results_root(lab_root, tmp_path):
    before = _snapshot(lab_root["root"])
    mine = tmp_path / "mine"
    r = train_probe(lab_root["train"], ProbeConfig(task="semseg", max_epochs=1), results_root=str(mine),
                    device="cpu", show_progress=False)
    assert _snapshot(lab_root["root"]) == before  # nothing under the shared root changed
    assert Path(r.result_path).is_relative_to(mine) and Path(r.run_dir).is_relative_to(mine)
    assert (Path(r.run_dir) / "adapter.pt").exists() and (Path(r.run_dir) / "meta.json").exists()
    assert len(read_results(mine)) == 1 and read_results(lab_root["root"]) == []
    # asking to extract what the shared root already holds reuses it without writing
    again = run_extract(backbone="test_vit", dataset="shapes", split="val", store_root=lab_root["root"],
                        weights="random", device="cpu", dataset_options={"num_images": 8}, num_workers=0,
                        show_progress=False)
    assert again.features.reused and again.targets.reused
    assert _snapshot(lab_root["root"]) == before


def test_stores_ls_counts_results(lab_root, tmp_path):
    root = lab_root["root"]
    append_result(root, {"task": "semseg", "train_store": lab_root["train_key"], "eval_store": lab_root["val_key"]})
    append_result(root, {"task": "depth", "train_store": lab_root["train_key"], "eval_store": lab_root["val_key"]})
    try:
        r = _invoke("stores", "ls", root, "--json")
        assert r.exit_code == 0, r.output
        rows = {row["key"]: row for row in json.loads(r.output)}
        assert rows[lab_root["train_key"]]["results"] == 2 and rows[lab_root["val_key"]]["results"] == 2
        assert all(row["results"] == 0 for row in rows.values() if row["kind"] == "targets")
        r = _invoke("stores", "ls", root)
        assert r.exit_code == 0 and "results" in r.output
    finally:
        for f in (Path(root) / "results").glob("*.parquet"):
            f.unlink()


def test_sigterm_during_extract_releases_the_lease_and_resumes(tmp_path):
    """SIGTERM (a scheduler's stop, sent to the whole process group, DataLoader worker included) is handled
    like Ctrl-C: one line naming the signal, exit 143, the lease released, the store left incomplete for a
    re-run to finish."""
    import signal

    from store import read_attrs

    root = tmp_path / "root"
    args = ["extract", "--backbone", "test_vit", "--dataset", "shapes", "--split", "val", "--weights", "random",
            "--device", "cpu", "--num-images", "600", "--batch-size", "8", "--shard-size", "16", "--decode-workers", "1",
            "--no-build-targets", "--no-progress", "--store-root", str(root)]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(root.rglob("*.zarr.lease")):
            assert proc.poll() is None, f"extract ended before taking its lease: {proc.communicate()}"
            assert time.monotonic() < deadline, "no lease file after 180 s"
            time.sleep(0.05)
        time.sleep(0.5)  # inside the extraction loop, shard writes in flight
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143, (proc.returncode, out, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("interrupted (SIGTERM):") and "re-run the same command to resume" in lines[0]
    assert not list(root.rglob("*.lease*")), "the lease was left behind"
    (path,) = root.rglob("*.zarr")
    assert read_attrs(str(path))["complete"] is False
    done = open_features(path, allow_incomplete=True).shard_done()
    assert not done.all()

    result = _invoke(*args)  # the re-run writes only the missing shards and completes the store
    assert result.exit_code == 0, result.output
    missing = sum(min(16, 600 - 16 * int(s)) for s in np.flatnonzero(~done))
    assert f"wrote {missing} images" in result.output
    assert read_attrs(str(path))["complete"] is True and verify_store(path).ok
