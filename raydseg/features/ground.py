"""The ground's patches: the ViT token-grid cells that the LiDAR's ground covers, one descriptor each (the features
stage) and one pseudo-class each after their own k-means (the cluster stage, `cluster.ground_k`), so that the
ground can split into road / sidewalk / terrain as the object segments split into classes. A cell-id image paints
like a segment-id image (`clustering.pseudolabels.paint_labels`). numpy only: the cluster stage uses it without
torch.
"""
from __future__ import annotations

import numpy as np

GROUND_DIR = "ground"  # features/ground/part-*: the ground patches' descriptors (features.ground_patches)


def patch_grid_size(h: int, w: int, patch: int, size: int = 0) -> tuple[int, int]:
    """Input size (H', W') for a whole-image pass: the shorter side scaled to `size` (0 = keep), both sides rounded
    to multiples of the patch size."""
    scale = size / min(h, w) if size > 0 else 1.0
    return max(patch, int(round(h * scale / patch)) * patch), max(patch, int(round(w * scale / patch)) * patch)


def ground_cells(ground_px: np.ndarray, segment_ids: np.ndarray, patch: int, size: int = 0) -> np.ndarray:
    """(H, W) int32: the 1-based token-grid cell of every ground pixel (0 elsewhere), for the grid of a whole-image
    pass at `size` (`patch_grid_size`). Ground pixels: the proposals' ground_px (H, W) == 1 outside the segments
    of segment_ids (H, W)."""
    ground = (np.asarray(ground_px) == 1) & (np.asarray(segment_ids) == 0)
    h, w = ground.shape
    ih, iw = patch_grid_size(h, w, patch, size)
    gh, gw = ih // patch, iw // patch
    cell = (np.arange(h)[:, None] * gh // h) * gw + np.arange(w)[None, :] * gw // w + 1
    return np.where(ground, cell, 0).astype(np.int32)


def described_cells(cells: np.ndarray, min_pixels: int) -> np.ndarray:
    """(G,) int64 ids of the cells with at least `min_pixels` ground pixels: those that get a descriptor."""
    ids, counts = np.unique(cells[cells > 0], return_counts=True)
    return ids[counts >= min_pixels].astype(np.int64)

