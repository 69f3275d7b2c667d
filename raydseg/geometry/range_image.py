"""Spherical range image of a LiDAR sweep: (beam row, azimuth column) per point, one representative point per pixel.

Conventions: LiDAR frame x forward, y left, z up (metres). Row 0 is the *top* beam (largest elevation), row
H-1 the lowest beam. Column c covers azimuth atan2(y, x) in [pi - (c+1) * 2pi/W, pi - c * 2pi/W), i.e. columns
run clockwise seen from above, starting behind the sensor; columns wrap (W-1 is next to 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@dataclass
class RangeImage:
    """A range image and the point <-> pixel maps.

    Attributes:
        index: (H, W) int64, index of the pixel's representative point (the nearest one), -1 = empty pixel.
        range_m: (H, W) float32, range of the representative point in metres, 0 = empty.
        elevation: (H, W) float32, elevation angle of the representative point in radians (0 where empty).
        horizontal: (H, W) float32, its horizontal distance sqrt(x^2 + y^2) in metres; height: (H, W) float32, its z.
        row: (N,) int32 beam row of every point (-1 = point not used, e.g. dropped by subsampling).
        col: (N,) int32 azimuth column of every point (-1 = not used).
        rng: (N,) float32 range of every point in metres.
    """

    index: np.ndarray
    range_m: np.ndarray
    elevation: np.ndarray
    horizontal: np.ndarray
    height: np.ndarray
    row: np.ndarray
    col: np.ndarray
    rng: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.index.shape  # type: ignore[return-value]


def beam_rows(xyz: np.ndarray, ring: np.ndarray | None, n_beams: int) -> tuple[np.ndarray, int]:
    """Beam row per point: from `ring` when given (ring 0 = top beam is NOT assumed: rows are ordered by the
    beams' mean elevation, top first), else by binning the elevation angle uniformly between the sweep's
    min and max into `n_beams` rows.

    Args:
        xyz: (N, 3) float metres. ring: (N,) int beam index or None. n_beams: rows when binning (>= 1).
    Returns:
        rows (N,) int32 in [0, H), and H.
    """
    n = len(xyz)
    if n == 0:
        return np.zeros(0, np.int32), max(n_beams, 1)
    elev = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))
    if ring is not None:
        ring = np.asarray(ring, dtype=np.int64)
        n_ring = int(ring.max()) + 1
        sums = np.bincount(ring, weights=elev, minlength=n_ring)
        cnts = np.bincount(ring, minlength=n_ring)
        mean = np.where(cnts > 0, sums / np.maximum(cnts, 1), -np.inf)
        order = np.argsort(-mean, kind="stable")  # top beam first
        rank = np.empty(n_ring, np.int64)
        rank[order] = np.arange(n_ring)
        return rank[ring].astype(np.int32), n_ring
    lo, hi = float(elev.min()), float(elev.max())
    span = max(hi - lo, 1e-6)
    rows = np.floor((hi - elev) / span * n_beams).astype(np.int64)
    return np.clip(rows, 0, n_beams - 1).astype(np.int32), n_beams


@numba.njit(cache=True, error_model="numpy")
def _fill(rows, cols, rng, elev, xyz, valid, H, W):  # pragma: no cover - numba
    index = np.full((H, W), -1, np.int64)
    range_m = np.zeros((H, W), np.float32)
    el = np.zeros((H, W), np.float32)
    hor = np.zeros((H, W), np.float32)
    hgt = np.zeros((H, W), np.float32)
    for i in range(rows.shape[0]):
        if not valid[i]:
            continue
        r, c = rows[i], cols[i]
        j = index[r, c]
        if j < 0 or rng[i] < range_m[r, c]:
            index[r, c] = i
            range_m[r, c] = rng[i]
            el[r, c] = elev[i]
    for r in range(H):
        for c in range(W):
            i = index[r, c]
            if i >= 0:
                hor[r, c] = np.sqrt(np.float64(xyz[i, 0]) ** 2 + np.float64(xyz[i, 1]) ** 2)
                hgt[r, c] = xyz[i, 2]
    return index, range_m, el, hor, hgt


def estimate_columns(xyz: np.ndarray, ring: np.ndarray, max_cols: int = 8192) -> int:
    """Azimuth columns per revolution of a spinning LiDAR: 2pi / the median azimuth step within the beam with the
    most returns. Args: xyz (N, 3) m; ring (N,) beam index. Returns an int in [64, max_cols]."""
    ring = np.asarray(ring)
    if len(ring) == 0:
        return 2048
    busiest = np.bincount(ring.astype(np.int64)).argmax()
    az = np.sort(np.arctan2(xyz[ring == busiest, 1], xyz[ring == busiest, 0]))
    d = np.diff(az)
    d = d[d > 1e-6]
    if len(d) == 0:
        return 2048
    return int(np.clip(round(2 * np.pi / np.median(d)), 64, max_cols))


@numba.njit(cache=True, inline="always", error_model="numpy")
def fast_atan2(y: float, x: float) -> float:  # pragma: no cover - numba
    """atan2 by a minimax polynomial, |error| < 2e-5 rad (far below a range-image pixel, ~3e-3 rad)."""
    ax, ay = abs(x), abs(y)
    if ax == 0.0 and ay == 0.0:
        return 0.0
    swap = ay > ax
    t = ax / ay if swap else ay / ax
    t2 = t * t
    a = t * (0.99997726 + t2 * (-0.33262347 + t2 * (0.19354346 + t2 * (-0.11643287 + t2 * (0.05265332
                                                                                         - t2 * 0.01172120)))))
    if swap:
        a = 1.5707963267948966 - a
    if x < 0:
        a = 3.141592653589793 - a
    return -a if y < 0 else a


@numba.njit(cache=True, error_model="numpy")
def _polar(xyz, valid, min_range, n_cols):  # pragma: no cover - numba
    n = xyz.shape[0]
    rng = np.empty(n, np.float32)
    elev = np.empty(n, np.float32)
    col = np.full(n, -1, np.int32)
    use = np.zeros(n, np.bool_)
    scale = n_cols / (2.0 * np.pi)
    for i in range(n):
        x, y, z = np.float64(xyz[i, 0]), np.float64(xyz[i, 1]), np.float64(xyz[i, 2])
        h = np.sqrt(x * x + y * y)
        r = np.sqrt(h * h + z * z)
        rng[i] = r
        elev[i] = fast_atan2(z, h)
        if valid[i] and r >= min_range:
            use[i] = True
            c = int(np.floor((np.pi - fast_atan2(y, x)) * scale))
            col[i] = c % n_cols
    return rng, elev, col, use


@numba.njit(cache=True, error_model="numpy")
def _ring_elevation(ring, elev, use, n_ring):  # pragma: no cover - numba
    """Sum of elevations (float64) and count of the used points of every ring index."""
    sums = np.zeros(n_ring, np.float64)
    cnts = np.zeros(n_ring, np.int64)
    for i in range(ring.shape[0]):
        if use[i]:
            sums[ring[i]] += elev[i]
            cnts[ring[i]] += 1
    return sums, cnts


@numba.njit(cache=True, error_model="numpy")
def _ring_rows(ring, use, rank):  # pragma: no cover - numba
    rows = np.full(ring.shape[0], -1, np.int32)
    for i in range(ring.shape[0]):
        if use[i]:
            rows[i] = rank[ring[i]]
    return rows


def build_range_image(xyz: np.ndarray, ring: np.ndarray | None = None, *, n_beams: int = 64, n_cols: int = 2048,
                      valid: np.ndarray | None = None, min_range: float = 0.5) -> RangeImage:
    """Project a sweep onto its (beam, azimuth) grid.

    Args:
        xyz: (N, 3) float32/64 points in metres (LiDAR frame). ring: (N,) beam index or None (elevation binning).
        n_beams: rows when `ring` is None. n_cols: azimuth columns (2pi / n_cols rad each).
        valid: (N,) bool, points to use (others get row = col = -1). min_range: points closer (m) are ignored.
    Returns:
        RangeImage; each pixel keeps its nearest point.
    """
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    n = len(xyz)
    valid = np.ones(n, np.bool_) if valid is None else np.ascontiguousarray(valid, dtype=np.bool_)
    rng, elev, cols, use = _polar(xyz, valid, float(min_range), int(n_cols))  # cols = -1 where not used
    if ring is not None:
        ring = np.ascontiguousarray(ring)
        n_ring = int(ring.max()) + 1 if len(ring) else 1
        sums, cnts = _ring_elevation(ring, elev, use, n_ring)
        present = cnts > 0
        mean = np.where(present, sums / np.maximum(cnts, 1), -np.inf)
        order = np.argsort(-mean, kind="stable")  # top beam first
        rank = np.full(n_ring, -1, np.int64)
        rank[order[: int(present.sum())]] = np.arange(int(present.sum()))
        all_rows = _ring_rows(ring, use, rank)
        H = max(int(present.sum()), 1)
    else:
        all_rows = np.full(n, -1, np.int32)
        e = elev[use]
        H = max(n_beams, 1)
        if len(e):
            lo, hi = float(e.min()), float(e.max())
            span = max(hi - lo, 1e-6)
            all_rows[use] = np.clip(((hi - e) / span * H).astype(np.int64), 0, H - 1)
    index, range_m, el, hor, hgt = _fill(all_rows, cols, rng, elev, xyz, use, H, int(n_cols))
    return RangeImage(index=index, range_m=range_m, elevation=el, horizontal=hor, height=hgt, row=all_rows, col=cols,
                      rng=rng)


@numba.njit(cache=True, error_model="numpy")
def _spread(pix_label, rows, cols, rng, range_m, rel_tol, abs_tol, out):  # pragma: no cover - numba
    for i in range(rows.shape[0]):
        r, c = rows[i], cols[i]
        if r < 0:
            continue
        d = range_m[r, c]
        if abs(rng[i] - d) <= abs_tol + rel_tol * d:
            out[i] = pix_label[r, c]
    return out


def pixel_labels_to_points(ri: RangeImage, pix_label: np.ndarray, *, rel_tol: float = 0.05,
                           abs_tol: float = 0.3) -> np.ndarray:
    """Per-pixel labels -> per-point labels. A point that is not its pixel's representative takes the pixel's
    label only when its range is within `abs_tol + rel_tol * pixel range` metres of it, else 0.

    Args: pix_label (H, W) integer image. Returns: (N,) array of pix_label's dtype.
    """
    out = np.zeros(len(ri.row), dtype=pix_label.dtype)
    return _spread(pix_label, ri.row, ri.col, ri.rng, ri.range_m, rel_tol, abs_tol, out)
