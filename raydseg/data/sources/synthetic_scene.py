"""Procedural street-scene geometry for the synthetic source: one triangle soup with per-triangle attributes.

World frame: x forward along the road (metres), y left, z up; the road surface is z = 0 and the road spans
|y| <= road_half_width. Every triangle carries a Cityscapes trainId, an instance id (0 for stuff classes,
unique ids >= 1 for things), an albedo colour (per instance, so instances of a class differ slightly) and a
part code that the renderer uses for textures and night-time emission. Pure numpy; no open3d here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydseg.eval.metrics import IGNORE_INDEX

# Cityscapes trainIds
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
VOID = IGNORE_INDEX  # unlabelled pixels of the ground truth
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
THING_CLASSES = frozenset({POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE,
                           BICYCLE})

# part codes (texture / emission selectors)
PART_PLAIN, PART_GLASS, PART_TYRE, PART_LAMP, PART_BULB, PART_SKIN = 0, 1, 2, 3, 4, 5

# base albedo per class (linear RGB, 0..1); instances jitter around it
CLASS_ALBEDO = np.array([
    [0.16, 0.16, 0.17], [0.45, 0.42, 0.40], [0.45, 0.38, 0.32], [0.55, 0.52, 0.45], [0.40, 0.36, 0.30],
    [0.35, 0.35, 0.36], [0.08, 0.08, 0.07], [0.70, 0.10, 0.08], [0.10, 0.30, 0.06], [0.30, 0.32, 0.12],
    [0.50, 0.65, 0.90], [0.30, 0.20, 0.40], [0.60, 0.15, 0.10], [0.20, 0.25, 0.45], [0.55, 0.55, 0.50],
    [0.75, 0.60, 0.10], [0.50, 0.50, 0.55], [0.30, 0.05, 0.05], [0.10, 0.35, 0.55]], dtype=np.float32)

CAR_PALETTE = np.array([[0.8, 0.8, 0.8], [0.05, 0.05, 0.06], [0.5, 0.05, 0.04], [0.1, 0.15, 0.45],
                        [0.35, 0.36, 0.38], [0.6, 0.6, 0.62], [0.1, 0.3, 0.15], [0.7, 0.55, 0.2]], np.float32)
CLOTH_PALETTE = np.array([[0.05, 0.05, 0.08], [0.6, 0.1, 0.1], [0.1, 0.2, 0.5], [0.5, 0.5, 0.45],
                          [0.2, 0.4, 0.2], [0.7, 0.6, 0.2], [0.4, 0.25, 0.15], [0.8, 0.8, 0.8]], np.float32)
SIGN_PALETTE = np.array([[0.75, 0.08, 0.06], [0.05, 0.2, 0.65], [0.85, 0.7, 0.05], [0.85, 0.85, 0.85]],
                        np.float32)
BUILDING_PALETTE = np.array([[0.55, 0.45, 0.35], [0.6, 0.58, 0.52], [0.45, 0.25, 0.2], [0.7, 0.68, 0.62],
                             [0.35, 0.35, 0.38], [0.62, 0.5, 0.38]], np.float32)


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _unit_box() -> tuple[np.ndarray, np.ndarray]:
    v = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)], dtype=np.float64)
    t = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], dtype=np.int64)
    return v, t


def _unit_cylinder(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Radius 1, z in [0, 1], n sides, capped."""
    a = 2 * np.pi * np.arange(n) / n
    ring = np.stack([np.cos(a), np.sin(a)], 1)
    v = np.concatenate([np.c_[ring, np.zeros(n)], np.c_[ring, np.ones(n)], [[0, 0, 0], [0, 0, 1]]])
    i = np.arange(n)
    j = (i + 1) % n
    side = np.concatenate([np.stack([i, j, j + n], 1), np.stack([i, j + n, i + n], 1)])
    caps = np.concatenate([np.stack([np.full(n, 2 * n), j, i], 1), np.stack([np.full(n, 2 * n + 1), i + n, j + n], 1)])
    return v, np.concatenate([side, caps])


