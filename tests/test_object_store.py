"""Stores on object storage: a real S3-compatible server (moto) on loopback, reached through fsspec/s3fs
with the standard AWS environment variables."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from extract.jobs import run_extract  # noqa: E402
from pipelines.cli import app  # noqa: E402
from store.results import read_results  # noqa: E402
from store import open_features, open_targets, verify_store  # noqa: E402
from store.catalogue import find_eval_features, list_stores, store_root_of  # noqa: E402
from store.lease import StoreLease  # noqa: E402

from conftest import S3_BUCKET as BUCKET  # noqa: E402

runner = CliRunner()


def _extract(root, split, n):
    return run_extract(backbone="test_vit", dataset="shapes", split=split, store_root=root, weights="random",
                       device="cpu", dataset_options={"num_images": n}, num_workers=0, show_progress=False,
                       shard_size=4)


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("local")
    url = f"s3://{BUCKET}/stores"
    out = {"url": url, "local": str(local)}
    for split, n in (("train", 12), ("val", 8)):
        remote_job = _extract(url, split, n)
        local_job = _extract(local, split, n)
        out[split] = remote_job.features.path
        out[split + "_local"] = local_job.features.path
        out[split + "_targets"] = remote_job.targets.path
    return out


def _listing(fs) -> dict[str, str]:
    fs.invalidate_cache()
    return {p: str(fs.info(p).get("ETag")) for p in fs.find(BUCKET)}


def test_extract_into_s3_and_read_back_bitwise(s3, stores):
    url = stores["train"]
    assert url.startswith(f"s3://{BUCKET}/stores/features/")
    remote, local = open_features(url), open_features(stores["train_local"])
    assert remote.key == local.key and remote.complete
    np.testing.assert_array_equal(remote.read_all(), local.read_all())
    np.testing.assert_array_equal(remote.read_batch([5, 1, 5]), local.read_batch([5, 1, 5]))
    assert open_targets(stores["train_targets"]).complete
    assert verify_store(url).ok
    assert store_root_of(url) == stores["url"]
    assert find_eval_features(stores["url"], remote.spec) == stores["val"]
    assert not s3.exists(url.removeprefix("s3://") + ".lease")  # released
    # asking again reuses the store
    assert _extract(stores["url"], "train", 12).features.reused


def test_stores_commands_on_s3(stores):
    r = runner.invoke(app, ["stores", "ls", stores["url"], "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    paths = {row["path"] for row in rows}
    assert {stores["train"], stores["val"], stores["train_targets"]} <= paths
    assert all(row["complete"] and row["bytes"] > 0 for row in rows)
    r = runner.invoke(app, ["stores", "ls", stores["url"]])
    assert r.exit_code == 0 and "features/" in r.output
    r = runner.invoke(app, ["stores", "info", stores["train"], "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["images"] == 12
    r = runner.invoke(app, ["stores", "verify", stores["train"]])
    assert r.exit_code == 0 and "OK" in r.output, r.output
    # explicit storage options work too (here: the same endpoint)
    r = runner.invoke(app, ["stores", "info", stores["val"], "--storage-option",
                            f"endpoint_url={os.environ['AWS_ENDPOINT_URL']}", "--storage-option", "key=testing",
                            "--storage-option", "secret=testing"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["stores", "info", f"s3://{BUCKET}/nothing-here.zarr"])
    assert r.exit_code == 2 and "no store at" in r.output


def test_probe_from_s3_writes_nothing_there(s3, stores, tmp_path):
    before = _listing(s3)
    mine = tmp_path / "mine"
    r = runner.invoke(app, ["probe", "--store", stores["train"], "--task", "semseg", "--max-epochs", "1",
                            "--device", "cpu", "--results-root", str(mine), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert _listing(s3) == before  # read-only use of the shared bucket
    records = read_results(mine)
    assert len(records) == 1 and records[0]["train_store"] == open_features(stores["train"]).key
    assert list((mine / "runs").rglob("adapter.pt"))


def test_results_and_rm_on_s3(s3, stores, tmp_path):
    from store.results import append_result, result_counts

    key = open_features(stores["val"]).key
    append_result(stores["url"], {"task": "semseg", "train_store": key})
    assert result_counts(stores["url"]) == {key: 1}
    # a live lease refuses rm; --force and --yes delete, completion mark first, then everything
    extra = _extract(f"s3://{BUCKET}/scratch", "val", 4).features.path
    lease = StoreLease(extra)
    lease.info.owner["pid"] = os.getppid()
    assert lease.try_claim()
    assert not lease.try_claim() and not StoreLease(extra).try_claim()  # conditional put: exclusive
    r = runner.invoke(app, ["stores", "rm", extra, "--yes"])
    assert r.exit_code == 2 and "being written" in r.output
    r = runner.invoke(app, ["stores", "rm", extra, "--yes", "--force"])
    assert r.exit_code == 0, r.output
    s3.invalidate_cache()
    assert not [p for p in s3.find(f"{BUCKET}/scratch") if "/features/" in p]  # data, lease and all
    assert [row["kind"] for row in list_stores(f"s3://{BUCKET}/scratch")] == ["targets"]


def test_predict_from_a_run_and_a_store_on_s3(s3, stores, tmp_path):
    """A probe whose results root is a bucket writes its run folder there; `maxa predict` reads it back."""
    root = f"s3://{BUCKET}/lab-results"
    r = runner.invoke(app, ["probe", "--store", stores["train"], "--task", "boundaries", "--max-epochs", "1",
                            "--device", "cpu", "--results-root", root, "--no-progress"])
    assert r.exit_code == 0, r.output
    (record,) = read_results(root)
    run_dir = record["run_dir"]
    assert run_dir.startswith(f"s3://{BUCKET}/lab-results/runs/") and s3.isfile(run_dir.removeprefix("s3://") + "/adapter.pt")
    png = tmp_path / "pred.png"
    r = runner.invoke(app, ["predict", "--adapter", run_dir, "--store", stores["val"], "--index", "2",
                            "--size", "96", "--bare", "--out", str(png)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(png).size == (96, 96)
    r = runner.invoke(app, ["predict", "--adapter", run_dir, "--store", stores["val"], "--index", "2",
                            "--size", "96", "--out", str(tmp_path / "fig.png")])
    assert r.exit_code == 0 and "input | ground truth | prediction 96×96" in r.output, r.output
    # every image's values into a prediction store in the bucket
    preds = f"s3://{BUCKET}/lab-results/preds.zarr"
    r = runner.invoke(app, ["predict", "--adapter", run_dir, "--store", stores["val"], "--size", "32",
                            "--out", preds, "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    from store.predictions import open_predictions

    p = open_predictions(preds)
    assert p.values_name == "boundary_probability" and p.read_all().shape == (len(p.image_ids), 32, 32)
    r = runner.invoke(app, ["predict", "--adapter", f"s3://{BUCKET}/lab-results/runs/nothing", "--store", stores["val"],
                            "--out", str(png)])
    assert r.exit_code != 0 and "not an adapter run directory" in r.output and "Traceback" not in r.output
