"""nuScenes v1.0 as a Frame source (no devkit at run time), local or s3://.

Layout under `data.root`: `<data.version>/{scene,sample,sample_data,calibrated_sensor,ego_pose,sensor}.json`
and the sensor files the `sample_data.filename`s name (`samples/LIDAR_TOP/*.pcd.bin`, `samples/CAM_*/*.jpg`,
`sweeps/...`). One shard per scene; one frame per LIDAR_TOP keyframe (or per sweep with `data.sweeps`), with the
keyframe cameras of its sample (sweeps: the nearest-in-time image of each camera).
LiDAR -> camera, as the devkit's `map_pointcloud_to_image`:
  T_cam_lidar = inv(cs_cam) @ inv(ego_pose(t_cam)) @ ego_pose(t_lidar) @ cs_lidar
(cs = calibrated_sensor sensor -> ego, ego_pose = ego -> global; quaternions w, x, y, z).
Points: `.pcd.bin` float32 x5 (x, y, z m in the LIDAR_TOP frame, intensity 0..255, ring 0..31) -> intensity / 255,
ring kept as uint8.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from raydseg import storage
from raydseg.config import Config
from raydseg.data.schema import image_size
from raydseg.data.sources.select import (apply_stride_and_limit, quat_to_matrix, rigid, select_cameras,
                                         sync_reason)

LIDAR = "LIDAR_TOP"
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
TABLES = ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor")


class NuScenesError(ValueError):
    """A frame that cannot be read; the message is the reject reason."""


def load_tables(root: str, version: str) -> dict[str, list[dict]]:
    """The v1.0 JSON tables this reader needs, by name."""
    return {t: json.loads(storage.read_bytes(storage.join(root, version, f"{t}.json"))) for t in TABLES}


def _pose(rec: dict) -> list[list[float]]:
    return rigid(quat_to_matrix(rec["rotation"]), rec["translation"]).tolist()


def layout_problem(cfg: Config) -> str | None:
    """None when data.root/data.version holds every table this reader needs; else the missing ones."""
    tables = storage.join(cfg.data.root, cfg.data.version)
    missing = [t for t in TABLES if not storage.exists(storage.join(tables, f"{t}.json"))]
    if not missing:
        return None
    names = ", ".join(f"{m}.json" for m in missing)
    return f"data.root: no nuScenes {cfg.data.version} tables in {tables} (missing {names})"


def list_shards(cfg: Config) -> list[dict[str, Any]]:
    """One shard per scene; each frame carries its file names, timestamps and poses (read_shard needs no tables)."""
    d = cfg.data
    tab = load_tables(d.root, d.version)
    by = {t: {r["token"]: r for r in tab[t]} for t in ("sample", "calibrated_sensor", "ego_pose", "sensor")}

    def channel(sd: dict) -> str:
        cs = by["calibrated_sensor"].get(sd.get("calibrated_sensor_token"))
        if cs is not None and cs.get("sensor_token") in by["sensor"]:
            return by["sensor"][cs["sensor_token"]]["channel"]
        return sd.get("channel") or (sd.get("filename", "").split("/")[1] if "/" in sd.get("filename", "") else "")

    scene_of = {s["token"]: s["scene_token"] for s in tab["sample"]}
    per_scene: dict[str, dict[str, list[dict]]] = {}
    for sd in tab["sample_data"]:
        scene = scene_of.get(sd.get("sample_token"))
        if scene is not None:
            per_scene.setdefault(scene, {}).setdefault(channel(sd), []).append(sd)

    def sensor_rec(sd: dict) -> dict[str, Any]:
        rec: dict[str, Any] = {"token": sd["token"], "filename": sd["filename"], "timestamp_us": int(sd["timestamp"])}
        cs = by["calibrated_sensor"].get(sd.get("calibrated_sensor_token"))
        ep = by["ego_pose"].get(sd.get("ego_pose_token"))
        if cs is None:
            rec["error"] = f"missing calibrated_sensor row {sd.get('calibrated_sensor_token')} for {sd['filename']}"
        elif ep is None:
            rec["error"] = f"missing ego_pose row {sd.get('ego_pose_token')} for {sd['filename']}"
        else:
            rec["sensor_to_ego"] = _pose(cs)
            rec["ego_to_global"] = _pose(ep)
            if cs.get("camera_intrinsic"):
                rec["K"] = cs["camera_intrinsic"]
        return rec

    shards = []
    for scene in tab["scene"]:
        chans = per_scene.get(scene["token"], {})
        lidar = sorted(chans.get(LIDAR, []), key=lambda s: s["timestamp"])
        if not d.sweeps:
            lidar = [s for s in lidar if s.get("is_key_frame", True)]
        cams = select_cameras([c for c in CAMERAS if c in chans], d.cameras)
        cam_sorted = {c: sorted(chans[c], key=lambda s: s["timestamp"]) for c in cams}
        cam_key = {c: {s["sample_token"]: s for s in cam_sorted[c] if s.get("is_key_frame", True)} for c in cams}
        frames = []
        for sd in lidar:
            frame = {"lidar": sensor_rec(sd), "cameras": {}}
            for c in cams:
                cs = cam_key[c].get(sd["sample_token"]) if sd.get("is_key_frame", True) and not d.sweeps else None
                if cs is None and cam_sorted[c]:  # sweeps: nearest image in time
                    ts = np.array([s["timestamp"] for s in cam_sorted[c]])
                    cs = cam_sorted[c][int(np.argmin(np.abs(ts - sd["timestamp"])))]
                if cs is not None:
                    frame["cameras"][c] = sensor_rec(cs)
            frames.append(frame)
        shards.append({"root": d.root, "scene": scene["name"], "frames": frames})
    return apply_stride_and_limit(shards, d.frame_stride, d.max_frames)


def lidar_to_camera(lidar: dict, cam: dict) -> np.ndarray:
    """(4, 4) T_cam_lidar: lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera (m)."""
    l2e, e2g_l = np.asarray(lidar["sensor_to_ego"]), np.asarray(lidar["ego_to_global"])
    c2e, e2g_c = np.asarray(cam["sensor_to_ego"]), np.asarray(cam["ego_to_global"])
    T = np.linalg.inv(c2e) @ np.linalg.inv(e2g_c) @ e2g_l @ l2e
    u, _, vt = np.linalg.svd(T[:3, :3])  # remove float32-quaternion round-off
    T[:3, :3] = u @ vt
    return T


def read_points(path: str) -> tuple[np.ndarray, np.ndarray]:
    """((N, 4) float32 x, y, z, intensity/255, (N,) uint8 ring) from a LIDAR_TOP .pcd.bin (5 float32 per point)."""
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, OSError) as e:
        raise NuScenesError(f"missing point cloud {path.split('/')[-1]} ({type(e).__name__})") from e
    if len(data) == 0 or len(data) % 20:
        raise NuScenesError(f"truncated point cloud {path.split('/')[-1]}: {len(data)} bytes is not a positive "
                            "multiple of 20 (5 float32 per point)")
    raw = np.frombuffer(data, dtype=np.float32).reshape(-1, 5)
    pts = raw[:, :4].copy()
    pts[:, 3] /= 255.0
    return pts, np.clip(raw[:, 4], 0, 255).astype(np.uint8)


def read_shard(shard: dict, cfg: Config) -> tuple[list[dict], list[dict]]:
    """(Frame rows, rejects {id, reason}) of one scene shard from `list_shards`."""
    root, scene = shard["root"], shard["scene"]
    rows, rejects = [], []
    for fr in shard["frames"]:
        lid = fr["lidar"]
        fid = f"nuscenes/{scene}/{lid['timestamp_us']}"
        try:
            for rec in [lid, *fr["cameras"].values()]:
                if "error" in rec:
                    raise NuScenesError(rec["error"])
            if not fr["cameras"]:
                raise NuScenesError(f"no camera of {cfg.data.cameras or list(CAMERAS)} in scene {scene}")
            reason = sync_reason(lid["timestamp_us"], {c: r["timestamp_us"] for c, r in fr["cameras"].items()},
                                 cfg.data.sync_tolerance_us)
            if reason:
                raise NuScenesError(reason)
            pts, ring = read_points(storage.join(root, lid["filename"]))
            cameras = []
            for name, rec in fr["cameras"].items():
                if "K" not in rec:
                    raise NuScenesError(f"camera {name}: calibrated_sensor row has no camera_intrinsic")
                try:
                    data = storage.read_bytes(storage.join(root, rec["filename"]))
                except (FileNotFoundError, OSError) as e:
                    raise NuScenesError(f"missing image {rec['filename']} ({type(e).__name__})") from e
                try:
                    w, h = image_size(data)
                except Exception as e:  # noqa: BLE001 - any decoder failure is the reason
                    raise NuScenesError(f"unreadable image {rec['filename']}: {type(e).__name__}: {e}") from e
                cameras.append({"name": name, "image": data, "width": int(w), "height": int(h),
                                "K": np.asarray(rec["K"], dtype=np.float64).reshape(3, 3),
                                "T_cam_lidar": lidar_to_camera(lid, rec), "timestamp_us": rec["timestamp_us"],
                                "gt_semantic": None, "gt_instance": None})
            rows.append({"frame_id": fid, "sequence": f"nuscenes/{scene}", "timestamp_us": lid["timestamp_us"],
                         "points": pts, "ring": ring, "gt_label": None, "gt_instance": None, "cameras": cameras})
        except NuScenesError as e:
            rejects.append({"id": fid, "reason": str(e)})
    return rows, rejects
