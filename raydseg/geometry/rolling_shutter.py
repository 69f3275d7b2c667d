"""Rolling shutter: the camera moves while its image is read out, so each image line sees the world at its own time.
The one home of the motion model; the projection kernels (`raydseg.geometry.project`) call `capture_point` per point.

A camera record's `rolling_shutter` (Frame contract, `raydseg.data.schema`) is 9 float64 values
    (v_x, v_y, v_z, w_x, w_y, w_z, t0, dt_dx, dt_dy)
in the OpenCV camera frame of `T_cam_lidar` ("camera 0": x right, y down, z forward, the camera at the time
`T_cam_lidar` holds):
  v (m/s): velocity of the camera's optical centre relative to the scene, in camera-0 axes;
  w (rad/s): angular velocity of the camera, in camera-0 axes;
  t0, dt_dx, dt_dy (s, s per unit of x, s per unit of y): the time a point is captured, relative to T_cam_lidar's,
    t = t0 + dt_dx x + dt_dy y, with (x, y) = (X / Z, Y / Z) the point's undistorted normalised coordinates in the
    camera at that time. A top-to-bottom readout has dt_dx = 0 and dt_dy > 0, right-to-left dt_dx < 0, dt_dy = 0.
Over the readout (tens of ms) the motion is first order, as in Waymo's camera_model.cc: a point p0 (camera-0
coordinates, static in the scene) is seen by the camera at time t at
    p(t) = (I - t [w]x) (p0 - t v),      [w]x q = w x q,
and the point's pixel is that of p(t*) where t* solves t = t0 + dt_dx x(p(t)) + dt_dy y(p(t)) (`capture_point`:
Newton's method, as camera_model.cc solves the same 1-d problem). Null / absent = a global shutter: every point is seen at T_cam_lidar's time.
"""
from __future__ import annotations

import numba
import numpy as np

ROLLING_SHUTTER_SIZE = 9  # v (3), w (3), t0, dt_dx, dt_dy
MAX_NEWTON_STEPS = 4  # camera_model.cc's kMaxIterNum
NEWTON_TOLERANCE_S = 1e-6  # a step below this ends the iteration: Newton's next error is ~ step^2 x O(10 / s)
CONVERGED_S = 1e-5  # a point whose last step is larger is not projected (z = NaN)


@numba.njit(cache=True, inline="always", error_model="numpy")
def capture_point(p0, p1, p2, rs):  # pragma: no cover - numba
    """Camera-0 point (p0, p1, p2) (m, z > 0) -> the point in the camera at its capture time (m) and that time
    (s, relative to T_cam_lidar's); rs = the 9-value record (module doc).

    p(t) = (I - t [w]x)(p0 - t v) = p0 - t A + t^2 B with A = v + w x p0, B = w x v, exactly. Newton's method on
    z^2 (t - t0 - dt_dx x - dt_dy y) (one division a step) from t = t0, ended by a step below NEWTON_TOLERANCE_S,
    as camera_model.cc (Newton from the pose time, at most 4 steps). A point that passes behind the camera (z <= 0)
    is returned as it is there, for the caller's depth test to drop; one whose last step is above CONVERGED_S (far
    outside the field of view at a tiny depth, where the first-order motion means nothing) gets z = NaN."""
    v0, v1, v2, w0, w1, w2, t0, ax, ay = rs[0], rs[1], rs[2], rs[3], rs[4], rs[5], rs[6], rs[7], rs[8]
    a0, a1, a2 = v0 + w1 * p2 - w2 * p1, v1 + w2 * p0 - w0 * p2, v2 + w0 * p1 - w1 * p0
    b0, b1, b2 = w1 * v2 - w2 * v1, w2 * v0 - w0 * v2, w0 * v1 - w1 * v0
    t, step = t0, np.inf
    for _ in range(MAX_NEWTON_STEPS):
        x0, x1, x2 = p0 - t * (a0 - t * b0), p1 - t * (a1 - t * b1), p2 - t * (a2 - t * b2)
        if not x2 > 0:
            return x0, x1, x2, t
        d0, d1, d2 = 2 * t * b0 - a0, 2 * t * b1 - a1, 2 * t * b2 - a2  # dp/dt
        s = ax * x0 + ay * x1  # z (dt_dx x + dt_dy y)
        step = x2 * (x2 * (t - t0) - s) / (x2 * (x2 - ax * d0 - ay * d1) + s * d2)
        t -= step
        if abs(step) < NEWTON_TOLERANCE_S:
            break
    x0, x1, x2 = p0 - t * (a0 - t * b0), p1 - t * (a1 - t * b1), p2 - t * (a2 - t * b2)
    return x0, x1, (x2 if abs(step) < CONVERGED_S else np.nan), t


def rolling_shutter_record(velocity: np.ndarray, angular_velocity: np.ndarray, t0: float, dt_dx: float,
                           dt_dy: float) -> np.ndarray:
    """(9,) float64 record from camera-0 velocity (3,) m/s, angular velocity (3,) rad/s and the capture-time plane
    (s; module doc)."""
    return np.concatenate([np.asarray(velocity, np.float64).reshape(3),
                           np.asarray(angular_velocity, np.float64).reshape(3), [t0, dt_dx, dt_dy]])
