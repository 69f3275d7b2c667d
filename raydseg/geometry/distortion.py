"""Lens distortion (Brown-Conrady: radial k1, k2, k3 and tangential p1, p2; OpenCV's and Waymo's camera model) and
the undistortion of an image onto the pinhole camera with the same K, so that the Frame contract stays pinhole.

Distortion acts on normalised coordinates (x, y) = (X / Z, Y / Z) of the OpenCV camera frame, with r^2 = x^2 + y^2:
    x_d = x (1 + k1 r^2 + k2 r^4 + k3 r^6) + 2 p1 x y + p2 (r^2 + 2 x^2)
    y_d = y (1 + k1 r^2 + k2 r^4 + k3 r^6) + p1 (r^2 + 2 y^2) + 2 p2 x y
and the pixel is K (x_d, y_d, 1).
"""
from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np


def distort(x: np.ndarray, y: np.ndarray, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised undistorted (x, y) -> distorted (x_d, y_d); coeffs (5,) = (k1, k2, p1, p2, k3)."""
    k1, k2, p1, p2, k3 = (float(c) for c in coeffs)
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def _maps(K: np.ndarray, coeffs: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(src_u, src_v), each (height, width) float32: where each pixel of the pinhole image lies in the distorted one
    (pixel centres at integers)."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    x, y = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    xd, yd = distort(x, y, coeffs)
    return (K[0, 0] * xd + K[0, 2]).astype(np.float32), (K[1, 1] * yd + K[1, 2]).astype(np.float32)


def bilinear_plan(src_u: np.ndarray, src_v: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sampling at (src_u, src_v) px of a (height, width) image, N = src_u.size, as
    (N,) int32 flat index of the top-left neighbour (u0, v0) in the image padded by one pixel on every side
    ((height + 2) x (width + 2), row-major; 0 where no neighbour is inside) and (4, N) float32 weights of the neighbours
    (u0, v0), (u0 + 1, v0), (u0, v0 + 1), (u0 + 1, v0 + 1), 0 for those outside the image."""
    u0, v0 = np.floor(src_u).astype(np.int64).ravel(), np.floor(src_v).astype(np.int64).ravel()
    fu, fv = (src_u.ravel() - u0).astype(np.float32), (src_v.ravel() - v0).astype(np.float32)
    wts = []
    for du, dv, wt in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        uu, vv = u0 + du, v0 + dv
        ok = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
        wts.append(np.where(ok, wt, 0).astype(np.float32))
    near = (u0 >= -1) & (u0 < width) & (v0 >= -1) & (v0 < height)
    return np.where(near, (v0 + 1) * (width + 2) + u0 + 1, 0).astype(np.int32), np.stack(wts)


def apply_plan(image: np.ndarray, plan: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) image sampled by a `bilinear_plan` into an image of `shape` (h, w); same dtype (integers rounded
    half to even and clipped to the dtype's range). Each output value is the float32 sum, in plan order, of the four
    neighbours' float32(value) x weight."""
    base, wts = plan
    H, W = image.shape[:2]
    c = 1 if image.ndim == 2 else image.shape[2]
    padded = np.zeros((H + 2, W + 2, c), image.dtype)
    padded[1:-1, 1:-1] = image.reshape(H, W, c)
    out = np.empty((base.shape[0], c), image.dtype)
    integer = np.issubdtype(image.dtype, np.integer)
    lo, hi = (np.iinfo(image.dtype).min, np.iinfo(image.dtype).max) if integer else (0, 0)
    _resample(padded.reshape(-1, c), base, wts, W + 2, integer, np.float32(lo), np.float32(hi), out)
    return out.reshape(shape + image.shape[2:])


@numba.njit(cache=True, error_model="numpy")
def _resample(padded, base, wts, row, integer, lo, hi, out):  # pragma: no cover - numba
    """out[i, ch] = float32 sum over k of padded[base[i] + (0, 1, row, row + 1)[k], ch] x wts[k, i]."""
    for i in range(out.shape[0]):
        b = base[i]
        for ch in range(out.shape[1]):
            acc = np.float32(0.0)
            acc = np.float32(acc + np.float32(padded[b, ch]) * wts[0, i])
            acc = np.float32(acc + np.float32(padded[b + 1, ch]) * wts[1, i])
            acc = np.float32(acc + np.float32(padded[b + row, ch]) * wts[2, i])
            acc = np.float32(acc + np.float32(padded[b + row + 1, ch]) * wts[3, i])
            if integer:
                acc = min(max(np.rint(acc), lo), hi)
            out[i, ch] = acc


@lru_cache(maxsize=16)
def _undistort_plan(K_bytes: bytes, coeff_bytes: bytes, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    K, coeffs = np.frombuffer(K_bytes, np.float64).reshape(3, 3), np.frombuffer(coeff_bytes, np.float64)
    return bilinear_plan(*_maps(K, coeffs, width, height), width, height)


def undistort_image(image: np.ndarray, K: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """The distorted camera's (H, W[, C]) image as the pinhole camera K (same size) sees it. The sampling plan is
    cached per camera, so each further frame costs one pass over the output pixels."""
    h, w = image.shape[:2]
    plan = _undistort_plan(np.ascontiguousarray(K, np.float64).tobytes(),
                           np.ascontiguousarray(coeffs, np.float64).tobytes(), w, h)
    return apply_plan(image, plan, (h, w))
