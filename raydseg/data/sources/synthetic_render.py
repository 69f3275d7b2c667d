"""Sensors for the synthetic source: a pinhole camera with procedural shading and a spinning multi-beam LiDAR.

Both ray-cast a `Scene` (synthetic_scene.py) with Open3D's `RaycastingScene` (imported lazily). The world frame
is x forward, y left, z up (metres). Textures are functions of the 3D hit point, so the same surface looks the
same in every frame of a sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydseg.data.sources.synthetic_scene import (BUILDING, PART_BULB, PART_GLASS, PART_LAMP, ROAD, SIDEWALK, SKY,
                                                  TERRAIN, VEGETATION, VOID, Scene)

# LiDAR reflectivity per trainId (0..1); traffic signs are retro-reflective
REFLECTIVITY = np.array([0.12, 0.25, 0.35, 0.3, 0.3, 0.45, 0.5, 0.95, 0.45, 0.35, 0.0, 0.3, 0.3, 0.5, 0.5, 0.5,
                         0.5, 0.5, 0.35], dtype=np.float32)
FOG_COLOR = np.array([0.70, 0.71, 0.73], np.float32)


class Raycaster:
    """Open3D RaycastingScene over a Scene's triangles; `cast(origins, dirs)` -> t, triangle index (-1 = miss)."""

    def __init__(self, scene: Scene, threads: int = 1, vertices: np.ndarray | None = None) -> None:
        """vertices: (V, 3) float32 positions to use instead of scene.vertices (e.g. scene.vertices_at(t))."""
        import open3d as o3d

        self.threads = int(threads)
        self._o3d = o3d
        self._rc = o3d.t.geometry.RaycastingScene(nthreads=self.threads)
        v = scene.vertices if vertices is None else vertices
        self._rc.add_triangles(o3d.core.Tensor(np.ascontiguousarray(v, np.float32)), o3d.core.Tensor(scene.triangles))

    def cast(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """origins (N, 3) or (3,), dirs (N, 3) unit -> t (N,) metres (inf = miss), tri (N,) int64, normal (N, 3)."""
        o = np.broadcast_to(np.asarray(origins, np.float32), dirs.shape)
        rays = np.ascontiguousarray(np.concatenate([o, dirs.astype(np.float32)], axis=1))
        ans = self._rc.cast_rays(self._o3d.core.Tensor(rays), nthreads=self.threads)
        t = ans["t_hit"].numpy().astype(np.float64)
        hit = np.isfinite(t)
        tri = np.where(hit, ans["primitive_ids"].numpy().astype(np.int64), -1)
        return t, tri, ans["primitive_normals"].numpy().astype(np.float64)

    def occluded(self, origins: np.ndarray, dirs: np.ndarray, t_max: float | np.ndarray) -> np.ndarray:
        """(N,) bool: something lies between origin and origin + t_max * dir."""
        t, _, _ = self.cast(origins, dirs)
        return t < t_max


# ---------------------------------------------------------------------------------------------- textures
def _hash(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Integer lattice -> uniform [0, 1) (uint32 avalanche hash, deterministic on every platform)."""
    h = (ix.astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (iy.astype(np.uint32) * np.uint32(0xD8163841))
    h ^= iz.astype(np.uint32) * np.uint32(0xCB1AB31F) ^ np.uint32(seed & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h.astype(np.float64) / 4294967296.0


def _value_noise_kernel():
    """Compile (once per process, cached on disk) the numba kernel of value_noise; same hash as _hash."""
    import numba

    M = np.uint64(0xFFFFFFFF)
    C1, C2, C3 = np.uint64(0x8DA6B343), np.uint64(0xD8163841), np.uint64(0xCB1AB31F)
    C4, C5 = np.uint64(0x2C1B3C6D), np.uint64(0x297A2D39)
    S15, S12 = np.uint64(15), np.uint64(12)

    @numba.njit(cache=True, nogil=True)
    def kernel(p: np.ndarray, seed: np.uint64) -> np.ndarray:
        out = np.empty(p.shape[0])
        for k in range(p.shape[0]):
            fx, fy, fz = np.floor(p[k, 0]), np.floor(p[k, 1]), np.floor(p[k, 2])
            tx, ty, tz = p[k, 0] - fx, p[k, 1] - fy, p[k, 2] - fz
            ux, uy, uz = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty), tz * tz * (3 - 2 * tz)
            ix, iy, iz = np.int64(fx), np.int64(fy), np.int64(fz)
            acc = 0.0
            for dx in range(2):
                wx = ux if dx else 1.0 - ux
                hx = (np.uint64((ix + dx) & 0xFFFFFFFF) * C1) & M
                for dy in range(2):
                    wy = uy if dy else 1.0 - uy
                    hy = (np.uint64((iy + dy) & 0xFFFFFFFF) * C2) & M
                    for dz in range(2):
                        wz = uz if dz else 1.0 - uz
                        hz = (np.uint64((iz + dz) & 0xFFFFFFFF) * C3) & M
                        h = hx ^ hy ^ hz ^ seed
                        h ^= h >> S15
                        h = (h * C4) & M
                        h ^= h >> S12
                        h = (h * C5) & M
                        h ^= h >> S15
                        acc += wx * wy * wz * (np.float64(h) / 4294967296.0)
            out[k] = acc
        return out

    return kernel


_KERNEL: list = []


def value_noise(p: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 3D value noise. p (N, 3) in lattice units -> (N,) in [0, 1) (numba; equals value_noise_numpy)."""
    if not _KERNEL:
        _KERNEL.append(_value_noise_kernel())
    return _KERNEL[0](np.ascontiguousarray(p, dtype=np.float64), np.uint64(seed & 0xFFFFFFFF))


def value_noise_numpy(p: np.ndarray, seed: int) -> np.ndarray:
    """Reference numpy implementation of value_noise (used by the tests)."""
    i = np.floor(p)
    f = p - i
    u = f * f * (3 - 2 * f)
    i = i.astype(np.int64)
    out = np.zeros(len(p))
    for dx in (0, 1):
        wx = u[:, 0] if dx else 1 - u[:, 0]
        for dy in (0, 1):
            wy = u[:, 1] if dy else 1 - u[:, 1]
            for dz in (0, 1):
                wz = u[:, 2] if dz else 1 - u[:, 2]
                out += wx * wy * wz * _hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed)
    return out


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


@dataclass
class Surface:
    """Per-hit surface description shared by camera and LiDAR."""

    cls: np.ndarray  # (N,) uint8 trainIds
    albedo: np.ndarray  # (N, 3) linear
    emission: np.ndarray  # (N, 3) linear radiance at night (lamps, lit windows, traffic-light bulbs)
    marking: np.ndarray  # (N,) bool road paint (bright, reflective)


def surface(scene: Scene, tri: np.ndarray, p: np.ndarray, n: np.ndarray, night: bool) -> Surface:
    """Albedo with procedural texture for hit points p (N, 3) on triangles tri (N,) with normals n (N, 3)."""
    cls = scene.tri_class[tri]
    part = scene.tri_part[tri]
    alb = scene.tri_color[tri].astype(np.float64)
    seed = scene.texture_seed
    fine = value_noise(p * 6.0, seed)
    coarse = value_noise(p * 0.6, seed + 1)
    alb = alb * (0.82 + 0.3 * fine[:, None]) * (0.9 + 0.2 * coarse[:, None])
    emission = np.zeros_like(alb)
    marking = np.zeros(len(p), bool)

    m = cls == ROAD
    if m.any():
        x, y = p[m, 0], p[m, 1]
        W = scene.road_half_width
        centre = (np.abs(y) < 0.08) & (_frac(x / 6.0) < 0.5)
        edges = np.abs(np.abs(y) - (W - 0.35)) < 0.08
        mk = centre | edges
        marking[np.flatnonzero(m)[mk]] = True
        a = alb[m]
        a[mk] = 0.75
        alb[m] = a
    m = cls == SIDEWALK
    if m.any():
        g = (_frac(p[m, 0] / 0.6) < 0.05) | (_frac(p[m, 1] / 0.6) < 0.05)
        alb[np.flatnonzero(m)[g]] *= 0.6
    m = (cls == BUILDING) & (np.abs(n[:, 2]) < 0.5)
    if m.any():
        pm, nm = p[m], n[m]
        h = np.where(np.abs(nm[:, 0]) > np.abs(nm[:, 1]), pm[:, 1], pm[:, 0])
        cell_h, cell_z = h / 2.6, (pm[:, 2] - 0.5) / 3.0
        win = (_frac(cell_h) > 0.25) & (_frac(cell_h) < 0.8) & (_frac(cell_z) > 0.3) & (_frac(cell_z) < 0.85) \
            & (pm[:, 2] > 1.0)
        idx = np.flatnonzero(m)[win]
        alb[idx] = np.array([0.08, 0.1, 0.13]) * (0.7 + 0.6 * fine[idx, None])
        if night:
            lit = _hash(np.floor(cell_h[win]).astype(np.int64), np.floor(cell_z[win]).astype(np.int64),
                        np.zeros(len(idx), np.int64), seed + 7) < 0.3
            emission[idx[lit]] = np.array([0.9, 0.7, 0.4])
    m = (cls == VEGETATION) | (cls == TERRAIN)
    if m.any():
        leaf = value_noise(p[m] * 3.0, seed + 2)
        alb[m] *= (0.5 + 1.0 * leaf * leaf)[:, None]
    glass = part == PART_GLASS
    alb[glass] *= 0.7
    if night:
        emission[part == PART_LAMP] = np.array([4.0, 3.5, 2.5])
        b = part == PART_BULB
        emission[b] = scene.tri_color[tri[b]] * 4.0
    return Surface(cls=cls, albedo=np.clip(alb, 0, 1), emission=emission, marking=marking)


# ---------------------------------------------------------------------------------------------- camera
def camera_rays(K: np.ndarray, width: int, height: int, R_world_cam: np.ndarray) -> np.ndarray:
    """Unit ray directions (H*W, 3) in the world frame through the integer pixel coordinates (u, v), so that
    a point projecting to (u, v) with pixel = K X / z lies on the ray of pixel (round(u), round(v))."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    xc = ((u - K[0, 2] - K[0, 1] * (v - K[1, 2]) / K[1, 1]) / K[0, 0]).ravel()
    yc = ((v - K[1, 2]) / K[1, 1]).ravel()
    d = xc[:, None] * R_world_cam[:, 0] + yc[:, None] * R_world_cam[:, 1] + R_world_cam[:, 2]
    return d / np.sqrt(1.0 + xc * xc + yc * yc)[:, None]


def render_camera(rc: Raycaster, scene: Scene, origin: np.ndarray, R_world_cam: np.ndarray, K: np.ndarray,
                  width: int, height: int, condition: str, rng: np.random.Generator, *,
                  fog_density: float = 0.035, noise_sigma: float = 0.03,
                  headlights: list[tuple[np.ndarray, np.ndarray]] | None = None,
                  shadows: bool = True, dirs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast and shade one image.

    origin (3,) camera centre (world m); R_world_cam (3, 3) OpenCV camera axes -> world; K (3, 3).
    dirs: precomputed camera_rays(K, width, height, R_world_cam) (constant along a straight drive).
    Returns rgb (H, W, 3) uint8, semantic (H, W) uint8 trainIds, instance (H, W) uint16.
    """
    night, fog = condition == "night", condition == "fog"
    if dirs is None:
        dirs = camera_rays(K, width, height, R_world_cam)
    t, tri, nrm = rc.cast(origin, dirs)
    hit = tri >= 0
    sem = np.full(len(dirs), SKY, np.uint8)
    inst = np.zeros(len(dirs), np.uint16)
    sem[hit] = scene.tri_class[tri[hit]]
    inst[hit] = scene.tri_instance[tri[hit]].astype(np.uint16)

    color = np.zeros((len(dirs), 3))
    # sky
    el = np.clip(dirs[~hit, 2], 0, 1)[:, None]
    if night:
        sky = np.array([0.01, 0.012, 0.03]) + el * np.array([0.0, 0.0, 0.02])
    elif fog:
        sky = np.broadcast_to(FOG_COLOR, (len(el), 3))
    else:
        cloud = value_noise(dirs[~hit] / np.maximum(dirs[~hit, 2:3], 0.05) * 0.8, scene.texture_seed + 5)
        sky = np.array([0.75, 0.82, 0.92]) * (1 - el) + np.array([0.3, 0.5, 0.85]) * el
        sky = sky + 0.25 * np.clip(cloud - 0.45, 0, 1)[:, None]
    color[~hit] = sky

    ph = origin + dirs[hit] * t[hit, None]
    n = nrm[hit]
    n = np.where((np.sum(n * dirs[hit], 1) > 0)[:, None], -n, n)  # face the camera
    surf = surface(scene, tri[hit], ph, n, night)
    ambient_sky = 0.5 + 0.5 * n[:, 2]  # hemisphere: surfaces facing up see more sky
    if night:
        light = np.full((len(ph), 3), 0.01) * (0.5 + 0.5 * ambient_sky[:, None])
        lamps = scene.lights
        if len(lamps):
            near = np.argsort(np.linalg.norm(lamps - origin, axis=1))[:10]
            for lp in lamps[near]:
                d = lp - ph
                dist2 = np.sum(d * d, 1)
                cos = np.clip(np.sum(d * n, 1) / np.sqrt(dist2), 0, 1)
                light += (5.0 * cos / (dist2 + 1.0))[:, None] * np.array([1.0, 0.8, 0.55])
        for hp, hd in (headlights if headlights is not None else []):  # ego headlights: spot lights
            d = ph - hp
            dist = np.linalg.norm(d, axis=1)
            cos_axis = (d @ hd) / dist
            spot = np.clip((cos_axis - 0.85) / 0.1, 0, 1)
            cos = np.clip(-np.sum(d * n, 1) / dist, 0, 1)
            light += (15.0 * spot * cos / (dist * dist + 1.0))[:, None] * np.array([1.0, 0.97, 0.9])
        col = surf.albedo * light + surf.emission
    else:
        sun = scene.sun_dir
        diffuse = np.clip(n @ sun, 0, 1)
        if shadows and len(ph):
            lit = diffuse > 0
            occ = np.zeros(len(ph), bool)
            occ[lit] = rc.occluded(ph[lit] + n[lit] * 0.02, np.broadcast_to(sun, (int(lit.sum()), 3)), 1e3)
            diffuse = np.where(occ, 0.0, diffuse)
        sun_k, amb_k = (0.35, 0.55) if fog else (0.9, 0.35)
        light = sun_k * diffuse[:, None] * np.array([1.0, 0.96, 0.88]) + \
            amb_k * (0.6 + 0.4 * ambient_sky)[:, None] * np.array([0.85, 0.9, 1.0])
        col = surf.albedo * light
    color[hit] = col
    if fog:
        tt = np.exp(-fog_density * t[hit])[:, None]
        color[hit] = color[hit] * tt + FOG_COLOR * (1 - tt)
    if night:
        color = color * 1.2 + rng.normal(0, noise_sigma, color.shape) * np.sqrt(color + 0.02)
        color += rng.normal(0, noise_sigma * 0.3, color.shape)
    rgb = (np.clip(color, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
    return rgb, sem.reshape(height, width), inst.reshape(height, width)


# ---------------------------------------------------------------------------------------------- LiDAR
def lidar_directions(beams: int, fov_up_deg: float, fov_down_deg: float, azimuth_steps: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions (beams*steps, 3) in the LiDAR frame (x fwd, y left, z up) and their ring (beam index,
    0 = lowest beam). Azimuth step k is at angle 2*pi*k/steps counter-clockwise from +x."""
    el = np.radians(np.linspace(fov_down_deg, fov_up_deg, beams))
    az = 2 * np.pi * np.arange(azimuth_steps) / azimuth_steps
    e, a = np.meshgrid(el, az, indexing="ij")
    d = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)
    ring = np.repeat(np.arange(beams), azimuth_steps)
    return d, ring


def render_lidar(rc: Raycaster, scene: Scene, origin: np.ndarray, R_world_lidar: np.ndarray, rng: np.random.Generator,
                 *, beams: int, fov_up_deg: float, fov_down_deg: float, azimuth_steps: int, max_range: float,
                 min_range: float, range_noise: float, dropout: float, intensity_noise: float, condition: str,
                 fog_density: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One sweep. Returns points (N, 4) float32 (x, y, z in the LiDAR frame, intensity 0..1), ring (N,) uint8,
    gt_label (N,) uint8 trainIds, gt_instance (N,) int32."""
    d_l, ring = lidar_directions(beams, fov_up_deg, fov_down_deg, azimuth_steps)
    d_w = d_l @ R_world_lidar.T
    t, tri, nrm = rc.cast(origin, d_w)
    keep = (tri >= 0) & (t <= max_range) & (t >= min_range)
    p_drop = np.full(len(t), dropout)
    if condition == "fog":  # attenuation: far returns get lost
        p_drop = 1 - (1 - dropout) * np.exp(-0.5 * fog_density * np.where(np.isfinite(t), t, 0))
    keep &= rng.random(len(t)) >= p_drop
    idx = np.flatnonzero(keep)
    t, tri, n, d_w, d_l = t[idx], tri[idx], nrm[idx], d_w[idx], d_l[idx]
    cls = scene.tri_class[tri]
    p_w = origin + d_w * t[:, None]
    surf = surface(scene, tri, p_w, n, night=False)
    cos_inc = np.abs(np.sum(n * d_w, 1))
    refl = REFLECTIVITY[cls] * np.where(surf.marking, 3.0, 1.0) * (0.8 + 0.4 * surf.albedo.mean(1))
    inten = refl * (0.25 + 0.75 * cos_inc) + rng.normal(0, intensity_noise, len(t))
    r = t + rng.normal(0, range_noise, len(t))
    pts = np.concatenate([d_l * r[:, None], np.clip(inten, 0, 1)[:, None]], 1).astype(np.float32)
    label = np.where(cls == SKY, VOID, cls).astype(np.uint8)
    return pts, ring[idx].astype(np.uint8), label, scene.tri_instance[tri].astype(np.int32)