def _unit_sphere(n_lat: int = 5, n_lon: int = 8) -> tuple[np.ndarray, np.ndarray]:
    lat = np.pi * np.arange(1, n_lat) / n_lat
    lon = 2 * np.pi * np.arange(n_lon) / n_lon
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    v = np.c_[(np.sin(la) * np.cos(lo)).ravel(), (np.sin(la) * np.sin(lo)).ravel(), np.cos(la).ravel()]
    v = np.concatenate([[[0, 0, 1]], v, [[0, 0, -1]]])
    tris = []
    for k in range(n_lon):  # top fan, bottom fan
        k2 = (k + 1) % n_lon
        tris.append([0, 1 + k, 1 + k2])
        b = 1 + (n_lat - 2) * n_lon
        tris.append([len(v) - 1, b + k2, b + k])
    for r in range(n_lat - 2):
        for k in range(n_lon):
            k2 = (k + 1) % n_lon
            a0, a1 = 1 + r * n_lon + k, 1 + r * n_lon + k2
            b0, b1 = a0 + n_lon, a1 + n_lon
            tris += [[a0, b0, b1], [a0, b1, a1]]
    return v, np.array(tris, dtype=np.int64)


_BOX = _unit_box()
_CYL8 = _unit_cylinder(8)
_CYL12 = _unit_cylinder(12)
_SPHERE = _unit_sphere()


@dataclass
class Scene:
    """A static street scene: triangle soup + per-triangle attributes + lights + layout parameters."""

    vertices: np.ndarray  # (V, 3) float32 world metres at time 0
    vertex_instance: np.ndarray  # (V,) int32 instance id of each vertex (0 = stuff)
    triangles: np.ndarray  # (T, 3) uint32
    tri_class: np.ndarray  # (T,) uint8 trainIds
    tri_instance: np.ndarray  # (T,) int32, 0 = stuff
    tri_color: np.ndarray  # (T, 3) float32 linear albedo
    tri_part: np.ndarray  # (T,) uint8 part codes
    road_half_width: float
    ego_y: float
    lights: np.ndarray  # (L, 3) float64 street-lamp positions (night light sources)
    sun_dir: np.ndarray  # (3,) unit vector towards the sun
    texture_seed: int
    n_instances: int = 0  # thing instance ids are 1..n_instances
    velocity: np.ndarray | None = None  # (n_instances + 1, 3) float32 m/s per instance (moving traffic, walkers)

    def vertices_at(self, t_s: float) -> np.ndarray:
        """(V, 3) float32 vertex positions at time t_s seconds (things move with constant velocity)."""
        if self.velocity is None or not self.velocity.any() or t_s == 0:
            return self.vertices
        return (self.vertices + self.velocity[self.vertex_instance] * np.float32(t_s)).astype(np.float32)


class MeshBuilder:
    """Accumulates primitives with attributes; `build()` concatenates them into a Scene."""

    def __init__(self) -> None:
        self._v: list[np.ndarray] = []
        self._t: list[np.ndarray] = []
        self._vi: list[np.ndarray] = []
        self._attr: list[tuple[int, int, np.ndarray, int, int]] = []  # class, inst, color, part, n_tris
        self._nv = 0

    def _add(self, v: np.ndarray, t: np.ndarray, cls: int, inst: int, color: np.ndarray, part: int) -> None:
        self._v.append(v)
        self._t.append(t + self._nv)
        self._nv += len(v)
        self._vi.append(np.full(len(v), inst, np.int32))
        self._attr.append((cls, inst, np.clip(np.asarray(color, np.float32), 0, 1), part, len(t)))

    def box(self, center, size, cls: int, inst: int, color, part: int = PART_PLAIN, yaw: float = 0.0) -> None:
        """Axis-aligned (then yawed about z) box; center (3,), size (3,) metres."""
        v, t = _BOX
        v = (v * np.asarray(size)) @ _rot_z(yaw).T + np.asarray(center)
        self._add(v, t, cls, inst, color, part)

    def cylinder(self, base, radius: float, height: float, cls: int, inst: int, color, part: int = PART_PLAIN,
                 horizontal_yaw: float | None = None, sides: int = 8) -> None:
        """Vertical cylinder from `base` upwards; with horizontal_yaw its axis is horizontal (a wheel) and
        `base` is the centre of the wheel, the axis pointing at yaw + 90 deg."""
        v, t = _CYL12 if sides == 12 else _CYL8
        v = v * np.array([radius, radius, height])
        if horizontal_yaw is not None:
            v = v - np.array([0, 0, height / 2])
            rx = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)  # z axis -> -y... (axis along y)
            v = v @ rx.T @ _rot_z(horizontal_yaw).T
        self._add(v + np.asarray(base), t, cls, inst, color, part)

    def ellipsoid(self, center, radii, cls: int, inst: int, color, part: int = PART_PLAIN) -> None:
        v, t = _SPHERE
        self._add(v * np.asarray(radii) + np.asarray(center), t, cls, inst, color, part)

    def build(self, **kw) -> Scene:
        v = np.concatenate(self._v).astype(np.float32)
        t = np.concatenate(self._t).astype(np.uint32)
        n = np.array([a[4] for a in self._attr])
        tri_class = np.repeat(np.array([a[0] for a in self._attr], np.uint8), n)
        tri_inst = np.repeat(np.array([a[1] for a in self._attr], np.int32), n)
        tri_color = np.repeat(np.stack([a[2] for a in self._attr]), n, axis=0)
        tri_part = np.repeat(np.array([a[3] for a in self._attr], np.uint8), n)
        return Scene(vertices=v, vertex_instance=np.concatenate(self._vi), triangles=t, tri_class=tri_class,
                     tri_instance=tri_inst, tri_color=tri_color, tri_part=tri_part, **kw)


