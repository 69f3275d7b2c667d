"""Ground removal on the range image (Bogoslavskyi & Stachniss, depth_clustering) and a RANSAC-plane alternative.

Range-image column method:
  1. angle image: for every pixel, the inclination (deg) of the line to the next valid pixel above it in the
     same column (gaps of up to `max_gap` empty rows are bridged, which "repairs" small holes);
  2. Savitzky-Golay smoothing (quadratic) of every column's angle sequence (window `sg_window`);
  3. BFS from each column's lowest valid pixel whose angle is below `start_max_deg`, joining 4-neighbours
     (columns wrap, vertical gaps bridged) whose smoothed angles differ by less than `angle_deg` and whose
     angle stays below `max_slope_deg` (a guard against creeping up smooth walls). Images of up to 64 rows run
     this flood on column bit masks (`_ground_bits`, raydseg.geometry.column_bits); taller ones run the BFS;
  4. (ours, `step_m` > 0) column-wise step extension: walking up each column, a non-ground pixel becomes ground
     when it is within `step_m` metres in height of the last ground pixel below it and further out horizontally
     than it is higher (the line to it is flatter than 45 deg). This crosses kerbs (the angle
     criterion stops at the kerb face) and takes the ground points right at an object's foot, which the angle
     of the pair ground->object marks as steep and the segmentation would otherwise glue to the object.
"""
from __future__ import annotations

import functools

import numba
import numpy as np

from raydseg.geometry.column_bits import MAX_ROWS, above_bits, at_most_bits, flood, near_bits, pair_run
from raydseg.geometry.range_image import RangeImage, fast_atan2, pixel_labels_to_points


@functools.lru_cache(maxsize=16)
def savgol_coeffs(window: int, order: int = 2) -> np.ndarray:
    """Savitzky-Golay smoothing coefficients (window odd >= 3) for the centre sample, (window,) float64, read-only
    (cached: a pseudo-inverse per sweep costs 0.1 ms)."""
    if window < 3 or window % 2 == 0:
        raise ValueError(f"Savitzky-Golay window must be odd and >= 3, got {window}")
    half = window // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    A = np.vander(x, order + 1, increasing=True)
    out = np.linalg.pinv(A)[0]
    out.flags.writeable = False
    return out


# The kernels below walk columns of the column-major images ((W, H) arrays indexed [column, row], RangeImage.*_cm).

@numba.njit(cache=True, error_model="numpy")
def _angle_image(range_m, hor, hgt, max_gap, coeffs):  # pragma: no cover - numba
    """Steps 1-2: inclination (deg) to the next valid pixel above, NaN-free top pixels copying the angle below,
    then Savitzky-Golay smoothing (`coeffs`, empty = none) of each column's defined angles.

    The valid pixels of every column are packed bottom first into (H, W) slot arrays ([k, c] = the k-th valid
    pixel of column c), so angles, filling and smoothing run along rows of slots, across all columns at once
    (contiguous, vectorised); only packing and unpacking walk the columns.
    Returns (W, H) float32, NaN where empty or undefined."""
    W, H = range_m.shape
    Wp = W + 16  # slot rows padded: a power-of-two stride would map a column's slots onto one cache set
    rows = np.empty((H + 1, Wp), np.int32)  # per slot: the pixel's row, height, horizontal distance
    zb = np.zeros((H + 1, Wp), np.float32)
    hb = np.zeros((H + 1, Wp), np.float32)
    n = np.zeros(W, np.int64)
    for c in range(W):
        rc, hc, zc = range_m[c], hor[c], hgt[c]
        k = 0
        for r in range(H - 1, -1, -1):
            if rc[r] > 0:
                rows[k, c] = r
                zb[k, c] = zc[r]
                hb[k, c] = hc[r]
                k += 1
        rows[k, c] = -(1 << 30)  # no partner above the top pixel
        n[c] = k
    raw = np.empty((H, Wp), np.float32)
    for k in range(H):
        r0, r1, z0, z1, h0, h1, out = rows[k], rows[k + 1], zb[k], zb[k + 1], hb[k], hb[k + 1], raw[k]
        for c in range(W):
            a = np.float32(57.29577951308232 * fast_atan2(abs(np.float64(z1[c]) - np.float64(z0[c])),
                                                          abs(np.float64(h1[c]) - np.float64(h0[c]))))
            out[c] = a if r0[c] - r1[c] <= max_gap + 1 else np.float32(np.nan)
    # undefined angles copy the last defined one below (a bottom run of NaN stays): first = that run's length
    first = np.zeros(W, np.int64)
    for c in range(W):
        if np.isnan(raw[0, c]):
            first[c] = 1
    for k in range(1, H):
        below, cur = raw[k - 1], raw[k]
        for c in range(W):
            isn = np.isnan(cur[c])
            first[c] += 1 if isn and first[c] == k else 0
            cur[c] = below[c] if isn else cur[c]
    win = coeffs.shape[0]
    half = win // 2
    out = raw
    if win >= 3:
        lo, hi = np.full(W, H, np.int64), np.zeros(W, np.int64)  # smoothed slots lo <= k < hi: a full window of
        for c in range(W):                                         # defined angles around them
            if n[c] - first[c] >= win:
                lo[c], hi[c] = first[c] + half, n[c] - half
        out = np.empty((H, Wp), np.float32)  # float64 sums, stored as the float32 the angle image keeps anyway
        for k in range(H):
            if k < half or k >= H - half:
                for c in range(W):
                    out[k, c] = raw[k, c]
        acc = np.empty(Wp, np.float64)
        for k in range(half, H - half):
            acc.fill(0.0)
            for j in range(-half, half + 1):  # each sum adds the taps top to bottom, as a plain loop would
                cj, src = coeffs[j + half], raw[k - j]
                for c in range(W):
                    acc[c] += cj * src[c]
            ok, rk = out[k], raw[k]
            for c in range(W):
                ok[c] = acc[c] if lo[c] <= k < hi[c] else rk[c]
    ang = np.full((W, H), np.nan, np.float32)
    for c in range(W):
        ac = ang[c]
        for k in range(first[c], n[c]):
            ac[rows[k, c]] = out[k, c]
    return ang


