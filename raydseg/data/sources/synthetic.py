"""Synthetic source: procedural street scenes ray-cast with Open3D, with exact per-pixel and per-point ground truth.

One shard is one sequence: a static street scene (synthetic_scene.make_scene) through which the ego vehicle
drives forward along +x at `ego_speed_mps`, one LiDAR sweep + one front camera image every `frame_interval_us`,
so consecutive frames overlap; some traffic, cyclists and pedestrians move at constant velocity (never towards
the ego lane). Everything is a pure function of (seed, config): the same seed gives
byte-identical frames. Training sequences and evaluation scenes draw their scene seeds from disjoint streams.

Frames: `synthetic/<sequence>/<timestamp_us>`, LiDAR frame x forward, y left, z up, mounted at lidar_height_m;
the camera sits 0.3 m ahead of and 0.25 m below the LiDAR, pitched down by camera_pitch_deg; T_cam_lidar maps
LiDAR coordinates to the OpenCV camera frame (x right, y down, z forward) and pixel = K X / z exactly (pixel
(u, v) is the ray through the integer coordinates u, v). Ring 0 is the lowest beam.
"""
from __future__ import annotations

import numpy as np

from raydseg.config import SyntheticConfig
from raydseg.data.schema import encode_png
from raydseg.data.sources.synthetic_render import Raycaster, camera_rays, render_camera, render_lidar
from raydseg.data.sources.synthetic_scene import make_scene

CONDITIONS = ("day", "night", "fog")
CAMERA_NAME = "front"
CAMERA_IN_LIDAR = np.array([0.3, 0.0, -0.25])  # camera centre in the LiDAR frame (m)
EVAL_SPACING_M = 8.0
_TRAIN_STREAM, _EVAL_STREAM, _LABELLED_STREAM = 1, 2, 3  # scene seed streams: disjoint places
_T0_US = 1_700_000_000_000_000

# Cityscapes trainId -> labelId (255 void -> 0 unlabeled)
TRAINID_TO_LABELID = np.zeros(256, np.uint8)
TRAINID_TO_LABELID[:19] = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def _scene_seed(seed: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream, index]).generate_state(1)[0])


def intrinsics(cfg: SyntheticConfig, width: int | None = None, height: int | None = None) -> np.ndarray:
    """(3, 3) pinhole K for the configured horizontal FOV; principal point at the image centre."""
    w, h = width or cfg.width, height or cfg.height
    f = (w / 2) / np.tan(np.radians(cfg.hfov_deg) / 2)
    return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])


def T_cam_lidar(cfg: SyntheticConfig) -> np.ndarray:
    """(4, 4) rigid LiDAR -> OpenCV camera transform (camera CAMERA_IN_LIDAR, pitched down camera_pitch_deg)."""
    base = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=np.float64)  # LiDAR axes -> camera axes
    a = np.radians(cfg.camera_pitch_deg)
    pitch = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    R = pitch @ base
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ CAMERA_IN_LIDAR
    return T


