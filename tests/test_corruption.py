"""A damaged chunk (one flipped byte) is the user's problem, told in one line; never "a bug in maxa".

Every read path (whole array, shard iteration, batched random reads, single images, the in-memory
load and the streamed prefetch of probing) turns a checksum mismatch into a ``StoreError`` naming
the store, the array, the damaged image(s) by index and id, and ``maxa stores verify``; verify pins
the damage to the image (inner chunk), not the whole shard; the async gather leaves no task
pending (no "Task was destroyed but it is pending!" on stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from store import ArrayDef, StoreError, StoreWriter, TargetSpec, open_features, open_targets, verify_store

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_synthetic_root  # noqa: E402
from test_store import fill, make_spec, make_writer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N, SHARD = 10, 4  # shards 0..3, 4..7, 8..9


def flip_inner_chunk(shard_file: Path, position: int) -> None:
    """Flip one byte in the middle of inner chunk ``position`` of a shard file (its data, not its crc)."""
    raw = bytearray(shard_file.read_bytes())
    # the shard index sits at the end: (offset, nbytes) uint64 pairs per inner chunk, then a crc32c
    for n_chunks in range(1, len(raw) // 16 + 1):
        index = np.frombuffer(bytes(raw[-(n_chunks * 16 + 4) : -4]), "<u8").reshape(-1, 2)
        used = index[index[:, 0] != np.iinfo(np.uint64).max]
        if len(used) and used[:, 0].min() == 0 and int((used[:, 0] + used[:, 1]).max()) == len(raw) - n_chunks * 16 - 4:
            break
    else:
        raise AssertionError(f"no shard index found in {shard_file}")
    offset, nbytes = (int(v) for v in index[position])
    raw[offset + nbytes // 2] ^= 0xFF
    shard_file.write_bytes(bytes(raw))


def flip_middle(chunk_file: Path) -> None:
    raw = bytearray(chunk_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(raw))


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, 4, 5, 6)).astype(np.float16)


@pytest.fixture
def damaged(tmp_path, data) -> str:
    """A feature store (shards of 4 images) with image 5 (id img5) damaged."""
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD)
    fill(w, data)
    w.finalize()
    flip_inner_chunk(Path(w.path) / "features" / "last" / "c" / "1" / "0" / "0" / "0", 5 - SHARD)
    return w.path


def assert_names_image_5(err: pytest.ExceptionInfo, path: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    assert path in text and "features/last" in text, text
    assert "image 5 (id img5)" in text and "maxa stores verify" in text, text
    assert "img4" not in text and "img6" not in text, text  # the image, not the shard


def test_every_feature_read_path_names_the_image(damaged, data):
    fs = open_features(damaged)
    cases = {
        "read_all": lambda: fs.read_all(),
        "read_batch random": lambda: fs.read_batch([9, 5, 0, 5]),
        "read_batch run": lambda: fs.read_batch(range(3, 7)),
        "read": lambda: fs.read(5),
        "getitem": lambda: fs[5],
        "iter_shards": lambda: list(fs.layer_shards()),
    }
    for what, call in cases.items():
        with pytest.raises(StoreError) as err:
            call()
        assert_names_image_5(err, damaged)
    # the other images still read, through every path
    np.testing.assert_array_equal(fs.read(4), data[4])
    np.testing.assert_array_equal(fs.read_batch([9, 6, 0]), data[[9, 6, 0]])
    np.testing.assert_array_equal(fs.read_batch(range(6, 10)), data[6:10])
    shards = fs.layer_shards()
    start, values = next(shards)
    assert start == 0
    np.testing.assert_array_equal(values, data[:4])


def test_negative_indices_still_read(tmp_path, data):
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD)
    fill(w, data)
    w.finalize()
    fs = open_features(w.path)
    np.testing.assert_array_equal(fs.read_batch([-2, -1]), data[[-2, -1]])
    np.testing.assert_array_equal(fs.read(-1), data[-1])


def test_several_damaged_images_across_shards(damaged):
    flip_inner_chunk(Path(damaged) / "features" / "last" / "c" / "2" / "0" / "0" / "0", 1)  # image 9
    fs = open_features(damaged)
    with pytest.raises(StoreError, match=r"2 images: 5 \(id img5\), 9 \(id img9\)"):
        fs.read_all()
    with pytest.raises(StoreError, match=r"2 images: 5 \(id img5\), 9 \(id img9\)"):
        fs.read_batch([9, 1, 5])
    report = verify_store(damaged)
    assert [p.split(":")[0] for p in report.problems] == ["features/last", "features/last"]
    assert "image 5 (id img5)" in report.problems[0] and "image 9 (id img9)" in report.problems[1]


def test_verify_pins_the_damaged_image(damaged):
    report = verify_store(damaged)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    line = report.problems[0]
    assert line.startswith("features/last: image 5 (id img5) unreadable"), line
    assert "checksum" in line and "the other 3 image(s) of images 4..7 read fine" in line, line
    assert "img4" not in line and "img6" not in line and "img7" not in line, line


def make_target_store(tmp_path: Path) -> str:
    """Targets like the extractor's: zstd + crc32c, one chunk per image, and a per-shard ``instance_count``."""
    tspec = TargetSpec(dataset="shapes", split="val", kinds=("semantic",), num_images=N, image_ids_hash="abc")
    tw = StoreWriter(tmp_path / "targets.zarr", kind="targets", key=tspec.key, spec=tspec.to_dict(),
                     arrays=[ArrayDef("semantic", (16, 16), "uint8", ("y", "x")),
                             ArrayDef("instance_count", (), "int32", chunk_per_image=False)],
                     image_ids=[f"img{i}" for i in range(N)], shard_size=SHARD, compression="zstd").open()
    rng = np.random.default_rng(1)
    for s in tw.missing_shards():
        a, b = tw.shard_range(s)
        tw.write_shard(s, {"semantic": rng.integers(0, 5, (b - a, 16, 16)).astype(np.uint8),
                           "instance_count": np.arange(a, b, dtype=np.int32)})
    tw.finalize()
    return tw.path