@numba.njit(cache=True, inline="always", error_model="numpy")
def _join(a_f, g_f, queue, tail, q, qc, qr, a0, thr, max_slope):  # pragma: no cover - numba
    """Join pixel q = (qc, qr) to the ground from a neighbour of angle a0 when it passes the angle tests; push it.
    Returns the new queue tail."""
    if g_f[q]:
        return tail
    a = a_f[q]
    if not a <= max_slope or abs(a - a0) >= thr:  # NaN fails a <= max_slope
        return tail
    g_f[q] = 1
    queue[tail] = (qc << 16) | qr
    return tail + 1


@numba.njit(cache=True, inline="always", error_model="numpy")
def _join_sideways(a_f, rng_f, g_f, queue, tail, W, H, c, r, thr, max_slope, max_gap):  # pragma: no cover - numba
    """_join the first valid pixels left and right of ground pixel (c, r) within max_gap + 1 columns (wrapping)."""
    a0 = a_f[c * H + r]
    for dc in (-1, 1):
        nc = c
        for _ in range(max_gap + 1):
            nc += dc
            nc = W - 1 if nc < 0 else (0 if nc >= W else nc)
            if rng_f[nc * H + r] > 0:
                tail = _join(a_f, g_f, queue, tail, nc * H + r, nc, r, a0, thr, max_slope)
                break
    return tail


@numba.njit(cache=True, error_model="numpy")
def _ground_bfs(ang, range_m, angle_thr, start_max, max_slope, max_gap):  # pragma: no cover - numba
    """Step 3: the pixels reachable from each column's lowest valid pixel. Reachability does not depend on the
    visiting order, so first every column's run above its seed is joined walking up the column (sequential
    memory), then a BFS starts from the sideways edges out of those runs. Returns (W, H) uint8, 1 = ground."""
    W, H = ang.shape
    ground = np.zeros((W, H), np.uint8)
    queue = np.empty(H * W, np.int32)
    a_f, rng_f, g_f = ang.ravel(), range_m.ravel(), ground.ravel()
    # phase A: every column's seed and the run above it joined pixel to pixel
    for c in range(W):
        base = c * H
        r = H - 1
        while r >= 0 and rng_f[base + r] <= 0:
            r -= 1
        if r < 0 or np.isnan(a_f[base + r]) or a_f[base + r] > start_max:
            continue
        g_f[base + r] = 1
        while True:
            a0 = a_f[base + r]
            nr = r - 1
            while nr >= 0 and nr >= r - max_gap - 1 and rng_f[base + nr] <= 0:
                nr -= 1
            if nr < 0 or nr < r - max_gap - 1:
                break
            a = a_f[base + nr]
            if not a <= max_slope or abs(a - a0) >= angle_thr:  # NaN fails a <= max_slope
                break
            g_f[base + nr] = 1
            r = nr
    # phase B: sideways edges out of the marked pixels seed a BFS over the rest
    tail = 0
    for c in range(W):
        base = c * H
        for r in range(H):
            if not g_f[base + r]:
                continue
            tail = _join_sideways(a_f, rng_f, g_f, queue, tail, W, H, c, r, angle_thr, max_slope, max_gap)
    head = 0
    while head < tail:
        cc, cr = queue[head] >> 16, queue[head] & 0xFFFF
        head += 1
        base = cc * H
        a0 = a_f[base + cr]
        nr = cr - 1
        while nr >= 0 and nr >= cr - max_gap - 1 and rng_f[base + nr] <= 0:
            nr -= 1
        if nr >= 0 and nr >= cr - max_gap - 1:
            tail = _join(a_f, g_f, queue, tail, base + nr, cc, nr, a0, angle_thr, max_slope)
        nr = cr + 1
        while nr < H and nr <= cr + max_gap + 1 and rng_f[base + nr] <= 0:
            nr += 1
        if nr < H and nr <= cr + max_gap + 1:
            tail = _join(a_f, g_f, queue, tail, base + nr, cc, nr, a0, angle_thr, max_slope)
        tail = _join_sideways(a_f, rng_f, g_f, queue, tail, W, H, cc, cr, angle_thr, max_slope, max_gap)
    return ground