def _jitter(rng: np.random.Generator, base, amount: float = 0.08) -> np.ndarray:
    """Intra-class variation: a per-instance brightness and hue jitter around `base`."""
    base = np.asarray(base, np.float32)
    return np.clip(base * rng.uniform(0.8, 1.2) + rng.normal(0, amount, 3).astype(np.float32) * base.mean(), 0, 1)


class _Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def _person(b: MeshBuilder, rng: np.random.Generator, x: float, y: float, z0: float, inst: int, cls: int = PERSON,
            yaw: float = 0.0, seated: bool = False) -> None:
    h = rng.uniform(1.55, 1.95)
    skin = _jitter(rng, [0.6, 0.45, 0.35], 0.15)
    top = _jitter(rng, CLOTH_PALETTE[rng.integers(len(CLOTH_PALETTE))])
    legs = _jitter(rng, CLOTH_PALETTE[rng.integers(len(CLOTH_PALETTE))])
    if cls == RIDER:
        top = _jitter(rng, [0.7, 0.25, 0.1])
    leg_h = 0.47 * h
    torso_h = 0.33 * h
    c, s = np.cos(yaw), np.sin(yaw)
    side = np.array([-s, c, 0.0])
    if not seated:
        for sgn in (-1, 1):
            b.box(np.array([x, y, z0 + leg_h / 2]) + sgn * 0.1 * side, [0.16, 0.15, leg_h], cls, inst, legs, yaw=yaw)
        zt = z0 + leg_h
    else:
        b.box([x, y, z0 + 0.25], [0.45, 0.34, 0.3], cls, inst, legs, yaw=yaw)
        zt = z0 + 0.35
    b.box([x, y, zt + torso_h / 2], [0.26, 0.44, torso_h], cls, inst, top, yaw=yaw)
    r = 0.11 * h / 1.75
    b.ellipsoid([x, y, zt + torso_h + r * 1.1], [r, r * 0.9, r * 1.15], cls, inst, skin, PART_SKIN)


def _bike(b: MeshBuilder, rng: np.random.Generator, x: float, y: float, yaw: float, ids: _Ids, motor: bool
          ) -> tuple[int, int]:
    """Rider (class rider) on a bicycle/motorcycle (separate instance), facing yaw; returns both instance ids."""
    cls = MOTORCYCLE if motor else BICYCLE
    inst = ids()
    color = _jitter(rng, CAR_PALETTE[rng.integers(len(CAR_PALETTE))] if motor else CLASS_ALBEDO[BICYCLE])
    wr = 0.32 if motor else 0.35
    fwd = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    for sgn in (-1, 1):
        b.cylinder(np.array([x, y, wr]) + sgn * 0.55 * fwd, wr, 0.08 if motor else 0.04, cls, inst,
                   [0.03, 0.03, 0.03], PART_TYRE, horizontal_yaw=yaw, sides=12)
    if motor:
        b.box([x, y, 0.65], [1.3, 0.35, 0.45], cls, inst, color, yaw=yaw)
    else:
        b.box([x, y, 0.6], [1.0, 0.06, 0.08], cls, inst, color, yaw=yaw)
        b.box(np.array([x, y, 0.45]) - 0.1 * fwd, [0.06, 0.06, 0.5], cls, inst, color, yaw=yaw)
    rider = ids()
    _person(b, rng, float(x), float(y), 0.45, rider, RIDER, yaw=yaw, seated=True)
    return inst, rider


