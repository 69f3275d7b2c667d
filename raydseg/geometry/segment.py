"""3D segmentation of non-ground points into object proposals ("segments").

`segment_range_image`: BFS labelling on the range image (Bogoslavskyi & Stachniss): 4-neighbourhood, columns
wrap at 360 deg, up to `max_gap` empty pixels bridged; two neighbouring pixels with ranges d1 >= d2 seen at
angular step alpha are joined when beta = atan2(d2 sin(alpha), d1 - d2 cos(alpha)) > `beta_deg`.
`segment_dbscan`: open3d DBSCAN on the non-ground points (baseline / fallback).
`filter_segments`: drops segments by point count and bounding-box extent and renumbers them 1..n.
Segment ids are uint16 per frame, 0 = no segment.
"""
from __future__ import annotations

import numba
import numpy as np

from raydseg.geometry.range_image import RangeImage, pixel_labels_to_points


@numba.njit(cache=True, error_model="numpy")
def _bfs_segments(range_m, elev, blocked, beta_thr, max_gap):  # pragma: no cover - numba
    H, W = range_m.shape
    labels = np.zeros((H, W), np.int32)
    qr = np.empty(H * W, np.int64)
    qc = np.empty(H * W, np.int64)
    col_step = 2.0 * np.pi / W
    sin_h = np.sin(np.arange(max_gap + 2) * col_step)
    cos_h = np.cos(np.arange(max_gap + 2) * col_step)
    tan_thr = np.tan(beta_thr)
    n = 0
    for r0 in range(H):
        for c0 in range(W):
            if range_m[r0, c0] <= 0 or blocked[r0, c0] or labels[r0, c0]:
                continue
            n += 1
            labels[r0, c0] = n
            head, tail = 0, 1
            qr[0], qc[0] = r0, c0
            while head < tail:
                cr, cc = qr[head], qc[head]
                head += 1
                d0 = range_m[cr, cc]
                for d in range(4):
                    dr = -1 if d == 0 else (1 if d == 1 else 0)
                    dc = -1 if d == 2 else (1 if d == 3 else 0)
                    nr, nc = cr, cc
                    found = False
                    steps = 0
                    for _ in range(max_gap + 1):
                        nr += dr
                        nc = (nc + dc) % W
                        steps += 1
                        if nr < 0 or nr >= H:
                            break
                        if range_m[nr, nc] > 0:
                            found = True
                            break
                    if not found or blocked[nr, nc] or labels[nr, nc]:
                        continue
                    d1 = range_m[nr, nc]
                    if dr != 0:
                        a = abs(elev[nr, nc] - elev[cr, cc])
                        a2 = a * a  # small angles (< 10 deg): 4th-order Taylor terms are exact to < 1e-7
                        sin_a = a * (1.0 - a2 / 6.0 * (1.0 - a2 / 20.0))
                        cos_a = 1.0 - a2 / 2.0 * (1.0 - a2 / 12.0)
                    else:
                        sin_a = sin_h[steps]
                        cos_a = cos_h[steps]
                    hi = max(d0, d1)
                    lo = min(d0, d1)
                    # beta > thr  <=>  lo*sin(a) > tan(thr) * (hi - lo*cos(a))   (both sides' signs handled)
                    num = lo * sin_a
                    den = hi - lo * cos_a
                    if den <= 0 or num > tan_thr * den:
                        labels[nr, nc] = n
                        qr[tail], qc[tail] = nr, nc
                        tail += 1
    return labels, n


def segment_range_image(ri: RangeImage, ground_px: np.ndarray, *, beta_deg: float = 10.0,
                        max_gap: int = 1) -> np.ndarray:
    """Raw BFS segment labels per pixel (not yet filtered).

    Args: ri: RangeImage; ground_px (H, W) nonzero = ground (never segmented). beta_deg: joining threshold (deg).
    max_gap: empty pixels bridged between neighbours. Returns (H, W) int32 labels, 0 = none.
    """
    labels, _ = _bfs_segments(ri.range_m, ri.elevation, ground_px.astype(np.bool_), np.radians(beta_deg), max_gap)
    return labels


@numba.njit(cache=True, error_model="numpy")
def _stats(labels, xyz, n_labels):  # pragma: no cover - numba
    cnt = np.zeros(n_labels + 1, np.int64)
    lo = np.full((n_labels + 1, 3), np.inf)
    hi = np.full((n_labels + 1, 3), -np.inf)
    s = np.zeros((n_labels + 1, 3))
    for i in range(labels.shape[0]):
        k = labels[i]
        if k <= 0:
            continue
        cnt[k] += 1
        for j in range(3):
            v = xyz[i, j]
            s[k, j] += v
            if v < lo[k, j]:
                lo[k, j] = v
            if v > hi[k, j]:
                hi[k, j] = v
    return cnt, lo, hi, s


