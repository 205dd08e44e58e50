"""Pictures of predictions: input | ground truth | prediction side by side, with a colour bar or a legend.

``maxa predict --out pred.png`` and the report's prediction figures draw with this module. Each task
has one way of showing its values, used for the ground truth and the prediction alike:

- semseg: the arg-max class in a fixed palette, a legend of the classes shown (names from the target
  spec), ignored pixels light grey;
- boundaries: probability in a colour map over the predictions' range (0.5th to 99.5th percentile,
  at least 0.02 wide; 0 to 1 where they span it), with its colour bar; the ground truth (0/1) lies
  at the scale's ends. A map near 0 with rare positives, or a weak adapter's 0.46-0.49, shows its
  structure instead of a flat grey square;
- depth, distance: one colour map and one scale (1st to 99th percentile of the ground truth's valid
  pixels and the prediction) for both, with a colour bar; invalid depth (0) grey;
- instances: ground-truth ids in random colours (background black); the embedding's first three
  principal components as RGB, and k-means with the true instance count inside the true foreground
  (the clustering the ARI scores).

The input panel shows the target store's ``input_image`` array (the resized input, uint8 at the target
size) where the store has one; an older target store has none, and the panel says so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from runtime.errors import MaxaError
from extract.target_store import IMAGE_ARRAY

__all__ = ["ViewInputs", "PredictionFigure", "view_inputs", "prediction_figure", "prediction_image",
           "TRUTH_ARRAYS", "NO_IMAGE_NOTE"]

#: The target array that holds each task's ground truth.
TRUTH_ARRAYS = {"semseg": "semantic", "boundaries": "boundaries", "distance": "distance", "depth": "depth",
                "instances": "instances"}
NO_IMAGE_NOTE = ("no image in this target store\n(built before target stores\nkept the input, or with\n"
                 "--no-target-image; `maxa extract`\nof this split builds one)")
IGNORE_COLOUR = (0.85, 0.85, 0.85)
PANEL_INCHES = 2.6
DPI = 100
MAX_LEGEND = 24


@dataclass
class ViewInputs:
    """What is shown beside a prediction: the input image and the ground truth, or why not."""

    image: np.ndarray | None = None  # (H, W, 3) uint8
    image_note: str = NO_IMAGE_NOTE
    truth: np.ndarray | None = None  # the task's target (H, W)
    truth_note: str = "no target store found"
    class_names: tuple[str, ...] | None = None
    ignore_index: int = 255


@dataclass
class PredictionFigure:
    """A rendered figure: PNG bytes and each panel's title and pixel box ``(left, top, right, bottom)``."""

    png: bytes
    panels: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    scale: str = ""  # "colour bar" or "legend" or ""

    def save(self, path: str | Path) -> None:
        """Write the figure to ``path`` (the format from its suffix: .png, .jpg)."""
        Image.open(io.BytesIO(self.png)).convert("RGB").save(path)


def view_inputs(store: Any, index: int, task: str, trained_on: dict[str, Any] | None = None) -> ViewInputs:
    """The input image and ground truth of image ``index`` of feature store ``store`` (a path, URL or
    open store) from its aligned target store; whatever is missing is left out with a note.

    ``trained_on``: the adapter's target info (its run's ``info``: ``num_classes``, ``class_names``).
    A semseg ground truth in other classes than the adapter's (another dataset or labelling) is not
    drawn beside its prediction, as if the two were comparable: a note says why."""
    from probe.pairing import find_targets
    from runtime.errors import StoreError
    from store.reader import FeatureStore, open_features

    fs = store if isinstance(store, FeatureStore) else open_features(store)
    try:
        ts = find_targets(fs)
    except StoreError:
        return ViewInputs(truth_note=f"no target store for {fs.spec.dataset}/{fs.spec.split} beside the features",
                          image_note=f"no target store for {fs.spec.dataset}/{fs.spec.split}\nbeside the features")
    spec = ts.spec
    view = ViewInputs(class_names=tuple(spec.class_names) if spec.class_names else None,
                      ignore_index=int(spec.ignore_index if spec.ignore_index is not None else 255))
    names = ts.array_names
    if IMAGE_ARRAY in names:
        view.image = np.asarray(ts.read(IMAGE_ARRAY, [index])[0], dtype=np.uint8)
    truth = TRUTH_ARRAYS.get(task)
    other = _other_classes(task, spec, trained_on)
    if other:
        view.truth_note = other
        view.class_names = tuple(trained_on.get("class_names") or ()) or None
    elif truth in names:
        view.truth = np.asarray(ts.read(truth, [index])[0])
    else:
        view.truth_note = f"the target store has no {truth!r} targets"
    return view