_HALF_WIDTH = {CAR: 0.95, TRUCK: 1.2, BUS: 1.29}  # metres, the widest body of each class
_HALF_LENGTH = {CAR: 2.4, TRUCK: 4.55}  # metres, the longest parked car (4.8 m) and truck (9.0 m, cab glass too)


def _vehicle(b: MeshBuilder, rng: np.random.Generator, x: float, y: float, yaw: float, cls: int, inst: int) -> None:
    fwd = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    left = np.array([-np.sin(yaw), np.cos(yaw), 0.0])
    if cls == CAR:
        L, W, H = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.6)
        body = _jitter(rng, CAR_PALETTE[rng.integers(len(CAR_PALETTE))], 0.04)
        b.box([x, y, 0.3 + 0.35], [L, W, 0.7], cls, inst, body, yaw=yaw)
        ch = H - 1.0
        b.box(np.array([x, y, 1.0 + ch / 2]) - 0.1 * L * fwd, [0.55 * L, W * 0.9, ch], cls, inst,
              [0.06, 0.07, 0.09], PART_GLASS, yaw=yaw)
        b.box(np.array([x, y, 1.0 + ch + 0.02]) - 0.1 * L * fwd, [0.45 * L, W * 0.85, 0.06], cls, inst, body,
              yaw=yaw)
        wr = 0.33
    elif cls == TRUCK:
        L, W = rng.uniform(6.5, 9.0), 2.4
        body = _jitter(rng, CLASS_ALBEDO[TRUCK] if rng.random() < 0.5 else CAR_PALETTE[rng.integers(8)], 0.05)
        b.box(np.array([x, y, 1.6]) + 0.5 * (L - 1.8) * fwd, [1.8, W, 2.2], cls, inst, body, yaw=yaw)
        b.box(np.array([x, y, 2.2]) + 0.5 * (L - 1.8) * fwd + 0.91 * fwd, [0.05, W * 0.9, 0.8], cls, inst,
              [0.06, 0.07, 0.09], PART_GLASS, yaw=yaw)
        b.box(np.array([x, y, 2.0]) - 1.0 * fwd, [L - 2.0, W, 3.0], cls, inst, _jitter(rng, [0.7, 0.7, 0.68]),
              yaw=yaw)
        wr = 0.5
    else:  # bus
        L, W = rng.uniform(10.0, 12.5), 2.55
        body = _jitter(rng, CLASS_ALBEDO[BUS] if rng.random() < 0.6 else [0.7, 0.1, 0.1], 0.05)
        b.box([x, y, 0.35 + 1.45], [L, W, 2.9], cls, inst, body, yaw=yaw)
        b.box([x, y, 2.1], [L * 0.95, W + 0.02, 0.9], cls, inst, [0.06, 0.07, 0.09], PART_GLASS, yaw=yaw)
        wr = 0.5
    for sx in (-0.32, 0.32):
        for sy in (-1, 1):
            c = np.array([x, y, wr]) + sx * L * fwd + sy * (W / 2 - 0.1) * left
            b.cylinder(c, wr, 0.25, cls, inst, [0.02, 0.02, 0.02], PART_TYRE, horizontal_yaw=yaw, sides=12)