def segment_stats(labels: np.ndarray, xyz: np.ndarray) -> dict[str, np.ndarray]:
    """Per-segment statistics of point labels 1..n.

    Args: labels (N,) int, 0 = none; xyz (N, 3) metres.
    Returns dict with, for ids 1..max: `id` (n,), `n_points` (n,) int64, `centroid` (n, 3) m, `extent` (n, 3) m
    (bounding-box size), `range` (n,) m (horizontal+vertical distance of the centroid from the sensor);
    ids with no points are omitted.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int64)
    n = int(labels.max()) if len(labels) else 0
    cnt, lo, hi, s = _stats(labels, np.asarray(xyz), n)  # any int / float dtype: no converted copies
    ids = np.flatnonzero(cnt[1:] > 0) + 1
    c = cnt[ids]
    centroid = s[ids] / c[:, None]
    return {"id": ids, "n_points": c, "centroid": centroid, "extent": hi[ids] - lo[ids],
            "range": np.linalg.norm(centroid, axis=1)}


def filter_segments(labels: np.ndarray, xyz: np.ndarray, *, min_points: int = 20, max_points: int = 100_000,
                    min_extent_m: float = 0.0, max_extent_m: float = 0.0) -> np.ndarray:
    """Drop segments with too few / many points or whose largest bounding-box side is outside
    [min_extent_m, max_extent_m] (0 = no bound); renumber the rest 1..n by decreasing size.

    Args: labels (N,) int point labels (0 = none), xyz (N, 3) m. Returns (N,) uint16 (ids beyond 65535 dropped).
    """
    st = segment_stats(labels, xyz)
    size = st["extent"].max(axis=1) if len(st["id"]) else np.zeros(0)
    keep = (st["n_points"] >= min_points) & (st["n_points"] <= max_points)
    if min_extent_m > 0:
        keep &= size >= min_extent_m
    if max_extent_m > 0:
        keep &= size <= max_extent_m
    ids, npts = st["id"][keep], st["n_points"][keep]
    ids = ids[np.argsort(-npts, kind="stable")][:65535]
    lut = np.zeros(int(labels.max()) + 1 if len(labels) else 1, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    return lut[np.maximum(np.asarray(labels, np.int64), 0)]


def segment_dbscan(xyz: np.ndarray, mask: np.ndarray, *, eps: float = 0.5, min_points: int = 5) -> np.ndarray:
    """open3d DBSCAN over the points where `mask` is set (e.g. non-ground).

    Args: xyz (N, 3) m; mask (N,) bool; eps (m) neighbourhood radius; min_points core-point density.
    Returns (N,) int32 raw labels (1..n, 0 = noise / not clustered).
    """
    import open3d as o3d

    out = np.zeros(len(xyz), np.int32)
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return out
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(xyz, np.float64)[idx]))
    lab = np.asarray(pcd.cluster_dbscan(eps=eps, min_points=min_points, print_progress=False))
    out[idx] = lab + 1
    return out


def segment_points(ri: RangeImage, xyz: np.ndarray, ground: np.ndarray, ground_px: np.ndarray, *,
                   method: str = "range_image", beta_deg: float = 10.0, max_gap: int = 1,
                   dbscan_eps: float = 0.5, dbscan_min_points: int = 5, min_points: int = 20,
                   max_points: int = 100_000, min_extent_m: float = 0.0, max_extent_m: float = 0.0) -> np.ndarray:
    """Filtered per-point segment ids (N,) uint16 of the non-ground points by `method` (range_image | dbscan)."""
    if method == "range_image":
        pix = segment_range_image(ri, ground_px, beta_deg=beta_deg, max_gap=max_gap)
        raw = pixel_labels_to_points(ri, pix)
        raw[ground] = 0
    elif method == "dbscan":
        raw = segment_dbscan(xyz, (~ground) & (ri.row >= 0), eps=dbscan_eps, min_points=dbscan_min_points)
    else:
        raise ValueError(f"unknown segment method '{method}' (range_image | dbscan)")
    return filter_segments(raw, xyz, min_points=min_points, max_points=max_points, min_extent_m=min_extent_m,
                           max_extent_m=max_extent_m)
