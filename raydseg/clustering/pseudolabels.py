"""Pseudo-label images from segment clusters, their purity against ground truth, and a per-cluster montage."""
from __future__ import annotations

import numpy as np

from raydseg.eval.metrics import IGNORE_INDEX, confusion_matrix
from raydseg.geometry.project import SKY_PX


def class_of_cluster(cluster: np.ndarray, n_ground: int) -> np.ndarray:
    """k-means cluster index (0..k-1) -> pseudo-class, after the `n_ground` ground pseudo-classes
    (`config.ground_pseudo_classes`)."""
    return np.asarray(cluster, np.int64) + int(n_ground)


def paint_labels(segment_ids: np.ndarray, seg_ids: np.ndarray, seg_classes: np.ndarray,
                 ground_px: np.ndarray | None = None, ground: int | np.ndarray | None = 0,
                 sky_class: int | None = None) -> np.ndarray:
    """Paint a segment-id image into pseudo-classes.

    segment_ids (H, W) uint16 (0 = no segment); seg_ids (S,) / seg_classes (S,) the class of each labelled
    segment (segments not listed stay IGNORE_INDEX); ground_px (H, W) uint8, 1 = ground, painted `ground` (one
    pseudo-class, or (H, W) uint8 per pixel: the ground cells of `raydseg.features.ground.ground_cells` painted by
    this function; None = unlabelled), SKY_PX = sky (raydseg.geometry.sky), painted `sky_class` when given (segment
    pixels win over both). Returns (H, W) uint8, 255 = ignore.
    """
    sid = np.asarray(segment_ids).astype(np.int64)
    lut = np.full(max(int(sid.max(initial=0)), int(np.max(seg_ids, initial=0))) + 1, IGNORE_INDEX, np.uint8)
    if len(seg_ids):
        if np.max(seg_classes) >= IGNORE_INDEX:
            raise ValueError(f"pseudo-class {int(np.max(seg_classes))} does not fit uint8 labels (255 = ignore)")
        lut[np.asarray(seg_ids, np.int64)] = np.asarray(seg_classes, np.uint8)
    lut[0] = IGNORE_INDEX
    label = lut[sid]
    if ground_px is not None:
        ground_px = np.asarray(ground_px)
        if ground is not None:
            on = (ground_px == 1) & (sid == 0)
            label[on] = ground[on] if isinstance(ground, np.ndarray) else ground
        if sky_class is not None:
            label[(ground_px == SKY_PX) & (sid == 0)] = sky_class
    return label


def purity(labels: list[np.ndarray], gts: list[np.ndarray], ignore: int = IGNORE_INDEX) -> float:
    """Majority-class fraction of labelled pixels: for every pseudo-class, the share of its pixels (with a valid
    ground truth) that belong to its most frequent ground-truth class, pooled over all images. labels / gts are
    lists of (H, W) uint8 images; pixels with label or gt == ignore are skipped."""
    conf = sum((confusion_matrix(lab, gt, ignore + 1, ignore, ignore) for lab, gt in zip(labels, gts)),
               np.zeros((ignore + 1, ignore), np.int64))[:ignore]  # the last row: unlabelled pixels
    if conf.sum() == 0:
        return float("nan")
    return float(conf.max(1).sum() / conf.sum())


def segment_purity(images: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], seed: int = 0,
                   ) -> tuple[float, float]:
    """Purity of the segment pixels (ground excluded) under the k-means classes and under a random-cluster control.

    images: per image (segment_ids (H, W) int, gt (H, W) uint8 with 255 = void, seg_ids (S,), seg_classes (S,)).
    The control permutes the classes over all segments (same cluster sizes, no descriptor information), so the
    gap between the two is what the features contributed. Returns (purity, control purity).
    """
    all_classes = np.concatenate([np.asarray(c, np.int64) for *_, c in images]) if images else np.zeros(0, np.int64)
    shuffled = np.random.default_rng(seed).permutation(all_classes)
    labels, controls, gts, start = [], [], [], 0
    for sid, gt, seg_ids, seg_classes in images:
        n = len(seg_ids)
        labels.append(paint_labels(sid, seg_ids, seg_classes, ground=None))
        controls.append(paint_labels(sid, seg_ids, shuffled[start:start + n], ground=None))
        gts.append(gt)
        start += n
    return purity(labels, gts), purity(controls, gts)


def segment_thumbnail(image: np.ndarray, segment_ids: np.ndarray, sid: int, px: int = 64) -> np.ndarray:
    """(px, px, 3) uint8 thumbnail of the segment's tight box, pixels outside the segment darkened."""
    from PIL import Image

    mask = segment_ids == sid
    if not mask.any():
        return np.zeros((px, px, 3), np.uint8)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = image[r0:r1, c0:c1, :3].astype(np.float32)
    crop[~mask[r0:r1, c0:c1]] *= 0.25
    return np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((px, px), Image.BILINEAR))


def montage(thumbs: list[list[np.ndarray]], labels: list[str], px: int = 64) -> np.ndarray:
    """Grid image: one row per cluster (label on the left), its thumbnails (px, px, 3) side by side.
    Returns (rows * (px + 2), 60 + cols * (px + 2), 3) uint8."""
    from PIL import Image, ImageDraw

    cols = max([len(t) for t in thumbs] + [1])
    h, w = len(thumbs) * (px + 2), 60 + cols * (px + 2)
    canvas = Image.new("RGB", (w, max(h, 1)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, name) in enumerate(zip(thumbs, labels)):
        y = r * (px + 2)
        draw.text((4, y + px // 2 - 6), name, fill=(0, 0, 0))
        for c, t in enumerate(row):
            canvas.paste(Image.fromarray(t), (60 + c * (px + 2), y))
    return np.asarray(canvas)
