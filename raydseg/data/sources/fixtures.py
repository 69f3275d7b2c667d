"""Tiny datasets in the published KITTI / nuScenes / Waymo v2 layouts, written from known geometry.

Used by the reader tests and `jobs/benchmarks/readers.py`. Each writer returns an oracle dict: world points and
the pixels they must land on, computed with the dataset's own documented formula (not the reader's code path).
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from raydseg.data.schema import camera_distortion, camera_rolling_shutter
from raydseg.data.sources.select import euler_to_matrix, matrix_to_quat, rigid
from raydseg.data.sources.waymo import CAMERAS, DISTORTION


def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _photo_jpg(w: int, h: int, seed: int, quality: int = 90) -> bytes:
    """A (h, w) RGB JPEG with a photo's entropy: smooth blobs, texture at 8 px, gradients and sensor noise (sigma 3);
    about 0.5 MB at 1920x1280, quality 90 (uniform noise would be 3x larger and slower to decode than a photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def upsampled(cell: int, resample: int) -> np.ndarray:
        small = rng.integers(0, 255, (max(h // cell, 2), max(w // cell, 2), 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((w, h), resample), np.float32)

    grad = np.linspace(0, 60, w, dtype=np.float32)[None, :, None] + \
        np.linspace(0, 40, h, dtype=np.float32)[:, None, None]
    img = 0.6 * upsampled(64, Image.BICUBIC) + 0.25 * upsampled(8, Image.BILINEAR) + grad + \
        rng.normal(0, 3, (h, w, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _rot(rx: float, ry: float, rz: float) -> np.ndarray:
    return euler_to_matrix(np.float64(rx), np.float64(ry), np.float64(rz))


def _fmt(a: np.ndarray) -> str:
    return " ".join(f"{v:.12e}" for v in np.asarray(a).reshape(-1))


def _cloud(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = np.c_[rng.uniform(4, 40, n), rng.uniform(-10, 10, n), rng.uniform(-2, 2, n), rng.uniform(0, 1, n)]
    return pts.astype(np.float32)


# ---------------------------------------------------------------- KITTI
KITTI_TR = rigid(np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]]) @ _rot(0.01, -0.02, 0.015), [0.02, -0.07, -0.3])
KITTI_R0 = _rot(0.004, -0.008, 0.01)


def _kitti_P(f: float, cx: float, cy: float, tx: float) -> np.ndarray:
    return np.array([[f, 0, cx, f * tx], [0, f, cy, 0.002], [0, 0, 1, 0.004]])


def kitti_project(P: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(N, 2) pixels of Velodyne points X (N, 3) by KITTI's documented P @ R0_rect @ Tr_velo_to_cam @ X."""
    Xh = np.c_[X, np.ones(len(X))]
    uvw = (P @ rigid(KITTI_R0, [0, 0, 0]) @ KITTI_TR @ Xh.T).T
    return uvw[:, :2] / uvw[:, 2:3]


def write_kitti_object(root: str, n_frames: int = 3, w: int = 96, h: int = 40, n_points: int = 500) -> dict:
    """`root/training/{velodyne,image_2,calib}`; oracle: Velodyne points and their image_2 pixels per frame."""
    P2 = _kitti_P(60.0, w / 2 + 0.3, h / 2 - 0.2, 0.06)
    calib = "\n".join([f"P0: {_fmt(_kitti_P(60.0, w / 2, h / 2, 0))}",
                       f"P1: {_fmt(_kitti_P(60.0, w / 2, h / 2, -0.5))}", f"P2: {_fmt(P2)}",
                       f"P3: {_fmt(_kitti_P(60.0, w / 2, h / 2, -0.47))}",
                       f"R0_rect: {_fmt(KITTI_R0)}", f"Tr_velo_to_cam: {_fmt(KITTI_TR[:3])}",
                       f"Tr_imu_to_velo: {_fmt(np.eye(4)[:3])}"]) + "\n"
    oracle = {"P2": P2, "frames": {}}
    for i in range(n_frames):
        num = f"{i:06d}"
        pts = _cloud(n_points, i)
        _write(f"{root}/training/velodyne/{num}.bin", pts.tobytes())
        _write(f"{root}/training/image_2/{num}.png", _png(w, h, i))
        _write(f"{root}/training/calib/{num}.txt", calib)
        oracle["frames"][num] = {"points": pts, "pixels": kitti_project(P2, pts[:, :3].astype(np.float64))}
    return oracle


def write_kitti_raw(root: str, n_frames: int = 3, w: int = 96, h: int = 40, n_points: int = 400,
                    late_frame: int | None = None, late_us: int = 80_000) -> dict:
    """`root/2011_09_26/{calib_*.txt, 2011_09_26_drive_0001_sync/...}`; `late_frame`'s image is `late_us` late."""
    date, drive = "2011_09_26", "2011_09_26_drive_0001_sync"
    P2 = _kitti_P(60.0, w / 2 - 0.4, h / 2 + 0.1, 0.06)
    _write(f"{root}/{date}/calib_cam_to_cam.txt", "\n".join([
        "calib_time: 09-Jan-2012 13:57:47", "corner_dist: 9.950000e-02",
        f"R_rect_00: {_fmt(KITTI_R0)}", f"P_rect_00: {_fmt(_kitti_P(60.0, w / 2, h / 2, 0))}",
        f"S_rect_02: {w} {h}", f"R_rect_02: {_fmt(np.eye(3))}", f"P_rect_02: {_fmt(P2)}"]) + "\n")
    _write(f"{root}/{date}/calib_velo_to_cam.txt", "\n".join([
        "calib_time: 15-Mar-2012 11:37:16", f"R: {_fmt(KITTI_TR[:3, :3])}", f"T: {_fmt(KITTI_TR[:3, 3])}",
        "delta_f: 0.000000e+00 0.000000e+00", "delta_c: 0.000000e+00 0.000000e+00"]) + "\n")
    base = np.datetime64("2011-09-26T13:02:25.000000000", "ns")
    velo_ts, cam_ts, oracle = [], [], {"P2": P2, "frames": {}, "drive": drive}
    for i in range(n_frames):
        num = f"{i:010d}"
        pts = _cloud(n_points, 100 + i)
        _write(f"{root}/{date}/{drive}/velodyne_points/data/{num}.bin", pts.tobytes())
        _write(f"{root}/{date}/{drive}/image_02/data/{num}.png", _png(w, h, 100 + i))
        t = base + np.timedelta64(i * 103_000_000, "ns")
        velo_ts.append(t)
        cam_ts.append(t + np.timedelta64((late_us if i == late_frame else 4_000) * 1000, "ns"))
        oracle["frames"][num] = {"points": pts, "pixels": kitti_project(P2, pts[:, :3].astype(np.float64))}
    for name, ts in (("velodyne_points", velo_ts), ("image_02", cam_ts)):
        _write(f"{root}/{date}/{drive}/{name}/timestamps.txt",
               "\n".join(str(t).replace("T", " ") for t in ts) + "\n")
    return oracle


# ---------------------------------------------------------------- nuScenes
def write_nuscenes(root: str, n_samples: int = 3, w: int = 80, h: int = 48, n_points: int = 300,
                   cam_offsets_us: tuple[int, ...] = (), version: str = "v1.0-mini") -> dict:
    """v1.0 tables + samples/LIDAR_TOP/*.pcd.bin + samples/CAM_FRONT/*.jpg of one moving scene.

    Oracle per sample: world points and their CAM_FRONT pixels (K @ camera point from the world point directly).
    `cam_offsets_us[i]` delays sample i's camera (default 20 ms).
    """
    K = np.array([[50.0, 0, w / 2 + 0.25], [0, 50.0, h / 2 - 0.5], [0, 0, 1]])
    lidar_cs = rigid(_rot(0.01, -0.02, -np.pi / 2 + 0.01), [0.94, 0.0, 1.84])  # x right, y forward like LIDAR_TOP
    cam_cs = rigid(_rot(-np.pi / 2 + 0.01, 0.005, -np.pi / 2 - 0.02), [1.70, 0.016, 1.51])  # z forward
    sensor = [{"token": "s_lidar", "channel": "LIDAR_TOP", "modality": "lidar"},
              {"token": "s_cam", "channel": "CAM_FRONT", "modality": "camera"}]
    cs = [{"token": "cs_lidar", "sensor_token": "s_lidar", "translation": lidar_cs[:3, 3].tolist(),
           "rotation": matrix_to_quat(lidar_cs[:3, :3]), "camera_intrinsic": []},
          {"token": "cs_cam", "sensor_token": "s_cam", "translation": cam_cs[:3, 3].tolist(),
           "rotation": matrix_to_quat(cam_cs[:3, :3]), "camera_intrinsic": K.tolist()}]
    samples, sds, poses = [], [], []
    oracle: dict = {"K": K, "frames": {}}
    t0 = 1532402927647951

    def ego(t_us: int) -> np.ndarray:  # ego drives along a curve at 10 m/s
        s = (t_us - t0) * 1e-6
        return rigid(_rot(0.0, 0.01, 0.3 + 0.2 * s), [400 + 10 * s, 1180 + 2 * s, 0.1])

    rng = np.random.default_rng(7)
    for i in range(n_samples):
        t_l = t0 + i * 500_000
        t_c = t_l + (cam_offsets_us[i] if i < len(cam_offsets_us) else 20_000)
        st = f"sample{i}"
        samples.append({"token": st, "timestamp": t_l, "scene_token": "scene0",
                        "prev": f"sample{i - 1}" if i else "", "next": f"sample{i + 1}" if i + 1 < n_samples else ""})
        # world points in front of the camera at t_c, written in the lidar frame at t_l
        E_l, E_c = ego(t_l), ego(t_c)
        pc = np.c_[rng.uniform(-3, 3, n_points), rng.uniform(-1.5, 1.5, n_points), rng.uniform(5, 30, n_points)]
        world = (E_c @ cam_cs @ np.c_[pc, np.ones(n_points)].T).T
        lid = (np.linalg.inv(E_l @ lidar_cs) @ world.T).T[:, :3]
        raw = np.c_[lid, rng.uniform(0, 255, n_points), rng.integers(0, 32, n_points)].astype(np.float32)
        uvw = (K @ pc.T).T
        lname = f"samples/LIDAR_TOP/n000-scene__LIDAR_TOP__{t_l}.pcd.bin"
        cname = f"samples/CAM_FRONT/n000-scene__CAM_FRONT__{t_c}.jpg"
        _write(f"{root}/{lname}", raw.tobytes())
        _write(f"{root}/{cname}", _jpg(w, h, i))
        for tok, t, fn, cst, fmt, wh in ((f"sdl{i}", t_l, lname, "cs_lidar", "pcd", (0, 0)),
                                         (f"sdc{i}", t_c, cname, "cs_cam", "jpg", (w, h))):
            E = ego(t)
            poses.append({"token": f"ep_{tok}", "timestamp": t, "translation": E[:3, 3].tolist(),
                          "rotation": matrix_to_quat(E[:3, :3])})
            sds.append({"token": tok, "sample_token": st, "ego_pose_token": f"ep_{tok}", "calibrated_sensor_token": cst,
                        "timestamp": t, "fileformat": fmt, "is_key_frame": True, "height": wh[1], "width": wh[0],
                        "filename": fn, "prev": "", "next": ""})
        oracle["frames"][f"nuscenes/scene-0001/{t_l}"] = {"points": raw, "pixels": uvw[:, :2] / uvw[:, 2:3],
                                                           "cam_offset_us": t_c - t_l}
    scene = [{"token": "scene0", "log_token": "log0", "nbr_samples": n_samples, "first_sample_token": "sample0",
              "last_sample_token": f"sample{n_samples - 1}", "name": "scene-0001", "description": "fixture"}]
    for name, rows in (("scene", scene), ("sample", samples), ("sample_data", sds), ("calibrated_sensor", cs),
                       ("ego_pose", poses), ("sensor", sensor)):
        _write(f"{root}/{version}/{name}.json", json.dumps(rows, indent=0))
    return oracle


# ---------------------------------------------------------------- Waymo v2
WAYMO_CAM_EXT = rigid(_rot(0.01, 0.02, -0.03), [1.5, -0.1, 2.0])  # camera -> vehicle (x fwd, y left, z up)
WAYMO_TOP_EXT = rigid(_rot(0.002, -0.003, 0.05), [1.43, 0.0, 2.18])  # TOP -> vehicle
WAYMO_CAMERA_SIZES = {"FRONT": (1920, 1280), "FRONT_LEFT": (1920, 1280), "FRONT_RIGHT": (1920, 1280),
                      "SIDE_LEFT": (1920, 886), "SIDE_RIGHT": (1920, 886)}  # (width, height) px of the real cameras
WAYMO_CAMERA_YAW = {"FRONT": 0.0, "FRONT_LEFT": np.pi / 4, "FRONT_RIGHT": -np.pi / 4, "SIDE_LEFT": np.pi / 2,
                    "SIDE_RIGHT": -np.pi / 2}  # rad about the vehicle's z axis, for the fixture's extrinsics
WAYMO_LIKE_DISTORTION = (0.04, -0.33, 0.0005, -0.0008, 0.0)  # k1 k2 p1 p2 k3, the order of Waymo's FRONT camera's


def second_return_image(rng: np.random.Generator, r1: np.ndarray, fraction: float) -> np.ndarray:
    """(H * W * 4,) float32 return2 range image: a fraction of the pixels with a first return get a farther one (no
    random draws for fraction 0, so the other fixture values stay as they were)."""
    H, W = r1.shape
    if fraction <= 0:
        return np.zeros(H * W * 4, np.float32)
    r = np.where((r1 > 0) & (rng.uniform(size=(H, W)) < fraction), r1 + rng.uniform(0.5, 20, (H, W)), 0.0)
    return np.stack([r, rng.uniform(0, 1.5, (H, W)) * (r > 0), np.zeros_like(r), np.zeros_like(r)], -1).astype(
        np.float32).reshape(-1)


def write_waymo(root: str, segment: str = "seg-0001", n_frames: int = 3, H: int = 16, W: int = 180,
                w: int = 96, h: int = 64, per_beam: bool = True, pixel_pose: bool = True,
                cam_offsets_us: tuple[int, ...] = (), drop_columns: tuple[str, ...] = (), split: str = "training",
                seed: int = 0, cameras: dict[str, tuple[int, int]] | None = None,
                focal: tuple[float, float] = (40.0, 41.0),
                distortion: tuple[float, ...] = (0.0,) * 5, photo: bool = False, second_return: float = 0.0) -> dict:
    """`root/<split>/<component>/<segment>.parquet` with the v2 column names.

    cameras: name -> (width, height) px (default FRONT at w x h), each with f_u, f_v = `focal` px, its own principal
    point near the centre, `distortion` (k1, k2, p1, p2, k3) and a camera yawed by `WAYMO_CAMERA_YAW`; photo: JPEGs
    with a photo's entropy (`_photo_jpg`) instead of uniform noise; second_return: fraction of pixels with a return2.

    Range images hold returns at pixel centres, so the oracle (vehicle-frame points per frame, computed with
    rotation matrices, in row-major pixel order) must be reproduced exactly. Oracle pixels: Waymo's camera model
    u = c_u - f_u y / x, v = c_v - f_v z / x in the camera frame (x forward, y left, z up).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cameras = {"FRONT": (w, h)} if cameras is None else cameras
    f_u, f_v = focal
    c_u, c_v = w / 2 + 0.3, h / 2 - 0.4
    incl_min, incl_max = -0.30, 0.04
    beams = np.sort(rng.uniform(incl_min, incl_max, H)) if per_beam else None
    incl_rows = (beams if per_beam else incl_min + (np.arange(H) + 0.5) / H * (incl_max - incl_min))[::-1]
    az_corr = np.arctan2(WAYMO_TOP_EXT[1, 0], WAYMO_TOP_EXT[0, 0])
    t0 = 1_550_000_000_000_000
    comp: dict[str, dict[str, list]] = {c: {} for c in ("lidar", "lidar_calibration", "camera_image",
                                                        "camera_calibration", "lidar_pose", "vehicle_pose")}

    def add(c: str, **cols) -> None:
        for k, v in cols.items():
            comp[c].setdefault(k, []).append(v)

    key = {"key.segment_context_name": segment}
    add("lidar_calibration", **key, **{"key.laser_name": 1,
        "[LiDARCalibrationComponent].extrinsic.transform": WAYMO_TOP_EXT.reshape(-1).tolist(),
        "[LiDARCalibrationComponent].beam_inclination.values": None if beams is None else beams.tolist(),
        "[LiDARCalibrationComponent].beam_inclination.min": incl_min,
        "[LiDARCalibrationComponent].beam_inclination.max": incl_max})
    for name, (cw, ch) in cameras.items():
        ext = rigid(_rot(0.0, 0.0, WAYMO_CAMERA_YAW[name]) @ WAYMO_CAM_EXT[:3, :3], WAYMO_CAM_EXT[:3, 3])
        add("camera_calibration", **key, **{"key.camera_name": CAMERAS[name],
            "[CameraCalibrationComponent].intrinsic.f_u": f_u, "[CameraCalibrationComponent].intrinsic.f_v": f_v,
            "[CameraCalibrationComponent].intrinsic.c_u": cw / 2 + 0.3 * CAMERAS[name],  # each camera its own K
            "[CameraCalibrationComponent].intrinsic.c_v": ch / 2 - 0.4,
            **{f"[CameraCalibrationComponent].intrinsic.{c}": float(k) for c, k in zip(DISTORTION, distortion)},
            "[CameraCalibrationComponent].extrinsic.transform": ext.reshape(-1).tolist(),
            "[CameraCalibrationComponent].width": cw, "[CameraCalibrationComponent].height": ch,
            "[CameraCalibrationComponent].rolling_shutter_direction": 1})
    oracle: dict = {"frames": {}, "K": np.array([[f_u, 0, c_u], [0, f_v, c_v], [0, 0, 1]])}
    for i in range(n_frames):
        ts = t0 + i * 100_000
        r = np.where(rng.uniform(size=(H, W)) < 0.7, rng.uniform(2, 60, (H, W)), 0.0).astype(np.float32)
        inten = rng.uniform(0, 1.5, (H, W)).astype(np.float32)
        ri = np.stack([r, inten, np.zeros_like(r), np.zeros_like(r)], -1)
        wfv = rigid(_rot(0.0, 0.0, 0.1 * i), [100.0 + i, 50.0, 0.0])
        yaw_px = np.tile(0.1 * i + np.linspace(-0.01, 0.01, W), (H, 1)) if pixel_pose else np.full((H, W), 0.1 * i)
        tx_px = np.tile(100.0 + i + np.linspace(-0.5, 0.5, W), (H, 1)) if pixel_pose else np.full((H, W), 100.0 + i)
        pose = np.stack([np.zeros((H, W)), np.zeros((H, W)), yaw_px, tx_px, np.full((H, W), 50.0),
                         np.zeros((H, W))], -1).astype(np.float32)
        # oracle: direction of pixel (row, col) by rotating the x axis: yaw = azimuth, then pitch up by incl
        rows, cols = np.nonzero(r > 0)
        az = ((W - cols - 0.5) / W * 2 - 1) * np.pi - az_corr
        dirs = np.einsum("nij,j->ni", euler_to_matrix(np.zeros(len(rows)), -incl_rows[rows], az), [1.0, 0, 0])
        p_sensor = dirs * r[rows, cols, None].astype(np.float64)
        p_veh = (WAYMO_TOP_EXT @ np.c_[p_sensor, np.ones(len(rows))].T).T
        pp = pose[rows, cols].astype(np.float64)
        Rpx = euler_to_matrix(pp[:, 0], pp[:, 1], pp[:, 2])
        world = np.einsum("nij,nj->ni", Rpx, p_veh[:, :3]) + pp[:, 3:6]
        p_frame = (np.linalg.inv(wfv) @ np.c_[world, np.ones(len(world))].T).T[:, :3]
        add("lidar", **key, **{"key.frame_timestamp_micros": ts, "key.laser_name": 1,
            "[LiDARComponent].range_image_return1.values": ri.reshape(-1).tolist(),
            "[LiDARComponent].range_image_return1.shape": [H, W, 4],
            "[LiDARComponent].range_image_return2.values": second_return_image(rng, r, second_return).tolist(),
            "[LiDARComponent].range_image_return2.shape": [H, W, 4]})
        add("lidar_pose", **key, **{"key.frame_timestamp_micros": ts, "key.laser_name": 1,
            "[LiDARPoseComponent].range_image_return1.values": pose.reshape(-1).tolist(),
            "[LiDARPoseComponent].range_image_return1.shape": [H, W, 6]})
        add("vehicle_pose", **key, **{"key.frame_timestamp_micros": ts,
            "[VehiclePoseComponent].world_from_vehicle.transform": wfv.reshape(-1).tolist()})
        cam_us = ts + (cam_offsets_us[i] if i < len(cam_offsets_us) else 10_000)
        for name, (cw, ch) in cameras.items():
            image = _photo_jpg(cw, ch, 10 * i + CAMERAS[name]) if photo else _jpg(cw, ch, i)
            add("camera_image", **key, **{"key.frame_timestamp_micros": ts, "key.camera_name": CAMERAS[name],
                "[CameraImageComponent].image": image, "[CameraImageComponent].pose_timestamp": cam_us * 1e-6})
        pc = (np.linalg.inv(WAYMO_CAM_EXT) @ np.c_[p_frame, np.ones(len(p_frame))].T).T
        front = pc[:, 0] > 0.5
        px = np.c_[c_u - f_u * pc[:, 1] / pc[:, 0], c_v - f_v * pc[:, 2] / pc[:, 0]]
        oracle["frames"][f"waymo/{segment}/{ts}"] = {"vehicle_points": p_frame, "intensity": inten[rows, cols],
                                                     "rows": rows, "front": front, "pixels": px}
    types = {"[LiDARComponent].range_image_return1.values": pa.list_(pa.float32()),
             "[LiDARComponent].range_image_return2.values": pa.list_(pa.float32()),
             "[LiDARPoseComponent].range_image_return1.values": pa.list_(pa.float32()),
             "[LiDARComponent].range_image_return1.shape": pa.list_(pa.int32(), 3),
             "[LiDARComponent].range_image_return2.shape": pa.list_(pa.int32(), 3),
             "[LiDARPoseComponent].range_image_return1.shape": pa.list_(pa.int32(), 3),
             "[LiDARCalibrationComponent].beam_inclination.values": pa.list_(pa.float64()),
             "[CameraImageComponent].image": pa.binary(), "key.laser_name": pa.int8(), "key.camera_name": pa.int8()}
    for c, cols in comp.items():
        cols = {k: v for k, v in cols.items() if k not in drop_columns}
        table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})
        path = f"{root}/{split}/{c}/{segment}.parquet"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path)
    return oracle


# ---------------------------------------------------------------- helpers for tests and benchmarks
def upload_tree(local_dir: str, s3_url: str) -> int:
    """Upload every file under `local_dir` to `s3_url` (s3://bucket/prefix) with boto3; returns the file count."""
    import boto3

    bucket, _, prefix = s3_url[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    n = 0
    for dirpath, _, files in os.walk(local_dir, followlinks=True):
        for f in files:
            path = os.path.join(dirpath, f)
            key = "/".join(p for p in (prefix.strip("/"), os.path.relpath(path, local_dir).replace(os.sep, "/")) if p)
            client.upload_file(path, bucket, key)
            n += 1
    return n


def frames_differ(a: list[dict], b: list[dict]) -> str | None:
    """The first difference between two lists of Frame rows (bytes, arrays and ids compared exactly), or None."""
    if [r["frame_id"] for r in a] != [r["frame_id"] for r in b]:
        return "frame ids differ"
    for x, y in zip(a, b):
        for k in ("sequence", "timestamp_us"):
            if x[k] != y[k]:
                return f"{x['frame_id']}: {k} differs"
        for k in ("points", "ring", "gt_label", "gt_instance"):
            if (x[k] is None) != (y[k] is None) or (x[k] is not None and not np.array_equal(x[k], y[k])):
                return f"{x['frame_id']}: {k} differs"
        if len(x["cameras"]) != len(y["cameras"]):
            return f"{x['frame_id']}: camera count differs"
        for c, d in zip(x["cameras"], y["cameras"]):
            for k in ("name", "image", "width", "height", "timestamp_us"):
                if c[k] != d[k]:
                    return f"{x['frame_id']}/{c['name']}: {k} differs"
            for k in ("K", "T_cam_lidar"):
                if not np.array_equal(c[k], d[k]):
                    return f"{x['frame_id']}/{c['name']}: {k} differs"
            if not np.array_equal(camera_distortion(c), camera_distortion(d)):
                return f"{x['frame_id']}/{c['name']}: distortion differs"
            rc, rd = camera_rolling_shutter(c), camera_rolling_shutter(d)
            if (rc is None) != (rd is None) or (rc is not None and not np.array_equal(rc, rd)):
                return f"{x['frame_id']}/{c['name']}: rolling_shutter differs"
    return None
