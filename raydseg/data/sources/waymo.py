"""Waymo Open Dataset v2 (per-component parquet) as a Frame source, local or s3:// through pyarrow.

Layout: `<data.root>/[<data.split>/]<component>/<segment>.parquet` for the components camera_image,
camera_calibration, lidar, lidar_calibration and optionally lidar_pose + vehicle_pose. Rows are joined on
`key.segment_context_name` + `key.frame_timestamp_micros` (+ `key.camera_name` / `key.laser_name`). One shard per
segment (parquet file); one frame per timestamp of the TOP LiDAR. Only `COLUMNS` + `OPTIONAL_COLUMNS` are read (return2
only with data.returns=2), and calibration values once per segment.

Range image -> points (as waymo_open_dataset's range_image_utils): row i has inclination
`beam_inclination.values` reversed (row 0 = highest beam), or when absent the uniform
`min + (H - 1 - i + 0.5) / H * (max - min)`; column j has azimuth
`((W - j - 0.5) / W * 2 - 1) * pi - atan2(E[1,0], E[0,0])`;
`p_sensor = r (cos(incl) cos(az), cos(incl) sin(az), sin(incl))`, `p_vehicle = E @ p_sensor` with E the LiDAR
extrinsic (sensor -> vehicle). With a per-pixel pose (TOP only, `[LiDARPoseComponent]`, roll pitch yaw x y z =
vehicle(t_pixel) -> world) points are motion-compensated: `p = inv(world_from_vehicle) @ pixel_pose @ p_vehicle`
(one rotation per range-image column when the pose is the same down each column, as a spinning LiDAR's).
Points are then expressed in the TOP LiDAR frame: `inv(E_top) @ p`, all in one numba pass over the pixels
(`_range_image_points`). Intensity is squashed with tanh to 0..1.

Cameras: Waymo's camera frame is x forward, y left, z up and its extrinsic E_cam maps camera -> vehicle. With C the
axis swap to OpenCV (x right, y down, z forward) and the points in the TOP frame at the frame time,
  T_cam_lidar = C @ inv(E_cam) @ inv(world_from_vehicle(t_cam)) @ world_from_vehicle(t_frame) @ E_top
(`lidar_to_camera`): the camera sees the world from where the vehicle was at its `pose_timestamp`, tens of ms from
the frame time (the five cameras fire as the LiDAR sweeps past them; at 10 m/s 50 ms is 0.5 m).
world_from_vehicle(t_cam) is the camera_image row's `[CameraImageComponent].pose.transform`,
world_from_vehicle(t_frame) the vehicle_pose row's, as in Waymo's camera_model.cc for a global shutter. A camera
row without a pose (older or partial conversions) or a frame without a vehicle pose keeps the static
T_cam_lidar = C @ inv(E_cam) @ E_top, and `read_shard` logs at DEBUG how many camera images of the segment did.

Rolling shutter (camera_model.cc's rolling-shutter model): the image is read out line by line (row or column,
`[CameraCalibrationComponent].rolling_shutter_direction` 1-4) over readout = camera_readout_done_time -
camera_trigger_time - shutter (`[CameraImageComponent].rolling_shutter_params.*`, s), so each line sees the world at
its own time. The camera record's `rolling_shutter` (raydseg.geometry.rolling_shutter) carries
  - the capture-time plane (`capture_time_plane`): a pixel's time is trigger + shutter / 2 + readout x (its line /
    the image's lines, counted in the readout direction, Waymo's pixel-edge coordinates); as camera_model.cc, the
    time is taken linear in the undistorted normalised coordinate along the readout, with the slope readout / the
    normalised span of the image's middle line, and the offset from the principal point's time minus
    pose_timestamp;
  - the camera's velocity (`camera_velocity`) from `[CameraImageComponent].velocity.linear_velocity.{x,y,z}` (m/s,
    world frame) and `angular_velocity.{x,y,z}` (rad/s, taken in the vehicle frame as camera_model.cc does; for the
    yaw of a car on level ground the world and vehicle z axes agree), with the lever arm of the camera's mount,
    rotated into the OpenCV camera frame at pose_timestamp.
Only a camera whose T_cam_lidar is at its pose_timestamp (both poses present) and whose row has all nine values and a
readout direction 1-4 gets one; others (direction 0 unknown or 5 global shutter, older conversions) stay global
shutter (null), and `read_shard` logs at DEBUG how many did. Timing uses the image's width and height.

Waymo's camera model measures image coordinates from the left/top edge of the first pixel (its centre is at 0.5),
the Frame puts pixel centres at integers (OpenCV), so K's principal point is (c_u - 0.5, c_v - 0.5). Lens distortion
(k1, k2, p1, p2, k3, Waymo's camera_model = OpenCV's) goes into the camera's `distortion` and the image keeps its
bytes: projections apply the lens (`raydseg.geometry.distortion`).
"""
from __future__ import annotations