def _other_classes(task: str, spec: Any, trained_on: dict[str, Any] | None) -> str | None:
    """Why the store's semseg targets are not the adapter's classes, or ``None`` when they are."""
    if task != "semseg" or not trained_on or trained_on.get("num_classes") is None:
        return None
    mine, theirs = int(trained_on["num_classes"]), spec.num_classes
    if theirs is not None and int(theirs) != mine:
        return f"this store's targets have {theirs} classes,\nthe adapter's {mine}: not drawn"
    names, their_names = trained_on.get("class_names"), spec.class_names
    if names and their_names and list(names) != list(their_names):
        return "this store's classes are not\nthe adapter's (other names): not drawn"
    return None


# -- colours --------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def class_palette(n: int) -> np.ndarray:
    """``(n, 3)`` float RGB: tab20's colours, then evenly spread hues for more classes."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb

    base = np.asarray(colormaps["tab20"].colors)[:, :3]
    if n <= len(base):
        return base[:n]
    extra = np.stack([hsv_to_rgb(((i * 0.618034) % 1.0, 0.65 + 0.3 * (i % 2), 0.9 - 0.25 * (i % 3 == 0)))
                      for i in range(n - len(base))])
    return np.concatenate([base, extra])


def _labels_rgb(labels: np.ndarray, palette: np.ndarray, ignore_index: int | None) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    ok = (labels >= 0) & (labels < len(palette)) & (labels != (ignore_index if ignore_index is not None else -1))
    rgb = np.empty((*labels.shape, 3))
    rgb[:] = IGNORE_COLOUR
    rgb[ok] = palette[labels[ok]]
    return rgb


def _ids_rgb(ids: np.ndarray) -> np.ndarray:
    """Instance ids in random colours, 0 (background) black."""
    ids = np.asarray(ids).astype(np.int64)
    palette = np.random.default_rng(0).uniform(0.25, 1.0, (int(ids.max(initial=0)) + 1, 3))
    palette[0] = 0.0
    return palette[ids]


def _pca_rgb(embedding: np.ndarray) -> np.ndarray:
    """The first three principal components of a ``(C, H, W)`` embedding as RGB in [0, 1]."""
    c, h, w = embedding.shape
    x = embedding.reshape(c, -1).T.astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:3].T
    if y.shape[1] < 3:
        y = np.pad(y, ((0, 0), (0, 3 - y.shape[1])))
    lo, hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
    return np.clip((y - lo) / np.maximum(hi - lo, 1e-8), 0, 1).reshape(h, w, 3)


def _nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``a`` (H, W, ...) resized to ``shape`` by nearest neighbour (pixel centres)."""
    h, w = a.shape[:2]
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
    return a[ys][:, xs]


def _kmeans_rgb(embedding: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int]:
    """k-means with the true instance count on the embedding inside the true foreground (as scored)."""
    from sklearn.cluster import KMeans

    ids = _nearest(truth, embedding.shape[1:])
    fg = ids > 0
    k = len(np.unique(ids[fg]))
    out = np.zeros(ids.shape, dtype=np.int64)
    if k >= 1:
        x = embedding[:, fg].T.astype(np.float64)
        rng = np.random.default_rng(0)
        fit = x[rng.choice(len(x), min(len(x), 5000), replace=False)]
        km = KMeans(n_clusters=min(k, len(fit)), n_init=4, random_state=0).fit(fit)
        out[fg] = km.predict(x) + 1
    return _ids_rgb(out), k


