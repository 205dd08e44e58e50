"""``--weights pretrained`` against a hub on loopback: the real download path, through ``HF_ENDPOINT``.

A small HTTP server on 127.0.0.1 serves weights this test writes, in the hub's URL layout
(``/{repo_id}/resolve/{revision}/{filename}`` with the ETag / X-Repo-Commit headers huggingface_hub
checks). The CLI runs in a subprocess with the environment set before anything is imported, as a
lab's job would; its features must equal those of the same file passed as ``--weights PATH``. The
same server doubles as an HTTP proxy (requests with an absolute URL) to show that proxies from the
environment are honoured, and a closed port stands for a mirror that cannot be reached.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from store import open_features

REPO = Path(__file__).resolve().parents[1]
HUB_REPO = "timm/test_vit.r160_in1k"  # test_vit's hf_hub_id in timm's pretrained config
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """HEAD and GET of the files in ``server.files`` (URL path -> bytes), the hub's 404s otherwise."""

    def _send(self, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path  # an absolute URL when the client uses us as its proxy
        self.server.requests.append((self.command, self.headers.get("Host"), path))
        data = self.server.files.get(path)
        if data is None:
            code = "EntryNotFound" if path.startswith(f"/{HUB_REPO}/") else "RepoNotFound"
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._send(body=False)

    def do_GET(self) -> None:
        self._send(body=True)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(tmp_path):
    """A hub on a free loopback port serving ``test_vit`` weights (seed 7, with the 1000-class head the
    hub's file has) and their timm config; yields (URL, weights file, server)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = timm.create_model("test_vit")
    weights = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = {"architecture": "test_vit", "num_classes": 1000, "pretrained_cfg": dict(model.pretrained_cfg)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.files = {
        f"/{HUB_REPO}/resolve/main/model.safetensors": weights.read_bytes(),
        f"/{HUB_REPO}/resolve/main/config.json": json.dumps(config, default=list).encode(),
    }
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", weights, server
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp_path: Path, weights: str | Path) -> list[str]:
    return ["extract", "--backbone", "test_vit", "--dataset", "shapes", "--split", "val", "--weights", str(weights),
            "--num-images", "4", "--store-root", str(tmp_path / "stores"), "--device", "cpu", "--decode-workers", "0",
            "--no-progress", "--no-build-targets"]


def _extract(tmp_path: Path, weights: str | Path, **env: str) -> subprocess.CompletedProcess:
    """``maxa extract`` of four shapes images with test_vit, in a fresh interpreter with only ``env``'s
    hub and proxy settings (those of the machine are dropped)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_", "MAXA_DEBUG")) and not k.lower().endswith("_proxy")}
    base.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(REPO),
                HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *_args(tmp_path, weights)], cwd=REPO, env=base,
                          capture_output=True, text=True, timeout=300, check=False)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _extract_file(tmp_path: Path, weights: Path) -> str:
    """The same extraction with ``--weights PATH``, in process (no hub involved); its output."""
    result = CliRunner().invoke(app, _args(tmp_path, weights))
    assert result.exit_code == 0, result.output
    return result.output


def _features(output: str) -> tuple[np.ndarray, str]:
    line = next(l for l in output.splitlines() if l.startswith("features:"))
    store = open_features(re.search(r"(/\S+\.zarr)", line).group(1))
    return store.read_all(), store.spec.weights_id


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_pretrained_through_hf_endpoint_equals_the_file(tmp_path, hub):
    url, weights, server = hub
    pretrained, weights_id = _features(_ok(_extract(tmp_path, "pretrained", HF_ENDPOINT=url)))
    assert weights_id == "pretrained:test_vit.r160_in1k"
    assert ("GET", f"127.0.0.1:{server.server_address[1]}", f"/{HUB_REPO}/resolve/main/model.safetensors") \
        in server.requests
    cached = tmp_path / "hf" / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / COMMIT / "model.safetensors"
    assert cached.read_bytes() == weights.read_bytes()
    from_file, file_id = _features(_extract_file(tmp_path, weights))
    assert file_id.startswith("file:")
    np.testing.assert_array_equal(pretrained, from_file)


@pytest.mark.slow
def test_mirror_behind_a_proxy(tmp_path, hub):
    """A mirror host this machine cannot resolve, reached only through HTTP_PROXY (the loopback server)."""
    url, weights, server = hub
    proxied, _ = _features(_ok(_extract(tmp_path, "pretrained", HF_ENDPOINT="http://hub.mirror.lab", HTTP_PROXY=url)))
    assert ("GET", "hub.mirror.lab", f"/{HUB_REPO}/resolve/main/model.safetensors") in server.requests
    direct, _ = _features(_extract_file(tmp_path, weights))
    np.testing.assert_array_equal(proxied, direct)


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line_naming_it(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    err = _one_line_error(_extract(tmp_path, "pretrained", HF_ENDPOINT=endpoint))
    assert time.monotonic() - start < 60  # interpreter start-up included; the probe itself takes under 2 s
    assert f"cannot reach {endpoint} (HF_ENDPOINT" in err and "test_vit" in err, err
    assert "Point HF_ENDPOINT at a reachable hub or mirror" in err and "--weights PATH" in err, err
    assert "--weights random" in err and "HF_HUB_OFFLINE=1" in err, err
    assert not (tmp_path / "stores").exists()


@pytest.mark.slow
def test_unreachable_proxy_is_named(tmp_path):
    proxy = f"http://lab:s3cret@127.0.0.1:{_closed_port()}"
    err = _one_line_error(_extract(tmp_path, "pretrained", HF_ENDPOINT="http://hub.mirror.lab", HTTP_PROXY=proxy))
    assert "cannot reach http://hub.mirror.lab (HF_ENDPOINT, through the proxy in HTTP_PROXY: " in err, err
    assert "check the proxy in HTTP_PROXY" in err, err
    assert "s3cret" not in err  # a proxy URL may carry credentials: the message names the variable only


def test_cached_copy_used_when_the_endpoint_is_down(tmp_path, monkeypatch):
    """In process: a filled cache, HF_HUB_OFFLINE unset and the endpoint closed: the cached file is read
    directly instead of huggingface_hub retrying its metadata request."""
    from huggingface_hub import constants

    from extract.backbones import load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = timm.create_model("test_vit")
    snap = tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(snap / "model.safetensors"))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    b = load_backbone("test_vit", weights="pretrained")
    assert time.monotonic() - start < 10
    x = torch.randn(1, 3, *b.input_size)
    torch.testing.assert_close(b.forward(x)["last"], model.eval().forward_features(x)[:, 1:].reshape(1, 10, 10, -1))


@pytest.mark.slow
def test_mirror_without_the_weights(tmp_path, hub):
    """A mirror that answers but lacks the file: huggingface_hub's 404, in one line naming the mirror."""
    url, _, server = hub
    server.files.clear()
    err = _one_line_error(_extract(tmp_path, "pretrained", HF_ENDPOINT=url))
    assert f"loading them from {url} (HF_ENDPOINT) failed with " in err and "404" in err, err
    assert "Check that the mirror in HF_ENDPOINT holds these weights" in err and "--weights PATH" in err, err