def test_corrupt_target_chunk_one_error_nothing_on_stderr(tmp_path, capfd):
    path = make_target_store(tmp_path)
    flip_inner_chunk(Path(path) / "semantic" / "c" / "0" / "0" / "0", 2)  # image 2
    ts = open_targets(path)
    capfd.readouterr()
    with pytest.raises(StoreError) as err:
        ts.read("semantic", [0, 1, 2, 3, 5, 9, 8])
    text = str(err.value)
    assert path in text and "'semantic'" in text and "image 2 (id img2)" in text and "maxa stores verify" in text
    with pytest.raises(StoreError, match=r"image 2 \(id img2\)"):
        ts.read_all("semantic")
    assert ts.read("semantic", [0, 1, 3, 5, 9]).shape == (5, 16, 16)
    out, errtext = capfd.readouterr()
    assert out == "" and errtext == "", errtext


def test_corrupt_target_no_pending_tasks_at_exit(tmp_path):
    """A process that fails a gathered read and exits at once prints nothing from asyncio."""
    path = make_target_store(tmp_path)
    flip_inner_chunk(Path(path) / "semantic" / "c" / "0" / "0" / "0", 0)  # the first request fails
    script = textwrap.dedent(f"""
        import sys
        from store import open_targets
        try:
            open_targets({path!r}).read("semantic", [0] + [1, 2, 3, 5, 6, 7, 9] * 30)  # many in flight
        except Exception as e:
            print(type(e).__name__, e)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 2 and proc.stdout.startswith("StoreError"), proc.stdout
    assert "image 0 (id img0)" in proc.stdout, proc.stdout


def test_one_chunk_per_shard_array_names_the_shard(tmp_path):
    path = make_target_store(tmp_path)
    flip_middle(Path(path) / "instance_count" / "c" / "1")  # images 4..7 share one chunk
    ts = open_targets(path)
    for call in (lambda: ts.read_all("instance_count"), lambda: ts.read("instance_count", [9, 5, 0])):
        with pytest.raises(StoreError) as err:
            call()
        text = str(err.value)
        assert "images 4..7 (ids img4..img7" in text and "whole shard in one chunk" in text, text
    assert ts.read("instance_count", [0, 9]).tolist() == [0, 9]
    report = verify_store(path)
    assert len(report.problems) == 1 and "instance_count: images 4..7" in report.problems[0], report.problems
    assert "shard is the unit" in report.problems[0]


@pytest.fixture
def synthetic(tmp_path) -> dict[str, str]:
    return make_synthetic_root(tmp_path / "root", n_train=12, n_val=4)


@pytest.mark.parametrize("in_memory", [True, False])
def test_probe_data_paths(synthetic, in_memory):
    """The in-memory load and the streamed prefetch thread both hand over the StoreError."""
    from probe.data import ProbeData

    fpath = synthetic["train"]
    flip_inner_chunk(Path(fpath) / "features" / "last" / "c" / "0" / "0" / "0" / "0", 7)
    fs = open_features(fpath)
    ts = _targets_of(synthetic, fs)
    indices = [0, 3, 7, 9, 11]
    if in_memory:
        with pytest.raises(StoreError, match=r"image 7 \(id synthetic-train-7\).*maxa stores verify"):
            ProbeData(fs, ts, ["semantic"], indices=indices, in_memory=True)
    else:
        data = ProbeData(fs, ts, ["semantic"], indices=indices, in_memory=False, prefetch=1)
        with pytest.raises(StoreError, match=r"image 7 \(id synthetic-train-7\).*maxa stores verify"):
            for _ in data.batches(2):
                pass


def _targets_of(synthetic: dict[str, str], fs) -> object:
    root = Path(synthetic["train"]).parents[2]
    for p in (root / "targets").rglob("*.zarr"):
        ts = open_targets(p)
        if ts.image_ids == fs.image_ids:
            return ts
    raise AssertionError("no target store for the synthetic train split")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAXA_DEBUG")}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("damage", ["features", "targets"])
def test_cli_probe_on_a_damaged_store(synthetic, damage):
    fpath = synthetic["train"]
    if damage == "features":
        store = fpath
        flip_inner_chunk(Path(fpath) / "features" / "last" / "c" / "0" / "0" / "0" / "0", 4)
        name = "features/last"
    else:
        store = _targets_of(synthetic, open_features(fpath)).path
        flip_inner_chunk(Path(store) / "semantic" / "c" / "0" / "0" / "0", 4)
        name = "semantic"
    proc = run_cli("probe", "--store", fpath, "--task", "semseg", "--max-epochs", "1", "--device", "cpu",
                   "--no-progress")
    text = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0, text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error:") and "bug in maxa" not in text, text
    assert "Traceback" not in text and "Task was destroyed" not in text, text
    assert store in text and repr(name) in text and "image 4 (id synthetic-train-4)" in text, text
    assert f"maxa stores verify {store}" in text, text


def test_damaged_bookkeeping_array_is_one_store_error(tmp_path, data):
    w = make_writer(tmp_path, make_spec(n=N), shard_size=SHARD)
    fill(w, data)
    w.finalize()
    chunks = [c for c in (Path(w.path) / "shard_done").rglob("*") if c.is_file() and c.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        flip_middle(chunk)
    with pytest.raises(StoreError) as err:
        open_features(w.path).shard_done()
    text = str(err.value)
    assert "\n" not in text and w.path in text and "'shard_done'" in text and "maxa stores verify" in text, text
