"""KITTI as a Frame source: the 3D-object layout and the raw (date/drive) layout, local or s3://.

Object layout (`data.root` holds `training/` and/or `testing/`, or is one of them):
  <split>/velodyne/NNNNNN.bin (or velodyne_reduced/), image_2/NNNNNN.png, image_3/ (optional), calib/NNNNNN.txt
  with `P0..P3` (3x4), `R0_rect` (3x3), `Tr_velo_to_cam` (3x4). Frame ids `kitti/<split>/NNNNNN`; no timestamps.
Raw layout (`data.root` holds `<date>/` folders, or is one):
  <date>/calib_cam_to_cam.txt (`P_rect_0i`, `R_rect_00`), <date>/calib_velo_to_cam.txt (`R` 9, `T` 3),
  <date>/<date>_drive_XXXX_sync/velodyne_points/data/NNNNNNNNNN.bin (+ timestamps.txt),
  image_02/data/NNNNNNNNNN.png (+ timestamps.txt). Frame ids `kitti/<drive>/NNNNNNNNNN`.
Projection of a Velodyne point X into camera i: `P_i @ R0_rect @ Tr_velo_to_cam @ X` = `K @ (T_cam_lidar @ X)[:3]`
with K = P_i[:, :3] and T_cam_lidar = [I | K^-1 P_i[:, 3]] @ R0_rect @ Tr_velo_to_cam (the rectified camera i).
Points: float32 x, y, z (m, Velodyne frame: x forward, y left, z up), reflectance 0..1.
"""
from __future__ import annotations

import posixpath
from typing import Any

import numpy as np

from raydseg import storage
from raydseg.config import Config
from raydseg.data.schema import image_size
from raydseg.data.sources.select import apply_stride_and_limit, select_cameras, sync_reason

OBJECT_CAMERAS = {"image_2": "P2", "image_3": "P3"}
RAW_CAMERAS = {"image_02": "P_rect_02", "image_03": "P_rect_03"}


class KittiError(ValueError):
    """A frame that cannot be read; the message is the reject reason."""