import logging
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydseg import storage
from raydseg.config import Config
from raydseg.data.schema import image_size
from raydseg.data.sources.select import apply_stride_and_limit, euler_to_matrix, select_cameras, sync_reason
from raydseg.geometry.distortion import undistort
from raydseg.geometry.rolling_shutter import rolling_shutter_record

LASERS = {"TOP": 1, "FRONT": 2, "SIDE_LEFT": 3, "SIDE_RIGHT": 4, "REAR": 5}
CAMERAS = {"FRONT": 1, "FRONT_LEFT": 2, "FRONT_RIGHT": 3, "SIDE_LEFT": 4, "SIDE_RIGHT": 5}
WAYMO_TO_OPENCV = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)

SEG, TS, CAM, LASER = "key.segment_context_name", "key.frame_timestamp_micros", "key.camera_name", "key.laser_name"
CAM_POSE = "[CameraImageComponent].pose.transform"  # world_from_vehicle at pose_timestamp, 16 doubles row-major
CAM_POSE_TS = "[CameraImageComponent].pose_timestamp"  # seconds
VEHICLE_POSE = "[VehiclePoseComponent].world_from_vehicle.transform"  # at the frame timestamp, 16 doubles row-major
DISTORTION = ("k1", "k2", "p1", "p2", "k3")  # Waymo's intrinsic columns, OpenCV's coefficient order
SHUTTER_DIRECTION = "[CameraCalibrationComponent].rolling_shutter_direction"
READOUT_DIRECTIONS = {1: "TOP_TO_BOTTOM", 2: "LEFT_TO_RIGHT", 3: "BOTTOM_TO_TOP", 4: "RIGHT_TO_LEFT"}  # 5 = global
CAM_VELOCITY = tuple(f"[CameraImageComponent].velocity.{kind}_velocity.{a}" for kind in ("linear", "angular")
                     for a in "xyz")  # m/s world frame, rad/s
SHUTTER_PARAMS = tuple(f"[CameraImageComponent].rolling_shutter_params.{c}"
                       for c in ("shutter", "camera_trigger_time", "camera_readout_done_time"))  # s
COLUMNS = {  # component folder -> columns this reader needs
    "lidar": [SEG, TS, LASER, "[LiDARComponent].range_image_return1.values",
              "[LiDARComponent].range_image_return1.shape"],
    "lidar_calibration": [SEG, LASER, "[LiDARCalibrationComponent].extrinsic.transform",
                          "[LiDARCalibrationComponent].beam_inclination.min",
                          "[LiDARCalibrationComponent].beam_inclination.max"],
    "camera_image": [SEG, TS, CAM, "[CameraImageComponent].image"],
    "camera_calibration": [SEG, CAM, "[CameraCalibrationComponent].intrinsic.f_u",
                           "[CameraCalibrationComponent].intrinsic.f_v", "[CameraCalibrationComponent].intrinsic.c_u",
                           "[CameraCalibrationComponent].intrinsic.c_v",
                           *(f"[CameraCalibrationComponent].intrinsic.{c}" for c in DISTORTION),
                           "[CameraCalibrationComponent].extrinsic.transform"],
    "lidar_pose": [SEG, TS, LASER, "[LiDARPoseComponent].range_image_return1.values",
                   "[LiDARPoseComponent].range_image_return1.shape"],
    "vehicle_pose": [SEG, TS, VEHICLE_POSE],
}
OPTIONAL = ("lidar_pose", "vehicle_pose")
RETURN2 = ("[LiDARComponent].range_image_return2.values", "[LiDARComponent].range_image_return2.shape")
INCL_VALUES = "[LiDARCalibrationComponent].beam_inclination.values"
OPTIONAL_COLUMNS = {"lidar": RETURN2, "lidar_calibration": (INCL_VALUES,),
                    "camera_image": (CAM_POSE, CAM_POSE_TS, *CAM_VELOCITY, *SHUTTER_PARAMS),
                    "camera_calibration": (SHUTTER_DIRECTION,)}
