"""Frame selection shared by the real sources: cameras, frame stride, max frames, LiDAR-camera time sync.

Sources enumerate their frames per shard in `list_shards`, then call `apply_stride_and_limit` so that
`data.frame_stride` applies within each sequence and `data.max_frames` over the whole dataset (shards are cut,
emptied shards dropped). `sync_reason` is the reject reason for a frame whose camera timestamps differ from the
LiDAR timestamp by more than `data.sync_tolerance_us` (0 = no check).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def select_cameras(available: list[str], wanted: list[str]) -> list[str]:
    """Cameras to keep, in the source's order: all of `available` when `wanted` is empty."""
    if not wanted:
        return list(available)
    return [c for c in available if c in set(wanted)]


def apply_stride_and_limit(shards: list[dict[str, Any]], stride: int, max_frames: int,
                           key: str = "frames") -> list[dict[str, Any]]:
    """Keep every `stride`-th entry of each shard's `key` list, then at most `max_frames` in total (0 = all)."""
    out, total = [], 0
    for s in shards:
        frames = list(s[key])[:: max(int(stride), 1)]
        if max_frames:
            frames = frames[: max(int(max_frames) - total, 0)]
        if frames:
            out.append({**s, key: frames})
            total += len(frames)
    return out


def sync_reason(lidar_us: int, camera_us: dict[str, int], tolerance_us: int) -> str | None:
    """Reject reason when any camera timestamp (us) is further than `tolerance_us` from the LiDAR one, else None."""
    if not tolerance_us:
        return None
    worst = [(abs(int(t) - int(lidar_us)), name) for name, t in camera_us.items()]
    bad = [(d, n) for d, n in worst if d > tolerance_us]
    if not bad:
        return None
    d, n = max(bad)
    return (f"time sync: camera {n} timestamp differs from LiDAR by {d} us > sync_tolerance_us={tolerance_us} "
            f"({len(bad)} camera(s) out of tolerance)")


def rigid(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(4, 4) float64 homogeneous transform from a (3, 3) rotation and a (3,) translation."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, dtype=np.float64)
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def quat_to_matrix(q: list[float] | np.ndarray) -> np.ndarray:
    """(3, 3) rotation from a unit quaternion (w, x, y, z), nuScenes / pyquaternion order."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quat(R: np.ndarray) -> list[float]:
    """Unit quaternion (w, x, y, z) of a (3, 3) rotation (for writing fixtures)."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = np.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2]) * 2
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2]) * 2
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1]) * 2
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    return (q / np.linalg.norm(q)).tolist()


def euler_to_matrix(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations Rz(yaw) @ Ry(pitch) @ Rx(roll) (Waymo's 3-2-1 convention), angles in radians."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    R = np.empty(np.shape(roll) + (3, 3))
    R[..., 0, 0] = cy * cp
    R[..., 0, 1] = cy * sp * sr - sy * cr
    R[..., 0, 2] = cy * sp * cr + sy * sr
    R[..., 1, 0] = sy * cp
    R[..., 1, 1] = sy * sp * sr + cy * cr
    R[..., 1, 2] = sy * sp * cr - cy * sr
    R[..., 2, 0] = -sp
    R[..., 2, 1] = cp * sr
    R[..., 2, 2] = cp * cr
    return R