def list_shards(cfg: SyntheticConfig, seed: int) -> list[dict]:
    """One shard per training sequence; the condition cycles through cfg.conditions."""
    conds = list(cfg.conditions) or ["day"]
    bad = [c for c in conds if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown synthetic condition(s) {bad} (known: {', '.join(CONDITIONS)})")
    return [{"sequence": f"seq{i:04d}_{conds[i % len(conds)]}", "seed": _scene_seed(seed, _TRAIN_STREAM, i),
             "condition": conds[i % len(conds)], "index": i, "frames": cfg.frames_per_sequence}
            for i in range(cfg.n_sequences)]


class _Rig:
    """Scene + sensors of one sequence; frame k is taken at LiDAR origin `lidar_origin(k)` and time k * dt_s."""

    def __init__(self, scene_seed: int, n_frames: int, step_m: float, dt_s: float, cfg: SyntheticConfig) -> None:
        self.cfg, self.step, self.dt = cfg, step_m, dt_s
        path_end = max(n_frames - 1, 0) * step_m
        self.scene = make_scene(scene_seed, -30.0, path_end + 100.0, (0.0, path_end))
        self._rc: tuple[int, Raycaster] | None = None
        self.T = T_cam_lidar(cfg)
        self.R_world_lidar = np.eye(3)  # the ego drives straight along +x
        self._rays: np.ndarray | None = None
        self._rays_key: tuple[int, int] | None = None

    def raycaster(self, k: int) -> Raycaster:
        """Raycaster of the scene at frame k (moving things displaced by velocity * k * dt)."""
        moving = self.scene.velocity is not None and bool(self.scene.velocity.any())
        if self._rc is None or (moving and self._rc[0] != k):
            self._rc = (k, Raycaster(self.scene, self.cfg.raycast_threads, self.scene.vertices_at(k * self.dt)))
        return self._rc[1]

    def lidar_origin(self, k: int) -> np.ndarray:
        return np.array([k * self.step, self.scene.ego_y, self.cfg.lidar_height_m])

    def camera(self, k: int, condition: str, rng: np.random.Generator, width: int, height: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(K (3, 3), rgb (H, W, 3) uint8, trainIds (H, W) uint8, instances (H, W) uint16) of frame k."""
        cfg = self.cfg
        K = intrinsics(cfg, width, height)
        R_world_cam = self.R_world_lidar @ self.T[:3, :3].T
        o = self.lidar_origin(k)
        cam_o = o + self.R_world_lidar @ CAMERA_IN_LIDAR
        fwd = self.R_world_lidar @ np.array([1.0, 0, -0.06])
        fwd /= np.linalg.norm(fwd)
        heads = [(o + self.R_world_lidar @ np.array([1.8, s, -1.1]), fwd) for s in (-0.75, 0.75)]
        if self._rays_key != (width, height):
            self._rays, self._rays_key = camera_rays(K, width, height, R_world_cam), (width, height)
        rgb, sem, inst = render_camera(self.raycaster(k), self.scene, cam_o, R_world_cam, K, width, height,
                                       condition, rng, fog_density=cfg.fog_density, noise_sigma=cfg.night_noise,
                                       headlights=heads, shadows=cfg.shadows, dirs=self._rays)
        return K, rgb, sem, inst

    def lidar(self, k: int, condition: str, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(points (N, 4) float32, ring (N,) uint8, gt_label (N,) uint8, gt_instance (N,) int32) of frame k."""
        cfg = self.cfg
        return render_lidar(self.raycaster(k), self.scene, self.lidar_origin(k), self.R_world_lidar, rng,
                            beams=cfg.beams, fov_up_deg=cfg.fov_up_deg, fov_down_deg=cfg.fov_down_deg,
                            azimuth_steps=cfg.azimuth_steps, max_range=cfg.max_range_m, min_range=cfg.min_range_m,
                            range_noise=cfg.range_noise_m, dropout=cfg.dropout, intensity_noise=cfg.intensity_noise,
                            condition=condition, fog_density=cfg.fog_density)


def generate_sequence(shard: dict, cfg: SyntheticConfig) -> list[dict]:
    """Frame rows (raydseg.data.schema row form) of one sequence shard from list_shards."""
    condition = shard.get("condition", "day")
    if condition not in CONDITIONS:
        raise ValueError(f"unknown synthetic condition '{condition}' (known: {', '.join(CONDITIONS)})")
    if not 1 <= cfg.beams <= 256:
        raise ValueError(f"synthetic.beams must be in [1, 256] (ring is uint8), got {cfg.beams}")
    n = int(shard.get("frames", cfg.frames_per_sequence))
    step = cfg.ego_speed_mps * cfg.frame_interval_us * 1e-6
    rig = _Rig(int(shard["seed"]), n, step, cfg.frame_interval_us * 1e-6, cfg)
    T = rig.T
    t0 = _T0_US + int(shard.get("index", 0)) * 3_600_000_000
    rows = []
    for k in range(n):
        rng = np.random.default_rng([int(shard["seed"]), k])
        ts = t0 + k * cfg.frame_interval_us
        pts, ring, label, inst = rig.lidar(k, condition, rng)
        K, rgb, sem, pinst = rig.camera(k, condition, rng, cfg.width, cfg.height)
        rows.append({
            "frame_id": f"synthetic/{shard['sequence']}/{ts}", "sequence": shard["sequence"], "timestamp_us": ts,
            "points": pts, "ring": ring, "gt_label": label, "gt_instance": inst,
            "cameras": [{"name": CAMERA_NAME, "image": encode_png(rgb), "width": cfg.width, "height": cfg.height,
                         "K": K, "T_cam_lidar": T.copy(), "timestamp_us": ts,
                         "gt_semantic": encode_png(sem), "gt_instance": encode_png(pinst)}],
        })
    return rows


def render_eval_images(condition: str, cfg: SyntheticConfig, seed: int, labelled_train: int = 0):
    """Yield (scene index, frame index, rgb (H, W, 3) uint8, trainIds (H, W) uint8) of the eval split, or with
    `labelled_train` > 0 that many images of the labelled training split (supervised fine-tuning).

    Scenes come from the eval (or labelled) seed stream, disjoint from the unlabelled training scenes and from each
    other, and do not depend on the condition, so the day, night and fog splits show the same places."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown synthetic condition '{condition}' (known: {', '.join(CONDITIONS)})")
    per = max(cfg.eval_images_per_scene, 1)
    total = labelled_train or cfg.eval_images_per_condition
    for s in range(-(-total // per)):
        n = min(per, total - s * per)
        sseed = _scene_seed(seed, _LABELLED_STREAM if labelled_train else _EVAL_STREAM, s)
        rig = _Rig(sseed, per, EVAL_SPACING_M, EVAL_SPACING_M / max(cfg.ego_speed_mps, 0.1), cfg)
        for k in range(n):
            rng = np.random.default_rng([sseed, k, CONDITIONS.index(condition)])
            _, rgb, sem, _ = rig.camera(k, condition, rng, cfg.width, cfg.height)
            yield s, k, rgb, sem


def write_eval_split(out_dir: str, condition: str, cfg: SyntheticConfig, seed: int, labelled_train: int = 0) -> int:
    """Render the camera-only eval split of `condition` in the Cityscapes layout under out_dir (local or s3://):
    leftImg8bit/val/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png and
    gtFine/val/<city>/<same>_gtFine_labelIds.png (Cityscapes labelIds); with `labelled_train` > 0, that many
    images of the labelled training split under leftImg8bit/train, gtFine/train. Returns the number of images."""
    from raydseg import storage

    city, split = cfg.eval_city, "train" if labelled_train else "val"
    count = 0
    for s, k, rgb, sem in render_eval_images(condition, cfg, seed, labelled_train):
        stem = f"{city}_{s:06d}_{k:06d}"
        storage.write_bytes(storage.join(out_dir, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"),
                            encode_png(rgb))
        storage.write_bytes(storage.join(out_dir, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"),
                            encode_png(TRAINID_TO_LABELID[sem]))
        count += 1
    return count
