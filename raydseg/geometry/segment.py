"""3D segmentation of non-ground points into object proposals ("segments").

`segment_range_image`: BFS labelling on the range image (Bogoslavskyi & Stachniss): 4-neighbourhood, columns
wrap at 360 deg, up to `max_gap` empty pixels bridged; two neighbouring pixels with ranges d1 >= d2 seen at
angular step alpha are joined when beta = atan2(d2 sin(alpha), d1 - d2 cos(alpha)) > `beta_deg`. Images of up to
64 rows are labelled on column bit masks (`_segment_bits`, raydseg.geometry.column_bits), with the same result.
`segment_dbscan`: open3d DBSCAN on the non-ground points (baseline / fallback).
`filter_segments`: drops segments by point count and bounding-box extent and renumbers them 1..n.
Segment ids are uint16 per frame, 0 = no segment.
"""
from __future__ import annotations

import numba
import numpy as np

from raydseg.geometry.column_bits import MAX_ROWS, above_bits, flood, pair_run
from raydseg.geometry.range_image import (SPREAD_ABS_TOL, SPREAD_REL_TOL, RangeImage, near_pixel,
                                          pixel_labels_to_points)


_EMPTY_PX, _BLOCKED_PX = -2, -1  # label states of the pixels no segment takes (0 = free, > 0 = labelled)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _vertical_sincos(e0, e1):  # pragma: no cover - numba
    """sin and cos of the angle between two beams of elevations e0, e1 (rad): small angles (< 10 deg), so the
    4th-order Taylor terms are exact to < 1e-7, with constant reciprocals (no divisions)."""
    a = abs(e1 - e0)
    a2 = a * a
    return a * (1.0 - a2 * (1.0 / 6.0) * (1.0 - a2 * (1.0 / 20.0))), 1.0 - a2 * 0.5 * (1.0 - a2 * (1.0 / 12.0))


@numba.njit(cache=True, inline="always", error_model="numpy")
def _beta_joins(d0, d1, sin_a, cos_a, tan_thr):  # pragma: no cover - numba
    """beta > thr for ranges d0, d1 (m) seen at angle a: lo sin(a) > tan(thr) (hi - lo cos(a)), or hi <= lo cos(a)
    (beta >= 90 deg)."""
    hi = max(d0, d1)
    lo = min(d0, d1)
    den = hi - lo * cos_a
    return (den <= 0) | (lo * sin_a > tan_thr * den)


@numba.njit(cache=True, error_model="numpy")
def _bfs_segments(range_m, elev, blocked, beta_thr, max_gap):  # pragma: no cover - numba
    """BFS labelling of the column-major images ((W, H) arrays); seeds in row-major order, so labels are numbered
    by their first pixel scanning rows top to bottom. Returns (W, H) int32 labels and their count.

    The label image doubles as the pixel state during the BFS (empty, blocked, free, labelled), so a neighbour
    costs one load until it is a candidate."""
    W, H = range_m.shape
    labels = np.empty((W, H), np.int32)
    queue = np.empty(H * W, np.int32)  # pixels as c << 16 | r (no division to unpack)
    rng_f, el_f, lab_f = range_m.ravel(), elev.ravel(), labels.ravel()
    col_step = 2.0 * np.pi / W
    sin_h = np.sin(np.arange(max_gap + 2) * col_step)
    cos_h = np.cos(np.arange(max_gap + 2) * col_step)
    tan_thr = np.tan(beta_thr)
    # pixel states, and the seed candidates (free pixels) in row-major order by a counting sort of a sequential
    # scan: scanning rows of the column-major image directly would touch a new cache line at every step
    per_row = np.zeros(H + 1, np.int64)
    for c in range(W):
        for r in range(H):
            p = c * H + r
            lab_f[p] = _EMPTY_PX if rng_f[p] <= 0 else (_BLOCKED_PX if blocked[c, r] else 0)
            per_row[r + 1] += lab_f[p] == 0
    for r in range(H):
        per_row[r + 1] += per_row[r]
    seeds = np.empty(per_row[H], np.int32)
    for c in range(W):
        for r in range(H):
            if lab_f[c * H + r] == 0:
                seeds[per_row[r]] = (c << 16) | r
                per_row[r] += 1
    n = 0
    for s0 in seeds:
        c0, r0 = s0 >> 16, s0 & 0xFFFF
        if lab_f[c0 * H + r0]:
            continue
        n += 1
        lab_f[c0 * H + r0] = n
        head, tail = 0, 1
        queue[0] = s0
        while head < tail:
            cc, cr = queue[head] >> 16, queue[head] & 0xFFFF
            head += 1
            p = cc * H + cr
            d0 = rng_f[p]
            for d in range(4):
                q, qc, qr = -1, 0, 0
                steps = 0
                if d < 2:  # up / down the column: the first non-empty pixel within the gap
                    nr = cr
                    for _ in range(max_gap + 1):
                        nr += -1 if d == 0 else 1
                        steps += 1
                        if nr < 0 or nr >= H:
                            break
                        if lab_f[cc * H + nr] != _EMPTY_PX:
                            q, qc, qr = cc * H + nr, cc, nr
                            break
                else:  # left / right, columns wrap
                    nc = cc
                    for _ in range(max_gap + 1):
                        nc += -1 if d == 2 else 1
                        if nc < 0:
                            nc += W
                        elif nc >= W:
                            nc -= W
                        steps += 1
                        if lab_f[nc * H + cr] != _EMPTY_PX:
                            q, qc, qr = nc * H + cr, nc, cr
                            break
                if q < 0 or lab_f[q] != 0:  # none, blocked or labelled
                    continue
                if d < 2:
                    sin_a, cos_a = _vertical_sincos(el_f[p], el_f[q])
                else:
                    sin_a, cos_a = sin_h[steps], cos_h[steps]
                if _beta_joins(d0, rng_f[q], sin_a, cos_a, tan_thr):
                    lab_f[q] = n
                    queue[tail] = (qc << 16) | qr
                    tail += 1
    for p in range(W * H):
        lab_f[p] = max(lab_f[p], 0)
    return labels, n


