"""Project a Frame's points into one of its cameras and draw them (a quick visual check of a reader)."""
from __future__ import annotations

import numpy as np


def project(points: np.ndarray, K: np.ndarray, T_cam_lidar: np.ndarray, width: int, height: int,
            near_m: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LiDAR points -> pixels.

    Args: points (N, >=3) m in the LiDAR frame; K (3, 3); T_cam_lidar (4, 4) LiDAR -> OpenCV camera.
    Returns: uv (M, 2) float pixels, depth (M,) m (camera z), index (M,) into points, for the points in front of
      the camera (z > near_m) whose pixel lies in [0, width) x [0, height).
    """
    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    cam = xyz @ np.asarray(T_cam_lidar)[:3, :3].T + np.asarray(T_cam_lidar)[:3, 3]
    front = np.nonzero(cam[:, 2] > near_m)[0]
    uvw = cam[front] @ np.asarray(K).T
    uv = uvw[:, :2] / uvw[:, 2:3]
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    return uv[inside], cam[front[inside], 2], front[inside]


def overlay(image: np.ndarray, uv: np.ndarray, depth: np.ndarray, max_depth_m: float = 50.0) -> np.ndarray:
    """HxWx3 uint8 copy of `image` with one 2x2 dot per projected point, coloured near = red ... far = blue."""
    out = np.array(image, dtype=np.uint8, copy=True)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    t = np.clip(depth / max_depth_m, 0, 1)
    colour = np.stack([255 * (1 - t), 255 * (1 - np.abs(2 * t - 1)), 255 * t], axis=1).astype(np.uint8)
    u, v = uv[:, 0].astype(int), uv[:, 1].astype(int)
    order = np.argsort(-depth)  # near points drawn last
    for du in (0, 1):
        for dv in (0, 1):
            uu, vv = np.clip(u[order] + du, 0, out.shape[1] - 1), np.clip(v[order] + dv, 0, out.shape[0] - 1)
            out[vv, uu] = colour[order]
    return out
