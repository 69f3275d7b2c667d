"""Quality measures of proposals against per-point / per-pixel ground truth (pure numpy).

Ground classes are Cityscapes trainIds road (0), sidewalk (1), terrain (9). For purity, points without an
instance (gt_instance 0: buildings, vegetation, ...) count as one pseudo-instance per class.
"""
from __future__ import annotations

import numpy as np

from raydseg.eval.metrics import IGNORE_INDEX

GROUND_TRAIN_IDS = (0, 1, 9)  # Cityscapes train ids of road, sidewalk, terrain
SKY_TRAIN_ID = 10


def ground_precision_recall(pred: np.ndarray, gt_label: np.ndarray, use: np.ndarray | None = None,
                            ground_ids: tuple[int, ...] = GROUND_TRAIN_IDS) -> tuple[float, float]:
    """(precision, recall) of the predicted ground points (N,) bool against trainIds (N,); void (255) ignored."""
    use = np.ones(len(pred), bool) if use is None else use
    use = use & (gt_label != IGNORE_INDEX)
    gt = np.isin(gt_label, ground_ids)
    tp = float((pred & gt & use).sum())
    return tp / max(float((pred & use).sum()), 1.0), tp / max(float((gt & use).sum()), 1.0)


def _instance_key(gt_label: np.ndarray, gt_instance: np.ndarray) -> np.ndarray:
    return np.where(gt_instance > 0, gt_instance.astype(np.int64), -1 - gt_label.astype(np.int64))


def segment_purity(seg: np.ndarray, gt_label: np.ndarray, gt_instance: np.ndarray) -> float:
    """Point-weighted purity: sum over segments of the majority-instance count / all segmented points (N,) inputs."""
    m = seg > 0
    if not m.any():
        return 0.0
    key = _instance_key(gt_label[m], gt_instance[m])
    pairs = np.stack([seg[m].astype(np.int64), key], 1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    best: dict[int, int] = {}
    for (s, _), c in zip(uniq, counts):
        best[int(s)] = max(best.get(int(s), 0), int(c))
    return float(sum(best.values()) / m.sum())


def instance_recall(seg: np.ndarray, gt_instance: np.ndarray, *, min_points: int = 50,
                    min_cover: float = 0.5) -> tuple[float, int]:
    """Fraction of instances with > min_points points that one segment covers at >= min_cover of their points.

    Returns (recall, number of instances considered)."""
    ids, sizes = np.unique(gt_instance[gt_instance > 0], return_counts=True)
    ids = ids[sizes > min_points]
    hit = 0
    for i in ids:
        m = gt_instance == i
        s = seg[m]
        s = s[s > 0]
        if len(s) and np.bincount(s.astype(np.int64)).max() >= min_cover * m.sum():
            hit += 1
    return (hit / len(ids) if len(ids) else 1.0), int(len(ids))


def image_agreement(seg_img: np.ndarray, gt_inst_img: np.ndarray) -> tuple[float, int]:
    """Fraction of the segment-labelled pixels whose gt instance is the majority gt instance of their segment
    (pixels with gt instance 0 -- stuff -- count as their own 'instance'). Returns (agreement, labelled pixels)."""
    m = seg_img > 0
    n = int(m.sum())
    if n == 0:
        return 0.0, 0
    pairs = np.stack([seg_img[m].astype(np.int64), gt_inst_img[m].astype(np.int64)], 1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    best: dict[int, int] = {}
    for (s, _), c in zip(uniq, counts):
        best[int(s)] = max(best.get(int(s), 0), int(c))
    return float(sum(best.values()) / n), n
