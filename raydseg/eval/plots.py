"""Plots as PNG bytes (matplotlib Agg, no global pyplot state): confusion matrices, PCA of features, overlays."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from raydseg.eval.metrics import IGNORE_INDEX


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours: Cityscapes' trainId colours for the first 19, then a fixed pseudo-random set."""
    from cityscapesscripts.helpers.labels import trainId2label

    rng = np.random.default_rng(12345)
    colours = rng.integers(0, 256, size=(max(n, 19), 3)).astype(np.uint8)
    for t in range(19):
        colours[t] = trainId2label[t].color
    return colours[:n]


def colorize(label: np.ndarray, n: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) classes -> (H, W, 3) uint8 colours; `ignore_index` and out-of-range values are black."""
    lut = np.zeros((max(n, int(label.max(initial=0)) + 1, ignore_index + 1), 3), dtype=np.uint8)
    lut[:n] = palette(n)
    lab = np.asarray(label, dtype=np.int64)
    out = lut[np.clip(lab, 0, len(lut) - 1)]
    out[(lab == ignore_index) | (lab >= n)] = 0
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def fig_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def confusion_plot(matrix: np.ndarray, row_names: list[str], col_names: list[str], title: str = "") -> bytes:
    """Row-normalised heat map of a (rows = predicted, cols = ground truth) matrix, as PNG bytes."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=0, keepdims=True), 1)  # fraction of each gt class's pixels
    fig = Figure(figsize=(0.35 * len(col_names) + 2.5, 0.3 * len(row_names) + 2))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(col_names)), col_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=7)
    ax.set_xlabel("ground-truth class")
    ax.set_ylabel("prediction")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of gt pixels")
    return fig_png(fig)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2) projection on the two leading principal components."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def pca_plot(features: np.ndarray, labels: np.ndarray, names: list[str], title: str = "") -> bytes:
    """Scatter of the 2-D PCA of (N, D) features coloured by (N,) class, as PNG bytes."""
    from matplotlib.figure import Figure

    xy = pca_2d(features) if len(features) > 1 else np.zeros((len(features), 2))
    cols = palette(len(names)).astype(np.float64) / 255
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(1, 1, 1)
    for c in np.unique(labels):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cols[c], label=names[c])
    ax.legend(fontsize=6, markerscale=1.5, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return fig_png(fig)


def overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, n_classes: int, alpha: float = 0.5) -> np.ndarray:
    """(H, 3W, 3) uint8 strip: image | image blended with mapped prediction | image blended with ground truth."""
    img = np.asarray(image, dtype=np.float32)

    def blend(lab: np.ndarray) -> np.ndarray:
        col = colorize(lab, n_classes).astype(np.float32)
        void = (np.asarray(lab) == IGNORE_INDEX)[..., None]
        return np.where(void, img, (1 - alpha) * img + alpha * col).astype(np.uint8)

    return np.concatenate([img.astype(np.uint8), blend(pred), blend(gt)], axis=1)


def shrink(strip: np.ndarray, max_width: int = 960) -> np.ndarray:
    """An image strip resized (nearest) to at most `max_width` px wide, for the report."""
    if strip.shape[1] <= max_width:
        return strip
    h = max(1, round(strip.shape[0] * max_width / strip.shape[1]))
    return np.array(Image.fromarray(strip).resize((max_width, h), Image.NEAREST))
