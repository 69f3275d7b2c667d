"""Lens distortion (Brown-Conrady: radial k1, k2, k3 and tangential p1, p2; OpenCV's and Waymo's camera model), the
one home of the lens formula: the projection kernels (`raydseg.geometry.project`) call it per point.

Distortion acts on normalised coordinates (x, y) = (X / Z, Y / Z) of the OpenCV camera frame, with r^2 = x^2 + y^2:
    x_d = x (1 + k1 r^2 + k2 r^4 + k3 r^6) + 2 p1 x y + p2 (r^2 + 2 x^2)
    y_d = y (1 + k1 r^2 + k2 r^4 + k3 r^6) + p1 (r^2 + 2 y^2) + 2 p2 x y
and the pixel is K (x_d, y_d, 1). As in Waymo's camera_model.cc, a point whose radial factor
1 + k1 r^2 + k2 r^4 + k3 r^6 lies outside (MIN_RADIAL, MAX_RADIAL) is outside the model's valid region: far outside
the field of view the polynomial turns back, and such a point would otherwise land inside the image.
"""
from __future__ import annotations

import numba
import numpy as np

MIN_RADIAL, MAX_RADIAL = 0.8, 1.2  # Waymo camera_model.cc's kMinRadialDistortion / kMaxRadialDistortion


@numba.njit(cache=True, error_model="numpy")
def distort_radial(x, y, coeffs):  # pragma: no cover - numba
    """Normalised undistorted (x, y) (floats or arrays) -> (x_d, y_d, radial factor); coeffs (5,) float64
    = (k1, k2, p1, p2, k3)."""
    k1, k2, p1, p2, k3 = coeffs[0], coeffs[1], coeffs[2], coeffs[3], coeffs[4]
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y, radial)



def undistort(x_d: float, y_d: float, coeffs: np.ndarray, iterations: int = 20) -> tuple[float, float]:
    """Normalised distorted (x_d, y_d) -> undistorted (x, y): the fixed-point iteration
    x = (x_d - tangential_x(x, y)) / radial(x, y) (y alike) from (x_d, y_d), as Waymo's camera_model.cc
    (IterateUndistortion, at most 20 iterations), ended when a step's squared length is below 1e-24. Plain Python:
    for the few image points a reader needs (the rolling shutter's readout range), not per LiDAR point."""
    coeffs = np.asarray(coeffs, np.float64)
    x, y = float(x_d), float(y_d)
    for _ in range(iterations):
        xd, yd, radial = distort_radial(x, y, coeffs)
        nx, ny = (x_d - (xd - x * radial)) / radial, (y_d - (yd - y * radial)) / radial
        done = (nx - x) ** 2 + (ny - y) ** 2 < 1e-24
        x, y = nx, ny
        if done:
            break
    return x, y


def undistort_array(x_d: np.ndarray, y_d: np.ndarray, coeffs: np.ndarray, iterations: int = 20
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`undistort` of many points at once (arrays of normalised distorted coordinates): the same fixed-point
    iteration, `iterations` steps for every point."""
    coeffs = np.asarray(coeffs, np.float64)
    x_d, y_d = np.asarray(x_d, np.float64), np.asarray(y_d, np.float64)
    x, y = x_d.copy(), y_d.copy()
    for _ in range(iterations):
        xd, yd, radial = distort_radial(x, y, coeffs)
        x, y = (x_d - (xd - x * radial)) / radial, (y_d - (yd - y * radial)) / radial
    return x, y
