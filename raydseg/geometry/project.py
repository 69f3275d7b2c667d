"""LiDAR -> camera projection, label-aware z-buffer, and densification of projected segments into pixel masks.

Camera model (Frame contract): pixel = K (T_cam_lidar [x y z 1]^T)[:3] / depth, OpenCV camera (x right, y down,
z forward). Pixel (u, v) = (column, row) with pixel centres at integer coordinates (OpenCV): a point lands on
pixel (round(u), round(v)).

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


@numba.njit(cache=True, error_model="numpy")
def _project(xyz, P, width, height, near):  # pragma: no cover - numba
    n = xyz.shape[0]
    u = np.empty(n)
    v = np.empty(n)
    z = np.empty(n)
    inside = np.zeros(n, np.bool_)
    for i in range(n):
        x0, x1, x2 = np.float64(xyz[i, 0]), np.float64(xyz[i, 1]), np.float64(xyz[i, 2])
        a = P[0, 0] * x0 + P[0, 1] * x1 + P[0, 2] * x2 + P[0, 3]
        b = P[1, 0] * x0 + P[1, 1] * x1 + P[1, 2] * x2 + P[1, 3]
        zz = P[3, 0] * x0 + P[3, 1] * x1 + P[3, 2] * x2 + P[3, 3]
        w = P[2, 0] * x0 + P[2, 1] * x1 + P[2, 2] * x2 + P[2, 3]
        z[i] = zz
        if zz > near:
            u[i] = a / w
            v[i] = b / w
            inside[i] = u[i] >= -0.5 and u[i] < width - 0.5 and v[i] >= -0.5 and v[i] < height - 0.5
        else:
            u[i] = np.nan
            v[i] = np.nan
    return u, v, z, inside


def project_points(xyz: np.ndarray, K: np.ndarray, T_cam_lidar: np.ndarray, width: int, height: int,
                   near: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Project LiDAR points into a camera.

    Args: xyz (N, 3) m LiDAR frame; K (3, 3); T_cam_lidar (4, 4); width, height px; near: min depth (m).
    Returns: u (N,) float64 px, v (N,) float64 px (NaN behind `near`), depth (N,) float64 m (camera z),
    inside (N,) bool (depth > near and the rounded pixel lies in [0, width) x [0, height)).
    """
    T = np.asarray(T_cam_lidar, np.float64).reshape(4, 4)
    K = np.asarray(K, np.float64).reshape(3, 3)
    P = np.zeros((4, 4))
    P[:3] = K @ T[:3]
    P[3] = T[2]
    return _project(np.asarray(xyz)[:, :3], P, float(width), float(height), float(near))  # strided view, no copy


@numba.njit(cache=True, error_model="numpy")
def _visible(px, py, z, group, width, height, radius, rel_tol, abs_tol):  # pragma: no cover - numba
    n = px.shape[0]
    zmin = np.full((height, width), np.inf)
    gmin = np.zeros((height, width), np.int64)
    for i in range(n):
        if z[i] < zmin[py[i], px[i]]:
            zmin[py[i], px[i]] = z[i]
            gmin[py[i], px[i]] = group[i]
    vis = np.ones(n, np.bool_)
    for i in range(n):
        lim = z[i] - (abs_tol + rel_tol * z[i])
        for y in range(max(0, py[i] - radius), min(height, py[i] + radius + 1)):
            for x in range(max(0, px[i] - radius), min(width, px[i] + radius + 1)):
                if zmin[y, x] < lim and (gmin[y, x] != group[i] or group[i] == -1):
                    vis[i] = False
                    break
            if not vis[i]:
                break
    return vis


def visible_points(px: np.ndarray, py: np.ndarray, depth: np.ndarray, group: np.ndarray, width: int, height: int,
                   *, radius_px: int = 2, rel_tol: float = 0.05, abs_tol: float = 0.3) -> np.ndarray:
    """Z-buffer test of projected points (all inside the image).

    Args: px, py (M,) int pixel column/row; depth (M,) m; group (M,) int occlusion group (-1 = unsegmented, never
    shares a surface with anything); radius_px: neighbourhood half-size; rel_tol, abs_tol: depth margin.
    Returns (M,) bool visible.
    """
    return _visible(px.astype(np.int64), py.astype(np.int64), depth.astype(np.float64), group.astype(np.int64),
                    width, height, radius_px, rel_tol, abs_tol)