def _name(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if storage.is_s3(path) else str(path).rstrip("/").split("/")[-1]


def parse_calib(text: str) -> dict[str, np.ndarray]:
    """KITTI calibration text (`KEY: v1 v2 ...` per line) -> {key: float64 array}; non-numeric lines are skipped."""
    out = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, vals = line.partition(":")
        try:
            out[key.strip()] = np.array([float(v) for v in vals.split()], dtype=np.float64)
        except ValueError:
            continue
    return out


def _need(calib: dict[str, np.ndarray], key: str, n: int, where: str) -> np.ndarray:
    if key not in calib:
        raise KittiError(f"calibration {where} has no {key} row")
    if calib[key].size != n:
        raise KittiError(f"calibration {where}: {key} has {calib[key].size} values, expected {n}")
    return calib[key]


def camera_from_projection(P: np.ndarray, R0: np.ndarray, Tr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), T_cam_lidar (4, 4)) from a rectified projection P (3, 4), R0_rect (3, 3), Tr_velo_to_cam (3, 4).

    K @ (T_cam_lidar @ X)[:3] == P @ R0 @ Tr @ X for homogeneous Velodyne points X (m -> px).
    """
    P = np.asarray(P, dtype=np.float64).reshape(3, 4)
    K = P[:, :3].copy()
    shift = np.eye(4)
    shift[:3, 3] = np.linalg.solve(K, P[:, 3])
    R0h = np.eye(4)
    R0h[:3, :3] = np.asarray(R0, dtype=np.float64).reshape(3, 3)
    Trh = np.eye(4)
    Trh[:3, :] = np.asarray(Tr, dtype=np.float64).reshape(3, 4)
    T = shift @ R0h @ Trh
    # R0_rect and Tr are rigid to ~1e-6; re-orthonormalise so the Frame validator's rigidity test holds exactly
    u, _, vt = np.linalg.svd(T[:3, :3])
    T[:3, :3] = u @ vt
    return K, T


def read_points(path: str) -> np.ndarray:
    """(N, 4) float32 from a KITTI .bin (x, y, z m, reflectance); truncated files raise KittiError."""
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, OSError) as e:
        raise KittiError(f"missing point cloud {_name(path)} ({type(e).__name__})") from e
    if len(data) == 0 or len(data) % 16:
        raise KittiError(f"truncated point cloud {_name(path)}: {len(data)} bytes is not a positive multiple of "
                         "16 (4 float32 per point)")
    return np.frombuffer(data, dtype=np.float32).reshape(-1, 4).copy()


def read_image(path: str) -> tuple[bytes, int, int]:
    """(bytes, width, height) of an image file; missing or unreadable images raise KittiError."""
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, OSError) as e:
        raise KittiError(f"missing image {_name(path)} ({type(e).__name__})") from e
    try:
        w, h = image_size(data)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the reason
        raise KittiError(f"unreadable image {_name(path)}: {type(e).__name__}: {e}") from e
    return data, int(w), int(h)


def _object_split_dirs(root: str, split: str) -> list[tuple[str, str]]:
    names = storage.listdir(root)
    if "calib" in names:  # root is one split folder
        return [(_name(root), root)]
    splits = [split] if split else [s for s in ("training", "testing") if s in names]
    return [(s, storage.join(root, s)) for s in splits if s in names]


def _raw_date_dirs(root: str) -> list[str]:
    names = storage.listdir(root)
    if "calib_cam_to_cam.txt" in names:
        return [root]
    return [storage.join(root, n) for n in names
            if storage.exists(storage.join(root, n, "calib_cam_to_cam.txt"))]


def layout_problem(cfg: Config) -> str | None:
    """None when data.root holds a KITTI object split or raw drives; else what was looked for."""
    if _object_split_dirs(cfg.data.root, cfg.data.split) or _raw_date_dirs(cfg.data.root):
        return None
    return (f"data.root: no KITTI data in {cfg.data.root} (looked for object splits training/ testing/ with calib/, "
            "or raw date folders with calib_cam_to_cam.txt)")


def list_shards(cfg: Config) -> list[dict[str, Any]]:
    """One shard per `data.shard_frames` object frames of a split, or per raw drive (stride / max frames applied)."""
    d, root = cfg.data, cfg.data.root
    shards: list[dict[str, Any]] = []
    for split, sdir in _object_split_dirs(root, d.split):
        names = storage.listdir(sdir)
        velo = "velodyne" if "velodyne" in names else "velodyne_reduced"
        frames = sorted(n[:-4] for n in storage.listdir(storage.join(sdir, velo)) if n.endswith(".bin"))
        cams = [c for c in OBJECT_CAMERAS if c in names]
        shards.append({"layout": "object", "dir": sdir, "split": split, "velodyne": velo, "cameras": cams,
                       "frames": frames})
    if not shards:
        for ddir in _raw_date_dirs(root):
            for drive in storage.listdir(ddir):
                vdir = storage.join(ddir, drive, "velodyne_points", "data")
                if not drive.endswith("_sync") or not storage.exists(vdir):
                    continue
                frames = sorted(n[:-4] for n in storage.listdir(vdir) if n.endswith(".bin"))
                cams = [c for c in RAW_CAMERAS if storage.exists(storage.join(ddir, drive, c))]
                shards.append({"layout": "raw", "dir": ddir, "drive": drive, "cameras": cams, "frames": frames})
    shards = apply_stride_and_limit(shards, d.frame_stride, d.max_frames)
    out = []
    per = max(int(d.shard_frames), 1)
    for s in shards:  # object splits are one big folder: cut them into shards of `shard_frames`
        step = per if s["layout"] == "object" else len(s["frames"])
        out += [{**s, "frames": s["frames"][i:i + step]} for i in range(0, len(s["frames"]), step)]
    return out


def _timestamps(path: str) -> list[int] | None:
    """KITTI raw timestamps.txt ('2011-09-26 13:02:25.964389445' per line) -> microseconds since the epoch."""
    if not storage.exists(path):
        return None
    out = []
    for line in storage.read_bytes(path).decode().splitlines():
        if line.strip():
            out.append(int(np.datetime64(line.strip().replace(" ", "T"), "ns").astype(np.int64) // 1000))
    return out


def _object_frames(shard: dict, cfg: Config) -> tuple[list[dict], list[dict]]:
    sdir, split = shard["dir"], shard["split"]
    cams = select_cameras(shard["cameras"], cfg.data.cameras)
    rows, rejects = [], []
    for num in shard["frames"]:
        fid = f"kitti/{split}/{num}"
        try:
            calib_path = storage.join(sdir, "calib", f"{num}.txt")
            if not storage.exists(calib_path):
                raise KittiError(f"missing calibration file calib/{num}.txt")
            calib = parse_calib(storage.read_bytes(calib_path).decode(errors="replace"))
            where = f"calib/{num}.txt"
            R0 = _need(calib, "R0_rect", 9, where)
            Tr = _need(calib, "Tr_velo_to_cam", 12, where)
            pts = read_points(storage.join(sdir, shard["velodyne"], f"{num}.bin"))
            cameras = []
            for cam in cams:
                P = _need(calib, OBJECT_CAMERAS[cam], 12, where)
                K, T = camera_from_projection(P, R0, Tr)
                data, w, h = read_image(storage.join(sdir, cam, f"{num}.png"))
                cameras.append({"name": cam, "image": data, "width": w, "height": h, "K": K, "T_cam_lidar": T,
                                "timestamp_us": 0, "gt_semantic": None, "gt_instance": None})
            if not cameras:
                raise KittiError(f"no camera of {cfg.data.cameras or list(OBJECT_CAMERAS)} in {split}")
            rows.append({"frame_id": fid, "sequence": f"kitti/{split}", "timestamp_us": 0, "points": pts,
                         "ring": None, "gt_label": None, "gt_instance": None, "cameras": cameras})
        except KittiError as e:
            rejects.append({"id": fid, "reason": str(e)})
    return rows, rejects


def _raw_frames(shard: dict, cfg: Config) -> tuple[list[dict], list[dict]]:
    ddir, drive = shard["dir"], shard["drive"]
    ddrive = storage.join(ddir, drive)
    cams = select_cameras(shard["cameras"], cfg.data.cameras)
    rows, rejects = [], []
    try:
        c2c = parse_calib(storage.read_bytes(storage.join(ddir, "calib_cam_to_cam.txt")).decode(errors="replace"))
        v2c_path = storage.join(ddir, "calib_velo_to_cam.txt")
        if not storage.exists(v2c_path):
            raise KittiError("missing calibration file calib_velo_to_cam.txt")
        v2c = parse_calib(storage.read_bytes(v2c_path).decode(errors="replace"))
        R0 = _need(c2c, "R_rect_00", 9, "calib_cam_to_cam.txt")
        Tr = np.hstack([_need(v2c, "R", 9, "calib_velo_to_cam.txt").reshape(3, 3),
                        _need(v2c, "T", 3, "calib_velo_to_cam.txt").reshape(3, 1)])
        Ps = {c: _need(c2c, RAW_CAMERAS[c], 12, "calib_cam_to_cam.txt") for c in cams}
    except KittiError as e:
        return [], [{"id": f"kitti/{drive}/{n}", "reason": str(e)} for n in shard["frames"]]
    velo_ts = _timestamps(storage.join(ddrive, "velodyne_points", "timestamps.txt"))
    cam_ts = {c: _timestamps(storage.join(ddrive, c, "timestamps.txt")) for c in cams}
    for num in shard["frames"]:
        fid, idx = f"kitti/{drive}/{num}", int(num)
        try:
            lidar_us = velo_ts[idx] if velo_ts and idx < len(velo_ts) else 0
            stamps = {c: cam_ts[c][idx] for c in cams if cam_ts[c] and idx < len(cam_ts[c])}
            reason = sync_reason(lidar_us, stamps, cfg.data.sync_tolerance_us) if velo_ts else None
            if reason:
                raise KittiError(reason)
            pts = read_points(storage.join(ddrive, "velodyne_points", "data", f"{num}.bin"))
            cameras = []
            for cam in cams:
                K, T = camera_from_projection(Ps[cam], R0, Tr)
                data, w, h = read_image(storage.join(ddrive, cam, "data", f"{num}.png"))
                cameras.append({"name": cam, "image": data, "width": w, "height": h, "K": K, "T_cam_lidar": T,
                                "timestamp_us": stamps.get(cam, lidar_us), "gt_semantic": None, "gt_instance": None})
            if not cameras:
                raise KittiError(f"no camera of {cfg.data.cameras or list(RAW_CAMERAS)} in drive {drive}")
            rows.append({"frame_id": fid, "sequence": f"kitti/{drive}", "timestamp_us": lidar_us, "points": pts,
                         "ring": None, "gt_label": None, "gt_instance": None, "cameras": cameras})
        except KittiError as e:
            rejects.append({"id": fid, "reason": str(e)})
    return rows, rejects


def read_shard(shard: dict, cfg: Config) -> tuple[list[dict], list[dict]]:
    """(Frame rows, rejects {id, reason}) of one shard from `list_shards`."""
    if shard["layout"] == "object":
        return _object_frames(shard, cfg)
    return _raw_frames(shard, cfg)