log = logging.getLogger(__name__)


def lidar_to_camera(E_top: np.ndarray, E_cam: np.ndarray, world_from_vehicle_frame: np.ndarray | None = None,
                    world_from_vehicle_cam: np.ndarray | None = None) -> np.ndarray:
    """(4, 4) float64 T_cam_lidar: TOP LiDAR -> vehicle(t_frame) -> world -> vehicle(t_cam) -> OpenCV camera (m).

    Args: E_top, E_cam (4, 4) float64 sensor -> vehicle; world_from_vehicle_frame (4, 4) float64 vehicle pose at the
      frame timestamp; world_from_vehicle_cam (4, 4) float64 vehicle pose at the camera's pose_timestamp. Without
      either pose: the static extrinsics C @ inv(E_cam) @ E_top.
    """
    T = np.linalg.inv(E_cam)
    if world_from_vehicle_frame is not None and world_from_vehicle_cam is not None:
        T = T @ vehicle_motion(world_from_vehicle_frame, world_from_vehicle_cam)
    return WAYMO_TO_OPENCV @ T @ E_top


def vehicle_motion(world_from_vehicle_frame: np.ndarray, world_from_vehicle_cam: np.ndarray) -> np.ndarray:
    """(4, 4) float64 vehicle(t_frame) -> vehicle(t_cam) from two (4, 4) world_from_vehicle poses (m), rigid."""
    Rf, tf = world_from_vehicle_frame[:3, :3], world_from_vehicle_frame[:3, 3]
    Rc, tc = world_from_vehicle_cam[:3, :3], world_from_vehicle_cam[:3, 3]
    M = np.eye(4)
    M[:3, :3] = Rc.T @ Rf
    M[:3, 3] = Rc.T @ (tf - tc)  # difference first: world coordinates can be kilometres
    return M


def capture_time_plane(direction: int, shutter: float, trigger: float, readout_done: float, pose_s: float,
                       width: int, height: int, f_u: float, f_v: float, c_u: float, c_v: float,
                       coeffs: np.ndarray) -> tuple[float, float, float]:
    """(t0, dt_dx, dt_dy) s of the rolling-shutter record: a point's capture time minus pose_s is
    t0 + dt_dx x + dt_dy y in its undistorted normalised coordinates (x, y) (camera_model.cc's model, module doc).

    Args: direction 1-4 (READOUT_DIRECTIONS); shutter, trigger, readout_done, pose_s (s); width, height px;
      f_u, f_v, c_u, c_v Waymo's intrinsics (principal point from the first pixel's edge); coeffs (5,) k1 k2 p1 p2 k3.
    """
    readout = readout_done - trigger - shutter
    start = trigger + 0.5 * shutter  # the middle of the first line's exposure
    horizontal, reverse = direction in (2, 4), direction in (3, 4)
    line, lines = (c_u, width) if horizontal else (c_v, height)
    t_principal = start + readout / lines * ((lines - line) if reverse else line)
    if horizontal:
        ends = [undistort((u - c_u) / f_u, (0.5 * height - c_v) / f_v, coeffs)[0] for u in (0.0, width)]
    else:
        ends = [undistort((0.5 * width - c_u) / f_u, (v - c_v) / f_v, coeffs)[1] for v in (0.0, height)]
    slope = (-readout if reverse else readout) / (ends[1] - ends[0])
    return t_principal - pose_s, (slope if horizontal else 0.0), (0.0 if horizontal else slope)