def _pole_group(b: MeshBuilder, rng: np.random.Generator, x: float, y: float, side: int, ids: _Ids,
                lights: list) -> None:
    """A pole on the sidewalk; with a street lamp, a traffic sign or a traffic light on top."""
    kind = rng.choice(["lamp", "sign", "light", "plain"], p=[0.35, 0.35, 0.2, 0.1])
    metal = _jitter(rng, CLASS_ALBEDO[POLE], 0.03)
    r = rng.uniform(0.07, 0.13)
    pid = ids()
    if kind == "lamp":
        h = rng.uniform(6.0, 8.0)
        b.cylinder([x, y, 0.15], r, h, POLE, pid, metal)
        arm = -side * 1.2
        b.box([x, y + arm / 2, 0.15 + h - 0.1], [0.12, abs(arm), 0.1], POLE, pid, metal)
        b.box([x, y + arm, 0.15 + h - 0.2], [0.5, 0.3, 0.15], POLE, pid, [0.9, 0.85, 0.7], PART_LAMP)
        lights.append([x, y + arm, 0.15 + h - 0.35])
    elif kind == "sign":
        h = rng.uniform(2.2, 3.0)
        b.cylinder([x, y, 0.15], r * 0.7, h, POLE, pid, metal)
        w = rng.uniform(0.6, 0.9)
        color = _jitter(rng, SIGN_PALETTE[rng.integers(len(SIGN_PALETTE))], 0.04)
        b.box([x - 0.1, y, 0.15 + h + w / 2 - 0.1], [0.04, w, w], TRAFFIC_SIGN, ids(), color)
    elif kind == "light":
        h = rng.uniform(3.0, 4.5)
        b.cylinder([x, y, 0.15], r, h, POLE, pid, metal)
        tl = ids()
        zc = 0.15 + h + 0.45
        b.box([x, y, zc], [0.3, 0.35, 1.0], TRAFFIC_LIGHT, tl, _jitter(rng, CLASS_ALBEDO[TRAFFIC_LIGHT], 0.02))
        on = rng.integers(3)
        for k, col in enumerate(([0.9, 0.1, 0.05], [0.9, 0.6, 0.05], [0.1, 0.9, 0.3])):
            lit = k == on
            b.box([x - 0.16, y, zc + 0.3 - 0.3 * k], [0.02, 0.2, 0.2], TRAFFIC_LIGHT, tl,
                  np.array(col) * (1.0 if lit else 0.25), PART_BULB if lit else PART_PLAIN)
    else:
        b.cylinder([x, y, 0.15], r, rng.uniform(3.0, 9.0), POLE, pid, metal)


