"""The ``maxa`` command line end to end: listings, extract, stores, and bad input (one clear line each).

Bad input must give ONE line that names the thing and the fix, a non-zero exit, no traceback, and
nothing half-written left looking complete. Everything runs in-process through ``pipelines.cli.app``
with tiny random-init backbones, except one subprocess run of the real entry point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from shared_data import shared_data

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid_small"

runner = CliRunner()


def invoke(*args: str, env: dict[str, str | None] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def ok(*args: str, env=None) -> str:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, f"maxa {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
    return result.output


def one_line_error(*args: str, env=None, code: int | None = None) -> str:
    """Run a command that must fail cleanly; return its single output line."""
    result = invoke(*args, env=env)
    text = result.output.strip()
    assert result.exit_code != 0, f"expected a failure, got exit 0:\n{text}"
    if code is not None:
        assert result.exit_code == code, text
    assert "Traceback" not in text, text
    assert len(text.splitlines()) == 1, f"expected one line, got:\n{text}"
    assert text.startswith("error:"), text
    # a clean exit, not an exception escaping into the runner
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return text


def extract_args(store_root: Path, *extra: str, backbone: str = "test_vit", n: int = 8) -> list[str]:
    return ["extract", "--backbone", backbone, "--dataset", "shapes", "--split", "val", "--weights", "random",
            "--num-images", str(n), "--store-root", str(store_root), "--device", "cpu", "--decode-workers", "0",
            "--no-progress", *extra]


def store_path_from(output: str, kind: str = "features") -> Path:
    line = next(l for l in output.splitlines() if l.startswith(f"{kind}:"))
    return Path(re.search(r"(/\S+\.zarr)", line).group(1))


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("stores")
    return root, ok(*extract_args(root))


@pytest.fixture(scope="module")
def backbone_rows() -> list[dict]:
    return json.loads(ok("backbones", "--json"))


def test_stores_ls_says_what_tells_look_alike_stores_apart(tmp_path):
    """Two stores that read alike in the table (same kind, backbone, dataset, split) get a note naming
    the settings they differ in."""
    ok(*extract_args(tmp_path, n=6))
    ok(*extract_args(tmp_path, n=8))
    result = invoke("stores", "ls", tmp_path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: 2 feature stores of test_vit on shapes/val differ in" in text, text
    assert "num_images 6 / 8" in text or "num_images 8 / 6" in text, text
    assert "note: 2 target stores on shapes/val differ" in text, text
    single = tmp_path / "single"
    ok(*extract_args(single))
    assert "note:" not in invoke("stores", "ls", single).output  # nothing alike: nothing to say


# -- listings ---------------------------------------------------------------------------------------
def test_backbones_json(backbone_rows):
    rows = {r["name"]: r for r in backbone_rows}
    assert rows["siglip_384"]["input_size"] == 384 and list(rows["siglip_384"]["grid"].values()) == [[24, 24]]
    assert rows["dinov2_b14"]["input_size"] == 518 and list(rows["dinov2_b14"]["grid"].values()) == [[37, 37]]
    for r in backbone_rows:
        for key in ("name", "timm_name", "input_size", "grid", "channels", "layers", "num_params"):
            assert r[key] not in (None, "", [], {}), (r["name"], key)
        assert set(r["grid"]) == set(r["channels"]) == set(r["layers"])
        assert r["num_params"] > 0
    paper = [r for r in backbone_rows if r.get("paper_image_size")]
    assert len(paper) >= 20 and all(r["paper_feature_size"] for r in paper)
    assert rows["siglip_384"]["paper_image_size"] == 384 and rows["siglip_384"]["paper_feature_size"] == 24
    assert "test_vit" not in rows  # test aliases only with --all


def test_backbones_table(backbone_rows):
    text = ok("backbones")
    for word in ("name", "timm model", "input", "grid", "channels", "siglip_384", "dinov2_b14", "37x37", "24x24"):
        assert word in text
    assert "test_vit" in ok("backbones", "--all", "--json")


def test_datasets_lists_readers():
    text = ok("datasets")
    for name in ("coco", "voc", "cocostuff", "nyuv2", "segfolder", "shapes"):
        assert re.search(rf"^{name}: ", text, re.M), name
    assert "semantic" in text and "depth" in text


# -- extract and stores -----------------------------------------------------------------------------
def test_extract_reuse_and_stores_commands(shapes_root):
    root, first = shapes_root
    fpath, tpath = store_path_from(first), store_path_from(first, "targets")
    assert "wrote 8 images" in first and fpath.is_dir() and tpath.is_dir()
    again = ok(*extract_args(root))
    assert "complete store found" in again and str(fpath) in again

    table = ok("stores", "ls", root)
    for col in ("kind", "backbone", "dataset", "split", "images", "grid", "size", "complete"):
        assert col in table
    assert "test_vit" in table and "shapes" in table and "yes" in table
    rows = json.loads(ok("stores", "ls", root, "--json"))
    assert {r["kind"] for r in rows} == {"features", "targets"}
    feat = next(r for r in rows if r["kind"] == "features")
    assert (feat["backbone"], feat["dataset"], feat["split"], feat["images"], feat["complete"]) == (
        "test_vit", "shapes", "val", 8, True)
    assert "10x10" in feat["grid"] and feat["bytes"] > 0

    info = json.loads(ok("stores", "info", fpath, "--json"))
    assert info["key"] == feat["key"] and info["complete"] and info["images"] == 8 and info["bad_images"] == 0
    assert info["spec"]["backbone"] == "test_vit" and info["spec"]["input_size"] == [160, 160]
    assert info["provenance"]["torch"] and info["provenance"]["timm"]
    assert "key" in ok("stores", "info", fpath)

    verify = ok("stores", "verify", fpath)
    assert verify.startswith("OK")
    assert json.loads(ok("stores", "verify", tpath, "--json"))["ok"] is True


def test_verify_finds_a_flipped_byte(shapes_root, tmp_path):
    _, first = shapes_root
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path_from(first), copy)
    chunks = sorted(p for p in (copy / "features" / "last").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert chunks
    victim = chunks[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = invoke("stores", "verify", copy)
    assert result.exit_code == 1, result.output
    assert "PROBLEMS" in result.output and "features/last" in result.output and "images 0..7" in result.output
    assert "Traceback" not in result.output


def test_timm_prefix_and_layers(tmp_path):
    text = ok(*extract_args(tmp_path, "--no-build-targets", "--layers", "-1,-2", backbone="timm:test_vit", n=4))
    path = store_path_from(text)
    assert "timm-test_vit" in str(path)
    info = json.loads(ok("stores", "info", path, "--json"))
    assert info["spec"]["backbone"] == "timm:test_vit" and len(info["spec"]["layers"]) == 2

    for bad, words in (("a,b", ["--layers", "comma-separated"]), (",", ["--layers", "names no layer"]),
                       ("1,1", ["--layers", "repeats"]), ("99", ["--layers 99", "test_vit", "out of range", "-1"])):
        line = one_line_error(*extract_args(tmp_path / "bad", "--layers", bad, n=4))
        for w in words:
            assert w in line, (bad, line)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


# -- bad input: one line, the thing and the fix -----------------------------------------------------
def test_unknown_backbone_and_dataset(tmp_path):
    line = one_line_error(*extract_args(tmp_path, backbone="siglip384"))
    assert "siglip384" in line and "siglip_384" in line and "timm:" in line
    line = one_line_error(*extract_args(tmp_path, backbone="timm:no_such_model_at_all"))
    assert "no_such_model_at_all" in line and "timm.list_models" in line
    args = extract_args(tmp_path)
    args[args.index("shapes")] = "shapez"
    line = one_line_error(*args)
    assert "shapez" in line and "shapes" in line
    args = extract_args(tmp_path)
    args[args.index("val")] = "bogus"
    line = one_line_error(*args)
    assert "bogus" in line and "train" in line
    assert not tmp_path.joinpath("features").exists()


def _extract_root(dataset: str, root: Path, store_root: Path, *extra: str, split: str = "val") -> list[str]:
    return ["extract", "--backbone", "test_vit", "--dataset", dataset, "--split", split, "--root", str(root),
            "--weights", "random", "--store-root", str(store_root), "--device", "cpu", "--decode-workers", "0",
            "--no-progress", *extra]


def test_dataset_roots(tmp_path):
    stores = tmp_path / "stores"
    line = one_line_error(*_extract_root("coco", Path("/nonexistent"), stores))
    assert "/nonexistent" in line and "does not exist" in line and "--root" in line and "annotations/" in line
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    line = one_line_error(*_extract_root("coco", malformed, stores))
    assert str(malformed) in line and "annotations/instances_val2017.json" in line and "layout" in line
    for dataset in ("voc", "cocostuff", "nyuv2", "segfolder"):
        line = one_line_error(*_extract_root(dataset, malformed, stores, split="train"))
        assert str(malformed) in line and "expected" in line, line
        line = one_line_error(*_extract_root(dataset, tmp_path / "missing", stores, split="train"))
        assert "missing" in line and "--root" in line, line
    seg = tmp_path / "seg"
    (seg / "train").mkdir(parents=True)
    Path(seg / "train" / "a.png").write_bytes(b"")
    line = one_line_error(*_extract_root("segfolder", seg, stores, split="train"))
    assert str(seg) in line and "trainannot" in line
    assert not stores.exists()  # nothing written for a bad root


def _camvid_tree(tmp_path: Path, n: int = 4) -> Path:
    shared_data("camvid_small")
    root = tmp_path / "camvid"
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir()
    for src in sorted((CAMVID / "train").glob("*.png"))[:n]:
        shutil.copy(src, root / "train" / src.name)
        shutil.copy(CAMVID / "trainannot" / src.name, root / "trainannot" / src.name)
    return root


def test_corrupt_image_then_skip_bad(tmp_path):
    root = _camvid_tree(tmp_path)
    victim = sorted((root / "train").glob("*.png"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    stores = tmp_path / "stores"
    args = _extract_root("segfolder", root, stores, "--num-classes", "11", "--ignore-index", "11", split="train")
    line = one_line_error(*args)
    assert str(victim) in line and "--skip-bad" in line
    rows = json.loads(ok("stores", "ls", stores, "--json"))
    # the target store (which decodes the images too) stops first: nothing left looking complete
    assert rows and not any(r["complete"] for r in rows)
    assert "no" in ok("stores", "ls", stores)

    text = ok(*args, "--skip-bad")
    assert "1 undecodable image" in text and victim.name in text
    info = json.loads(ok("stores", "info", store_path_from(text), "--json"))
    assert info["complete"] and info["bad_images"] == 1 and info["images"] == 4


def test_segfolder_options(tmp_path):
    root = _camvid_tree(tmp_path, n=2)
    stores = tmp_path / "stores"
    for value in ("0", "300"):
        line = one_line_error(*_extract_root("segfolder", root, stores, "--num-classes", value, split="train"))
        assert "num_classes" in line and "--num-classes" in line and value in line
    line = one_line_error(*_extract_root("segfolder", root, stores, "--num-classes", "11", "--ignore-index", "3",
                                         split="train"))
    assert "ignore_index 3" in line and "ignore_index >=" in line
    # labels beyond --num-classes: found while building targets in a DataLoader worker
    args = _extract_root("segfolder", root, stores, "--num-classes", "5", split="train")
    args[args.index("--decode-workers") + 1] = "1"
    line = one_line_error(*args)
    assert "trainannot" in line and "--num-classes" in line and "--ignore-index" in line
    assert all(not r["complete"] for r in json.loads(ok("stores", "ls", stores, "--json")))


def test_weights_offline_without_cache(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf), "HF_HUB_CACHE": None, "TORCH_HOME": str(tmp_path / "torch")}
    args = extract_args(tmp_path / "stores")
    args[args.index("random")] = "pretrained"
    line = one_line_error(*args, env=env)
    assert "test_vit" in line and "HF_HUB_OFFLINE" in line and "--weights PATH" in line and "--weights random" in line
    assert not (tmp_path / "stores").exists()  # refused before building targets


def test_weights_offline_real_entry_point(tmp_path):
    """The installed entry point, HF_HUB_OFFLINE set before anything is imported: one line on stderr."""
    hf = tmp_path / "hf"
    hf.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MAXA_DEBUG"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf), TORCH_HOME=str(tmp_path / "torch"))
    args = extract_args(tmp_path / "stores")
    args[args.index("random")] = "pretrained"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == ""
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "test_vit" in err and "HF_HUB_OFFLINE" in err and "--weights PATH" in err and "--weights random" in err


def test_weights_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    cases = {
        "/nonexistent.safetensors": ["/nonexistent.safetensors", "does not exist", "--weights random"],
    }
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    cases[str(garbage)] = [str(garbage), "safetensors", "--weights random"]
    pickle = tmp_path / "garbage.pth"
    pickle.write_bytes(b"not a pickle either")
    cases[str(pickle)] = [str(pickle), "state dict", "--weights random"]
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(3)}, str(wrong))
    cases[str(wrong)] = [str(wrong), "does not fit backbone test_vit", "checkpoint"]
    for weights, words in cases.items():
        args = extract_args(tmp_path / "stores")
        args[args.index("random")] = weights
        line = one_line_error(*args)
        for w in words:
            assert w in line, (weights, line)
    assert not (tmp_path / "stores").exists()


def test_store_path_holding_something_else(tmp_path):
    first = ok(*extract_args(tmp_path, "--no-build-targets", n=4))
    path = store_path_from(first)
    shutil.rmtree(path)
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    line = one_line_error(*extract_args(tmp_path, "--no-build-targets", n=4))
    assert str(path) in line and "not a maxa store" in line and "remove it" in line
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"] and (path / "notes.txt").read_text() == "mine"
    # another store's data at this path: refused, left as it was
    shutil.rmtree(path)
    other = store_path_from(ok(*extract_args(tmp_path, "--no-build-targets", "--layers", "2", n=4)))
    shutil.copytree(other, path)
    before = (path / "zarr.json").read_bytes()
    line = one_line_error(*extract_args(tmp_path, "--no-build-targets", n=4))
    assert str(path) in line and "another store" in line and "remove it" in line
    assert (path / "zarr.json").read_bytes() == before
    # a file where the store root should be
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line_error(*extract_args(afile, n=4))
    assert str(afile) in line and "not a folder" in line


def test_stores_commands_on_bad_paths(tmp_path, shapes_root):
    line = one_line_error("stores", "info", "/nonexistent")
    assert "/nonexistent" in line and "maxa stores ls" in line
    line = one_line_error("stores", "verify", "/nonexistent")
    assert "/nonexistent" in line and "maxa stores ls" in line
    line = one_line_error("stores", "ls", "/nonexistent")
    assert "/nonexistent" in line and "maxa extract" in line
    plain = tmp_path / "plain"
    plain.mkdir()
    for cmd in ("info", "verify"):
        line = one_line_error("stores", cmd, plain)
        assert str(plain) in line and "not a maxa store" in line and "maxa stores ls" in line
    root, _ = shapes_root
    line = one_line_error("stores", "info", root)
    assert "store root" in line and f"maxa stores ls {root}" in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line_error("stores", "ls", afile)
    assert str(afile) in line and "not a folder" in line
    assert "no stores under" in ok("stores", "ls", plain)


def test_device_cuda_on_cpu_machine(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(*extract_args(tmp_path, "--device", "cuda"))
    assert "cuda" in line and "--device cpu" in line
    line = one_line_error(*extract_args(tmp_path, "--device", "tpu7"))
    assert "tpu7" in line and "cpu" in line
    assert not tmp_path.joinpath("targets").exists()


def test_interrupted_extraction_is_marked_incomplete_and_resumes(tmp_path, monkeypatch):
    import extract.jobs as jobs

    real = jobs.extract_features

    def interrupt_after_first_shard(*args, **kwargs):
        def on_shard(shard: int) -> None:
            raise KeyboardInterrupt

        return real(*args, **kwargs, on_shard=on_shard)

    monkeypatch.setattr(jobs, "extract_features", interrupt_after_first_shard)
    args = extract_args(tmp_path, "--no-build-targets", "--shard-size", "4", "--batch-size", "4", n=12)
    result = invoke(*args)
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    rows = json.loads(ok("stores", "ls", tmp_path, "--json"))
    assert len(rows) == 1 and rows[0]["complete"] is False
    info = json.loads(ok("stores", "info", rows[0]["path"], "--json"))
    assert not info["complete"] and 1 <= info["shards_done"] < info["num_shards"] == 3
    assert invoke("stores", "verify", rows[0]["path"]).exit_code == 1

    monkeypatch.setattr(jobs, "extract_features", real)
    text = ok(*args)
    assert "wrote" in text and str(store_path_from(text)) == rows[0]["path"]
    assert json.loads(ok("stores", "ls", tmp_path, "--json"))[0]["complete"] is True
    assert ok("stores", "verify", rows[0]["path"]).startswith("OK")


def test_unexpected_errors_are_one_line_unless_debugging(tmp_path, monkeypatch):
    import extract.jobs as jobs

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(jobs, "extract_features", boom)
    line = one_line_error(*extract_args(tmp_path, "--no-build-targets", n=4), code=1)
    assert "ZeroDivisionError" in line and "MAXA_DEBUG=1" in line
    result = invoke(*extract_args(tmp_path, "--no-build-targets", n=4), env={"MAXA_DEBUG": "1"})
    assert isinstance(result.exception, ZeroDivisionError)


def _remote(name: str, module: str = "botocore.exceptions") -> type:
    return type(name, (Exception,), {"__module__": module})


@pytest.mark.parametrize("error, says", [
    (_remote("NoCredentialsError")("Unable to locate credentials"), "set AWS_ACCESS_KEY_ID"),
    (_remote("EndpointConnectionError")('Could not connect to the endpoint URL: "http://127.0.0.1:9/b"'),
     "endpoint did not answer"),
    (_remote("ClientError")("An error occurred (NoSuchBucket)"), "check the URL, the bucket"),
    (_remote("ClientConnectorError", "aiohttp.client_exceptions")("Cannot connect to host"), "did not answer"),
])
def test_object_store_errors_are_one_line_not_a_bug(tmp_path, monkeypatch, error, says):
    """An object store's refusal or silence is the user's to fix (credentials, endpoint, bucket):
    one line naming the fix, exit 2, never "a bug in maxa"."""
    import extract.jobs as jobs

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(jobs, "extract_features", refuse)
    line = one_line_error(*extract_args(tmp_path, "--no-build-targets", n=4), code=2)
    assert line.startswith("error: object storage: ") and says in line and "bug" not in line, line


def test_a_storage_option_the_filesystem_does_not_take():
    """s3fs hands unknown storage options to its session: the TypeError it raises there is named as
    a --storage-option problem; a TypeError anywhere else is not an object store's."""
    from pipelines.cli.errors import _remote_error_line

    def raised(filename: str) -> TypeError:
        ns: dict = {}
        exec(compile("def f():\n    raise TypeError(\"AioSession.__init__() got an unexpected keyword argument 'bogus'\")",
                     filename, "exec"), ns)
        try:
            ns["f"]()
        except TypeError as e:
            return e
        raise AssertionError("not raised")

    line = _remote_error_line(raised("/venv/lib/python3.11/site-packages/aiobotocore/session.py"))
    assert line is not None and "'bogus'" in line and "--storage-option" in line
    assert _remote_error_line(raised("/work/main/probe/train.py")) is None
    assert _remote_error_line(ZeroDivisionError("x")) is None


