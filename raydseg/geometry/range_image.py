"""Spherical range image of a LiDAR sweep: (beam row, azimuth column) per point, one representative point per pixel.

Conventions: LiDAR frame x forward, y left, z up (metres). Row 0 is the *top* beam (largest elevation), row
H-1 the lowest beam. Column c covers azimuth atan2(y, x) in [pi - (c+1) * 2pi/W, pi - c * 2pi/W), i.e. columns
run clockwise seen from above, starting behind the sensor; columns wrap (W-1 is next to 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


EMPTY_KEY = np.int64(0x7FFFFFFFFFFFFFFF)  # empty pixel of the packed int64 keys (RangeImage.nearest_cm, z-buffer)


@dataclass
class RangeImage:
    """A range image and the point <-> pixel maps.

    The images are stored column-major, (W, H) arrays indexed [column, row], because the ground and segmentation
    kernels walk columns; the properties of the same names without `_cm` are (H, W) views of them.

    Attributes:
        nearest_cm: (W, H) int64, the pixel's representative point (the nearest one) as
            (float32 range bits << 32 | point index), EMPTY_KEY where empty; index_cm / index decode it.
        range_cm: (W, H) float32, range of the representative point in metres, 0 = empty.
        elevation_cm: (W, H) float32, elevation angle of the representative point in radians (0 where empty).
        horizontal_cm: (W, H) float32, its horizontal distance sqrt(x^2 + y^2) in metres; height_cm: its z.
        row: (N,) int32 beam row of every point (-1 = point not used, e.g. dropped by subsampling).
        col: (N,) int32 azimuth column of every point (-1 = not used).
        rng: (N,) float32 range of every point in metres.
    """

    nearest_cm: np.ndarray
    range_cm: np.ndarray
    elevation_cm: np.ndarray
    horizontal_cm: np.ndarray
    height_cm: np.ndarray
    row: np.ndarray
    col: np.ndarray
    rng: np.ndarray

    @property
    def index_cm(self) -> np.ndarray:
        """(W, H) int32 index of each pixel's representative point, -1 = empty (decoded on demand: the default
        pipeline never needs it)."""
        return np.where(self.nearest_cm == EMPTY_KEY, -1, self.nearest_cm & 0xFFFFFFFF).astype(np.int32)

    index = property(lambda self: self.index_cm.T)
    range_m = property(lambda self: self.range_cm.T)
    elevation = property(lambda self: self.elevation_cm.T)
    horizontal = property(lambda self: self.horizontal_cm.T)
    height = property(lambda self: self.height_cm.T)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W): beam rows, azimuth columns."""
        return self.range_cm.shape[::-1]  # type: ignore[return-value]


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
def _of_ring(az, ring, beam, count):  # pragma: no cover - numba
    """The azimuths `az` (N,) of the `count` points of ring `beam`, in point order."""
    sel = np.empty(count, np.float64)
    k = 0
    for i in range(ring.shape[0]):
        if ring[i] == beam and k < count:
            sel[k] = az[i]
            k += 1
    return sel[:k]


def _median_step(az: np.ndarray, ring: np.ndarray, beam: int, count: int) -> float:
    """Median positive azimuth step (rad) between the sorted azimuths of the points of ring `beam`; 0 when there
    is none. (The sort and median stay in numpy: in numba they take ~9 s to compile for ~0.05 ms of work.)"""
    d = np.diff(np.sort(_of_ring(az, ring, beam, count)))
    d = d[d > 1e-6]
    return float(np.median(d)) if len(d) else 0.0


def _columns_from_step(step: float, max_cols: int) -> int:
    return int(np.clip(round(2 * np.pi / step), 64, max_cols)) if step > 0 else 2048


