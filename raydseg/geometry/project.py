"""LiDAR -> camera projection, label-aware z-buffer, and densification of projected segments into pixel masks.

Camera model (Frame contract): pixel = K (T_cam_lidar [x y z 1]^T)[:3] / depth, OpenCV camera (x right, y down,
z forward); with a rolling shutter the camera point first moves to where the camera saw it at its capture time
(`raydseg.geometry.rolling_shutter`; depth is then the depth at that time); with lens distortion (k1, k2, p1, p2,
k3) the normalised coordinates pass through `raydseg.geometry.distortion` before K. Pixel (u, v) = (column, row)
with pixel centres at integer coordinates (OpenCV): a point lands on pixel (round(u), round(v)).

Occlusion: a projected point is dropped when, within `zbuf_radius_px` pixels, there is a nearer point
(by more than `abs_tol + rel_tol * depth`) with a *different* occlusion group (segment id, ground, or
unsegmented): points of one surface never hide each other, a foreground object hides the background points
that fall between its sparse points.

Densification: nearest-visible-point assignment within `radius_px` (a Voronoi partition of the image around
the visible projected points, cut at the radius). Every visible point competes -- ground and unsegmented points
too (they claim pixels for label 0) -- so a segment's mask stops halfway to the next surface instead of
bleeding over it; ties in pixel distance go to the nearer depth.
"""
from __future__ import annotations

import numba
import numpy as np

from raydseg.geometry.distortion import MAX_RADIAL, MIN_RADIAL, distort_radial
from raydseg.geometry.range_image import EMPTY_KEY
from raydseg.geometry.rolling_shutter import ROLLING_SHUTTER_SIZE, capture_point

SKY_PX = 2  # `ground_px` value of a sky pixel (1 = ground)
LENS_SIZE = 10  # fx, s, cx, fy, cy, k1, k2, p1, p2, k3: `_camera`'s lens without a rolling shutter


@numba.njit(cache=True, inline="always", error_model="numpy")
def _pixel(a, b, w, lens):  # pragma: no cover - numba
    """(u, v, inside the lens model's valid region) from a point's rows of `_camera`'s P: a / w, b / w for a pinhole
    (lens empty), else the normalised (a / w, b / w) distorted through lens = (fx, s, cx, fy, cy, k1, k2, p1, p2, k3,
    [rolling shutter]) and mapped by K."""
    if lens.shape[0] == 0:
        return a / w, b / w, True
    xd, yd, radial = distort_radial(a / w, b / w, lens[5:LENS_SIZE])
    return lens[0] * xd + lens[1] * yd + lens[2], lens[3] * yd + lens[4], MIN_RADIAL < radial < MAX_RADIAL


@numba.njit(cache=True, inline="always", error_model="numpy")
def _point(xyz, i, P, lens):  # pragma: no cover - numba
    """(a, b, w, depth) of point i for `_pixel`: P's rows applied to it; with a rolling shutter (lens longer than
    LENS_SIZE) the camera point at its capture time (depth = w = its z then; a point behind the camera at T's time
    stays there)."""
    x0, x1, x2 = np.float64(xyz[i, 0]), np.float64(xyz[i, 1]), np.float64(xyz[i, 2])
    a = P[0, 0] * x0 + P[0, 1] * x1 + P[0, 2] * x2 + P[0, 3]
    b = P[1, 0] * x0 + P[1, 1] * x1 + P[1, 2] * x2 + P[1, 3]
    w = P[2, 0] * x0 + P[2, 1] * x1 + P[2, 2] * x2 + P[2, 3]
    if lens.shape[0] > LENS_SIZE and w > 0:
        a, b, w, _ = capture_point(a, b, w, lens[LENS_SIZE:])
        return a, b, w, w
    return a, b, w, P[3, 0] * x0 + P[3, 1] * x1 + P[3, 2] * x2 + P[3, 3]