def test_after_sigterm_broken_connections_of_background_threads_are_quiet(capsys):
    """Once SIGTERM is in, a background thread's broken connection (multiprocessing's resource sharer
    talking to a DataLoader worker the same signal killed) prints no traceback; other errors do."""
    import threading

    from pipelines.cli.errors import _quiet_after_sigterm

    for exc, shown in ((ConnectionResetError("peer gone"), False), (EOFError(), False), (ValueError("real"), True)):
        try:
            raise exc
        except Exception as e:  # noqa: BLE001
            _quiet_after_sigterm(threading.ExceptHookArgs([type(e), e, e.__traceback__, threading.current_thread()]))
        assert ("Traceback" in capsys.readouterr().err) == shown, exc


def test_disk_full_names_the_store_and_nothing_unwritten_is_flagged(tmp_path, monkeypatch):
    """ENOSPC while writing a shard, then while writing the completion mark: one line naming the store,
    the array and shard, and the fix; no lease left; the store stays incomplete; a re-run finishes it."""
    import errno

    import zarr.storage._local as zarr_local

    real_put = zarr_local._put
    fail = {"when": lambda path: "features" in path.parts and "c" in path.parts  # a feature shard file
            and "image_id" not in path.parts}

    def full_disk(path, value, exclusive=False):
        if fail["when"](path):
            raise OSError(errno.ENOSPC, "No space left on device")  # a failed write() names no file
        return real_put(path, value, exclusive=exclusive)

    from store.location_local import LocalLocation

    real_write_buffers = LocalLocation.write_buffers

    def full_disk_direct(self, buffers):  # shard files of per-image arrays (store.fastwrite)
        if fail["when"](Path(self.url)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_buffers(self, buffers)

    monkeypatch.setattr(zarr_local, "_put", full_disk)
    monkeypatch.setattr(LocalLocation, "write_buffers", full_disk_direct)
    args = extract_args(tmp_path, "--no-build-targets", "--shard-size", "4", "--batch-size", "4", n=8)
    line = one_line_error(*args, code=2)
    (path,) = tmp_path.rglob("*.zarr")
    assert f"cannot write {path} (array features/" in line and "shard 0" in line, line
    assert "No space left on device" in line and "free space" in line and "--store-root" in line
    assert not list(tmp_path.rglob("*.lease*"))
    info = json.loads(ok("stores", "info", path, "--json"))
    assert not info["complete"] and info["shards_done"] == 0

    # every shard written, the completion mark (the store's zarr.json) is not
    fail["when"] = lambda p: p.name == "zarr.json" and p.parent == path
    line = one_line_error(*args, code=2)
    assert f"cannot write {path} (its completion mark" in line and "free space" in line, line
    info = json.loads(ok("stores", "info", path, "--json"))
    assert not info["complete"] and info["shards_done"] == info["num_shards"] == 2
    assert not list(tmp_path.rglob("*.lease*"))

    monkeypatch.setattr(zarr_local, "_put", real_put)
    monkeypatch.setattr(LocalLocation, "write_buffers", real_write_buffers)
    text = ok(*args)
    assert json.loads(ok("stores", "info", path, "--json"))["complete"] is True, text


def test_os_errors_name_a_path(tmp_path, monkeypatch):
    """An OSError outside the store writer names its file, or else the path the command writes under."""
    import errno

    import extract.jobs as jobs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs, "extract_features", full)
    line = one_line_error(*extract_args(tmp_path, "--no-build-targets", n=4), code=2)
    assert f"while writing under --store-root {tmp_path}" in line and "free space there" in line, line

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "features"))

    monkeypatch.setattr(jobs, "extract_features", denied)
    line = one_line_error(*extract_args(tmp_path, "--no-build-targets", n=4), code=2)
    assert f"Permission denied: {tmp_path / 'features'} (PermissionError)" in line and "permissions" in line, line


