"""``maxa report``: paper-style tables with the paper's numbers, figures, and the HTML page in headless Chromium.

A tiny real store root (``shapes`` with the random ``test_vit``, two boundaries probes) plus hand-made
records for backbones that have paper rows, so the paper columns are checked against known differences.
The page is rendered by Chromium driven over the DevTools protocol on a pipe (stdlib only), which
reports console messages, script exceptions and failed loads.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.jobs import run_extract
from pipelines.report import load_reference, write_report
from store.results import append_result
from probe.train import ProbeConfig, train_probe

pytestmark = pytest.mark.slow


def _record(task, backbone, dataset, metrics, *, variant="base", seed=0, p_learn=190_000, trivial=None):
    primary = {"boundaries": "iou", "semseg": "miou", "instances": "ari", "depth": "mse", "distance": "mse"}[task]
    return {"task": task, "variant": variant, "head": "maxa", "seed": seed, "backbone": backbone,
            "weights": "pretrained:test", "dataset": dataset, "train_split": "train", "eval_split": "val",
            "primary_metric": primary, "primary_value": metrics[primary],
            "higher_is_better": task in ("boundaries", "semseg", "instances"), "metrics": metrics,
            "trivial": trivial or {k: 0.0 for k in metrics}, "p_learn": p_learn, "epochs": 1,
            "timings": {"total_s": 1.0}, "config": {}, "run_dir": "", "train_store": "", "eval_store": ""}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    paths = {}
    for split in ("train", "val"):
        r = run_extract(backbone="test_vit", dataset="shapes", split=split, store_root=root, weights="random",
                        device="cpu", dataset_options={"num_images": 24}, num_workers=0, show_progress=False)
        paths[split] = r.features.path
    probes = [train_probe(paths["train"], ProbeConfig(task="boundaries", max_epochs=1, seed=s), show_progress=False)
              for s in (0, 1)]
    hand = [
        _record("boundaries", "dinov2_b14", "coco", {"iou": 30.0, "ce": 0.15}, p_learn=193_000),
        _record("boundaries", "siglip_384", "coco", {"iou": 27.0, "ce": 0.17}, p_learn=187_000),
        _record("instances", "dinov2_b14", "coco", {"ari": 50.0}, p_learn=230_000),
        _record("instances", "dinov2_b14", "coco", {"ari": 45.0}, variant="d16", p_learn=120_000),
        _record("semseg", "dinov2_b14", "voc", {"miou": 80.0, "ce": 0.2, "pixel_acc": 90.0}, p_learn=209_000),
        _record("depth", "dinov2_b14", "nyuv2", {"mse": 0.25, "rmse": 0.5, "absrel": 0.1, "delta1": 0.9}),
        {"task": "speed", "backbone": "dinov2_b14", "metrics": {"seconds_per_batch": 0.5, "relative_to_vitb16": 5.1}},
        {"task": "speed", "backbone": "test_vit", "metrics": {"seconds_per_batch": 0.01, "relative_to_vitb16": 0.2}},
    ]
    for rec in hand:
        append_result(root, rec)
    out = tmp_path_factory.mktemp("report")
    result = write_report([str(root)], str(out), max_feature_images=3)
    return {"root": root, "out": out, "paths": result, "probes": probes,
            "md": Path(result.markdown).read_text(encoding="utf-8")}


def _row(md: str, label: str, after: str | None = None) -> list[str]:
    """Cells of the first markdown table row labelled ``label`` (after the line containing ``after``)."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if after in l) if after else 0
    for line in lines[start:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} after {after!r}")


def _header(md: str, title: str) -> list[str]:
    lines = md.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("### ") and title in l)
    head = next(l for l in lines[i:] if l.startswith("| "))
    return [c.strip() for c in head.strip().strip("|").split("|")]


def test_reference_data_shipped():
    ref, ablation = load_reference()
    assert ref["Dino V2"]["boundaries_iou"] == 33.3 and ref["SigLIP-384"]["voc_miou"] == 76.4
    assert ablation["D=16"]["instdisc_dinov2"] == 0.4777