@numba.njit(cache=True, error_model="numpy")
def _project(xyz, P, lens, width, height, near):  # pragma: no cover - numba
    n = xyz.shape[0]
    u = np.empty(n)
    v = np.empty(n)
    z = np.empty(n)
    inside = np.zeros(n, np.bool_)
    for i in range(n):
        a, b, w, zz = _point(xyz, i, P, lens)
        z[i] = zz
        u[i] = np.nan
        v[i] = np.nan
        if zz > near:
            uu, vv, ok = _pixel(a, b, w, lens)
            if ok:
                u[i] = uu
                v[i] = vv
                inside[i] = uu >= -0.5 and uu < width - 0.5 and vv >= -0.5 and vv < height - 0.5
    return u, v, z, inside


def project_points(xyz: np.ndarray, K: np.ndarray, T_cam_lidar: np.ndarray, width: int, height: int,
                   near: float = 0.5, distortion: np.ndarray | None = None,
                   rolling_shutter: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Project LiDAR points into a camera.

    Args: xyz (N, 3) m LiDAR frame; K (3, 3); T_cam_lidar (4, 4); width, height px; near: min depth (m);
    distortion (5,) k1, k2, p1, p2, k3 or None (pinhole); rolling_shutter (9,) the camera's motion and readout
    (`raydseg.geometry.rolling_shutter`) or None (global shutter at T_cam_lidar's time).
    Returns: u (N,) float64 px, v (N,) float64 px (NaN behind `near` or outside the lens model's valid region),
    depth (N,) float64 m (camera z, at the capture time; NaN where the rolling shutter's capture time does not
    settle, `capture_point`), inside (N,) bool (u, v defined and the rounded pixel in [0, width) x [0, height)).
    """
    P, lens = _camera(K, T_cam_lidar, distortion, rolling_shutter)
    return _project(np.asarray(xyz)[:, :3], P, lens, float(width), float(height), float(near))  # strided, no copy


def _camera(K: np.ndarray, T_cam_lidar: np.ndarray, distortion: np.ndarray | None,
            rolling_shutter: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P (4, 4) float64, lens (0,), (LENS_SIZE,) or (LENS_SIZE + 9,) float64) for `_point` and `_pixel`. Pinhole
    (no or all-zero distortion, no rolling shutter): P rows 0-2 = K [R | t] (homogeneous pixel), lens empty.
    Otherwise P rows 0-2 = [R | t] (camera coordinates), lens = (fx, s, cx, fy, cy, k1, k2, p1, p2, k3) followed by
    the rolling-shutter record when there is one. Row 3 = the camera z (depth) row of T."""
    T = np.asarray(T_cam_lidar, np.float64).reshape(4, 4)
    K = np.asarray(K, np.float64).reshape(3, 3)
    dist = np.zeros(5) if distortion is None else np.asarray(distortion, np.float64).reshape(5)
    P = np.zeros((4, 4))
    P[3] = T[2]
    if not dist.any() and rolling_shutter is None:
        P[:3] = K @ T[:3]
        return P, np.zeros(0)
    P[:3] = T[:3]
    rs = np.zeros(0) if rolling_shutter is None else np.asarray(rolling_shutter, np.float64).reshape(
        ROLLING_SHUTTER_SIZE)
    return P, np.concatenate([[K[0, 0], K[0, 1], K[0, 2], K[1, 1], K[1, 2]], dist, rs])


@numba.njit(cache=True, error_model="numpy")
def _project_inside(xyz, use, seg, ground, P, lens, width, height, near):  # pragma: no cover - numba
    """The used points inside the image, compacted: pixel column / row (int32), depth (float32 m), segment id
    and occlusion group (int32: segment id, 0 = ground, -1 = unsegmented)."""
    n = xyz.shape[0]
    px = np.empty(n, np.int32)
    py = np.empty(n, np.int32)
    z = np.empty(n, np.float32)
    label = np.empty(n, np.int32)
    group = np.empty(n, np.int32)
    m = 0
    for i in range(n):
        if not use[i]:
            continue
        a, b, w, zz = _point(xyz, i, P, lens)
        if not zz > near:
            continue
        u, v, ok = _pixel(a, b, w, lens)
        if ok and u >= -0.5 and u < width - 0.5 and v >= -0.5 and v < height - 0.5:
            px[m] = int(np.floor(u + 0.5))
            py[m] = int(np.floor(v + 0.5))
            z[m] = zz
            label[m] = seg[i]
            group[m] = seg[i] if seg[i] > 0 else (0 if ground[i] else -1)
            m += 1
    return px[:m], py[:m], z[:m], label[:m], group[:m]


def _check_depths(depth: np.ndarray) -> None:
    """The packed keys order depths by their float bits, which holds for positive floats only."""
    if len(depth) and not np.min(depth) > 0:
        raise ValueError(f"depths must be positive (points in front of the camera), got min {np.min(depth)}")


@numba.njit(cache=True, inline="always", error_model="numpy")
def _fmin_into(acc, src):  # pragma: no cover - numba
    """acc = min(acc, src) elementwise over two equal-length float32 rows without NaN (vectorises)."""
    for x in range(acc.shape[0]):
        acc[x] = src[x] if src[x] < acc[x] else acc[x]


@numba.njit(cache=True, error_model="numpy")
def _row_band(py, mask, height):  # pragma: no cover - numba
    """Lowest and highest row of the points where mask is set ((height, -1) when none)."""
    lo, hi = height, -1
    for i in range(py.shape[0]):
        if mask[i]:
            lo = min(lo, py[i])
            hi = max(hi, py[i])
    return lo, hi


@numba.njit(cache=True, error_model="numpy")
def _visible(px, py, z, group, width, height, radius, rel_tol, abs_tol):  # pragma: no cover - numba
    """Z-buffer over the points' row band: per pixel the nearest point's (float32 depth bits << 32 | group + 1)
    -- positive floats order as their bits, so one int64 min keeps the depth and its group. A point is visible at
    once when its square window's min depth (separable min filter over a float32 depth image, vectorised) is not
    in front of it by the margin; only the others are tested pixel by pixel for a nearer point of another group."""
    n = px.shape[0]
    vis = np.ones(n, np.bool_)
    lo, hi = _row_band(py, vis, height)
    if hi < 0:
        return vis
    nb = hi - lo + 1
    key = np.full((nb, width), EMPTY_KEY, np.int64)
    zimg = np.full((nb, width), np.inf, np.float32)  # the nearest depth alone, for the window min below
    zbits = z.view(np.int32)
    for i in range(n):
        k = (np.int64(zbits[i]) << 32) | (group[i] + 1)
        r, x = py[i] - lo, px[i]
        key[r, x] = min(key[r, x], k)
        zimg[r, x] = min(zimg[r, x], z[i])
    rows = zimg.copy()  # window min along rows, then along columns
    for r in range(nb):
        for d in range(1, min(radius, width - 1) + 1):
            _fmin_into(rows[r, :width - d], zimg[r, d:])
            _fmin_into(rows[r, d:], zimg[r, :width - d])
    win = rows.copy()
    for r in range(nb):
        for d in range(1, radius + 1):
            if r - d >= 0:
                _fmin_into(win[r], rows[r - d])
            if r + d < nb:
                _fmin_into(win[r], rows[r + d])
    kz = key.view(np.float32)  # little-endian: [..., 2 * x] = group + 1 (int32 bits), [..., 2 * x + 1] = depth
    kg = key.view(np.int32)
    for i in range(n):
        lim = z[i] - (abs_tol + rel_tol * np.float64(z[i]))
        r0 = py[i] - lo
        if not win[r0, px[i]] < lim:
            continue
        g = group[i]
        hidden = False
        for y in range(max(0, r0 - radius), min(nb, r0 + radius + 1)):
            zr, gr = kz[y], kg[y]
            for x in range(max(0, px[i] - radius), min(width, px[i] + radius + 1)):
                hidden |= (zr[2 * x + 1] < lim) & ((gr[2 * x] - 1 != g) | (g == -1))
            if hidden:
                break
        vis[i] = not hidden
    return vis


def visible_points(px: np.ndarray, py: np.ndarray, depth: np.ndarray, group: np.ndarray, width: int, height: int,
                   *, radius_px: int = 2, rel_tol: float = 0.05, abs_tol: float = 0.3) -> np.ndarray:
    """Z-buffer test of projected points (all inside the image).

    Args: px, py (M,) int pixel column/row; depth (M,) m (compared in float32, the points' precision); group (M,)
    int occlusion group (-1 = unsegmented, never shares a surface with anything); radius_px: neighbourhood
    half-size; rel_tol, abs_tol: depth margin.
    Returns (M,) bool visible.
    """
    _check_depths(depth)
    return _visible(px.astype(np.int32), py.astype(np.int32), depth.astype(np.float32), group.astype(np.int32),
                    width, height, radius_px, rel_tol, abs_tol)


MAX_DENSIFY_RADIUS_PX = 90  # 2 * radius^2 added to the empty key's 2^15 distance field must stay below 2^16
_NONE = np.int64(1) << 62  # densify: no point. Its distance field (bits 47-62) = 2^15 is above any disc's r^2,
# and adding squared distances (< 2^15) neither overflows nor reaches a real key


@numba.njit(cache=True, inline="always", error_model="numpy")
def _min_add_into(acc, src, add):  # pragma: no cover - numba
    """acc = min(acc, src + add) elementwise over two equal-length int64 rows (vectorises)."""
    for x in range(acc.shape[0]):
        acc[x] = min(acc[x], src[x] + add)


@numba.njit(cache=True, error_model="numpy")
def _densify(px, py, z, label, vis, width, height, radius, n_labels):  # pragma: no cover - numba
    """Owner of every pixel = min over the visible points within the radius of
    (squared px distance << 47 | float32 depth bits << 16 | label): nearest point, ties to the nearer depth.

    A source pixel holding several points offers its nearest-depth one (the only one that can win). The disc is
    split into its rows: per source row and half-width h, M_h[x] = min over |dx| <= h of the source key at x + dx
    plus dx^2 << 47 (built h by h); an output row is then the min over the disc's rows dy of M_h(dy) of source row
    y + dy plus dy^2 << 47. All as vectorised int64 mins over image rows.
    Returns the (height, width) uint16 label image and the pixel count of every label 0..n_labels."""
    out = np.zeros((height, width), np.uint16)
    counts = np.zeros(n_labels + 1, np.int64)
    lo, hi = _row_band(py, vis, height)
    if hi < 0:
        counts[0] = height * width
        return out, counts
    nb = hi - lo + 1
    src = np.full((nb, width), _NONE, np.int64)  # per pixel: min (depth bits << 16 | label) of its points
    has = np.zeros(nb, np.bool_)
    zbits = z.view(np.int32)
    for i in range(px.shape[0]):
        if vis[i]:
            k = (np.int64(zbits[i]) << 16) | label[i]
            r = py[i] - lo
            if k < src[r, px[i]]:
                src[r, px[i]] = k
            has[r] = True
    half = np.empty(2 * radius + 1, np.int64)  # half-width of the disc on each row offset
    for dy in range(-radius, radius + 1):
        half[dy + radius] = min(int(np.floor(np.sqrt(radius * radius - dy * dy) + 1e-9)), width - 1)
    R = 2 * radius + 1
    m = np.empty((R, radius + 1, width), np.int64)  # M_h of the last R source rows (ring buffer by row)
    done = -1  # source rows < done + 1 have their M_h
    acc = np.empty(width, np.int64)
    y0, y1 = max(0, lo - radius), min(height, hi + radius + 1)
    for y in range(y0, y1):
        while done < min(nb - 1, y + radius - lo):
            done += 1
            if not has[done]:
                continue
            mh = m[done % R]
            mh[0] = src[done]
            for h in range(1, min(radius, width - 1) + 1):
                mh[h] = mh[h - 1]
                add = np.int64(h * h) << 47
                _min_add_into(mh[h, :width - h], src[done, h:], add)
                _min_add_into(mh[h, h:], src[done, :width - h], add)
        acc[:] = _NONE
        for dy in range(-radius, radius + 1):
            ys = y + dy - lo
            if 0 <= ys < nb and has[ys]:
                _min_add_into(acc, m[ys % R, half[dy + radius]], np.int64(dy * dy) << 47)
        o = out[y]
        cur, run = 0, 0  # count runs of one label in a register (a memory increment per pixel serialises)
        for x in range(width):
            lab = 0 if acc[x] >= _NONE else acc[x] & 0xFFFF
            o[x] = lab
            if lab != cur:
                counts[cur] += run
                cur, run = lab, 0
            run += 1
        counts[cur] += run
    counts[0] += (height - (y1 - y0)) * width
    return out, counts


def densify_segments(px: np.ndarray, py: np.ndarray, depth: np.ndarray, label: np.ndarray, width: int, height: int,
                     *, radius_px: int = 4) -> np.ndarray:
    """Nearest-visible-point label assignment within `radius_px` (see module doc).

    Args: px, py (M,) int pixels of the visible points; depth (M,) m; label (M,) int segment id in [0, 65535]
    (0 = ground or unsegmented, still competing). Returns (height, width) uint16 segment-id image, 0 = no segment.
    """
    if not 0 <= radius_px <= MAX_DENSIFY_RADIUS_PX:
        raise ValueError(f"densify radius_px must be in [0, {MAX_DENSIFY_RADIUS_PX}], got {radius_px}")
    _check_depths(depth)
    label = np.asarray(label)
    out, _ = _densify(px.astype(np.int32), py.astype(np.int32), depth.astype(np.float32), label.astype(np.int32),
                      np.ones(len(label), np.bool_), width, height, int(radius_px), int(label.max(initial=0)))
    return out


@numba.njit(cache=True, error_model="numpy")
def _fill_columns(img, ground_id, seg_gap, ground_gap):  # pragma: no cover - numba
    """Close the vertical gaps of a densified label image in place, column by column.

    An empty run (label 0) whose pixels above and below carry the same label L is filled with L when it is at most
    `ground_gap` rows long (L = ground_id) or `seg_gap` rows (a segment, 0 < L < ground_id); other labels (the
    unsegmented points' id) are never filled. Below the lowest labelled pixel of a column, a ground pixel is
    extended to the image bottom when that is at most `ground_gap` rows. A run bounded by two different labels is
    an occlusion boundary and stays empty, so a mask never grows over another surface."""
    H, W = img.shape
    for x in range(W):
        prev, prev_y = 0, -1
        for y in range(H):
            lab = img[y, x]
            if lab == 0:
                continue
            if lab == prev and y - prev_y > 1:
                gap = y - prev_y - 1
                lim = ground_gap if lab == ground_id else (seg_gap if lab < ground_id else -1)
                if gap <= lim:
                    for yy in range(prev_y + 1, y):
                        img[yy, x] = lab
            prev, prev_y = lab, y
        if prev == ground_id and prev_y >= 0 and H - 1 - prev_y <= ground_gap:
            for yy in range(prev_y + 1, H):
                img[yy, x] = ground_id


def fill_masks(labels: np.ndarray, ground_id: int, seg_gap_px: int, ground_gap_px: int) -> np.ndarray:
    """Filled silhouettes from a densified label image (copy; see `_fill_columns`).

    Args: labels (H, W) int: 0 = no point, 1 .. ground_id - 1 segment ids, ground_id = ground, > ground_id
    unsegmented points; seg_gap_px / ground_gap_px: the longest vertical gap closed inside a segment / between
    ground scanlines (0 = none). Returns (H, W) same dtype.
    """
    out = np.array(labels, copy=True)
    if seg_gap_px > 0 or ground_gap_px > 0:
        _fill_columns(out, out.dtype.type(ground_id), int(seg_gap_px), int(ground_gap_px))
    return out


@numba.njit(cache=True, error_model="numpy")
def _ground_hits(px, py, vis, group, width, height):  # pragma: no cover - numba
    """(height, width) uint8 image, 1 = hit by a visible ground point (group 0), and the number of visible points."""
    img = np.zeros((height, width), np.uint8)
    n_vis = 0
    for i in range(px.shape[0]):
        n_vis += vis[i]
        if vis[i] and group[i] == 0:
            img[py[i], px[i]] = 1
    return img, n_vis


def project_segments(xyz: np.ndarray, seg: np.ndarray, ground: np.ndarray, K: np.ndarray, T_cam_lidar: np.ndarray,
                     width: int, height: int, *, distortion: np.ndarray | None = None,
                     rolling_shutter: np.ndarray | None = None, near: float = 0.5,
                     use: np.ndarray | None = None,
                     zbuf_radius_px: int = 2, zbuf_rel_tol: float = 0.05, zbuf_abs_tol: float = 0.3,
                     radius_px: int = 4, fill_gap_px: int = 0, ground_fill_px: int = 0,
                     sky_margin_deg: float = -1.0, top_beam: float | None = None,
                     sky_above_top_beam: bool = False) -> dict[str, np.ndarray | int]:
    """Segment-id image and ground mask of one camera.

    Args: xyz (N, 3) m; seg (N,) uint16 ids (0 none); ground (N,) bool; K, T_cam_lidar; width, height px;
    distortion (5,) k1, k2, p1, p2, k3 or None (pinhole; `project_points`); rolling_shutter (9,) or None (global
    shutter; `project_points`); use (N,) bool points to project
    (None = all); fill_gap_px / ground_fill_px: vertical gaps closed inside a segment's mask / between ground
    scanlines (`fill_masks`; both 0 = the plain densification). Occlusion and densification work on the (distorted)
    pixels, where the image is: their radii are pixel radii either way. sky_margin_deg >= 0: also mark the sky,
    the pixels crossed by rays without a return (`raydseg.geometry.sky`), that neither a segment nor the ground owns;
    top_beam: the sweep's top-beam elevation (rad; None = `top_beam_elevation(xyz)`, which a sweep's cameras share);
    sky_above_top_beam: open columns' sky goes on above the top beam (`sky_pixels`).
    Returns dict: `segment_ids` (H, W) uint16, `ground_px` (H, W) uint8 (1 = ground: with ground_fill_px 0 the
    pixels hit by a visible ground point, else the pixels the densified and filled ground owns; SKY_PX = sky),
    `n_in_image` points in front of the camera inside the image, `n_visible` after the z-buffer, `n_pixels`
    (max(seg) + 1,) int64 pixel count of every segment id.
    """
    if not 0 <= radius_px <= MAX_DENSIFY_RADIUS_PX:
        raise ValueError(f"densify radius_px must be in [0, {MAX_DENSIFY_RADIUS_PX}], got {radius_px}")
    if near < 0:
        raise ValueError(f"near must be >= 0 m (depths are packed as positive floats), got {near}")
    use = np.ones(len(xyz), np.bool_) if use is None else np.asarray(use, np.bool_)
    P, lens = _camera(K, T_cam_lidar, distortion, rolling_shutter)
    px, py, z, label, group = _project_inside(np.asarray(xyz)[:, :3], use, seg, ground, P, lens, float(width),
                                              float(height), float(near))
    vis = _visible(px, py, z, group, width, height, zbuf_radius_px, zbuf_rel_tol, zbuf_abs_tol)
    n_seg = int(seg.max(initial=0))
    ground_img, n_vis = _ground_hits(px, py, vis, group, width, height)
    if fill_gap_px > 0 or ground_fill_px > 0:
        if n_seg + 2 > 0xFFFF:
            raise ValueError(f"{n_seg} segments leave no label for the ground in a uint16 image")
        # ground and unsegmented points own pixels under labels of their own, then the column fill closes the gaps
        dense_label = np.where(group >= 0, np.where(group == 0, n_seg + 1, label), n_seg + 2).astype(np.int32)
        dense, _ = _densify(px, py, z, dense_label, vis, width, height, int(radius_px), n_seg + 2)
        dense = fill_masks(dense, n_seg + 1, fill_gap_px, ground_fill_px)
        if ground_fill_px > 0:
            ground_img = (dense == n_seg + 1).astype(np.uint8)
        seg_img = np.where(dense <= n_seg, dense, 0).astype(np.uint16)
        n_px = np.bincount(seg_img.ravel(), minlength=n_seg + 1).astype(np.int64)
    else:
        seg_img, n_px = _densify(px, py, z, label, vis, width, height, int(radius_px), n_seg)
    if sky_margin_deg >= 0:
        from raydseg.geometry.sky import camera_elevation, sky_pixels, top_beam_elevation

        sky = sky_pixels(camera_elevation(K, T_cam_lidar, width, height, distortion), px[vis > 0], py[vis > 0],
                         top_beam_elevation(np.asarray(xyz)[:, :3]) if top_beam is None else top_beam,
                         np.radians(sky_margin_deg), int(radius_px), sky_above_top_beam)
        ground_img[sky & (seg_img == 0) & (ground_img == 0)] = SKY_PX
    return {"segment_ids": seg_img, "ground_px": ground_img, "n_in_image": int(len(px)), "n_visible": n_vis,
            "n_pixels": n_px}