@numba.njit(cache=True, error_model="numpy")
def _densify(px, py, z, label, width, height, radius):  # pragma: no cover - numba
    best_d = np.full((height, width), radius * radius + 1, np.int32)  # squared px distance of the current owner
    best_z = np.full((height, width), np.inf)
    out = np.zeros((height, width), np.int32)
    half = np.empty(2 * radius + 1, np.int64)  # half-width of the disc on each row offset: visit the disc only
    for dy in range(-radius, radius + 1):
        half[dy + radius] = int(np.floor(np.sqrt(radius * radius - dy * dy) + 1e-9))
    for i in range(px.shape[0]):
        zi, li = z[i], label[i]
        for y in range(max(0, py[i] - radius), min(height, py[i] + radius + 1)):
            dy = y - py[i]
            h = half[dy + radius]
            dy2 = dy * dy
            bd, bz, o = best_d[y], best_z[y], out[y]
            for x in range(max(0, px[i] - h), min(width, px[i] + h + 1)):
                dx = x - px[i]
                d = dx * dx + dy2
                if d < bd[x] or (d == bd[x] and zi < bz[x]):
                    bd[x] = d
                    bz[x] = zi
                    o[x] = li
    return out


def densify_segments(px: np.ndarray, py: np.ndarray, depth: np.ndarray, label: np.ndarray, width: int, height: int,
                     *, radius_px: int = 4) -> np.ndarray:
    """Nearest-visible-point label assignment within `radius_px` (see module doc).

    Args: px, py (M,) int pixels of the visible points; depth (M,) m; label (M,) int segment id (0 = ground or
    unsegmented, still competing). Returns (height, width) uint16 segment-id image, 0 = no segment.
    """
    out = _densify(px.astype(np.int64), py.astype(np.int64), depth.astype(np.float64), label.astype(np.int64),
                   width, height, int(radius_px))
    return out.astype(np.uint16)


def project_segments(xyz: np.ndarray, seg: np.ndarray, ground: np.ndarray, K: np.ndarray, T_cam_lidar: np.ndarray,
                     width: int, height: int, *, near: float = 0.5, use: np.ndarray | None = None,
                     zbuf_radius_px: int = 2, zbuf_rel_tol: float = 0.05, zbuf_abs_tol: float = 0.3,
                     radius_px: int = 4) -> dict[str, np.ndarray | int]:
    """Segment-id image and ground-hit mask of one camera.

    Args: xyz (N, 3) m; seg (N,) uint16 ids (0 none); ground (N,) bool; K, T_cam_lidar; width, height px;
    use (N,) bool points to project (None = all).
    Returns dict: `segment_ids` (H, W) uint16, `ground_px` (H, W) uint8 (1 = hit by a visible ground point),
    `n_in_image` points in front of the camera inside the image, `n_visible` after the z-buffer.
    """
    u, v, z, inside = project_points(xyz, K, T_cam_lidar, width, height, near)
    if use is not None:
        inside &= use
    idx = np.flatnonzero(inside)
    px = np.floor(u[idx] + 0.5).astype(np.int64)
    py = np.floor(v[idx] + 0.5).astype(np.int64)
    s = seg[idx].astype(np.int64)
    g = ground[idx]
    group = np.where(s > 0, s, np.where(g, 0, -1))
    vis = visible_points(px, py, z[idx], group, width, height, radius_px=zbuf_radius_px, rel_tol=zbuf_rel_tol,
                         abs_tol=zbuf_abs_tol)
    px, py, zv, s, g = px[vis], py[vis], z[idx][vis], s[vis], g[vis]
    seg_img = densify_segments(px, py, zv, s, width, height, radius_px=radius_px)
    ground_img = np.zeros((height, width), np.uint8)
    ground_img[py[g], px[g]] = 1
    return {"segment_ids": seg_img, "ground_px": ground_img, "n_in_image": int(len(idx)), "n_visible": int(vis.sum())}