def test_one_vocabulary_old_spellings_still_work(tmp_path):
    """extract's --workers/--targets/--seed are now --decode-workers/--build-targets/--scene-seed;
    the old spellings still work, with one warning line each."""
    args = extract_args(tmp_path, n=4)
    args[args.index("--decode-workers")] = "--workers"
    text = ok(*args, "--no-targets", "--seed", "3")
    for old, new in (("--workers", "--decode-workers"), ("--targets/--no-targets", "--build-targets/--no-build-targets"),
                     ("--seed", "--scene-seed")):
        assert f"warning: {old} is now {new}" in " ".join(text.split()), text
    assert "targets:" not in text  # --no-targets still meant: no target store
    new = ok(*extract_args(tmp_path, "--no-build-targets", "--scene-seed", "3", n=4))
    assert "complete store found" in new and "warning" not in new  # the same store: same scene seed


def test_help_short_flag_version_and_required_split():
    assert "Usage: " in ok("-h") and "Image decode" in ok("extract", "-h")
    assert "\\[datasets.NAME]" not in ok("sweep", "-h") and "[datasets.NAME]" in " ".join(ok("sweep", "-h").split())
    assert ok("--version").startswith("maxa ")
    result = invoke("extract", "--backbone", "test_vit", "--dataset", "shapes")
    assert result.exit_code == 2 and "--split" in result.output


