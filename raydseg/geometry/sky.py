"""Sky pixels from LiDAR rays without a return: the pseudo-labels' sky (a cross-modal cue the paper does not use).

A LiDAR ray that crosses the camera's view above the highest return of its image column, yet below the sensor's
top beam, met nothing within range: in a street scene that is sky. Per camera, the pixels whose viewing ray lies
above the column's highest visible return by more than a margin (`proposals.sky_margin_deg`: the gap to the next
beam, where nothing is known) and at or below the sweep's highest return elevation (the top beam) are sky. With
`proposals.sky_above_top_beam`, an open column (the top beam returned nothing there: the column's highest return
lies more than the margin below it) is sky above the top beam too, since nothing grounded stands in it up to the
range; a column whose top beam hit something (a façade) gets none either way. The rolling shutter is ignored
here: at infinity only the camera's rotation during readout moves a ray, by a fraction of a degree. On real
sensors far trees and buildings beyond range, glass and dark paint return nothing too, so the config resolves it
on for the synthetic world only (docs/results.md).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from raydseg.geometry.distortion import undistort_array


def pixel_elevation(K: np.ndarray, T_cam_lidar: np.ndarray, width: int, height: int,
                    distortion: np.ndarray | None = None) -> np.ndarray:
    """(height, width) float64 elevation (rad) in the LiDAR frame of each pixel centre's viewing ray (centres at
    integer coordinates, as `project_points` rounds); distortion (5,) k1, k2, p1, p2, k3 or None (pinhole)."""
    K = np.asarray(K, np.float64)
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    x = (u - K[0, 2] - K[0, 1] * (v - K[1, 2]) / K[1, 1]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    if distortion is not None:
        x, y = undistort_array(x, y, distortion)
    d = np.asarray(T_cam_lidar, np.float64)[:3, :3].T @ np.stack([x.ravel(), y.ravel(), np.ones(x.size)])
    return np.arctan2(d[2], np.hypot(d[0], d[1])).reshape(height, width)


def camera_elevation(K: np.ndarray, T_cam_lidar: np.ndarray, width: int, height: int,
                     distortion: np.ndarray | None = None) -> np.ndarray:
    """`pixel_elevation`, computed once per camera calibration (a sequence's frames share it); read-only."""
    key = (np.asarray(K, np.float64).tobytes(), np.asarray(T_cam_lidar, np.float64)[:3, :3].tobytes(), int(width),
           int(height), None if distortion is None else np.asarray(distortion, np.float64).tobytes())
    return _cached_elevation(key)


@lru_cache(maxsize=32)
def _cached_elevation(key: tuple) -> np.ndarray:
    K, R, width, height, dist = key
    T = np.eye(4)
    T[:3, :3] = np.frombuffer(R).reshape(3, 3)
    out = pixel_elevation(np.frombuffer(K).reshape(3, 3), T, width, height,
                          None if dist is None else np.frombuffer(dist))
    out.flags.writeable = False
    return out


def sky_pixels(elevation: np.ndarray, px: np.ndarray, py: np.ndarray, top_beam: float, margin: float,
               column_radius: int, above_top_beam: bool = False) -> np.ndarray:
    """(H, W) bool sky mask of one camera.

    elevation: (H, W) rad of each pixel (`pixel_elevation`); px, py: (M,) integer pixel coordinates of the visible
    LiDAR returns in the image (any kind: ground, segments, the rest); top_beam: rad, the sweep's highest return
    elevation; margin: rad above a column's highest return left unlabelled, and below the top beam for a column to
    count as open; column_radius: px, a column's highest return is the highest within this many columns either side
    (LiDAR columns are sparser than pixels, and a beam's scanline is not vertical in the image); above_top_beam:
    open columns' sky goes on above the top beam. Columns without a return within the radius get no sky, nor do
    columns whose highest return is within the margin of the top beam.
    """
    h, w = elevation.shape
    col, row = np.clip(px.astype(np.int64), 0, w - 1), np.clip(py.astype(np.int64), 0, h - 1)
    highest = np.full(w + 2 * column_radius, -np.inf)
    np.maximum.at(highest, col + column_radius, elevation[row, col])
    highest = np.lib.stride_tricks.sliding_window_view(highest, 2 * column_radius + 1).max(axis=1)
    highest[np.isneginf(highest)] = np.inf  # no return near the column: nothing is known there
    sky = elevation > highest[None, :] + margin
    if above_top_beam:
        return sky & (highest < top_beam - margin)[None, :]  # the top beam met nothing here: the sky goes on above it
    return sky & (elevation <= top_beam)


def top_beam_elevation(xyz: np.ndarray) -> float:
    """rad: the highest elevation of any return of the sweep ((N, 3) m, LiDAR frame), the top beam's where it hit."""
    xyz = np.asarray(xyz, np.float64)
    if not len(xyz):
        return -np.inf
    return float(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])).max())
