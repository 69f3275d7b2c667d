"""k-NN evaluation of segment descriptors against the majority ground-truth class of each segment."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from raydseg.eval.metrics import IGNORE_INDEX


def segment_majority_class(segment_ids: np.ndarray, gt: np.ndarray, n_classes: int = 19,
                           ignore_index: int = IGNORE_INDEX) -> dict[int, int]:
    """Majority valid ground-truth class of every segment.

    Args:
        segment_ids: (H, W) uint16 segment ids, 0 = no segment.
        gt: (H, W) classes in [0, n_classes) or `ignore_index`.
    Returns:
        {segment_id: class} for segments with at least one valid gt pixel (void pixels never vote).
    """
    seg = np.asarray(segment_ids, dtype=np.int64).ravel()
    g = np.asarray(gt, dtype=np.int64).ravel()
    keep = (seg > 0) & (g != ignore_index) & (g < n_classes)
    if not keep.any():
        return {}
    seg, g = seg[keep], g[keep]
    ids, inv = np.unique(seg, return_inverse=True)
    counts = np.zeros((len(ids), n_classes), dtype=np.int64)
    np.add.at(counts, (inv, g), 1)
    return {int(i): int(c) for i, c in zip(ids, counts.argmax(axis=1))}


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 5,
                chunk: int = 4096) -> np.ndarray:
    """Cosine-similarity k-NN majority vote (ties -> the class with the highest summed similarity).

    Args:
        train_x: (N, D) descriptors; train_y: (N,) int classes; test_x: (M, D) descriptors.
    Returns:
        (M,) int64 predicted classes.
    """
    tx = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    qx = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(tx))
    n_cls = int(train_y.max()) + 1
    out = np.empty(len(qx), dtype=np.int64)
    for s in range(0, len(qx), chunk):
        sim = qx[s:s + chunk] @ tx.T
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(nn), n_cls))
        rows = np.repeat(np.arange(len(nn)), k)
        np.add.at(votes, (rows, train_y[nn].ravel()), 1.0 + 1e-6 * np.take_along_axis(sim, nn, 1).ravel())
        out[s:s + chunk] = votes.argmax(axis=1)
    return out


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 5) -> dict[str, float]:
    """k-NN top-1 accuracy and mean per-class accuracy (fractions) of segment descriptors."""
    if len(train_x) == 0 or len(test_x) == 0:
        return {"knn_acc": float("nan"), "knn_mean_class_acc": float("nan")}
    pred = knn_predict(train_x, train_y, test_x, k)
    per_class = [float(np.mean(pred[test_y == c] == c)) for c in np.unique(test_y)]
    return {"knn_acc": float(np.mean(pred == test_y)), "knn_mean_class_acc": float(np.mean(per_class))}


def scene_split(frames: list[str], sequences: Mapping[str, str] | None = None) -> np.ndarray:
    """(N,) bool, True for the items of test scenes: every other distinct sequence (frame id -> `sequences`) in
    sorted order, so that no drive has segments on both sides. The frames of one drive are metres apart and show the
    same objects, so a split by frame scores re-identification, not class. With fewer than two sequences (or none
    given), every other distinct frame tests instead."""
    groups = [sequences.get(f, "") for f in frames] if sequences else []
    if len(set(groups)) < 2:
        groups = frames
    test = set(sorted(set(groups))[1::2])
    return np.array([g in test for g in groups], dtype=bool)


def frame_sequences(frames_dir: str) -> dict[str, str]:
    """{frame_id: sequence} of the ingest stage's frame parts under `frames_dir` ({} when there are none)."""
    from raydseg import storage
    from raydseg.parts import part_names

    out: dict[str, str] = {}
    for name in part_names(frames_dir) if storage.exists(frames_dir) else []:
        t = storage.read_table(storage.join(frames_dir, name), columns=["frame_id", "sequence"])
        out.update(zip(t.column("frame_id").to_pylist(), t.column("sequence").to_pylist()))
    return out


def colour_histogram(image: np.ndarray, segment_ids: np.ndarray, ids: np.ndarray, levels: int = 4) -> np.ndarray:
    """Hand-made baseline descriptor: the square root of each segment's normalised RGB histogram (levels^3 bins).
    image (H, W, 3) uint8, segment_ids (H, W), ids (S,) -> (S, levels^3) float32 (unit L2 norm)."""
    q = (np.asarray(image[..., :3], np.int64) * levels) // 256
    bins = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    out = np.zeros((len(ids), levels ** 3), np.float32)
    for i, sid in enumerate(ids):
        h = np.bincount(bins[segment_ids == sid], minlength=levels ** 3).astype(np.float32)
        out[i] = np.sqrt(h / max(h.sum(), 1.0))
    return out


def knn_analysis(feat_dir: str, pl_dir: str, k: int, max_segments: int = 20000, frames_dir: str = ""
                 ) -> tuple[dict[str, float], bytes | None]:
    """k-NN accuracy of segment descriptors (train/test split by drive: `scene_split` over the sequences of the
    ingest frame parts in `frames_dir`; by frame without it) vs the segments' majority gt class, and a PCA plot;
    ({}, None) when the features / pseudo-label outputs or their ground truth are missing.

    Bounded memory: label images are decoded, in part order, only until `max_segments` segments have a majority
    class, and the descriptor column is read part by part until those segments are found."""
    from raydseg import storage
    from raydseg.data.schema import decode_image
    from raydseg.eval import plots
    from raydseg.eval.sets import class_names
    from raydseg.features.table import DESCRIPTOR_COLUMN
    from raydseg.parts import part_names

    if k <= 0 or not storage.exists(feat_dir) or not storage.exists(pl_dir):
        return {}, None
    majority: dict[tuple[str, str, int], int] = {}
    for name in part_names(pl_dir):
        if len(majority) >= max_segments:
            break
        t = storage.read_table(storage.join(pl_dir, name), columns=["frame_id", "camera", "segment_ids", "gt_semantic"])
        for fid, cam, seg, gt in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            if seg is not None and gt is not None and len(majority) < max_segments:
                for sid, c in segment_majority_class(decode_image(seg), decode_image(gt)).items():
                    majority[(fid, cam, sid)] = c
    xs, ys, frames = [], [], []
    for name in part_names(feat_dir):
        if len(ys) >= min(len(majority), max_segments):
            break
        t = storage.read_table(storage.join(feat_dir, name),
                               columns=["frame_id", "camera", "segment_id", DESCRIPTOR_COLUMN])
        desc = t[DESCRIPTOR_COLUMN].combine_chunks()
        mat = np.asarray(desc.flatten(), np.float32).reshape(len(desc), -1) if len(desc) else None
        for i, key in enumerate(zip(*(t.column(c).to_pylist() for c in ("frame_id", "camera", "segment_id")))):
            c = majority.get((key[0], key[1], int(key[2])))
            if c is not None and len(ys) < max_segments:
                xs.append(mat[i])
                ys.append(c)
                frames.append(key[0])
    if len(set(frames)) < 2:
        return {}, None
    x, y = np.stack(xs), np.array(ys)
    is_test = scene_split(frames, frame_sequences(frames_dir) if frames_dir else None)
    metrics = knn_accuracy(x[~is_test], y[~is_test], x[is_test], y[is_test], k)
    metrics["knn_n_segments"] = float(len(y))
    png = plots.pca_plot(x, y, class_names(19), title=f"PCA of {len(y)} segment descriptors (majority gt class)")
    return metrics, png
