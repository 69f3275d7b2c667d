"""Pseudo-class -> ground-truth class mappings fitted on a confusion matrix.

A mapping is a (n_pred,) int64 array: the class each pseudo-class predicts, or -1 when it is unmatched (its pixels
then predict "ignore" and count as errors, as in the official Drive&Segment evaluation).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from raydseg.eval.metrics import IGNORE_INDEX

METHODS = ("hungarian", "majority")


def other_method(method: str) -> str:
    """The mapping method of METHODS that is not `method` (reports show both: the headline one and this)."""
    return next(m for m in METHODS if m != method)


def hungarian_mapping(matrix: np.ndarray) -> np.ndarray:
    """One-to-one match maximising matched pixels (linear_sum_assignment on counts).

    Args:
        matrix: (n_pred, n_gt) pixel counts.
    Returns:
        (n_pred,) class per pseudo-class; at most one pseudo-class per class, the rest -1. A pair with zero overlap
        (which linear_sum_assignment fills arbitrarily when there are spare rows/columns) stays unmatched: a
        pseudo-class never seen on the fitting split must not predict an arbitrary class on another split.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    keep = matrix[rows, cols] > 0
    mapping = np.full(matrix.shape[0], -1, dtype=np.int64)
    mapping[rows[keep]] = cols[keep]
    return mapping


def majority_mapping(matrix: np.ndarray) -> np.ndarray:
    """Many-to-one: each pseudo-class predicts the class it overlaps most; -1 for a pseudo-class with no pixels.

    Args:
        matrix: (n_pred, n_gt) pixel counts.
    Returns:
        (n_pred,) class per pseudo-class.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    mapping = matrix.argmax(axis=1).astype(np.int64)
    mapping[matrix.sum(axis=1) == 0] = -1
    return mapping


def fit_mapping(matrix: np.ndarray, method: str) -> np.ndarray:
    """Dispatch to `hungarian_mapping` or `majority_mapping`."""
    if method == "hungarian":
        return hungarian_mapping(matrix)
    if method == "majority":
        return majority_mapping(matrix)
    raise ValueError(f"unknown matching method {method!r} (known: {', '.join(METHODS)})")


def map_prediction(pred: np.ndarray, mapping: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) pseudo-classes -> (H, W) uint8 classes, `ignore_index` where unmatched or beyond the mapping."""
    lut = np.full(max(int(np.max(pred, initial=0)) + 1, len(mapping)), ignore_index, dtype=np.int64)
    lut[: len(mapping)] = np.where(np.asarray(mapping) < 0, ignore_index, mapping)
    return lut[np.asarray(pred, dtype=np.int64)].astype(np.uint8)


def covered_scores(labels: np.ndarray, gt: np.ndarray, n_pred: int, n_gt: int = 19, ignore_index: int = IGNORE_INDEX
                   ) -> dict:
    """Scores of sparse pseudo-labels on the pixels they cover, Hungarian-matched to the ground truth.

    labels, gt: (..., H, W) integer pseudo-classes in [0, n_pred) or `ignore_index` (uncovered) / classes in
    [0, n_gt) or `ignore_index`. Returns `scores` of the mapped confusion plus "coverage" (labelled / all pixels).
    """
    from raydseg.eval.metrics import apply_mapping, confusion_matrix, scores

    labels, gt = np.asarray(labels), np.asarray(gt)
    covered = labels != ignore_index
    conf = confusion_matrix(labels[covered].astype(np.int64), gt[covered], n_pred, n_gt, ignore_index)
    out = scores(apply_mapping(conf, hungarian_mapping(conf)))
    out["coverage"] = float(covered.mean()) if covered.size else float("nan")
    return out