def test_table2_values_best_and_paper_delta(report):
    md = report["md"]
    head = _header(md, "Table 2")
    col = {name: i for i, name in enumerate(head)}
    dino = _row(md, "dinov2_b14", "Table 2")
    sig = _row(md, "siglip_384", "Table 2")
    assert dino[col["Boundaries IoU"]] == "**30.0** (n=1)"  # best: higher IoU
    assert sig[col["Boundaries IoU"]] == "27.0 (n=1)"
    assert dino[col["Boundaries CE"]] == "**0.1500** (n=1)"  # best: lower CE
    assert sig[col["Boundaries CE"]] == "0.1700 (n=1)"
    assert dino[col["Inst. Disc. ARI"]] == "50.0 (n=1)"  # a single row: nothing to mark
    assert dino[col["Boundaries P_learn"]] == "0.193 (n=1)"
    paper = _row(md, "*paper: Dino V2*", "Table 2")
    delta = _row(md, "*Δ ours − paper*", "Table 2")
    assert paper[col["Boundaries IoU"]] == "33.3" and delta[col["Boundaries IoU"]] == "-3.3"  # 30.0 − 33.3
    assert paper[col["Boundaries CE"]] == "0.1461" and delta[col["Boundaries CE"]] == "+0.0039"
    assert paper[col["Inst. Disc. ARI"]] == "54.5" and delta[col["Inst. Disc. ARI"]] == "-4.5"
    assert delta[col["Boundaries P_learn"]] == "+0.000"
    sig_delta = _row(md, "*Δ ours − paper*", "| siglip_384 ")
    assert sig_delta[col["Boundaries IoU"]] == "+0.5"  # 27.0 − 26.5
    # the random test backbone on shapes is not in the paper's tables
    assert "| test_vit |" not in md.split("### Table 3")[0]


def test_table3_and_ablation(report):
    md = report["md"]
    col = {name: i for i, name in enumerate(_header(md, "Table 3"))}
    assert _row(md, "dinov2_b14", "Table 3")[col["Pascal VOC2012 IoU"]] == "80.0 (n=1)"
    delta = _row(md, "*Δ ours − paper*", "Table 3")
    assert delta[col["Pascal VOC2012 IoU"]] == "-5.3"  # 80.0 − 85.3
    assert delta[col["Depth (NYUv2) MSE"]] == "+0.0220"  # 0.25 − 22.8 / 100
    # Table 4: the paper's ARI fraction 0.4777 as a percent
    col4 = {name: i for i, name in enumerate(_header(md, "Table 4"))}
    name = next(n for n in col4 if n.startswith("Inst. Disc. ARI") and "dinov2_b14" in n)
    assert _row(md, "base", "Table 4")[col4[name]] == "**50.0** (n=1)"
    assert _row(md, "d16", "Table 4")[col4[name]] == "45.0 (n=1)"
    assert _row(md, "*paper: D=16*", "Table 4")[col4[name]] == "47.8"
    d16_delta = _row(md, "*Δ ours − paper*", "| d16 ")
    assert d16_delta[col4[name]] == "-2.8"  # 45.0 − 47.77


def test_other_datasets_mean_std_over_seeds(report):
    md = report["md"]
    vals = [p.record["metrics"]["iou"] for p in report["probes"]]
    ces = [p.record["metrics"]["ce"] for p in report["probes"]]
    col = {name: i for i, name in enumerate(_header(md, "Other datasets — shapes"))}
    row = _row(md, "test_vit", "Other datasets — shapes")
    assert row[col["Boundaries IoU"]] == f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f} (n=2)"
    assert row[col["Boundaries CE"]] == f"{statistics.fmean(ces):.4f} ± {statistics.stdev(ces):.4f} (n=2)"
    assert _row(md, "*trivial predictor*", "Other datasets — shapes")[col["Boundaries IoU"]] != ""


def test_figures_written(report):
    out, paths = report["out"], report["paths"]
    names = {Path(p).name for p in paths.images}
    assert {"score_vs_speed.png", "score_vs_plearn.png", "pca_test_vit.png"} <= names
    # predictions: input | ground truth | the prediction at 56, 112, 224 and 448 px, with a colour bar
    assert "pred_boundaries.png" in names
    pred = np.asarray(Image.open(out / "img" / "pred_boundaries.png").convert("RGB")).astype(int)
    assert pred.shape[1] > 6 * pred.shape[0] // 2 and pred.shape[0] >= 200
    assert np.abs(pred[..., 0] - pred[..., 2]).mean() > 5  # a colour map, not grey squares
    assert "input | ground truth | prediction at 56×56, 112×112, 224×224, 448×448 (colour bar)" in report["md"]
    pca = np.asarray(Image.open(out / "img" / "pca_test_vit.png").convert("RGB"))
    assert pca.shape[1] >= 3 * 112 and len(np.unique(pca.reshape(-1, 3), axis=0)) > 20
    assert "64 / 10×10" in report["md"]  # C / h×w
    for p in paths.images:  # the markdown links every image relatively
        assert f"](img/{Path(p).name})" in report["md"]