@numba.njit(cache=True, error_model="numpy")
def _segment_bits(range_m, elev, blocked, beta_thr, max_gap):  # pragma: no cover - numba
    """_bfs_segments for images of at most 64 rows, on column bit masks (raydseg.geometry.column_bits); same
    labels. The masks: per column the free rows and the vertical pairs of free pixels that join; per pair of columns
    k <= max_gap + 1 apart, the rows where both pixels are free, the columns between are empty and beta passes.
    Seeds are taken in row-major order and each floods its whole segment, so the numbering is the BFS's."""
    W, H = range_m.shape
    one, zero, full = np.uint64(1), np.uint64(0), ~np.uint64(0)
    K = max_gap + 1
    tan_thr = np.tan(beta_thr)
    col_step = 2.0 * np.pi / W
    valid, free, joined = np.zeros(W, np.uint64), np.zeros(W, np.uint64), np.zeros(W, np.uint64)
    for c in range(W):
        valid[c] = above_bits(range_m[c], 0.0)
        free[c] = valid[c] & ~above_bits(blocked[c], 0)
    pair = np.zeros((K, W), np.uint64)
    for c in range(W):
        rc, ec, f = range_m[c], elev[c], free[c]
        between = full  # rows where the columns strictly between c and c + k are empty
        for k in range(1, K + 1):
            d = (c + k) % W
            rd = range_m[d]
            sin_a, cos_a = np.sin(k * col_step), np.cos(k * col_step)
            m = zero
            for r in range(H):
                m |= (one << np.uint64(r)) if _beta_joins(rc[r], rd[r], sin_a, cos_a, tan_thr) else zero
            pair[k - 1, c] = f & free[d] & between & m
            between &= ~valid[d]
        between = full  # rows strictly between r and r + k empty
        for k in range(1, min(K, H - 1) + 1):
            m = zero
            for r in range(H - k):
                sin_a, cos_a = _vertical_sincos(ec[r], ec[r + k])
                m |= (one << np.uint64(r)) if _beta_joins(rc[r], rc[r + k], sin_a, cos_a, tan_thr) else zero
            joined[c] |= pair_run(f & (f >> np.uint64(k)) & between & m, k)
            between &= ~valid[c] >> np.uint64(k)
    labels = np.zeros((W, H), np.int32)
    comp = np.zeros(W, np.uint64)  # the current segment's rows per column
    queue = np.empty(W + 1, np.int64)
    queued = np.zeros(W, np.bool_)
    touched = np.empty(W, np.int64)
    one_col = np.int64(1)  # queue and touched hold the seed column (int64, as in the ground flood's call)
    n = 0
    for r0 in range(H):
        bit0 = one << np.uint64(r0)
        for c0 in range(W):
            if not free[c0] & bit0:
                continue
            n += 1
            comp[c0], queue[0], queued[c0], touched[0] = bit0, c0, True, c0
            n_touched = flood(comp, joined, free, free, pair, queue, queued, one_col, touched, one_col)
            for j in range(n_touched):  # label the segment; its pixels are no longer free
                c = touched[j]
                g, lc = comp[c], labels[c]
                for r in range(H):
                    lc[r] = n if (g >> np.uint64(r)) & one else lc[r]
                free[c] &= ~g
                comp[c] = zero
    return labels, n