def estimate_columns(xyz: np.ndarray, ring: np.ndarray, max_cols: int = 8192) -> int:
    """Azimuth columns per revolution of a spinning LiDAR: 2pi / the median azimuth step within the beam with the
    most returns. Args: xyz (N, 3) m; ring (N,) beam index. Returns an int in [64, max_cols] (2048 without
    points)."""
    ring = np.ascontiguousarray(ring)
    if len(ring) == 0:
        return 2048
    az = polar(np.asarray(xyz))[1]  # as build_range_image
    counts = np.bincount(ring.astype(np.int64))
    return _columns_from_step(_median_step(az, ring, counts.argmax(), counts.max()), max_cols)


@numba.njit(cache=True, inline="always", error_model="numpy")
def fast_atan2(y: float, x: float) -> float:  # pragma: no cover - numba
    """atan2 by a minimax polynomial, |error| < 2e-5 rad (far below a range-image pixel, ~3e-3 rad); branch-free
    (selects only), so loops over it vectorise. atan2(0, 0) = 0."""
    ax, ay = abs(x), abs(y)
    swap = ay > ax
    mx = ay if swap else ax
    mn = ax if swap else ay
    t = mn / (mx if mx > 0.0 else 1.0)
    t2 = t * t
    a = t * (0.99997726 + t2 * (-0.33262347 + t2 * (0.19354346 + t2 * (-0.11643287 + t2 * (0.05265332
                                                                                         - t2 * 0.01172120)))))
    a = 1.5707963267948966 - a if swap else a
    a = 3.141592653589793 - a if x < 0 else a
    return -a if y < 0 else a


@numba.njit(cache=True, inline="always", error_model="numpy")
def _polar_point(xx, yy, zz, i, rec, az):  # pragma: no cover - numba
    h = np.sqrt(xx * xx + yy * yy)
    rec[i, 0] = np.sqrt(h * h + zz * zz)
    rec[i, 1] = fast_atan2(zz, h)
    rec[i, 2] = h
    rec[i, 3] = zz
    az[i] = fast_atan2(yy, xx)


@numba.njit(cache=True, error_model="numpy")
def _polar(x, y, z):  # pragma: no cover - numba
    """Per point, one float32 record (range m, elevation rad, horizontal distance m, z m) and the azimuth
    atan2(y, x) (float64 rad), from contiguous (N,) coordinate arrays: branch-free, so the loop vectorises."""
    n = x.shape[0]
    rec = np.empty((n, 4), np.float32)
    az = np.empty(n, np.float64)
    for i in range(n):
        _polar_point(np.float64(x[i]), np.float64(y[i]), np.float64(z[i]), i, rec, az)
    return rec, az


@numba.njit(cache=True, error_model="numpy")
def _polar4(p, n):  # pragma: no cover - numba
    """_polar of n points stored x, y, z, _ (4 floats a point, the Frame layout) in the flat array p: a literal
    stride vectorises without first copying the coordinates apart."""
    rec = np.empty((n, 4), np.float32)
    az = np.empty(n, np.float64)
    for i in range(n):
        _polar_point(np.float64(p[4 * i]), np.float64(p[4 * i + 1]), np.float64(p[4 * i + 2]), i, rec, az)
    return rec, az