@pytest.mark.parametrize("args, says", [
    (("probe", "--store", "s", "--task", "boundaries", "--max-epochs", "-1"), "'--max-epochs'"),
    (("probe", "--store", "s", "--task", "boundaries", "--batch-size", "abc"), "'--batch-size'"),
    (("probe", "--store", "s", "--bogus"), "--bogus"),
    (("extract", "--dataset", "shapes"), "'--backbone'"),
    (("stores", "ls", "--nope"), "--nope"),
    (("probee",), "Did you mean 'probe'"),
    (("--nope",), "--nope"),
])
def test_command_lines_click_refuses_are_one_line(args, says):
    """Values out of range or of the wrong type, unknown options and commands, missing options: one
    ``error:`` line naming the option and the command's help, exit 2, as every other bad input."""
    line = one_line_error(*args, code=2)
    assert says in line and line.endswith("-h`."), line


def test_command_lists_read_each_summary_as_one_sentence():
    """A docstring's line breaks do not break a command's line in its group's list (typer's rich help
    keeps them there): every command's summary is one line, its docstring's first paragraph."""
    from typer.main import get_command

    def commands(group):
        for name, cmd in group.commands.items():
            yield name, cmd
            if hasattr(cmd, "commands"):  # a group (typer's own click or click)
                yield from commands(cmd)

    listed = dict(commands(get_command(app)))
    assert {"predict", "quickstart", "verify", "upgrade", "speed"} <= set(listed)
    for name, cmd in listed.items():
        if not hasattr(cmd, "commands"):
            assert cmd.short_help and "\n" not in cmd.short_help, (name, cmd.short_help)
    assert listed["predict"].short_help.startswith("Render a trained adapter's prediction for one stored image at any "
                                                   "output size (a picture or its values), or write")


def test_a_bare_group_still_prints_its_help():
    bare = invoke("stores")
    assert "Usage:" in bare.output and "verify" in bare.output and "error:" not in bare.output