@dataclass
class _Scale:
    cmap: str
    vmin: float
    vmax: float
    label: str


def _scale(task: str, truth: np.ndarray | None, predictions: Sequence[np.ndarray]) -> _Scale | None:
    """The one colour scale of a continuous task's truth and predictions."""
    if task == "boundaries":  # the predictions' own range: a map of 0.46-0.49 is not one flat colour
        lo = min(float(np.percentile(p, 0.5)) for p in predictions)
        hi = max(float(np.percentile(p, 99.5)) for p in predictions)
        if hi - lo < 0.02:
            mid = (hi + lo) / 2
            lo, hi = max(0.0, mid - 0.01), min(1.0, mid + 0.01)
        full = lo <= 0.01 and hi >= 0.99
        label = "boundary probability" + ("" if full else " (truth: 0/1)")
        return _Scale("magma", 0.0 if full else lo, 1.0 if full else hi, label)
    if task in ("depth", "distance"):
        vals = [np.asarray(p, dtype=np.float64).ravel() for p in predictions]
        if truth is not None:
            t = np.asarray(truth, dtype=np.float64).ravel()
            vals.append(t[t > 0] if task == "depth" else t)
        v = np.concatenate(vals)
        v = v[np.isfinite(v)]
        lo, hi = (float(np.percentile(v, 1)), float(np.percentile(v, 99))) if v.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1e-6
        return _Scale("viridis", lo, hi, "depth (m)" if task == "depth" else "distance to the nearest boundary "
                      "(normalised)")
    return None


# -- the figure -----------------------------------------------------------------------------------
def _panel_data(task: str, values: np.ndarray, *, view: ViewInputs, palette: np.ndarray | None,
                truth: bool = False) -> tuple[np.ndarray, bool]:
    """``(array for imshow, whether it takes the colour scale)`` of a truth or a prediction."""
    if task == "semseg":
        labels = values if truth else np.asarray(values).argmax(0)
        return _labels_rgb(labels, palette, view.ignore_index if truth else None), False
    if task == "instances":
        return (_ids_rgb(values) if truth else _pca_rgb(np.asarray(values))), False
    if task == "depth" and truth:
        return np.ma.masked_less_equal(np.asarray(values, dtype=np.float64), 0.0), True
    return np.asarray(values, dtype=np.float64), True


def _note_panel(ax: Any, text: str) -> None:
    ax.set_facecolor("#f2f2f2")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, color="#444", transform=ax.transAxes, wrap=True)