def segment_range_image(ri: RangeImage, ground_px: np.ndarray, *, beta_deg: float = 10.0,
                        max_gap: int = 1) -> np.ndarray:
    """Raw BFS segment labels per pixel (not yet filtered).

    Args: ri: RangeImage; ground_px (H, W) nonzero = ground (never segmented). beta_deg: joining threshold (deg).
    max_gap: empty pixels bridged between neighbours. Returns (H, W) int32 labels (a view of a column-major
    array), 0 = none.
    """
    label = _segment_bits if ri.shape[0] <= MAX_ROWS else _bfs_segments
    labels, _ = label(ri.range_cm, ri.elevation_cm, ground_px.T, np.radians(beta_deg), max_gap)
    return labels.T


@numba.njit(cache=True, error_model="numpy")
def _stats_arrays(n_labels):  # pragma: no cover - numba
    """Empty per-label sums for _add_point: count, bounding-box min / max and coordinate sum, ids 0..n_labels."""
    return (np.zeros(n_labels + 1, np.int64), np.full((n_labels + 1, 3), np.inf), np.full((n_labels + 1, 3), -np.inf),
            np.zeros((n_labels + 1, 3)))


@numba.njit(cache=True, inline="always", error_model="numpy")
def _add_point(k, i, xyz, cnt, lo, hi, s):  # pragma: no cover - numba
    """Add point i (xyz row) to label k's count, bounding box and coordinate sum."""
    cnt[k] += 1
    for j in range(3):
        v = xyz[i, j]
        s[k, j] += v
        lo[k, j] = min(lo[k, j], v)
        hi[k, j] = max(hi[k, j], v)


@numba.njit(cache=True, error_model="numpy")
def _stats(labels, xyz, n_labels):  # pragma: no cover - numba
    cnt, lo, hi, s = _stats_arrays(n_labels)
    for i in range(labels.shape[0]):
        if labels[i] > 0:
            _add_point(labels[i], i, xyz, cnt, lo, hi, s)
    return cnt, lo, hi, s


def _stats_of(cnt, lo, hi, s, ids) -> dict[str, np.ndarray]:
    c = cnt[ids]
    centroid = s[ids] / c[:, None]
    return {"id": ids, "n_points": c, "centroid": centroid, "extent": hi[ids] - lo[ids],
            "range": np.linalg.norm(centroid, axis=1)}


def _raw_stats(labels: np.ndarray, xyz: np.ndarray):
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int64)
    n = int(labels.max()) if len(labels) else 0
    return labels, _stats(labels, np.asarray(xyz), n)  # any int / float dtype: no converted copies


def segment_stats(labels: np.ndarray, xyz: np.ndarray) -> dict[str, np.ndarray]:
    """Per-segment statistics of point labels 1..n.

    Args: labels (N,) int, 0 = none; xyz (N, 3) metres.
    Returns dict with, for ids 1..max: `id` (n,), `n_points` (n,) int64, `centroid` (n, 3) m, `extent` (n, 3) m
    (bounding-box size), `range` (n,) m (horizontal+vertical distance of the centroid from the sensor);
    ids with no points are omitted.
    """
    _, (cnt, lo, hi, s) = _raw_stats(labels, xyz)
    return _stats_of(cnt, lo, hi, s, np.flatnonzero(cnt[1:] > 0) + 1)


@numba.njit(cache=True, error_model="numpy")
def _spread_stats(pix_label, ground_px, ground_in, rows, cols, rng, range_m, rel_tol, abs_tol, xyz,
                  n_labels):  # pragma: no cover - numba
    """range_image.pixel_labels_to_points of the column-major ground pixels (unless `ground_in` gives the points'
    ground flags) and segment labels (0 on ground points) in one pass, with the _stats of the labels."""
    n = rows.shape[0]
    given = ground_in.shape[0] == n
    ground = ground_in.copy() if given else np.zeros(n, np.bool_)
    out = np.zeros(n, np.int32)
    cnt, lo, hi, s = _stats_arrays(n_labels)
    for i in range(n):
        r, c = rows[i], cols[i]
        if r < 0:
            continue
        near = near_pixel(rng[i], range_m[c, r], rel_tol, abs_tol)
        if not given:
            ground[i] = near and ground_px[c, r] != 0
        k = pix_label[c, r]
        if ground[i] or k <= 0 or not near:
            continue
        out[i] = k
        _add_point(k, i, xyz, cnt, lo, hi, s)
    return ground, out, cnt, lo, hi, s