def camera_velocity(E_cam: np.ndarray, world_from_vehicle: np.ndarray, linear: np.ndarray,
                    angular: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(v (3,) m/s, w (3,) rad/s) of the camera in its OpenCV frame at the pose time, from the vehicle's linear
    velocity (3,) m/s in the world frame and angular velocity (3,) rad/s in the vehicle frame (camera_model.cc);
    v adds the lever arm w x (the camera's offset from the vehicle origin). E_cam, world_from_vehicle (4, 4)."""
    R_wv, R_vc = world_from_vehicle[:3, :3], E_cam[:3, :3]
    w_world = R_wv @ np.asarray(angular, np.float64)
    v_world = np.asarray(linear, np.float64) + np.cross(w_world, R_wv @ E_cam[:3, 3])
    C = WAYMO_TO_OPENCV[:3, :3]
    return C @ (R_vc.T @ (R_wv.T @ v_world)), C @ (R_vc.T @ np.asarray(angular, np.float64))


def camera_rolling_shutter(direction: int | None, values: np.ndarray, pose_s: float, size: tuple[int, int],
                           intrinsics: tuple[float, float, float, float], coeffs: np.ndarray, E_cam: np.ndarray,
                           world_from_vehicle: np.ndarray) -> np.ndarray | None:
    """(9,) float64 rolling-shutter record of one camera image (raydseg.geometry.rolling_shutter), or None (global
    shutter) for a direction outside 1-4 or a null (NaN) value.

    Args: direction the calibration's rolling_shutter_direction; values (9,) the camera_image row's linear velocity
      (3,) m/s, angular velocity (3,) rad/s, shutter, camera_trigger_time, camera_readout_done_time s; pose_s its
      pose_timestamp s; size (width, height) px; intrinsics Waymo's (f_u, f_v, c_u, c_v); coeffs (5,) the lens;
      E_cam camera -> vehicle and world_from_vehicle at pose_s, (4, 4).
    """
    if direction not in READOUT_DIRECTIONS or not np.isfinite(values).all():
        return None
    v, w = camera_velocity(E_cam, world_from_vehicle, values[:3], values[3:6])
    return rolling_shutter_record(v, w, *capture_time_plane(int(direction), *values[6:9], pose_s, *size, *intrinsics,
                                                            coeffs))


class WaymoError(ValueError):
    """A frame or segment that cannot be read; the message is the reject reason."""


def _base(cfg: Config) -> str:
    root = cfg.data.root
    return storage.join(root, cfg.data.split) if cfg.data.split else root


def layout_problem(cfg: Config) -> str | None:
    """None when data.root (/data.split) holds v2 segment files; else what was looked for."""
    lidar = storage.join(_base(cfg), "lidar")
    if any(n.endswith(".parquet") for n in storage.listdir(lidar)):
        return None
    return f"data.root: no Waymo Open v2 segments in {cfg.data.root} (looked for {lidar}/*.parquet)"


def list_shards(cfg: Config) -> list[dict[str, Any]]:
    """One shard per segment parquet file of the `lidar` component, with its TOP-LiDAR frame timestamps."""
    base = _base(cfg)
    shards = []
    for name in storage.listdir(storage.join(base, "lidar")):
        if not name.endswith(".parquet"):
            continue
        path = storage.join(base, "lidar", name)
        try:
            t = storage.read_table(path, columns=[TS, LASER])
            ts = np.asarray(t.column(TS).to_numpy(), dtype=np.int64)[t.column(LASER).to_numpy() == LASERS["TOP"]]
            frames = sorted(set(int(x) for x in ts))
        except Exception as e:  # noqa: BLE001 - an unreadable file becomes a shard that rejects with the reason
            frames, err = [0], f"unreadable lidar file {name}: {type(e).__name__}: {e}"
            shards.append({"base": base, "segment": name[:-len(".parquet")], "frames": frames, "error": err})
            continue
        shards.append({"base": base, "segment": name[:-len(".parquet")], "frames": frames})
    return apply_stride_and_limit(shards, cfg.data.frame_stride, cfg.data.max_frames)


def _read_component(base: str, comp: str, segment: str, skip: tuple[str, ...] = ()) -> pa.Table | None:
    """The rows of `segment` in one component file, with the columns this reader uses (`COLUMNS`, and the
    `OPTIONAL_COLUMNS` the file has, less `skip`); None for a missing optional component."""
    path = storage.join(base, comp, f"{segment}.parquet")
    if not storage.exists(path):
        if comp in OPTIONAL:
            return None
        raise WaymoError(f"missing component file {comp}/{segment}.parquet")
    present = set(storage.parquet_columns(path))
    missing = [c for c in COLUMNS[comp] if c not in present]
    if missing:
        raise WaymoError(f"{comp}/{segment}.parquet: missing parquet column(s) {', '.join(missing)}")
    extra = [c for c in OPTIONAL_COLUMNS.get(comp, ()) if c in present and c not in skip]
    table = storage.read_table(path, columns=COLUMNS[comp] + extra)
    mine = pc.equal(table.column(SEG), segment)
    return table if pc.all(mine, skip_nulls=False).as_py() else table.filter(mine)  # one segment a file: no copy


def _index(table: pa.Table | None, *keys: str) -> dict[tuple, int]:
    if table is None:
        return {}
    cols = [table.column(k).to_pylist() for k in keys]
    return {tuple(v): i for i, v in enumerate(zip(*cols))}


def _cell(table: pa.Table, col: str, i: int) -> Any:
    return table.column(col)[i].as_py()


def _array(table: pa.Table, col: str, i: int, dtype: Any) -> np.ndarray:
    v = table.column(col)[i]
    if not v.is_valid:
        raise WaymoError(f"null value in column {col}")
    return np.asarray(v.values.to_numpy(zero_copy_only=False), dtype=dtype)


def _range_image(table: pa.Table, prefix: str, i: int, channels: int) -> np.ndarray:
    vals = _array(table, f"{prefix}.values", i, np.float32)
    shape = _array(table, f"{prefix}.shape", i, np.int64)
    if len(shape) != 3 or shape[2] != channels or int(np.prod(shape)) != len(vals):
        raise WaymoError(f"corrupt range image {prefix}: {len(vals)} values for shape {shape.tolist()}")
    return vals.reshape(shape)


def inclinations(height: int, incl_min: float, incl_max: float, values: np.ndarray | None) -> np.ndarray:
    """(H,) beam inclination (rad) of each range-image row, row 0 = highest (values / uniform min..max)."""
    if values is not None and len(values):
        incl = np.asarray(values, dtype=np.float64)
        if len(incl) != height:
            raise WaymoError(f"beam_inclination.values has {len(incl)} entries for a {height}-row range image")
    else:
        incl = incl_min + (np.arange(height) + 0.5) / height * (incl_max - incl_min)
    return incl[::-1].copy()


def column_poses(pixel_pose: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """(W, 6) float32 pose of each range-image column when every valid pixel holds its column's pose (a spinning
    LiDAR fires a column at once), else None. pixel_pose (H, W, 6); valid (H, W) bool."""
    first, same = _column_pose_check(pixel_pose, valid)
    return pixel_pose[first, np.arange(valid.shape[1])] if same else None


@numba.njit(cache=True, error_model="numpy")
def _column_pose_check(pixel_pose, valid):  # pragma: no cover - numba
    """(W,) row of each column's first valid pixel (0 when none), and whether every valid pixel's pose equals it."""
    H, W = valid.shape
    first = np.full(W, -1, np.int64)
    for i in range(H):
        for j in range(W):
            if valid[i, j]:
                if first[j] < 0:
                    first[j] = i
                else:
                    for c in range(pixel_pose.shape[2]):
                        if pixel_pose[i, j, c] != pixel_pose[first[j], j, c]:
                            return np.maximum(first, 0), False
    return np.maximum(first, 0), True


@numba.njit(cache=True, error_model="numpy")
def _range_image_points(ri, ci, si, ca, sa, E, rot, trans, pose_of, out_T):  # pragma: no cover - numba
    """One pass over the pixels with range > 0 (row-major): p = E (r cos(incl) cos(az), r cos(incl) sin(az),
    r sin(incl)), then with a pose (pose_of 1: rot/trans per column, 2: per point) p = rot p + trans, then out_T p.
    Returns points (N, 4) float32 (x, y, z, tanh(max(intensity, 0))) and row (N,) int64."""
    H, W = ri.shape[0], ri.shape[1]
    n = 0
    for i in range(H):
        for j in range(W):
            n += ri[i, j, 0] > 0
    pts = np.empty((n, 4), np.float32)
    rows = np.empty(n, np.int64)
    k = 0
    for i in range(H):
        for j in range(W):
            if not ri[i, j, 0] > 0:
                continue
            r = np.float64(ri[i, j, 0])
            rc = r * ci[i]
            q0, q1, q2 = rc * ca[j], rc * sa[j], r * si[i]
            p0 = E[0, 0] * q0 + E[0, 1] * q1 + E[0, 2] * q2 + E[0, 3]
            p1 = E[1, 0] * q0 + E[1, 1] * q1 + E[1, 2] * q2 + E[1, 3]
            p2 = E[2, 0] * q0 + E[2, 1] * q1 + E[2, 2] * q2 + E[2, 3]
            if pose_of > 0:
                m = j if pose_of == 1 else k
                R, t = rot[m], trans[m]
                w0 = R[0, 0] * p0 + R[0, 1] * p1 + R[0, 2] * p2 + t[0]
                w1 = R[1, 0] * p0 + R[1, 1] * p1 + R[1, 2] * p2 + t[1]
                w2 = R[2, 0] * p0 + R[2, 1] * p1 + R[2, 2] * p2 + t[2]
                p0, p1, p2 = w0, w1, w2
            for c in range(3):
                pts[k, c] = out_T[c, 0] * p0 + out_T[c, 1] * p1 + out_T[c, 2] * p2 + out_T[c, 3]
            pts[k, 3] = np.tanh(max(np.float64(ri[i, j, 1]), 0.0))
            rows[k] = i
            k += 1
    return pts, rows


def range_image_to_points(ri: np.ndarray, extrinsic: np.ndarray, incl: np.ndarray,
                          pixel_pose: np.ndarray | None = None, world_from_vehicle: np.ndarray | None = None,
                          out_from_vehicle: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Range image -> points.

    Args: ri (H, W, >=2) float32 (range m, intensity, ...); extrinsic (4, 4) sensor -> vehicle; incl (H,) rad per
      row (row 0 highest); pixel_pose (H, W, 6) roll pitch yaw x y z vehicle(t_pixel) -> world, or None;
      world_from_vehicle (4, 4) frame pose (needed with pixel_pose); out_from_vehicle (4, 4) the output frame
      (None = the vehicle frame at the frame time).
    Returns: points (N, 4) float32 (x, y, z m in the output frame, intensity squashed by tanh to 0..1) and row (N,)
      int64 of the pixels with range > 0 (row-major order).
    """
    H, W = ri.shape[:2]
    E = np.asarray(extrinsic, dtype=np.float64)
    az = ((W - np.arange(W) - 0.5) / W * 2.0 - 1.0) * np.pi - np.arctan2(E[1, 0], E[0, 0])
    out_T = np.eye(4) if out_from_vehicle is None else np.asarray(out_from_vehicle, np.float64)
    rot, trans, pose_of = np.zeros((0, 3, 3)), np.zeros((0, 3)), 0
    if pixel_pose is not None:
        if world_from_vehicle is None:
            raise WaymoError("per-pixel LiDAR pose given without a vehicle pose for the frame")
        if pixel_pose.shape[:2] != (H, W):
            raise WaymoError(f"per-pixel LiDAR pose of shape {list(pixel_pose.shape)} for a {H}x{W} range image")
        valid = ri[..., 0] > 0
        pose = column_poses(pixel_pose, valid)  # W rotations instead of N when a column shares its pose
        pose_of = 1 if pose is not None else 2
        if pose is None:
            pose = pixel_pose.reshape(H * W, -1).take(np.flatnonzero(valid), axis=0)
        pose = pose.astype(np.float64)
        rot, trans = euler_to_matrix(pose[:, 0], pose[:, 1], pose[:, 2]), np.ascontiguousarray(pose[:, 3:6])
        out_T = out_T @ np.linalg.inv(world_from_vehicle)
    return _range_image_points(ri, np.cos(incl), np.sin(incl), np.cos(az), np.sin(az), E, rot, trans, pose_of, out_T)


def camera_waymo_intrinsics(ccal: pa.Table, i: int) -> tuple[float, float, float, float]:
    """(f_u, f_v, c_u, c_v) px of camera_calibration row i as Waymo states them (principal point from the edge)."""
    return tuple(float(_cell(ccal, f"[CameraCalibrationComponent].intrinsic.{c}", i))
                 for c in ("f_u", "f_v", "c_u", "c_v"))


def camera_intrinsics(ccal: pa.Table, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3) float64 px with pixel centres at integers, (5,) float64 k1 k2 p1 p2 k3) of camera_calibration row i."""
    g = lambda c: float(_cell(ccal, f"[CameraCalibrationComponent].intrinsic.{c}", i))  # noqa: E731
    # Waymo measures pixels from the first pixel's edge (centre 0.5), the Frame from its centre (OpenCV)
    c_u, c_v = g("c_u") - 0.5, g("c_v") - 0.5
    K = np.array([[g("f_u"), 0, c_u], [0, g("f_v"), c_v], [0, 0, 1]], dtype=np.float64)
    return K, np.array([g(c) for c in DISTORTION])


def read_shard(shard: dict, cfg: Config) -> tuple[list[dict], list[dict]]:
    """(Frame rows, rejects {id, reason}) of one segment shard from `list_shards`."""
    base, seg = shard["base"], shard["segment"]
    ids = [f"waymo/{seg}/{ts}" for ts in shard["frames"]]
    try:
        if "error" in shard:
            raise WaymoError(shard["error"])
        skip = RETURN2 if cfg.data.returns < 2 else ()
        tabs = {c: _read_component(base, c, seg, skip) for c in COLUMNS}
    except WaymoError as e:
        return [], [{"id": i, "reason": str(e)} for i in ids]
    except Exception as e:  # noqa: BLE001 - unreadable parquet: reject the segment's frames with the reason
        return [], [{"id": i, "reason": f"unreadable parquet in segment {seg}: {type(e).__name__}: {e}"} for i in ids]
    lidar, lcal, cimg, ccal, lpose, vpose = (tabs[c] for c in ("lidar", "lidar_calibration", "camera_image",
                                                                "camera_calibration", "lidar_pose", "vehicle_pose"))
    i_lidar, i_lcal = _index(lidar, TS, LASER), _index(lcal, LASER)
    i_cimg, i_ccal = _index(cimg, TS, CAM), _index(ccal, CAM)
    i_lpose, i_vpose = _index(lpose, TS, LASER), _index(vpose, TS)
    cams = select_cameras([n for n, k in CAMERAS.items() if (k,) in i_ccal], cfg.data.cameras)
    lasers = [n for n in cfg.data.lidars if n in LASERS]
    has_pose_ts, has_cam_pose = CAM_POSE_TS in cimg.column_names, CAM_POSE in cimg.column_names
    has_incl_values = INCL_VALUES in lcal.column_names
    shutter_cols = None  # per camera_image row: the 6 velocities and 3 shutter times, NaN where null
    if all(c in cimg.column_names for c in CAM_VELOCITY + SHUTTER_PARAMS) and SHUTTER_DIRECTION in ccal.column_names:
        shutter_cols = np.stack([np.asarray(cimg.column(c).to_numpy(zero_copy_only=False), np.float64)
                                 for c in CAM_VELOCITY + SHUTTER_PARAMS], axis=1)
    rows, rejects, n_static, n_cams, n_global = [], [], 0, 0, 0
    # calibration values are read at first use; a failure is not kept, so every frame that needs the value raises it
    # again (the same rejects as reading it per frame)
    per_segment: dict[tuple, Any] = {}

    def once(key: tuple, read: Any) -> Any:
        if key not in per_segment:
            per_segment[key] = read()
        return per_segment[key]

    for ts, fid in zip(shard["frames"], ids):
        try:
            if (LASERS["TOP"],) not in i_lcal:
                raise WaymoError(f"lidar_calibration has no row for laser TOP in segment {seg}")
            E_top = once(("lidar_E", "TOP"), lambda: _array(
                lcal, "[LiDARCalibrationComponent].extrinsic.transform", i_lcal[(LASERS["TOP"],)], np.float64
            ).reshape(4, 4))
            inv_top = once(("inv_top",), lambda: np.linalg.inv(E_top))
            wfv_frame = None
            if (ts,) in i_vpose and vpose.column(VEHICLE_POSE)[i_vpose[(ts,)]].is_valid:
                wfv_frame = _array(vpose, VEHICLE_POSE, i_vpose[(ts,)], np.float64).reshape(4, 4)
            pts_all, ring_all = [], []
            for name in lasers:
                k = LASERS[name]
                if (ts, k) not in i_lidar:
                    raise WaymoError(f"lidar has no row for laser {name} at {ts}")
                if (k,) not in i_lcal:
                    raise WaymoError(f"lidar_calibration has no row for laser {name} in segment {seg}")
                ci = i_lcal[(k,)]
                E = once(("lidar_E", name), lambda: _array(
                    lcal, "[LiDARCalibrationComponent].extrinsic.transform", ci, np.float64).reshape(4, 4))
                values = None
                if has_incl_values and lcal.column(INCL_VALUES)[ci].is_valid:
                    values = once(("incl", name), lambda: _array(lcal, INCL_VALUES, ci, np.float64))
                returns = ["[LiDARComponent].range_image_return1"]
                if cfg.data.returns >= 2 and RETURN2[0] in lidar.column_names:
                    returns.append("[LiDARComponent].range_image_return2")
                pose = None
                if name == "TOP" and (ts, k) in i_lpose and (ts,) in i_vpose:
                    pose = _range_image(lpose, "[LiDARPoseComponent].range_image_return1", i_lpose[(ts, k)], 6)
                for prefix in returns:
                    ri = _range_image(lidar, prefix, i_lidar[(ts, k)], 4)
                    lo, hi = once(("incl_range", name), lambda: (
                        float(_cell(lcal, "[LiDARCalibrationComponent].beam_inclination.min", ci)),
                        float(_cell(lcal, "[LiDARCalibrationComponent].beam_inclination.max", ci))))
                    incl = inclinations(ri.shape[0], lo, hi, values)
                    p, row = range_image_to_points(ri, E, incl, pose, wfv_frame, inv_top)
                    pts_all.append(p)
                    ring_all.append(row)
            pts = pts_all[0] if len(pts_all) == 1 else np.concatenate(pts_all)
            ring = np.concatenate(ring_all).astype(np.uint8) if lasers == ["TOP"] else None
            cameras, stamps, static, global_shutter = [], {}, 0, 0
            for name in cams:
                k = CAMERAS[name]
                if (ts, k) not in i_cimg:
                    raise WaymoError(f"camera_image has no row for camera {name} at {ts}")
                ii, ic = i_cimg[(ts, k)], i_ccal[(k,)]
                cam_us, pose_s = int(ts), None
                if has_pose_ts and cimg.column(CAM_POSE_TS)[ii].is_valid:
                    pose_s = float(_cell(cimg, CAM_POSE_TS, ii))
                    cam_us = int(round(pose_s * 1e6))
                wfv_cam = None
                if has_cam_pose and cimg.column(CAM_POSE)[ii].is_valid:
                    wfv_cam = _array(cimg, CAM_POSE, ii, np.float64).reshape(4, 4)
                stamps[name] = cam_us
                data = _cell(cimg, "[CameraImageComponent].image", ii)
                try:
                    w, h = image_size(data)
                except Exception as e:  # noqa: BLE001 - any decoder failure is the reason
                    raise WaymoError(f"unreadable image of camera {name}: {type(e).__name__}: {e}") from e
                K, coeffs = once(("camera_K", name), lambda: camera_intrinsics(ccal, ic))
                E_cam = once(("camera_E", name), lambda: _array(
                    ccal, "[CameraCalibrationComponent].extrinsic.transform", ic, np.float64).reshape(4, 4))
                T = lidar_to_camera(E_top, E_cam, wfv_frame, wfv_cam)
                static += wfv_frame is None or wfv_cam is None
                rs = None
                if shutter_cols is not None and wfv_frame is not None and wfv_cam is not None and pose_s is not None:
                    rs = camera_rolling_shutter(once(("shutter_dir", name), lambda: _cell(ccal, SHUTTER_DIRECTION, ic)),
                                                shutter_cols[ii], pose_s, (w, h), camera_waymo_intrinsics(ccal, ic),
                                                coeffs, E_cam, wfv_cam)
                global_shutter += rs is None
                cameras.append({"name": name, "image": data, "width": int(w), "height": int(h), "K": K.copy(),
                                "T_cam_lidar": T, "timestamp_us": cam_us, "gt_semantic": None, "gt_instance": None,
                                "distortion": coeffs.copy(), "rolling_shutter": rs})
            reason = sync_reason(int(ts), stamps, cfg.data.sync_tolerance_us)
            if reason:
                raise WaymoError(reason)
            if not cameras:
                raise WaymoError(f"no camera of {cfg.data.cameras or list(CAMERAS)} in segment {seg}")
            rows.append({"frame_id": fid, "sequence": f"waymo/{seg}", "timestamp_us": int(ts),
                         "points": pts, "ring": ring, "gt_label": None, "gt_instance": None,
                         "cameras": cameras})
            n_static, n_cams, n_global = n_static + static, n_cams + len(cameras), n_global + global_shutter
        except WaymoError as e:
            rejects.append({"id": fid, "reason": str(e)})
    if n_global:
        log.debug("waymo %s: %d of %d camera images have no rolling-shutter data (or no pose): global shutter", seg,
                  n_global, n_cams)
    if n_static:
        log.debug("waymo %s: %d of %d camera images have no camera or vehicle pose: static T_cam_lidar (no ego-motion "
                  "correction)", seg, n_static, n_cams)
    return rows, rejects
