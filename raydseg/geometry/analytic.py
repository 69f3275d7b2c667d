"""Analytic test scenes: a spinning multi-beam LiDAR ray-cast against a ground plane and axis-aligned boxes.

Exact ground truth without a renderer, for unit tests and benchmarks. LiDAR frame x forward, y left, z up.
"""
from __future__ import annotations

import numpy as np

# forward-looking pinhole camera at the LiDAR origin: OpenCV axes (x right = -y, y down = -z, z forward = x)
R_CAM_LIDAR = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def camera(width: int = 320, height: int = 160, focal: float = 160.0) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), T_cam_lidar (4, 4)) of a forward camera at the LiDAR origin, principal point at the centre."""
    K = np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    T = np.eye(4)
    T[:3, :3] = R_CAM_LIDAR
    return K, T


def lidar_rays(beams: int = 32, columns: int = 1024, fov_up_deg: float = 2.0,
               fov_down_deg: float = -24.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions (beams * columns, 3) and ring (beams * columns,) uint8, ring 0 = lowest beam."""
    el = np.radians(np.linspace(fov_down_deg, fov_up_deg, beams))
    az = np.arange(columns) * (2 * np.pi / columns) - np.pi + np.pi / columns
    E, A = np.meshgrid(el, az, indexing="ij")
    d = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], -1).reshape(-1, 3)
    return d, np.repeat(np.arange(beams), columns).astype(np.uint8)


def raycast(boxes: list[tuple[tuple[float, float, float], tuple[float, float, float]]], *, sensor_height: float = 1.8,
            beams: int = 32, columns: int = 1024, fov_up_deg: float = 2.0, fov_down_deg: float = -24.0,
            max_range: float = 60.0, noise_m: float = 0.0, dropout: float = 0.0,
            seed: int = 0) -> dict[str, np.ndarray]:
    """Ray-cast a sweep.

    Args: boxes: list of (min corner, max corner) in metres, LiDAR frame (ground is z = -sensor_height).
    Returns dict: points (N, 4) float32 (intensity 0.5), ring (N,) uint8, instance (N,) int32 (0 = ground,
    k = box k-1 + 1), ground (N,) bool.
    """
    d, ring = lidar_rays(beams, columns, fov_up_deg, fov_down_deg)
    t = np.full(len(d), np.inf)
    inst = np.zeros(len(d), np.int32)
    down = d[:, 2] < -1e-9
    t[down] = -sensor_height / d[down, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        for k, (lo, hi) in enumerate(boxes):
            t1 = (np.asarray(lo) - 0.0) * inv
            t2 = (np.asarray(hi) - 0.0) * inv
            tmin = np.nanmax(np.minimum(t1, t2), axis=1)
            tmax = np.nanmin(np.maximum(t1, t2), axis=1)
            hit = (tmax >= tmin) & (tmin > 0) & (tmin < t)
            t[hit] = tmin[hit]
            inst[hit] = k + 1
    rng = np.random.default_rng(seed)
    keep = np.isfinite(t) & (t < max_range)
    if dropout > 0:
        keep &= rng.random(len(d)) >= dropout
    r = t[keep] + (rng.normal(0, noise_m, keep.sum()) if noise_m > 0 else 0.0)
    xyz = d[keep] * r[:, None]
    pts = np.concatenate([xyz, np.full((len(xyz), 1), 0.5)], 1).astype(np.float32)
    return {"points": pts, "ring": ring[keep], "instance": inst[keep], "ground": inst[keep] == 0}


def street_boxes() -> list[tuple[tuple[float, float, float], tuple[float, float, float]]]:
    """A few car-, pedestrian- and pole-sized boxes standing on the ground (z = -1.8), some in front of others."""
    g = -1.8
    return [
        ((8.0, -3.0, g), (12.0, -1.2, g + 1.5)),     # car ahead right
        ((10.0, 2.0, g), (10.6, 2.6, g + 1.8)),      # pedestrian ahead left
        ((16.0, 0.5, g), (20.0, 2.3, g + 1.6)),      # car further ahead, partly behind the pedestrian
        ((-9.0, 3.0, g), (-5.0, 4.8, g + 1.5)),      # car behind left
        ((5.0, -6.0, g), (5.3, -5.7, g + 4.0)),      # pole
        ((25.0, -12.0, g), (27.0, 12.0, g + 6.0)),   # wall across the street far ahead
    ]
