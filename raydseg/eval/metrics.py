"""Confusion matrices and segmentation scores, numerically identical to the official Cityscapes evaluation.

Layout: a confusion matrix is `(n_pred, n_gt)` int64 pixel counts, rows = predicted pseudo-class (or mapped class),
columns = ground-truth class. Ground-truth pixels equal to `ignore_index` (255, void) are never counted; predictions
are never masked (an over-clustered prediction is an error, not a dropped pixel).
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n_pred: int, n_gt: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pixel counts of (prediction, ground truth) pairs.

    Args:
        pred: (H, W) integer predictions in [0, n_pred).
        gt: (H, W) integer ground-truth classes in [0, n_gt) or `ignore_index`.
    Returns:
        (n_pred, n_gt) int64 counts over the pixels whose ground truth is valid.
    Raises:
        ValueError: shapes differ, a valid gt value is >= n_gt, or a prediction is outside [0, n_pred).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    valid = gt != ignore_index
    p = pred[valid].astype(np.int64).ravel()
    g = gt[valid].astype(np.int64).ravel()
    if g.size and (g.min() < 0 or g.max() >= n_gt):
        raise ValueError(f"ground-truth values must be in [0, {n_gt}) or {ignore_index}; got {g.min()}..{g.max()}")
    if p.size and (p.min() < 0 or p.max() >= n_pred):
        raise ValueError(f"predictions must be in [0, {n_pred}); got {p.min()}..{p.max()} (never masked)")
    return np.bincount(p * n_gt + g, minlength=n_pred * n_gt).reshape(n_pred, n_gt).astype(np.int64)


class ConfusionAccumulator:
    """Streaming (n_pred, n_gt) confusion matrix: add images one at a time; rows grow when a larger
    pseudo-class id appears (the number of pseudo-classes need not be known up front)."""

    def __init__(self, n_gt: int, n_pred: int = 0, ignore_index: int = IGNORE_INDEX) -> None:
        self.n_gt = n_gt
        self.ignore_index = ignore_index
        self.matrix = np.zeros((n_pred, n_gt), dtype=np.int64)
        self.n_images = 0

    def _grow(self, n_pred: int) -> None:
        if n_pred > self.matrix.shape[0]:
            grown = np.zeros((n_pred, self.n_gt), dtype=np.int64)
            grown[: self.matrix.shape[0]] = self.matrix
            self.matrix = grown

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one (H, W) prediction / ground-truth pair."""
        pred = np.asarray(pred)
        if pred.size and pred.min() < 0:
            raise ValueError("predictions must be non-negative pseudo-class ids")
        n_pred = max(self.matrix.shape[0], int(pred.max()) + 1 if pred.size else 0)
        self._grow(n_pred)
        self.matrix += confusion_matrix(pred, gt, n_pred, self.n_gt, self.ignore_index)
        self.n_images += 1

    def add(self, matrix: np.ndarray, n_images: int = 1) -> None:
        """Add a partial (n, n_gt) matrix, e.g. one computed by a worker."""
        matrix = np.asarray(matrix, dtype=np.int64)
        if matrix.ndim != 2 or matrix.shape[1] != self.n_gt:
            raise ValueError(f"expected a (n, {self.n_gt}) matrix, got {matrix.shape}")
        self._grow(matrix.shape[0])
        self.matrix[: matrix.shape[0]] += matrix
        self.n_images += n_images


def apply_mapping(matrix: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Merge the rows of a pseudo-class confusion matrix by a pseudo-class -> class mapping.

    Args:
        matrix: (n_pred, n_gt) counts.
        mapping: (n_pred,) int, class id in [0, n_gt) or -1 for an unmatched pseudo-class. Pseudo-classes beyond
            len(mapping) are unmatched.
    Returns:
        (n_gt + 1, n_gt) counts; the last row holds pixels predicted by unmatched pseudo-classes ("ignore"
        predictions), which are errors for the ground truth they cover.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    n_pred, n_gt = matrix.shape
    full = np.full(n_pred, -1, dtype=np.int64)
    m = np.asarray(mapping, dtype=np.int64)[:n_pred]
    full[: len(m)] = m
    if full.max(initial=-1) >= n_gt:
        raise ValueError(f"mapping targets must be < {n_gt}")
    rows = np.where(full < 0, n_gt, full)
    out = np.zeros((n_gt + 1, n_gt), dtype=np.int64)
    np.add.at(out, rows, matrix)
    return out


def scores(mapped: np.ndarray) -> dict:
    """Per-class IoU, mIoU and pixel accuracy from a mapped confusion matrix.

    Args:
        mapped: (n_gt + 1, n_gt) or (n_gt, n_gt) counts, rows = predicted class (last extra row = ignore).
    Returns:
        {"iou": (n_gt,) float64 with NaN where TP + FP + FN = 0 (as cityscapesscripts), "miou": nan-mean of iou,
         "pixel_acc": correct / valid gt pixels, "n_pixels": valid gt pixels}. Fractions in [0, 1].
    """
    mapped = np.asarray(mapped, dtype=np.int64)
    n_gt = mapped.shape[1]
    tp = np.diag(mapped[:n_gt, :n_gt]).astype(np.float64)
    fp = mapped[:n_gt].sum(axis=1) - tp  # predicted c on valid pixels of another class
    fn = mapped.sum(axis=0) - tp  # gt c predicted as anything else (incl. ignore)
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    total = mapped.sum()
    valid = ~np.isnan(iou)
    return {
        "iou": iou,
        "miou": float(iou[valid].mean()) if valid.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total else float("nan"),
        "n_pixels": int(total),
    }