@numba.njit(cache=True, error_model="numpy")
def _ground_bits(ang, range_m, angle_thr, start_max, max_slope, max_gap):  # pragma: no cover - numba
    """_ground_bfs for images of at most 64 rows, on column bit masks (raydseg.geometry.column_bits); same pixels.

    The masks: per column the valid and the enterable (angle <= max_slope) rows, and the vertical pairs that join
    (upper pixel enterable, lower one enterable or the seed, angles close). Per pair of columns k <= max_gap + 1
    apart: the rows where both pixels are valid, the columns between are empty, and the angles are close.
    Returns (W, H) uint8, 1 = ground."""
    W, H = ang.shape
    one, full = np.uint64(1), ~np.uint64(0)
    K = max_gap + 1
    valid, enter = np.zeros(W, np.uint64), np.zeros(W, np.uint64)
    joined, marked = np.zeros(W, np.uint64), np.zeros(W, np.uint64)
    pair = np.zeros((K, W), np.uint64)
    for c in range(W):
        valid[c], enter[c] = above_bits(range_m[c], 0.0), at_most_bits(ang[c], max_slope)
    queue = np.empty(W + 1, np.int64)
    queued = np.zeros(W, np.bool_)
    tail = 0
    for c in range(W):
        ac, v, en = ang[c], valid[c], enter[c]
        between = full  # rows where the columns strictly between c and c + k are empty
        for k in range(1, K + 1):
            d = (c + k) % W
            pair[k - 1, c] = v & valid[d] & between & near_bits(ac, ang[d], angle_thr, H)
            between &= ~valid[d]
        r = H - 1
        while r >= 0 and range_m[c, r] <= 0:
            r -= 1
        if r < 0:
            continue
        lower_ok = en
        if ac[r] <= start_max:  # the seed
            marked[c] = one << np.uint64(r)
            lower_ok |= marked[c]
            queue[tail], queued[c] = c, True
            tail += 1
        between = full  # rows strictly between r and r + k empty
        for k in range(1, min(K, H - 1) + 1):
            q = (v & (v >> np.uint64(k)) & between & en & (lower_ok >> np.uint64(k))
                 & near_bits(ac, ac[k:], angle_thr, H - k))
            joined[c] |= pair_run(q, k)
            between &= ~v >> np.uint64(k)
    flood(marked, joined, valid, enter, pair, queue, queued, tail, np.empty(W, np.int64), np.int64(0))
    ground = np.empty((W, H), np.uint8)
    for c in range(W):
        g, gc = marked[c], ground[c]
        for r in range(H):
            gc[r] = (g >> np.uint64(r)) & one
    return ground


@numba.njit(cache=True, error_model="numpy")
def _extend_steps(ground, range_m, hor, hgt, step_m, tan_slope, max_dx):  # pragma: no cover - numba
    W, H = range_m.shape
    for c in range(W):
        gc, rc, hc, zc = ground[c], range_m[c], hor[c], hgt[c]
        last = -1
        lx = 0.0
        lz = 0.0
        for r in range(H - 1, -1, -1):
            if rc[r] <= 0:
                continue
            x = hc[r]
            z = zc[r]
            if not gc[r] and last >= 0:
                dx = x - lx
                dz = abs(z - lz)
                if dz < step_m and dz < dx * tan_slope and dx < max_dx:  # noqa
                    gc[r] = 1
            if gc[r]:
                last, lx, lz = r, x, z
    return ground