def prediction_figure(task: str, predictions: Sequence[tuple[str, np.ndarray]], view: ViewInputs,
                      title: str = "") -> PredictionFigure:
    """Input | ground truth | each prediction, with a colour bar (continuous values) or a legend (classes).

    Args:
        task: the run's task.
        predictions: ``(panel title, values)`` with values as :func:`probe.predict.output_values` gives them.
        view: the input image and ground truth (:func:`view_inputs`).
        title: the figure's title.
    """
    if not predictions:
        raise MaxaError("nothing to draw: no predictions.")
    plt = _pyplot()
    from matplotlib.patches import Patch

    values = [np.asarray(v) for _, v in predictions]
    palette = None
    if task == "semseg":
        labelled = [] if view.truth is None else np.asarray(view.truth)[view.truth != view.ignore_index]
        n = max(int(values[0].shape[0]), len(view.class_names or ()), int(labelled.max()) + 1 if len(labelled) else 0)
        palette = class_palette(n)
    scale = _scale(task, view.truth, values)
    extra: list[tuple[str, np.ndarray]] = []
    if task == "instances" and view.truth is not None:
        rgb, k = _kmeans_rgb(values[-1], view.truth)
        extra.append((f"k-means, k = {k}\n(true foreground)", rgb))
    titles = ["input", "ground truth"] + [t for t, _ in predictions] + [t for t, _ in extra]
    n = len(titles)
    side = 1.7 if task == "semseg" else (0.9 if scale is not None else 0.0)
    fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n + side, PANEL_INCHES + 0.5), dpi=DPI,
                             squeeze=False, layout="constrained")
    axes = list(axes.flat)
    mappable = None
    kw = {"interpolation": "nearest"}
    if view.image is not None:
        axes[0].imshow(view.image, **kw)
    else:
        _note_panel(axes[0], view.image_note)
    if view.truth is not None:
        data, scaled = _panel_data(task, view.truth, view=view, palette=palette, truth=True)
        if scaled and scale is not None:
            cmap = plt.get_cmap(scale.cmap).with_extremes(bad="#bbbbbb")
            mappable = axes[1].imshow(data, cmap=cmap, vmin=scale.vmin, vmax=scale.vmax, **kw)
        else:
            axes[1].imshow(data, **kw)
    else:
        _note_panel(axes[1], view.truth_note)
    for ax, v in zip(axes[2:], values):
        data, scaled = _panel_data(task, v, view=view, palette=palette)
        if scaled and scale is not None:
            mappable = ax.imshow(data, cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax, **kw)
        else:
            ax.imshow(data, **kw)
    for ax, (_, rgb) in zip(axes[2 + len(values):], extra):
        ax.imshow(rgb, **kw)
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    kind = ""
    if scale is not None and mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.85, pad=0.01).set_label(scale.label, fontsize=8)
        kind = "colour bar"
    elif task == "semseg" and palette is not None:
        shown = _classes_shown(view, values)
        names = view.class_names or ()
        handles = [Patch(color=palette[c], label=(names[c] if c < len(names) else f"class {c}")) for c in shown]
        if view.truth is not None and np.any(view.truth == view.ignore_index):
            handles.append(Patch(color=IGNORE_COLOUR, label=f"ignored ({view.ignore_index})"))
        fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False)
        kind = "legend"
    if title:
        fig.suptitle(title, fontsize=9)
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    boxes = []
    for ax, t in zip(axes, titles):
        b = ax.get_window_extent()
        boxes.append((t.replace("\n", " "), (int(round(b.x0)), int(round(height - b.y1)), int(round(b.x1)),
                                              int(round(height - b.y0)))))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return PredictionFigure(buf.getvalue(), boxes, kind)


def _classes_shown(view: ViewInputs, values: Sequence[np.ndarray]) -> list[int]:
    """The classes in the truth or any prediction, most pixels first, at most :data:`MAX_LEGEND`."""
    counts: dict[int, int] = {}
    arrays = [v.argmax(0) for v in values]
    if view.truth is not None:
        t = np.asarray(view.truth).astype(np.int64)
        arrays.append(t[t != view.ignore_index])
    for a in arrays:
        ids, n = np.unique(np.asarray(a).astype(np.int64), return_counts=True)
        for i, c in zip(ids, n):
            counts[int(i)] = counts.get(int(i), 0) + int(c)
    return sorted(sorted(counts, key=lambda c: -counts[c])[:MAX_LEGEND])


def prediction_image(values: np.ndarray, task: str, *, num_classes: int | None = None) -> Image.Image:
    """The prediction alone, one pixel per output pixel, in the colours of :func:`prediction_figure`
    (boundaries and depth/distance on their own scale; no colour bar or legend)."""
    from matplotlib import colormaps

    values = np.asarray(values)
    if task == "semseg":
        rgb = _labels_rgb(values.argmax(0), class_palette(max(values.shape[0], num_classes or 0)), None)
    elif task == "instances":
        rgb = _pca_rgb(values)
    else:
        s = _scale(task, None, [values])
        assert s is not None
        rgb = colormaps[s.cmap](np.clip((values - s.vmin) / (s.vmax - s.vmin), 0, 1))[..., :3]
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
