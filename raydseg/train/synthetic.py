"""Tiny synthetic pseudo-label parts (coloured blobs on a grey background) for tests and benchmarks.

Pseudo-class c has a fixed colour; every image holds a few rectangles (each a LiDAR "segment") labelled with their
class, a background labelled as class 0 on a sparse strip only, everything else 255 (unlabelled).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from raydseg import storage
from raydseg.data.schema import encode_png
from raydseg.eval.metrics import IGNORE_INDEX

COLOURS = np.array([[110, 110, 110], [220, 40, 40], [40, 200, 60], [50, 70, 230], [230, 220, 50]], np.uint8)


def blob_example(rng: np.random.Generator, h: int, w: int, n_cls: int = 4, n_blobs: int = 3
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image (h,w,3) uint8, sparse label (h,w) uint8, segment ids (h,w) uint16, dense ground truth (h,w) uint8)."""
    gt = np.zeros((h, w), np.uint8)
    seg = np.zeros((h, w), np.uint16)
    for b in range(n_blobs):
        c = int(rng.integers(1, n_cls))
        bh, bw = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 6, w // 3))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        gt[y:y + bh, x:x + bw] = c
        seg[y:y + bh, x:x + bw] = b + 1
    image = COLOURS[gt].astype(np.float32) + rng.normal(0, 12, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    label = np.full((h, w), IGNORE_INDEX, np.uint8)
    inside = seg > 0
    label[inside] = gt[inside]
    strip = np.zeros((h, w), bool)
    strip[-h // 6:] = True
    label[strip & ~inside] = 0
    return image, label, seg, gt


def write_blob_parts(out_dir: str, n_images: int = 16, h: int = 64, w: int = 96, n_parts: int = 2,
                     n_cls: int = 4, seed: int = 0) -> list[dict]:
    """Write `part-XXXXX.parquet` pseudo-label parts (cluster/pseudolabels schema); returns the rows as arrays."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        image, label, seg, gt = blob_example(rng, h, w, n_cls)
        rows.append({"frame_id": f"blobs/{i:05d}", "camera": "front", "image": image, "label": label,
                     "segment_ids": seg, "gt": gt})
    per = -(-n_images // n_parts)
    for p in range(n_parts):
        chunk = rows[p * per:(p + 1) * per]
        table = pa.table({
            "frame_id": [r["frame_id"] for r in chunk], "camera": [r["camera"] for r in chunk],
            "image": pa.array([encode_png(r["image"]) for r in chunk], pa.binary()),
            "label": pa.array([encode_png(r["label"]) for r in chunk], pa.binary()),
            "segment_ids": pa.array([encode_png(r["segment_ids"]) for r in chunk], pa.binary()),
            "gt_semantic": pa.array([encode_png(r["gt"]) for r in chunk], pa.binary())})
        storage.write_table(table, storage.join(out_dir, f"part-{p:05d}.parquet"))
    return rows
