"""The notebook API (``import maxa``): open stores, a torch Dataset over an aligned pair, training
that returns the model and can write nothing, prediction on arrays."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import maxa

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_synthetic_root  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_root(tmp_path_factory.mktemp("root"), n_train=16, n_val=6)


def test_public_names_resolve():
    assert maxa.__version__ and set(dir(maxa)) == set(maxa.__all__)
    for name in maxa.__all__:
        assert getattr(maxa, name) is not None, name
    with pytest.raises(AttributeError):
        maxa.not_a_name  # noqa: B018


def test_dataset_over_an_aligned_pair(root):
    fs = maxa.open_features(root["train"])
    ts = maxa.find_targets(fs)
    ds = maxa.StorePairDataset(fs, ts, names=["semantic"], indices=[3, 1, 4])
    item = ds[1]
    assert len(ds) == 3 and item["index"] == 1
    assert torch.equal(item["features"]["last"], torch.from_numpy(fs.read(1).astype(np.float32)))
    assert torch.equal(item["targets"]["semantic"], torch.from_numpy(ts.read("semantic", [1])[0]))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["features"]["last"].shape == (3, *fs.layer_shape()) and batch["index"].tolist() == [3, 1, 4]
    with pytest.raises(KeyError, match="not in the target store"):
        maxa.StorePairDataset(fs, ts, names=["depth"])


def test_train_without_writing_then_predict_on_arrays(root):
    store_root = Path(root["train"]).parents[2]
    before = sorted(store_root.rglob("*"))
    r = maxa.train_probe(root["train"], maxa.ProbeConfig(task="semseg", max_epochs=2), device="cpu",
                         show_progress=False, write=False)
    assert sorted(store_root.rglob("*")) == before and r.run_dir == "" and r.result_path == ""  # nothing written
    assert isinstance(r.model, torch.nn.Module) and not r.model.training and len(r.history) == 2
    fs = maxa.open_features(root["val"])
    x = fs.read_batch([0, 2])
    out = maxa.predict_arrays(r.model, [x], [fs.token_centres()], (32, 32))
    single = maxa.predict_arrays(r.model, [x[1]], [fs.token_centres()], (32, 32))
    assert out.shape[:1] == (2,) and out.shape[2:] == (32, 32) and np.allclose(out[1], single[0], atol=1e-5)
    probs = maxa.output_values(out[0], "semseg")
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