def ground_range_image(ri: RangeImage, *, angle_deg: float = 7.0, start_max_deg: float = 30.0,
                       max_slope_deg: float = 20.0, sg_window: int = 7, max_gap: int = 2,
                       step_m: float = 0.25) -> np.ndarray:
    """Ground pixels of a range image by the column method above.

    Args:
        ri: RangeImage of the sweep. angle_deg: max difference (deg) of smoothed inclinations between joined
        neighbours. start_max_deg: columns whose lowest pixel is steeper are skipped. max_slope_deg: pixels
        steeper than this are never ground. sg_window: Savitzky-Golay window (odd, rows; < 3 = no smoothing).
        max_gap: empty rows bridged vertically. step_m: height tolerance of the step extension (0 = off).
    Returns:
        (H, W) uint8 view of a column-major array, 1 = ground pixel.
    """
    coeffs = savgol_coeffs(sg_window) if sg_window >= 3 else np.zeros(0)
    ang = _angle_image(ri.range_cm, ri.horizontal_cm, ri.height_cm, max_gap, coeffs)
    fill = _ground_bits if ri.shape[0] <= MAX_ROWS else _ground_bfs
    ground = fill(ang, ri.range_cm, float(angle_deg), float(start_max_deg), float(max_slope_deg), max_gap)
    if step_m > 0:
        ground = _extend_steps(ground, ri.range_cm, ri.horizontal_cm, ri.height_cm, float(step_m), 1.0, np.inf)
    return ground.T


def ground_plane_ransac(xyz: np.ndarray, valid: np.ndarray | None = None, *, threshold_m: float = 0.2,
                        iterations: int = 60, max_tilt_deg: float = 15.0, seed: int = 0) -> np.ndarray:
    """Ground points as the inliers of one RANSAC plane fitted to the lowest 30% of points (a cheap alternative for
    flat scenes; fails on slopes and ramps).

    Args: xyz (N, 3) metres; valid (N,) bool points to consider. threshold_m: inlier distance (m).
    max_tilt_deg: planes tilted more than this from horizontal are rejected. Returns (N,) bool.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    n = len(xyz)
    use = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    cand = np.flatnonzero(use)
    out = np.zeros(n, bool)
    if len(cand) < 3:
        return out
    rng = np.random.default_rng(seed)
    low = cand[xyz[cand, 2] <= np.quantile(xyz[cand, 2], 0.3)]
    score_idx = rng.choice(cand, size=min(len(cand), 5000), replace=False)
    best, best_score = None, -1
    cos_tilt = np.cos(np.radians(max_tilt_deg))
    for _ in range(iterations):
        p = xyz[rng.choice(low, 3, replace=False)]
        nrm = np.cross(p[1] - p[0], p[2] - p[0])
        norm = np.linalg.norm(nrm)
        if norm < 1e-9:
            continue
        nrm /= norm
        if abs(nrm[2]) < cos_tilt:
            continue
        d = -nrm @ p[0]
        score = int((np.abs(xyz[score_idx] @ nrm + d) < threshold_m).sum())
        if score > best_score:
            best, best_score = (nrm, d), score
    if best is None:
        return out
    nrm, d = best
    out[cand] = np.abs(xyz[cand] @ nrm + d) < threshold_m
    return out


def ground_points(ri: RangeImage, xyz: np.ndarray, valid: np.ndarray, *, method: str = "range_image",
                  angle_deg: float = 7.0, start_max_deg: float = 30.0, max_slope_deg: float = 20.0,
                  sg_window: int = 7, max_gap: int = 2, step_m: float = 0.25, plane_threshold_m: float = 0.2,
                  seed: int = 0, per_point: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Per-point and per-pixel ground masks by `method` (range_image | ransac).

    Returns: (N,) bool per point, (H, W) uint8 per pixel of `ri`. With per_point=False the range-image method
    returns None for the points (segment.segment_points derives them in its own pass over the points).
    """
    if method == "range_image":
        pix = ground_range_image(ri, angle_deg=angle_deg, start_max_deg=start_max_deg,
                                 max_slope_deg=max_slope_deg, sg_window=sg_window, max_gap=max_gap, step_m=step_m)
        return (pixel_labels_to_points(ri, pix.view(np.bool_)) if per_point else None), pix  # 0/1 bytes: bool view
    if method == "ransac":
        pts = ground_plane_ransac(xyz, valid & (ri.row >= 0), threshold_m=plane_threshold_m, seed=seed)
        has = ri.index_cm >= 0
        pix = np.zeros(has.shape, np.uint8)
        pix[has] = pts[ri.index_cm[has]]
        return pts, pix.T
    raise ValueError(f"unknown ground method '{method}' (range_image | ransac)")
