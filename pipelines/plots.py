"""The report's figures: score vs speed (paper Fig. 6), score vs P_learn, feature PCA (Fig. 9) and an
adapter's predictions at several output resolutions (Fig. 4). Each returns ``(figures, notes)``."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipelines.report_shared import DEFAULT_FEATURE_IMAGES, Figure, primary_metric

__all__ = ["score_vs_speed", "score_vs_plearn", "feature_pca", "prediction_resolutions", "PREDICTION_SIZES"]

PREDICTION_SIZES = (56, 112, 224, 448)
HEAD_COLOURS = {"maxa": "tab:blue", "linear": "tab:orange", "cnn": "tab:green", "jbu": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _image_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _primary(records: list[dict[str, Any]]) -> tuple[str, bool]:
    r = records[0]
    return primary_metric(r), bool(r.get("higher_is_better", True))


def _groups(records, keyf):
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(keyf(r), []).append(r)
    return out


def _mean(vals) -> float | None:
    vals = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else None


def _subplots(n: int):
    plt = _pyplot()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def score_vs_speed(records, speed):
    """Primary metric per (task, dataset) against the backbone's inference time relative to ViT-B/16."""
    if not speed:
        return [], ["no speed records (task 'speed', from `maxa bench speed`): the score-vs-speed plot is skipped."]
    from pipelines.report_shared import other_references, relative_to_vitb16

    rel: dict[str, float] = {}
    unit = "relative to ViT-B/16 @224"
    notes = []
    if other_references(speed):
        notes.append(f"speed records timed against another reference ({', '.join(other_references(speed))}, "
                     "`maxa bench speed --reference`) are left out of the relative speeds: their ratios are not to "
                     "ViT-B/16.")
    for b, recs in _groups(speed, lambda r: r.get("backbone")).items():
        v = _mean([relative_to_vitb16(r) for r in recs])
        if v is not None:
            rel[b] = v
    if not rel:  # no relative numbers: seconds per batch
        unit = "seconds per batch"
        for b, recs in _groups(speed, lambda r: r.get("backbone")).items():
            v = _mean([r["metrics"].get("seconds_per_batch") for r in recs])
            if v is not None:
                rel[b] = v
    base = [r for r in records if r["head"] == "maxa" and r["variant"] == "base" and r["backbone"] in rel]
    groups = _groups(base, lambda r: (r["task"], r["dataset"]))
    if not groups:
        return [], [*notes, ("speed records exist, but no maxa base probe shares a backbone with them: no "
                             "score-vs-speed plot.")]
    fig, axes = _subplots(len(groups))
    for ax, ((task, ds), recs) in zip(axes, sorted(groups.items())):
        metric, higher = _primary(recs)
        points = _groups(recs, lambda r: (r["backbone"], r.get("_config", "")))  # never average configurations
        for (b, conf), brecs in points.items():
            y = _mean([r["metrics"].get(metric) for r in brecs])
            if y is None:
                continue
            label = b + (f" [{conf}]" if sum(k[0] == b for k in points) > 1 else "")
            ax.scatter([rel[b]], [y], color="tab:blue")
            ax.annotate(label, (rel[b], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"inference time ({unit})")
        ax.set_ylabel(f"{metric} {'↑' if higher else '↓'}")
        ax.set_title(f"{task} · {ds}")
        ax.grid(alpha=0.3)
    fig.suptitle("Score against relative speed (paper Fig. 6)")
    return [Figure("score_vs_speed.png", _png(fig), f"Score against inference time ({unit}).", "plots")], notes


def _annotate_apart(ax, points: list[tuple[float, float, str]], log_x: bool) -> None:
    """Label points; labels of points that fall on one spot (within 3 % of the axes' spans) are
    joined into one, a line each, instead of printed over each other."""
    if not points:
        return
    xs = np.array([np.log10(max(p[0], 1e-12)) if log_x else p[0] for p in points])
    ys = np.array([p[1] for p in points])
    span_x, span_y = max(np.ptp(xs), 1e-12), max(np.ptp(ys), 1e-12)
    spots: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(zip(xs, ys)):
        spots.setdefault((round((x - xs.min()) / span_x * 33), round((y - ys.min()) / span_y * 33)), []).append(i)
    for members in spots.values():
        x, y, _ = points[members[0]]
        ax.annotate("\n".join(points[i][2] for i in members), (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points", va="bottom")


def head_legend(records) -> list[tuple[str, str]]:
    """(head, colour) for the heads among ``records`` only, MAXA first: a legend of what is plotted."""
    heads = {r["head"] for r in records}
    order = sorted(heads, key=lambda h: (list(HEAD_COLOURS).index(h) if h in HEAD_COLOURS else len(HEAD_COLOURS), h))
    return [(h, HEAD_COLOURS.get(h, "tab:gray")) for h in order]


def score_vs_plearn(records, speed=None):
    """Primary metric per (task, dataset) against learnable parameters; one point per backbone/variant/head."""
    recs = [r for r in records if r.get("p_learn") is not None]
    groups = _groups(recs, lambda r: (r["task"], r["dataset"]))
    if not groups:
        return [], []
    fig, axes = _subplots(len(groups))
    for ax, ((task, ds), grecs) in zip(axes, sorted(groups.items())):
        metric, higher = _primary(grecs)
        xs, labelled = [], []
        points = _groups(grecs, lambda r: (r["backbone"], r["variant"], r["head"], r.get("_config", "")))
        for (b, v, h, conf), prs in sorted(points.items()):  # one point per configuration, never averaged
            ys = [float(r["metrics"].get(metric, math.nan)) for r in prs]
            ys = [y for y in ys if not math.isnan(y)]
            if not ys:
                continue
            x = float(np.mean([r["p_learn"] for r in prs])) / 1e6
            xs.append(x)
            ax.errorbar([x], [np.mean(ys)], yerr=[np.std(ys, ddof=1)] if len(ys) > 1 else None, fmt="o",
                        color=HEAD_COLOURS.get(h, "tab:gray"), capsize=3)
            label = b + ("" if v == "base" else f" {v}") + ("" if h == "maxa" else f" ({h})")
            label += f" [{conf}]" if sum(k[:3] == (b, v, h) for k in points) > 1 else ""
            labelled.append((x, float(np.mean(ys)), label))
        log = bool(xs) and max(xs) / max(min(xs), 1e-12) > 10
        _annotate_apart(ax, labelled, log)
        if log:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks ran into each other
        elif xs and max(xs) <= min(xs) * 1.05:  # one P_learn (±5 %): a range around it, one tick
            ax.set_xlim(min(xs) * 0.8, max(xs) * 1.25)
            ax.set_xticks([float(np.mean(xs))])
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_xlabel("P_learn (M)")
        ax.set_ylabel(f"{metric} {'↑' if higher else '↓'}")
        ax.set_title(f"{task} · {ds}")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=h) for h, c in head_legend(recs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle("Score against learnable parameters (mean ± std over seeds)")
    return [Figure("score_vs_plearn.png", _png(fig), "Score against learnable parameters per task and dataset.",
                   "plots")], []


# -- feature PCA ----------------------------------------------------------------------------------
def _font(size: int = 12):
    from PIL import ImageFont

    try:  # matplotlib ships DejaVu Sans, which has "×"
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size), True
    except Exception:
        return ImageFont.load_default(), False


def _strip(images: list[Image.Image], text: str, gap: int = 4) -> Image.Image:
    """Images side by side with ``text`` below."""
    font, unicode_ok = _font()
    text = text if unicode_ok else text.replace("×", "x")
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    out = Image.new("RGB", (max(w, 1), h + 18), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    ImageDraw.Draw(out).text((2, h + 2), text, fill="black", font=font)
    return out


def pca_images(store_path: str, max_images: int, size: int = 112) -> tuple[list[Image.Image], str]:
    """The first three principal components of the stored tokens of up to ``max_images`` images as RGB
    (PCA fitted jointly on their tokens), nearest-upsampled to ``size``; and the label ``"C / h×w"``."""
    from store.reader import open_features

    fs = open_features(store_path)
    layer = fs.spec.layer_names[-1]
    n = min(max_images, len(fs))
    feats = np.stack([fs.read(i, layer).astype(np.float32) for i in range(n)])  # (n, h, w, C)
    _, h, w, c = feats.shape
    x = feats.reshape(-1, c)
    x = x - x.mean(0)
    cov = x.T @ x / max(len(x) - 1, 1)
    vals, vecs = np.linalg.eigh(cov.astype(np.float64))
    comps = vecs[:, ::-1][:, :3].astype(np.float32)
    y = x @ comps
    if y.shape[1] < 3:
        y = np.pad(y, ((0, 0), (0, 3 - y.shape[1])))
    lo, hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
    y = np.clip((y - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
    rgb = (y.reshape(n, h, w, 3) * 255).astype(np.uint8)
    label = f"{c} / {h}×{w}"
    return [Image.fromarray(a).resize((size, size), Image.NEAREST) for a in rgb], label


def _eval_store_paths(roots: list[str], records: list[dict[str, Any]]) -> dict[str, str]:
    """One complete eval-split feature store per backbone (preferring those the records evaluated on)."""
    from store.catalogue import list_stores

    used = {str(r.get("eval_store")) for r in records}
    found: dict[str, tuple] = {}
    for root in roots:
        for row in list_stores(root, with_size=False):
            if row["kind"] != "features" or not row["complete"]:
                continue
            rank = (row["key"] not in used, row["split"] not in ("val", "test"), row["path"])
            b = str(row["backbone"])
            if b not in found or rank < found[b]:
                found[b] = rank
    return {b: r[-1] for b, r in sorted(found.items())}


def feature_pca(roots: list[str], records: list[dict[str, Any]], max_images: int = DEFAULT_FEATURE_IMAGES):
    figures, notes = [], []
    if max_images < 1:
        return [], []
    stores = _eval_store_paths(roots, records)
    if not stores:
        return [], ["no complete feature stores under the roots: no feature PCA images."]
    for backbone, path in stores.items():
        try:
            images, label = pca_images(path, max_images)
        except Exception as e:  # a broken store must not stop the report
            notes.append(f"feature PCA of {path} failed: {e}")
            continue
        from store.reader import open_features

        spec = open_features(path).spec
        strip = _strip(images, f"{backbone}: {label}")
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in backbone)
        figures.append(Figure(f"pca_{safe}.png", _image_png(strip),
                              f"{backbone} — {spec.dataset}/{spec.split}, {label} (C / h×w), first {len(images)} images",
                              "pca"))
    return figures, notes


# -- predictions at several resolutions -----------------------------------------------------------
def prediction_resolutions(records: list[dict[str, Any]], sizes=PREDICTION_SIZES, index: int = 0):
    """For each task, the best run with an adapter and eval store on disk: one figure of image ``index``
    with its input, its ground truth and the prediction at each of ``sizes``, with a colour bar or a
    class legend (:mod:`pipelines.prediction_view`)."""
    import json

    from pipelines.prediction_view import prediction_figure, view_inputs
    from probe.predict import output_values, predict

    figures, notes = [], []
    for task in ("semseg", "boundaries", "instances", "distance", "depth"):
        cands = []
        for r in records:
            run = Path(str(r.get("run_dir") or ""))
            if r["task"] != task or not (run / "meta.json").is_file() or not (run / "adapter.pt").is_file():
                continue
            try:
                ev = json.loads((run / "meta.json").read_text()).get("eval_features")
            except (OSError, ValueError):
                continue
            v = r.get("primary_value")
            if ev and Path(ev).exists() and v is not None and not math.isnan(v):
                cands.append((-v if r.get("higher_is_better", True) else v, str(run), ev, r))
        if not cands:
            continue
        _, run, ev, r = min(cands, key=lambda c: c[:2])
        try:
            preds = []
            for s in sizes:
                raw, meta = predict(run, ev, index, (s, s))
                preds.append((f"prediction {s}×{s}", output_values(raw, task)))
            view = view_inputs(ev, index, task, trained_on=meta.get("info"))
            if view.class_names is None and (meta.get("info") or {}).get("class_names"):
                view.class_names = tuple(meta["info"]["class_names"])
            group = f"{task} · {r['backbone']} · {r['dataset']} · seed {r.get('seed')} · image {index}"
            figure = prediction_figure(task, preds, view)
        except Exception as e:  # a broken run or store must not stop the report
            notes.append(f"prediction of {run} failed: {e}")
            continue
        if view.image is None:
            notes.append(f"{task}: the target store of {ev} holds no input image (built before target stores "
                         "kept it); the prediction figure shows a note in its place.")
        caption = f"input | ground truth | prediction at {', '.join(f'{s}×{s}' for s in sizes)}"
        if figure.scale:
            caption += f" ({figure.scale})"
        figures.append(Figure(f"pred_{task}.png", figure.png, caption, "predictions", group))
    if not figures and not notes:
        notes.append("no adapter run directory with its eval store on disk: no prediction images.")
    return figures, notes