def test_cli_report(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    empty, out = tmp_path / "empty-root", tmp_path / "cli"
    empty.mkdir()
    res = CliRunner().invoke(app, ["report", str(empty), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "no probe records" in (out / "results.md").read_text() and (out / "index.html").is_file()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code == 2


# -- which records count: one per experiment, the newest; configurations never merged ------------
def _run(*, epochs=4, eval_store="val-key-A", seed=0, iou=30.0, finished="2025-03-01T10:00:00", run_dir="run-a", **extra):
    """A record as ``train_probe`` writes it (boundaries on coco, dinov2_b14)."""
    rec = _record("boundaries", "dinov2_b14", "coco", {"iou": iou, "ce": 0.15}, seed=seed)
    probe = {"task": "boundaries", "variant": "base", "head": "maxa", "seed": seed, "batch_size": 16,
             "max_epochs": epochs, "patience": 5, "val_fraction": 0.1, "lr": None, "max_train_images": None,
             "task_options": {}}
    rec.update(epochs=epochs, best_epoch=epochs, train_store="train-key", eval_store=eval_store,
               train_targets="train-targets-key", eval_targets=f"targets-of-{eval_store}", run_dir=run_dir,
               finished=finished, tool_version="0.1", train_images=900, val_images=100, eval_images=500,
               config={"probe": probe, "adapter": {"dim": 64}, "task_options": {}, "lr": 0.002, "device": "cpu",
                       "in_memory": True})
    rec.update(extra)
    return rec


def _root(tmp_path, name, *records):
    root = tmp_path / name
    for rec in records:
        append_result(root, rec)
    return str(root)


def test_other_experiments_are_kept_apart_not_replaced(tmp_path):
    """A 4-epoch run on one eval set and a later 1-epoch run on another are two experiments: neither replaces
    the other, and the table cell neither averages them nor names a best or a Δ for them."""
    from pipelines.report import collect_records

    a = _root(tmp_path, "a", _run(epochs=4, eval_store="val-key-A", iou=30.0, finished="2025-03-01T10:00:00"))
    b = _root(tmp_path, "b", _run(epochs=1, eval_store="val-key-B", iou=12.0, finished="2025-03-02T10:00:00",
                                  run_dir="run-b"))
    for roots in ([a, b], [b, a]):
        records, _ = collect_records(roots)
        assert sorted(r["metrics"]["iou"] for r in records) == [12.0, 30.0]
    out = tmp_path / "report"
    paths = write_report([a, b], str(out), max_feature_images=0)
    md = Path(paths.markdown).read_text(encoding="utf-8")
    col = {name: i for i, name in enumerate(_header(md, "Table 2"))}
    cell = _row(md, "dinov2_b14", "Table 2")[col["Boundaries IoU"]]
    assert "12.0 (n=1) [" in cell and "30.0 (n=1) [" in cell and cell.index("12.0") < cell.index("30.0")  # newest first
    assert "21.0" not in cell and "**" not in cell  # no mean of the two, no "best"
    assert _row(md, "*Δ ours − paper*", "Table 2")[col["Boundaries IoU"]] == ""
    note = next(n for n in paths.notes if "mixes 2 configurations" in n)
    assert "dinov2_b14" in note and "config.probe.max_epochs 1 / 4" in note and "eval_store" in note
    section = md.split("## All records")[1].split("\n## ")[0]
    all_rows = [line for line in section.splitlines() if line.startswith("| boundaries")]
    assert len(all_rows) == 2  # one row per configuration
    assert "## Duplicates" not in md  # different experiments are not duplicates
    # where the numbers come from: each configuration id's settings, each record's run directory
    configs = md.split("## Configurations")[1].split("\n## ")[0]
    ids = {line.split("|")[7].strip() for line in all_rows}
    assert {line.split("|")[1].strip() for line in configs.splitlines() if line.startswith("| ") and "config" not in line} == ids
    assert "max_epochs 1" in configs and "max_epochs 4" in configs
    assert "lr 0.002 (the task's)" in configs and "max_train_images all" in configs and "None" not in configs
    assert "task_options" not in configs  # an empty setting says nothing
    assert "I: input image side (px), F: feature grid side, P: backbone parameters" in md.split("### Table 2")[1]
    sources = md.split("## Where each number comes from")[1]
    assert "| run-b |" in sources and str(b) in sources and "maxa " in md.split("\n")[2]


def test_same_experiment_newest_record_wins_in_any_root_order(tmp_path):
    from pipelines.report import collect_records

    old = _run(iou=30.0, finished="2025-03-01T10:00:00", run_dir="run-old")
    new = _run(iou=31.0, finished="2025-03-05T09:00:00", run_dir="run-new",
               timings={"total_s": 9.0}, tool_version="0.2")  # bookkeeping differs: still the same experiment
    new["config"] = {**new["config"], "device": "cuda:0", "in_memory": False}
    a, b = _root(tmp_path, "a", new), _root(tmp_path, "b", old)
    for roots in ([a, b], [b, a]):
        records, _ = collect_records(roots)
        assert [(r["run_dir"], r["metrics"]["iou"]) for r in records] == [("run-new", 31.0)]
    # one root holding both, the newer written first
    c = _root(tmp_path, "c", new, old)
    assert [r["run_dir"] for r in collect_records([c])[0]] == ["run-new"]


def test_conflicting_duplicates_are_listed(tmp_path):
    old = _run(iou=30.0, finished="2025-03-01T10:00:00", run_dir="run-old")
    new = _run(iou=25.0, finished="2025-03-05T09:00:00", run_dir="run-new")
    noise = _run(seed=1, iou=28.0, finished="2025-03-01T10:00:00", run_dir="run-s1")
    noise_again = _run(seed=1, iou=28.0 * (1 + 1e-9), finished="2025-03-03T10:00:00", run_dir="run-s1-again")
    a, b = _root(tmp_path, "a", new, noise_again), _root(tmp_path, "b", old, noise)
    paths = write_report([a, b], str(tmp_path / "report"), max_feature_images=0)
    md = Path(paths.markdown).read_text(encoding="utf-8")
    dup = md.split("## Duplicates")[1].split("## All records")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in dup.splitlines() if "| boundaries" in line]
    assert [(r[1], r[2], r[3], r[4], r[6]) for r in rows] == [
        ("yes", a, "run-new", "2025-03-05T09:00:00", "25.000"), ("no", b, "run-old", "2025-03-01T10:00:00", "30.000")]
    assert "seed 0" in rows[0][0] and not any("run-s1" in line for line in dup.splitlines())  # float noise: no conflict
    assert any("different metrics" in n for n in paths.notes) and any("same metrics" in n for n in paths.notes)
    col = {name: i for i, name in enumerate(_header(md, "Table 2"))}
    assert _row(md, "dinov2_b14", "Table 2")[col["Boundaries IoU"]] == "26.5 ± 2.1 (n=2)"  # seeds 0 (newest), 1
    page = Path(paths.html).read_text(encoding="utf-8")
    assert page.index('id="duplicates"') < page.index("<h2>All records</h2>")
    assert "run-old" in page and "run-new" in page and "2025-03-05T09:00:00" in page


def test_identity_takes_new_fields_and_old_records_still_load(tmp_path):
    from pipelines.report import collect_records, record_identity

    plain = _run()
    assert record_identity(plain) == record_identity({**plain, "dataset_id": None, "metrics": {"iou": 1.0}})
    assert record_identity(plain) != record_identity({**plain, "dataset_id": "coco-2017-abc"})
    assert record_identity(plain) != record_identity({**plain, "eval_bad_excluded": 3})
    # an old record without the new fields and a new one with them: both load, kept apart
    root = _root(tmp_path, "mixed", plain, _run(dataset_id="coco-2017-abc", eval_bad_excluded=0,
                                                finished="2025-03-05T09:00:00"))
    assert len(collect_records([root])[0]) == 2


# -- the HTML page in headless Chromium -----------------------------------------------------------
class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: it reads
    NUL-terminated JSON on fd 3 and writes on fd 4); network-related services are off."""

    def __init__(self, exe: str, user_data_dir: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", "--no-default-browser-check", "--mute-audio",
                f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"]

        def fds() -> None:
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for m in self.events:
            if m.get("method") == method:
                return m
        while True:
            m = self._recv(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def problems(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {p.get('args')}")
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("headless Chromium is needed to check the report page: `apt-get install chromium` "
                    "(.ci/run installs it).")
    return exe


JS_CHECK = """JSON.stringify({
  tables: [...document.querySelectorAll('table')].map(t => t.id),
  t2rows: [...document.querySelectorAll('#table2 tbody tr')].map(r => [r.className, r.cells[0].innerText]),
  best: [...document.querySelectorAll('#table2 td.best')].map(td => td.closest('tr').cells[0].innerText + '|' + td.innerText),
  worse: [...document.querySelectorAll('#table2 tr.delta td.worse')].map(td => td.innerText),
  imgs: [...document.images].map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)]),
  external: [...document.querySelectorAll('link[href], script[src], iframe')].length,
  overflow: document.documentElement.scrollWidth - window.innerWidth,
})"""


def test_html_renders_in_chromium(report, tmp_path):
    exe = _chromium()
    # self-contained: the page alone, copied elsewhere, must show everything
    copy = tmp_path / "copied"
    copy.mkdir()
    shutil.copy(report["paths"].html, copy / "index.html")
    browser = Chromium(exe, tmp_path / "chromium-profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            browser.send(method, session=sid)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        browser.send("Page.navigate", {"url": (copy / "index.html").as_uri()}, session=sid)
        browser.wait_event("Page.loadEventFired")
        state = json.loads(browser.send("Runtime.evaluate", {"expression": JS_CHECK, "returnByValue": True},
                                        session=sid)["result"]["value"])
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=sid)
    finally:
        browser.close()
    assert browser.problems() == []
    assert {"table2", "table3", "table4", "other-shapes", "all-records"} <= set(state["tables"])
    assert ["ours", "dinov2_b14"] in state["t2rows"] and ["paper", "paper: Dino V2"] in state["t2rows"]
    assert ["delta", "Δ ours − paper"] in state["t2rows"] and ["ours", "siglip_384"] in state["t2rows"]
    assert sorted(state["best"]) == ["dinov2_b14|0.1500n=1", "dinov2_b14|30.0n=1"]
    assert "-3.3" in state["worse"]
    assert len(state["imgs"]) == len(report["paths"].images)
    assert all(ok and width > 0 and src.startswith("data:image/png") for ok, width, src in state["imgs"])
    assert state["external"] == 0
    assert state["overflow"] <= 0  # wide tables scroll inside the page, the page does not
    png = base64.b64decode(shot["data"])
    path = tmp_path / "report.png"
    path.write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    img = Image.open(path).convert("RGB")
    assert 1200 <= img.width <= 1280 and img.height >= 2000  # the viewport less a scroll bar
    small = np.asarray(img.resize((320, img.height // 4)))
    assert len(np.unique(small.reshape(-1, 3), axis=0)) > 200  # tables, plots, images: not a blank page
    if os.environ.get("MAXA_REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(path, os.environ["MAXA_REPORT_SCREENSHOT"])


def test_labels_of_points_on_one_spot_are_joined_not_overprinted():
    """score_vs_plearn: two backbones with the same P_learn and score get one label of two lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.plots import _annotate_apart

    fig, ax = plt.subplots()
    try:
        _annotate_apart(ax, [(0.015, 0.0, "test_vit"), (0.015, 0.0, "timm:test_convnext"), (0.9, 19.0, "cnn")], False)
        texts = sorted(t.get_text() for t in ax.texts)
        assert texts == ["cnn", "test_vit\ntimm:test_convnext"]
        ax.clear()
        _annotate_apart(ax, [(0.002, 10.0, "linear"), (0.05, 10.5, "maxa"), (0.9, 19.0, "cnn")], True)
        assert sorted(t.get_text() for t in ax.texts) == ["cnn", "linear", "maxa"]  # apart: each its own
    finally:
        plt.close(fig)


def test_the_plot_legend_names_the_heads_plotted_only():
    from pipelines.plots import head_legend

    assert head_legend([{"head": "maxa"}, {"head": "maxa"}]) == [("maxa", "tab:blue")]
    assert [h for h, _ in head_legend([{"head": "cnn"}, {"head": "jbu"}, {"head": "maxa"}, {"head": "new"}])] == \
        ["maxa", "cnn", "jbu", "new"]