@numba.njit(cache=True, error_model="numpy")
def _apply_lut(labels, lut):  # pragma: no cover - numba
    out = np.zeros(labels.shape[0], np.uint16)
    for i in range(labels.shape[0]):
        if labels[i] > 0:
            out[i] = lut[labels[i]]
    return out


def _select(cnt, lo, hi, s, labels, *, min_points: int, max_points: int, min_extent_m: float,
            max_extent_m: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Filter raw segments by their stats (cnt, lo, hi, s per raw id); renumber the kept ones 1..n by decreasing
    size. Returns the (N,) uint16 ids of `labels` and the stats of the kept segments."""
    ids = np.flatnonzero(cnt[1:] > 0) + 1
    npts, size = cnt[ids], (hi[ids] - lo[ids]).max(axis=1, initial=0.0)
    keep = (npts >= min_points) & (npts <= max_points)
    if min_extent_m > 0:
        keep &= size >= min_extent_m
    if max_extent_m > 0:
        keep &= size <= max_extent_m
    ids, npts = ids[keep], npts[keep]
    ids = ids[np.argsort(-npts, kind="stable")][:65535]
    lut = np.zeros(len(cnt), np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    out = _stats_of(cnt, lo, hi, s, ids)
    out["id"] = np.arange(1, len(ids) + 1)
    return _apply_lut(labels, lut), out


def filter_segments_stats(labels: np.ndarray, xyz: np.ndarray, *, min_points: int = 20, max_points: int = 100_000,
                          min_extent_m: float = 0.0,
                          max_extent_m: float = 0.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """filter_segments, and the segment_stats of its result (taken from the raw segments' stats, no second pass)."""
    labels, (cnt, lo, hi, s) = _raw_stats(labels, xyz)
    return _select(cnt, lo, hi, s, labels, min_points=min_points, max_points=max_points, min_extent_m=min_extent_m,
                   max_extent_m=max_extent_m)


def filter_segments(labels: np.ndarray, xyz: np.ndarray, *, min_points: int = 20, max_points: int = 100_000,
                    min_extent_m: float = 0.0, max_extent_m: float = 0.0) -> np.ndarray:
    """Drop segments with too few / many points or whose largest bounding-box side is outside
    [min_extent_m, max_extent_m] (0 = no bound); renumber the rest 1..n by decreasing size.

    Args: labels (N,) int point labels (0 = none), xyz (N, 3) m. Returns (N,) uint16 (ids beyond 65535 dropped).
    """
    return filter_segments_stats(labels, xyz, min_points=min_points, max_points=max_points,
                                 min_extent_m=min_extent_m, max_extent_m=max_extent_m)[0]


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


def segment_points(ri: RangeImage, xyz: np.ndarray, ground: np.ndarray | None, ground_px: np.ndarray, *,
                   method: str = "range_image", beta_deg: float = 10.0, max_gap: int = 1,
                   dbscan_eps: float = 0.5, dbscan_min_points: int = 5, min_points: int = 20,
                   max_points: int = 100_000, min_extent_m: float = 0.0,
                   max_extent_m: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Filtered per-point segment ids of the non-ground points by `method` (range_image | dbscan).

    Args: ground (N,) bool per point, or None to take it from ground_px (H, W) like pixel_labels_to_points.
    Returns: ground (N,) bool, segment ids (N,) uint16, their segment_stats.
    """
    kw = dict(min_points=min_points, max_points=max_points, min_extent_m=min_extent_m, max_extent_m=max_extent_m)
    if method == "range_image":
        pix = segment_range_image(ri, ground_px, beta_deg=beta_deg, max_gap=max_gap).T  # column-major again
        ground_in = np.zeros(0, np.bool_) if ground is None else np.asarray(ground, np.bool_)
        ground, raw, cnt, lo, hi, s = _spread_stats(pix, ground_px.T, ground_in, ri.row, ri.col, ri.rng, ri.range_cm,
                                                    SPREAD_REL_TOL, SPREAD_ABS_TOL, np.asarray(xyz),
                                                    int(pix.max(initial=0)))
        return (ground, *_select(cnt, lo, hi, s, raw, **kw))
    if method == "dbscan":
        if ground is None:
            ground = pixel_labels_to_points(ri, ground_px.view(np.bool_))
        raw = segment_dbscan(xyz, (~ground) & (ri.row >= 0), eps=dbscan_eps, min_points=dbscan_min_points)
        return (ground, *filter_segments_stats(raw, xyz, **kw))
    raise ValueError(f"unknown segment method '{method}' (range_image | dbscan)")