def make_scene(seed: int, x_min: float, x_max: float, path_x: tuple[float, float]) -> Scene:
    """Procedural street between x_min and x_max (metres); the ego drives at y = ego_y for x in path_x.

    The ego's lane is kept free of objects along path_x (plus margins) so the cameras never sit inside one.
    """
    rng = np.random.default_rng(seed)
    b = MeshBuilder()
    ids = _Ids()
    lights: list = []
    W = float(rng.uniform(4.5, 7.0))  # road half width
    S = float(rng.uniform(2.0, 4.0))  # sidewalk width
    lane_y = min(W / 2, W - 3.1)  # lane centre, clear of the parked cars at |y| = W - 1.15
    ego_y = -lane_y
    far = 400.0
    # ground: road, sidewalks with a curb, a big terrain plane beyond everything
    b.box([(x_min + x_max) / 2 + far / 2, 0, -0.25], [x_max - x_min + far, 2 * W, 0.5], ROAD, 0,
          _jitter(rng, CLASS_ALBEDO[ROAD], 0.02))
    for side in (-1, 1):
        b.box([(x_min + x_max) / 2 + far / 2, side * (W + S / 2), -0.175], [x_max - x_min + far, S, 0.65],
              SIDEWALK, 0, _jitter(rng, CLASS_ALBEDO[SIDEWALK], 0.03))
        b.box([(x_min + x_max) / 2 + far / 2, side * (W + S + far / 2), -0.26],
              [x_max - x_min + far, far, 0.5], TERRAIN, 0, _jitter(rng, CLASS_ALBEDO[TERRAIN], 0.03))
    edge = W + S
    # blocks along both sides
    for side in (-1, 1):
        x = x_min
        while x < x_max + 60:
            length = float(rng.uniform(10, 30))
            kind = rng.choice(["building", "park", "wall"], p=[0.5, 0.25, 0.25])
            xc = x + length / 2
            if kind == "building":
                setback = rng.uniform(0.0, 1.5)
                depth = rng.uniform(10, 16)
                h = rng.uniform(6, 28)
                color = _jitter(rng, BUILDING_PALETTE[rng.integers(len(BUILDING_PALETTE))], 0.05)
                b.box([xc, side * (edge + setback + depth / 2), h / 2 - 0.1], [length - 0.05, depth, h], BUILDING,
                      0, color)
                if setback > 0.3:
                    b.box([xc, side * (edge + setback / 2), 0.05], [length, setback, 0.3], TERRAIN, 0,
                          _jitter(rng, CLASS_ALBEDO[TERRAIN]))
            else:
                for _ in range(int(rng.integers(1, 4))):  # background buildings
                    bl = rng.uniform(8, 20)
                    bh = rng.uniform(8, 30)
                    b.box([xc + rng.uniform(-8, 8), side * (edge + rng.uniform(25, 50)), bh / 2], [bl, 12, bh],
                          BUILDING, 0, _jitter(rng, BUILDING_PALETTE[rng.integers(len(BUILDING_PALETTE))], 0.05))
                n_trees = int(rng.integers(1, 4)) if kind == "park" else int(rng.integers(0, 3))
                for _ in range(n_trees):
                    tx = rng.uniform(x + 1, x + length - 1)
                    ty = side * (edge + rng.uniform(2.0, 12.0))
                    th = rng.uniform(2.0, 4.0)
                    green = _jitter(rng, CLASS_ALBEDO[VEGETATION], 0.1)
                    b.cylinder([tx, ty, 0], rng.uniform(0.12, 0.25), th + 0.5, VEGETATION, 0,
                               _jitter(rng, [0.25, 0.17, 0.1]))
                    cr = rng.uniform(1.5, 3.0)
                    b.ellipsoid([tx, ty, th + cr * 0.8], [cr, cr, cr * rng.uniform(0.8, 1.3)], VEGETATION, 0, green)
                if kind == "park" and rng.random() < 0.6:  # hedge
                    b.box([xc, side * (edge + 0.8), 0.5], [length * rng.uniform(0.4, 0.9), 0.9, 1.0], VEGETATION, 0,
                          _jitter(rng, CLASS_ALBEDO[VEGETATION], 0.1))
                if kind == "wall":
                    is_fence = rng.random() < 0.5
                    hw = rng.uniform(0.9, 2.2)
                    cls = FENCE if is_fence else WALL
                    b.box([xc, side * (edge + 0.4), 0.15 + hw / 2], [length, 0.06 if is_fence else 0.3, hw], cls,
                          0, _jitter(rng, CLASS_ALBEDO[cls], 0.06))
            x += length
    # street trees at the outer edge of the sidewalks
    for side in (-1, 1):
        x = x_min + rng.uniform(0, 20)
        while x < x_max + 40:
            if rng.random() < 0.5:
                tx, ty, cr = x, side * (edge - 0.6), rng.uniform(1.2, 2.2)
                b.cylinder([tx, ty, 0.15], rng.uniform(0.1, 0.18), 2.5, VEGETATION, 0, _jitter(rng, [0.25, 0.17, 0.1]))
                b.ellipsoid([tx, ty, 2.4 + cr], [cr, cr, cr * rng.uniform(0.9, 1.4)], VEGETATION, 0,
                            _jitter(rng, CLASS_ALBEDO[VEGETATION], 0.1))
            x += rng.uniform(10, 25)
    # poles with lamps / signs / traffic lights along the curbs
    for side in (-1, 1):
        x = x_min + rng.uniform(0, 8)
        while x < x_max + 40:
            _pole_group(b, rng, x, side * (W + 0.45), side, ids, lights)
            x += rng.uniform(8, 18)

    def lane_free(xc: float, yc: float, half_len: float, half_w: float) -> bool:
        """True when a footprint does not block the ego lane along its path."""
        if xc + half_len < path_x[0] - 6 or xc - half_len > path_x[1] + 12:
            return True
        return abs(yc - ego_y) > half_w + 1.3

    taken: list[tuple[float, float, float, float]] = []  # footprints (x, y, half length, half width) at t = 0

    def clear(xc: float, yc: float, half_len: float, half_w: float, margin: float = 0.3) -> bool:
        """True when a footprint keeps `margin` m from every footprint placed before (things never interpenetrate:
        a geometric segmentation could not tell them apart, and the ground truth would be wrong where they do)."""
        return all(abs(xc - x) >= half_len + hl + margin or abs(yc - y) >= half_w + hw + margin
                   for x, y, hl, hw in taken)

    # parked cars along the curbs, at least 0.5 m apart
    for side in (-1, 1):
        x = x_min + rng.uniform(0, 6)
        front = -np.inf  # front end of the vehicle parked last on this side
        while x < x_max + 40:
            if rng.random() < 0.55:
                cls = CAR if rng.random() < 0.85 else TRUCK
                half = _HALF_LENGTH[cls]
                x = max(x, front + 0.5 + half)  # a truck after a car would otherwise reach into it
                yc = side * (W - 1.15)
                if lane_free(x, yc, 2.5 if cls == CAR else 4.5, 1.0 if cls == CAR else 1.25):
                    _vehicle(b, rng, x, yc, 0.0 if side < 0 else np.pi, cls, ids())
                    front = x + half
                    taken.append((x, yc, half, _HALF_WIDTH[cls]))
                x += 9.0 if cls == TRUCK else 5.5
            else:
                x += rng.uniform(3, 10)
    velocity: dict[int, np.ndarray] = {}

    def moves_safely(xc: float, oncoming: bool) -> bool:
        """Moving things are oncoming (other lanes) or start ahead of the ego's path and drive away from it."""
        return oncoming or xc > path_x[1] + 12

    # traffic in the lanes: oncoming, or ahead of the ego driving the same way
    for _ in range(int(rng.integers(3, 8))):
        cls = rng.choice([CAR, CAR, CAR, TRUCK, BUS])
        xc = rng.uniform(x_min + 10, x_max + 40)
        oncoming = rng.random() < 0.5
        yc = lane_y if oncoming else ego_y + rng.choice([0.0, -0.2, 0.2])
        hl = {CAR: 2.5, TRUCK: 4.5, BUS: 6.3}[int(cls)]
        if lane_free(xc, yc, hl, 1.3) and clear(xc, yc, hl, _HALF_WIDTH[int(cls)]):
            inst = ids()
            _vehicle(b, rng, xc, yc, np.pi if oncoming else 0.0, int(cls), inst)
            taken.append((xc, yc, hl, _HALF_WIDTH[int(cls)]))
            if moves_safely(xc - hl, oncoming) and rng.random() < 0.7:
                velocity[inst] = np.array([-1.0 if oncoming else 1.0, 0, 0]) * rng.uniform(3, 12)
    # cyclists / motorcyclists on the road
    for _ in range(int(rng.integers(3, 8))):
        xc = rng.uniform(path_x[0] + 4, x_max + 30)
        oncoming = rng.random() < 0.5
        yc = (W - 2.5) * (1 if oncoming else -1)  # at the outer edge of the lane, next to the parked cars
        if lane_free(xc, yc, 1.0, 0.5) and clear(xc, yc, 1.0, 0.4):
            motor = rng.random() < 0.25
            pair = _bike(b, rng, xc, yc, np.pi if oncoming else 0.0, ids, motor=motor)
            taken.append((xc, yc, 1.0, 0.4))
            if moves_safely(xc - 1.0, oncoming) and rng.random() < 0.7:
                v = np.array([-1.0 if oncoming else 1.0, 0, 0]) * rng.uniform(3, 9 if motor else 5)
                velocity.update({i: v for i in pair})
    # pedestrians on the sidewalks, a few crossing
    for side in (-1, 1):
        x = x_min + rng.uniform(0, 5)
        while x < x_max + 40:
            inst, yaw = ids(), float(rng.choice([0, np.pi]))
            _person(b, rng, x, side * rng.uniform(W + 0.9, W + S - 0.3), 0.15, inst, yaw=yaw)
            if rng.random() < 0.6:  # walking along the sidewalk
                velocity[inst] = np.array([np.cos(yaw), 0, 0]) * rng.uniform(0.8, 1.6)
            x += rng.uniform(3, 12)
    for _ in range(int(rng.integers(0, 3))):
        xc = rng.uniform(x_min + 10, x_max + 30)
        yc = rng.uniform(-W + 0.5, W - 0.5)
        if lane_free(xc, yc, 0.3, 0.3) and clear(xc, yc, 0.3, 0.3):
            _person(b, rng, xc, yc, 0.0, ids(), yaw=np.pi / 2)
    vel = np.zeros((ids.n + 1, 3), np.float32)
    for i, v in velocity.items():
        vel[i] = v
    sun_az, sun_el = rng.uniform(0, 2 * np.pi), rng.uniform(np.radians(25), np.radians(60))
    sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
    return b.build(road_half_width=W, ego_y=ego_y, lights=np.asarray(lights, np.float64).reshape(-1, 3),
                   sun_dir=sun, texture_seed=int(rng.integers(2**31)), n_instances=ids.n,
                   velocity=vel)