def polar(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polar coordinates of every point (see _polar): records (N, 4) float32 (range m, elevation rad, horizontal
    distance m, z m) -- one record per point, so the range image gathers one cache line per pixel -- and azimuth
    (N,) float64 rad. xyz: (N, 3) float m, any strides (points[:, :3] of a (N, 4) float32 Frame array is read in
    place)."""
    if xyz.dtype == np.float32 and xyz.strides == (16, 4) and len(xyz):
        return _polar4(np.lib.stride_tricks.as_strided(xyz, shape=(4 * len(xyz) - 1,), strides=(4,)), len(xyz))
    return _polar(*(np.ascontiguousarray(xyz[:, j]) for j in range(3)))


@numba.njit(cache=True, error_model="numpy")
def _used(rng, elev, valid, min_range, ring, n_ring):  # pragma: no cover - numba
    """Used flag per point (valid and not closer than min_range); per ring index (when ring has a value per point)
    the elevation sum and count of the used points and the count of all points; min / max used elevation."""
    n = rng.shape[0]
    use = np.empty(n, np.bool_)
    sums = np.zeros(n_ring, np.float64)
    cnts = np.zeros(n_ring, np.int64)
    all_cnts = np.zeros(n_ring, np.int64)
    has_ring = ring.shape[0] == n
    lo, hi = np.inf, -np.inf
    cur, s, c, ca = -1, 0.0, 0, 0  # the current ring's accumulators: points come ring by ring, so a register
    for i in range(n):               # sum beats a read-modify-write of memory per point
        u = valid[i] and rng[i] >= min_range
        use[i] = u
        e = elev[i]
        if has_ring:
            if ring[i] != cur:
                if cur >= 0:
                    sums[cur], cnts[cur], all_cnts[cur] = s, c, ca
                cur = ring[i]
                s, c, ca = sums[cur], cnts[cur], all_cnts[cur]
            ca += 1
            if u:
                s += e
                c += 1
        if u:
            lo = min(lo, e)
            hi = max(hi, e)
    if cur >= 0:
        sums[cur], cnts[cur], all_cnts[cur] = s, c, ca
    return use, sums, cnts, all_cnts, lo, hi


@numba.njit(cache=True, error_model="numpy")
def _fill(rec, ring, rank, az, use, lo, hi, H, W):  # pragma: no cover - numba
    """Row / column of every used point (row from rank[ring], or by binning elevations in [lo, hi] when ring is
    empty) and the column-major images of each pixel's nearest point, from the points' polar records.

    The nearest point of a pixel is the min of (range float32 bits << 32 | point index): positive floats order as
    their bits, and of equal ranges the first point stays. The images are then read out in memory order."""
    n = rec.shape[0]
    rows = np.empty(n, np.int32)
    cols = np.empty(n, np.int32)
    span = max(hi - lo, 1e-6)
    scale = W / (2.0 * np.pi)
    for i in range(n):  # branch-free (selects), two loops for the two row sources: both vectorise
        c = int(np.floor((np.pi - az[i]) * scale))  # in [0, W]: az in [-pi, pi]
        cols[i] = (c - W if c >= W else c) if use[i] else -1
    if ring.shape[0] == n:
        for i in range(n):
            rows[i] = rank[ring[i]] if use[i] else -1
    else:
        for i in range(n):
            rows[i] = min(max(int((hi - rec[i, 1]) / span * H), 0), H - 1) if use[i] else -1
    key = np.full((W, H), EMPTY_KEY, np.int64)
    k_f = key.ravel()
    bits = rec.view(np.int32)
    for i in range(n):
        if rows[i] >= 0:
            p = cols[i] * H + rows[i]
            k_f[p] = min(k_f[p], (np.int64(bits[i, 0]) << 32) | i)
    range_m = np.empty((W, H), np.float32)
    el = np.empty((W, H), np.float32)
    hor = np.empty((W, H), np.float32)
    hgt = np.empty((W, H), np.float32)
    r_f, e_f, h_f, z_f = range_m.ravel(), el.ravel(), hor.ravel(), hgt.ravel()
    for p in range(W * H):
        k = k_f[p]
        if k == EMPTY_KEY:
            r_f[p] = e_f[p] = h_f[p] = z_f[p] = 0.0
        else:
            i = k & 0xFFFFFFFF
            r_f[p] = rec[i, 0]
            e_f[p] = rec[i, 1]
            h_f[p] = rec[i, 2]
            z_f[p] = rec[i, 3]
    return key, range_m, el, hor, hgt, rows, cols


def build_range_image(xyz: np.ndarray, ring: np.ndarray | None = None, *, n_beams: int = 64, n_cols: int = 2048,
                      valid: np.ndarray | None = None, min_range: float = 0.5) -> RangeImage:
    """Project a sweep onto its (beam, azimuth) grid.

    Args:
        xyz: (N, 3) float32/64 points in metres (LiDAR frame). ring: (N,) beam index or None (elevation binning).
        n_beams: rows when `ring` is None. n_cols: azimuth columns (2pi / n_cols rad each); 0 = estimated from the
        ring's azimuth step (see estimate_columns; 2048 without ring).
        valid: (N,) bool, points to use (others get row = col = -1). min_range: points closer (m) are ignored.
    Returns:
        RangeImage; each pixel keeps its nearest point.
    """
    xyz = np.asarray(xyz)
    if xyz.dtype != np.float32 and xyz.dtype != np.float64:
        xyz = xyz.astype(np.float32)
    n = len(xyz)
    valid = np.ones(n, np.bool_) if valid is None else np.ascontiguousarray(valid, dtype=np.bool_)
    ring = np.zeros(0, np.int64) if ring is None else np.ascontiguousarray(ring)
    n_ring = int(ring.max()) + 1 if len(ring) else 1
    rec, az = polar(xyz)
    rng, elev = rec[:, 0], rec[:, 1]
    use, sums, cnts, all_cnts, lo, hi = _used(rng, elev, valid, float(min_range), ring, n_ring)
    if len(ring):
        present = cnts > 0
        mean = np.where(present, sums / np.maximum(cnts, 1), -np.inf)
        order = np.argsort(-mean, kind="stable")  # top beam first
        rank = np.full(n_ring, -1, np.int32)
        rank[order[: int(present.sum())]] = np.arange(int(present.sum()))
        H = max(int(present.sum()), 1)
        if n_cols <= 0:
            n_cols = _columns_from_step(_median_step(az, ring, all_cnts.argmax(), all_cnts.max()), 8192)
    else:
        rank = np.zeros(0, np.int32)
        H = max(n_beams, 1)
        n_cols = n_cols if n_cols > 0 else 2048
    nearest, range_m, el, hor, hgt, rows, cols = _fill(rec, ring, rank, az, use, float(lo), float(hi), H, int(n_cols))
    return RangeImage(nearest_cm=nearest, range_cm=range_m, elevation_cm=el, horizontal_cm=hor, height_cm=hgt,
                      row=rows, col=cols, rng=rng)


@numba.njit(cache=True, inline="always", error_model="numpy")
def near_pixel(rng_i, d, rel_tol, abs_tol):  # pragma: no cover - numba
    """A point at range rng_i (m) belongs to its pixel, of range d (m), within abs_tol + rel_tol * d."""
    return abs(rng_i - d) <= abs_tol + rel_tol * d


@numba.njit(cache=True, error_model="numpy")
def _spread(pix_label, rows, cols, rng, range_m, rel_tol, abs_tol, out):  # pragma: no cover - numba
    """Column-major pixel labels -> points (see pixel_labels_to_points)."""
    for i in range(rows.shape[0]):
        r, c = rows[i], cols[i]
        if r < 0:
            continue
        if near_pixel(rng[i], range_m[c, r], rel_tol, abs_tol):
            out[i] = pix_label[c, r]
    return out


SPREAD_REL_TOL, SPREAD_ABS_TOL = 0.05, 0.3  # a point joins its pixel's label within 0.3 m + 5 % of its range


def pixel_labels_to_points(ri: RangeImage, pix_label: np.ndarray, *, rel_tol: float = SPREAD_REL_TOL,
                           abs_tol: float = SPREAD_ABS_TOL) -> np.ndarray:
    """Per-pixel labels -> per-point labels. A point that is not its pixel's representative takes the pixel's
    label only when its range is within `abs_tol + rel_tol * pixel range` metres of it, else 0.

    Args: pix_label (H, W) integer image. Returns: (N,) array of pix_label's dtype.
    """
    out = np.zeros(len(ri.row), dtype=pix_label.dtype)
    return _spread(np.ascontiguousarray(pix_label.T), ri.row, ri.col, ri.rng, ri.range_cm, rel_tol, abs_tol, out)
