"""Waymo v2 reader: parquet components written from known geometry, range-image round trip, camera motion, rejects,
S3 == disk."""
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydseg.config import load_config
from raydseg.data.schema import validate_frame
from raydseg.data.sources import fixtures, waymo
from raydseg.geometry.project import project_points


def cfg_for(root, *extra):
    return load_config(overrides=["data.source=waymo", f"data.root={root}", "data.split=training", *extra])


def read_all(cfg):
    rows, rejects = [], []
    for s in waymo.list_shards(cfg):
        json.dumps(s)
        r, j = waymo.read_shard(s, cfg)
        rows += r
        rejects += j
    return rows, rejects


def to_vehicle(points):
    xyz = np.c_[points[:, :3].astype(np.float64), np.ones(len(points))]
    return (fixtures.WAYMO_TOP_EXT @ xyz.T).T[:, :3]


@pytest.mark.parametrize("per_beam,pixel_pose", [(True, True), (False, False)])
def test_range_image_conversion_reproduces_the_points_it_was_made_from(tmp_path, per_beam, pixel_pose):
    oracle = fixtures.write_waymo(str(tmp_path), n_frames=2, per_beam=per_beam, pixel_pose=pixel_pose)
    rows, rejects = read_all(cfg_for(tmp_path))
    assert rejects == [] and [r["frame_id"] for r in rows] == list(oracle["frames"])
    for r in rows:
        fr = oracle["frames"][r["frame_id"]]
        assert validate_frame(r) is None
        assert len(r["points"]) == len(fr["vehicle_points"])
        # points are stored in the TOP LiDAR frame; back in the vehicle frame they match the oracle to < 0.1 mm
        assert np.abs(to_vehicle(r["points"]) - fr["vehicle_points"]).max() < 1e-4
        np.testing.assert_array_equal(r["ring"], fr["rows"])
        np.testing.assert_allclose(r["points"][:, 3], np.tanh(fr["intensity"]), atol=1e-6)


def test_vehicle_points_land_on_waymo_camera_model_pixels(tmp_path):
    oracle = fixtures.write_waymo(str(tmp_path), n_frames=2)
    rows, _ = read_all(cfg_for(tmp_path))
    for r in rows:
        fr, cam = oracle["frames"][r["frame_id"]], r["cameras"][0]
        assert cam["name"] == "FRONT" and (cam["width"], cam["height"]) == (96, 64)
        np.testing.assert_allclose(cam["K"], oracle["K"] - [[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])  # half-pixel
        xyz = np.c_[r["points"][:, :3].astype(np.float64), np.ones(len(r["points"]))]
        c = (cam["T_cam_lidar"] @ xyz.T).T[:, :3]
        front = fr["front"]
        assert front.sum() > 100 and np.all(c[front, 2] > 0)  # OpenCV z forward == Waymo x forward
        uvw = (cam["K"] @ c[front].T).T
        # float32 points: within 1e-3 px of Waymo's pixel moved to integer pixel centres
        assert np.abs(uvw[:, :2] / uvw[:, 2:3] - (fr["pixels"][front] - 0.5)).max() < 1e-3
        assert cam["timestamp_us"] - r["timestamp_us"] == 10_000


def test_principal_point_moves_half_a_pixel_to_opencv_pixel_centres(tmp_path):
    # Waymo's camera model (camera_model.cc CameraToImage, no distortion) in its camera frame (x fwd, y left, z up):
    # u = c_u - f_u y / x, v = c_v - f_v z / x, measured from the left/top edge of the first pixel. The Frame puts
    # pixel centres at integers (OpenCV), so the same point must land on (u - 0.5, v - 0.5).
    f_u, f_v, c_u, c_v = 50.0, 52.5, 47.25, 33.75
    fixtures.write_waymo(str(tmp_path), n_frames=1, H=4, W=24)
    path = tmp_path / "training" / "camera_calibration" / "seg-0001.parquet"
    t = pq.read_table(path)
    for name, value in (("f_u", f_u), ("f_v", f_v), ("c_u", c_u), ("c_v", c_v)):
        col = f"[CameraCalibrationComponent].intrinsic.{name}"
        t = t.set_column(t.column_names.index(col), col, [[value] * t.num_rows])
    pq.write_table(t, path)
    rows, rejects = read_all(cfg_for(tmp_path))
    assert rejects == [] and len(rows) == 1
    cam = rows[0]["cameras"][0]
    p_cam = np.array([[10.0, 0.0, 0.0], [10.0, 1.0, 0.5], [5.0, -0.8, -0.6], [20.0, 2.0, 1.5], [7.5, 0.3, -1.1]])
    u_waymo = c_u - f_u * p_cam[:, 1] / p_cam[:, 0]
    v_waymo = c_v - f_v * p_cam[:, 2] / p_cam[:, 0]
    assert (u_waymo[0], v_waymo[0]) == (c_u, c_v)
    # camera -> vehicle -> TOP LiDAR frame in float64 (the Frame's float32 points are tested above)
    p_veh = (fixtures.WAYMO_CAM_EXT @ np.c_[p_cam, np.ones(len(p_cam))].T).T
    p_lidar = (np.linalg.inv(fixtures.WAYMO_TOP_EXT) @ p_veh.T).T[:, :3]
    u, v, depth, inside = project_points(p_lidar, cam["K"], cam["T_cam_lidar"], cam["width"], cam["height"])
    np.testing.assert_allclose(depth, p_cam[:, 0], atol=1e-9)
    assert np.abs(u - (u_waymo - 0.5)).max() < 1e-6 and np.abs(v - (v_waymo - 0.5)).max() < 1e-6
    assert inside.all()


def test_out_of_tolerance_camera_is_rejected_with_the_reason(tmp_path):
    oracle = fixtures.write_waymo(str(tmp_path), n_frames=3, cam_offsets_us=(10_000, 60_000, 0))
    ids = list(oracle["frames"])
    rows, rejects = read_all(cfg_for(tmp_path))
    assert [r["frame_id"] for r in rows] == [ids[0], ids[2]]
    assert rejects == [{"id": ids[1], "reason": "time sync: camera FRONT timestamp differs from LiDAR by 60000 us > "
                                               "sync_tolerance_us=50000 (1 camera(s) out of tolerance)"}]
    rows, _ = read_all(cfg_for(tmp_path, "data.frame_stride=2", "data.max_frames=1"))
    assert [r["frame_id"] for r in rows] == [ids[0]]


def test_corrupt_inputs_become_rejects_with_reasons(tmp_path):
    oracle = fixtures.write_waymo(str(tmp_path / "a"), n_frames=2,
                                  drop_columns=("[LiDARCalibrationComponent].extrinsic.transform",))
    rows, rejects = read_all(cfg_for(tmp_path / "a"))
    assert rows == [] and [r["id"] for r in rejects] == list(oracle["frames"])
    assert rejects[0]["reason"] == ("lidar_calibration/seg-0001.parquet: missing parquet column(s) "
                                    "[LiDARCalibrationComponent].extrinsic.transform")
    # an undecodable image and a range image whose values do not fit its shape reject only their frame
    oracle = fixtures.write_waymo(str(tmp_path / "b"), n_frames=3)
    ids = list(oracle["frames"])
    for comp, col, i, value in (("camera_image", "[CameraImageComponent].image", 0, b"not an image"),
                                ("lidar", "[LiDARComponent].range_image_return1.shape", 1, [5, 5, 4])):
        path = tmp_path / "b" / "training" / comp / "seg-0001.parquet"
        t = pq.read_table(path)
        vals = t.column(col).to_pylist()
        vals[i] = value
        pq.write_table(t.set_column(t.column_names.index(col), col, [vals]), path)
    rows, rejects = read_all(cfg_for(tmp_path / "b"))
    assert [r["frame_id"] for r in rows] == [ids[2]]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons[ids[0]].startswith("unreadable image of camera FRONT: UnidentifiedImageError")
    assert reasons[ids[1]] == ("corrupt range image [LiDARComponent].range_image_return1: 11520 values for "
                               "shape [5, 5, 4]")
    # a segment without its camera_calibration file
    (tmp_path / "b" / "training" / "camera_calibration" / "seg-0001.parquet").unlink()
    rows, rejects = read_all(cfg_for(tmp_path / "b"))
    assert rows == [] and rejects[0]["reason"] == "missing component file camera_calibration/seg-0001.parquet"


def test_s3_and_disk_give_identical_frames(tmp_path, s3_bucket):
    fixtures.write_waymo(str(tmp_path / "w"), n_frames=2)
    fixtures.write_waymo(str(tmp_path / "w"), segment="seg-0002", n_frames=1, seed=3)
    url = f"s3://{s3_bucket}/waymo_v2"
    fixtures.upload_tree(str(tmp_path / "w"), url)
    disk, _ = read_all(cfg_for(tmp_path / "w"))
    s3, _ = read_all(cfg_for(url))
    assert len(disk) == 3 and fixtures.frames_differ(disk, s3) is None


def waymo_pixel(p_cam, K_waymo, coeffs):
    """Waymo's camera model (camera_model.cc, CameraToImage without rolling shutter) on (N, 3) camera-frame points
    (x forward, y left, z up): u_n = -y/x, v_n = -z/x, OpenCV's k1, k2, p1, p2, k3 (Waymo's k1, k2, k3, k4, k5),
    u = f_u u_nd + c_u measured from the first pixel's left edge. Returns (N, 2) px and the valid-region flag."""
    (f_u, _, c_u), (_, f_v, c_v) = K_waymo[0], K_waymo[1]
    k1, k2, p1, p2, k3 = coeffs
    u_n, v_n = -p_cam[:, 1] / p_cam[:, 0], -p_cam[:, 2] / p_cam[:, 0]
    r2 = u_n ** 2 + v_n ** 2
    r_d = 1.0 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    u_nd = u_n * r_d + 2.0 * p1 * u_n * v_n + p2 * (r2 + 2.0 * u_n * u_n)
    v_nd = v_n * r_d + p1 * (r2 + 2.0 * v_n * v_n) + 2.0 * p2 * u_n * v_n
    return np.c_[u_nd * f_u + c_u, v_nd * f_v + c_v], (r_d > 0.8) & (r_d < 1.2)


def test_distorted_camera_projects_through_the_frames_lens_onto_waymos_pixel(tmp_path):
    """The Frame carries the lens (k1, k2, p1, p2, k3) and keeps the image bytes; known camera points projected with
    the Frame's K, T_cam_lidar and distortion, after a parquet round trip of the Frame, land on the pixel of Waymo's
    camera model (pixel edge at 0, so 0.5 px less in the Frame's pixel-centre convention) within 0.15 px. Without the
    distortion they miss by > 2 px."""
    from raydseg.data.schema import frames_to_table, table_to_frames

    w, h = 96, 64
    coeffs = np.array([-0.25, 0.08, 0.002, -0.003, 0.01])
    oracle = fixtures.write_waymo(str(tmp_path), n_frames=1, H=4, W=24, w=w, h=h, distortion=tuple(coeffs))
    rows, rejects = read_all(cfg_for(tmp_path))
    assert rejects == [] and validate_frame(rows[0]) is None
    assert rows[0]["cameras"][0]["image"] == pq.read_table(
        tmp_path / "training" / "camera_image" / "seg-0001.parquet").column(
        "[CameraImageComponent].image")[0].as_py()  # the bytes as stored: nothing resampled
    (cam,) = table_to_frames(frames_to_table(rows))[0]["cameras"]
    np.testing.assert_array_equal(cam["distortion"], coeffs)
    p_cam = np.array([[10.0, 0.0, 0.0], [10.0, 8.0, 5.0], [8.0, -6.0, -3.5], [12.0, 5.0, -3.0], [9.0, -7.0, 4.0]])
    want, valid = waymo_pixel(p_cam, oracle["K"], coeffs)
    assert valid.all()
    p_veh = (fixtures.WAYMO_CAM_EXT @ np.c_[p_cam, np.ones(len(p_cam))].T).T
    p_lidar = (np.linalg.inv(fixtures.WAYMO_TOP_EXT) @ p_veh.T).T[:, :3]
    u, v, _, inside = project_points(p_lidar, cam["K"], cam["T_cam_lidar"], w, h, distortion=cam["distortion"])
    assert inside.all()
    err = np.hypot(u - (want[:, 0] - 0.5), v - (want[:, 1] - 0.5))
    print("px error through the lens:", err.max())
    assert err.max() < 0.15
    u0, v0, _, _ = project_points(p_lidar, cam["K"], cam["T_cam_lidar"], w, h)  # the lens ignored
    miss = np.hypot(u0 - (want[:, 0] - 0.5), v0 - (want[:, 1] - 0.5))
    print("px error without the lens:", miss)
    assert (miss > 2).sum() >= 3


def moving_car_pose(t_s, speed=12.0, yaw_rate=0.2, yaw0=0.7, climb=0.2, start=(1234.5, -4321.0, 56.0)):
    """(4, 4) float64 world_from_vehicle at t_s seconds after the first frame: a car on a circular arc at `speed`
    m/s (x forward), turning at `yaw_rate` rad/s and climbing at `climb` m/s, far from the world origin."""
    yaw = yaw0 + yaw_rate * t_s
    r = speed / yaw_rate
    t = [start[0] + r * (np.sin(yaw) - np.sin(yaw0)), start[1] - r * (np.cos(yaw) - np.cos(yaw0)),
         start[2] + climb * t_s]
    c, s = np.cos(yaw), np.sin(yaw)
    return fixtures.rigid(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]), t)


def write_moving_car(root, n_frames=2, cam_offset_us=50_000, f=200.0, w=192, h=128, cameras=None, directions=None,
                     readout=0.02, shutter=0.004, lens=(0.0,) * 5, **motion):
    """A segment in the official v2 layout where the ego car drives `moving_car_pose`: vehicle_pose at each frame
    timestamp, and the camera_image rows carry the v2 CameraImageComponent pose (world_from_vehicle at
    pose_timestamp = frame + cam_offset_us), velocity and rolling_shutter_params (column names and Arrow types of
    waymo_open_dataset/v2/perception/camera_image.py): `readout` s of readout after a `shutter` s exposure, the pose
    time 40 % into the readout. No lidar_pose: the points are the vehicle-frame points at the frame time.
    cameras: name -> (width, height) px (default FRONT at w x h); directions: name -> the calibration's
    rolling_shutter_direction (default 1, top to bottom); f: focal length (px) of a Waymo-like field of view; lens:
    (k1, k2, p1, p2, k3). Returns write_waymo's oracle."""
    cameras = {"FRONT": (w, h)} if cameras is None else cameras
    oracle = fixtures.write_waymo(str(root), n_frames=n_frames, w=w, h=h, pixel_pose=False, cameras=cameras,
                                  distortion=tuple(lens), cam_offsets_us=(cam_offset_us,) * n_frames)
    base = root / "training"
    (base / "lidar_pose" / "seg-0001.parquet").unlink()
    ts = [int(fid.rsplit("/", 1)[1]) for fid in oracle["frames"]]
    t0, pre = ts[0], "[CameraImageComponent]"

    def pose(us):
        return moving_car_pose((us - t0) * 1e-6, **motion)

    def velocity(us, dt=1e-3):  # linear (m/s, world frame) and angular (rad/s; a yaw about z in both frames)
        lin = (pose(us + dt * 1e6)[:3, 3] - pose(us - dt * 1e6)[:3, 3]) / (2 * dt)
        R = pose(us)[:3, :3].T @ pose(us + dt * 1e6)[:3, :3]
        return lin, np.array([0.0, 0.0, np.arctan2(R[1, 0], R[0, 0]) / dt])

    cam_us = [t + cam_offset_us for t in ts]
    cols = {"[VehiclePoseComponent].world_from_vehicle.transform":
            pa.array([pose(t).reshape(-1).tolist() for t in ts], pa.list_(pa.float64(), 16))}
    t = pq.read_table(base / "vehicle_pose" / "seg-0001.parquet")
    for col, arr in cols.items():
        t = t.set_column(t.column_names.index(col), col, arr)
    pq.write_table(t, base / "vehicle_pose" / "seg-0001.parquet")
    t = pq.read_table(base / "camera_image" / "seg-0001.parquet")
    row_us = [u + cam_offset_us for u in t.column("key.frame_timestamp_micros").to_pylist()]  # one per camera image
    vel = [velocity(u) for u in row_us]
    trigger = [u * 1e-6 - shutter / 2 - 0.4 * readout for u in row_us]
    cols = {f"{pre}.pose.transform": pa.array([pose(u).reshape(-1).tolist() for u in row_us],
                                              pa.list_(pa.float64(), 16)),
            **{f"{pre}.velocity.linear_velocity.{a}": pa.array([v[0][i] for v in vel], pa.float32())
               for i, a in enumerate("xyz")},
            **{f"{pre}.velocity.angular_velocity.{a}": pa.array([v[1][i] for v in vel], pa.float64())
               for i, a in enumerate("xyz")},
            f"{pre}.pose_timestamp": pa.array([u * 1e-6 for u in row_us], pa.float64()),
            f"{pre}.rolling_shutter_params.shutter": pa.array([shutter] * len(row_us), pa.float64()),
            f"{pre}.rolling_shutter_params.camera_trigger_time": pa.array(trigger, pa.float64()),
            f"{pre}.rolling_shutter_params.camera_readout_done_time":
                pa.array([x + shutter + readout for x in trigger], pa.float64())}
    for col, arr in cols.items():
        t = t.set_column(t.column_names.index(col), col, arr) if col in t.column_names else t.append_column(col, arr)
    pq.write_table(t, base / "camera_image" / "seg-0001.parquet")
    path = base / "camera_calibration" / "seg-0001.parquet"
    t = pq.read_table(path)
    for name in ("f_u", "f_v"):
        col = f"[CameraCalibrationComponent].intrinsic.{name}"
        t = t.set_column(t.column_names.index(col), col, [[f] * t.num_rows])
    col, name_of = "[CameraCalibrationComponent].rolling_shutter_direction", {k: n for n, k in waymo.CAMERAS.items()}
    t = t.set_column(t.column_names.index(col), col, pa.array(
        [(directions or {}).get(name_of[k], 1) for k in t.column("key.camera_name").to_pylist()], pa.int8()))
    pq.write_table(t, path)
    oracle.update(K=np.array([[f, 0, oracle["K"][0, 2]], [0, f, oracle["K"][1, 2]], [0, 0, 1]]), pose=pose,
                  cam_us=dict(zip(oracle["frames"], cam_us)))
    return oracle


def test_moving_car_points_land_on_the_camera_pixel_at_its_pose_time(tmp_path):
    """Ego car at 12 m/s turning at 0.2 rad/s; the camera's pose_timestamp is 50 ms after the LiDAR frame. World
    points (the fixture's vehicle points at the frame pose) go through the camera's true pose at its time and
    Waymo's camera model (u = c_u - f_u y / x, v = c_v - f_v z / x from the pixel edge): the Frame's points, K and
    T_cam_lidar must land there within 0.5 px; the static extrinsics miss by many pixels. (T_cam_lidar alone: the
    global-shutter model; the rolling shutter is tested in `test_rolling_shutter_points_land_on_waymos_...`.)"""
    w, h = 192, 128
    oracle = write_moving_car(tmp_path, w=w, h=h)
    rows, rejects = read_all(cfg_for(tmp_path, "data.sync_tolerance_us=100000"))
    assert rejects == [] and len(rows) == 2
    (f_u, _, c_u), (_, f_v, c_v) = oracle["K"][0], oracle["K"][1]
    static = waymo.WAYMO_TO_OPENCV @ np.linalg.inv(fixtures.WAYMO_CAM_EXT) @ fixtures.WAYMO_TOP_EXT
    for r in rows:
        fid, cam = r["frame_id"], r["cameras"][0]
        assert cam["timestamp_us"] == oracle["cam_us"][fid] == r["timestamp_us"] + 50_000
        assert validate_frame(r) is None
        vehicle = oracle["frames"][fid]["vehicle_points"]
        world = (oracle["pose"](r["timestamp_us"]) @ np.c_[vehicle, np.ones(len(vehicle))].T).T
        cam_world = oracle["pose"](cam["timestamp_us"]) @ fixtures.WAYMO_CAM_EXT  # camera -> world at its time
        p = np.linalg.solve(cam_world, world.T).T  # Waymo camera frame: x forward, y left, z up
        u_true, v_true = c_u - f_u * p[:, 1] / p[:, 0] - 0.5, c_v - f_v * p[:, 2] / p[:, 0] - 0.5
        seen = (p[:, 0] > 1) & (u_true > 0) & (u_true < w - 1) & (v_true > 0) & (v_true < h - 1)
        assert seen.sum() > 50
        u, v, _, _ = project_points(r["points"][:, :3], cam["K"], cam["T_cam_lidar"], w, h)
        err = np.hypot(u - u_true, v - v_true)[seen]
        assert err.max() < 0.5, err.max()
        u0, v0, _, _ = project_points(r["points"][:, :3], cam["K"], static, w, h)
        err0 = np.hypot(u0 - u_true, v0 - v_true)[seen]
        assert np.median(err0) > 2 and err0.max() > 5, (np.median(err0), err0.max())
        print(f"{fid}: {seen.sum()} points, with the motion {err.max():.1e} px max, static extrinsics "
              f"{np.median(err0):.2f} px median / {err0.max():.2f} px max")


def waymo_rolling_shutter_pixels(world, image_row, calib_row):
    """Waymo's rolling-shutter camera model (camera_model.cc: PrepareProjection, then WorldToImage solving for the
    capture time), coded here from the C++ source and the v2 column values of one camera_image row and its
    camera_calibration row, apart from the reader: the camera frame is Waymo's (x forward, y left, z up), the world
    frame the poses', and the capture time is found by bisection (camera_model.cc uses Newton).

    Args: world (N, 3) m static points; image_row, calib_row {v2 column name: value}.
    Returns (N, 2) px from the first pixel's edge, (N,) the radial-bound flag, (N, 3) m the points in the camera at
    their capture times, (N,) that time minus pose_timestamp (s)."""
    img = lambda c: image_row[f"[CameraImageComponent].{c}"]  # noqa: E731
    cal = lambda c: calib_row[f"[CameraCalibrationComponent].{c}"]  # noqa: E731
    pose, E = np.reshape(img("pose.transform"), (4, 4)), np.reshape(cal("extrinsic.transform"), (4, 4))
    f_u, f_v, c_u, c_v = (cal(f"intrinsic.{c}") for c in ("f_u", "f_v", "c_u", "c_v"))
    coeffs = [cal(f"intrinsic.{c}") for c in ("k1", "k2", "p1", "p2", "k3")]
    W, H, direction = cal("width"), cal("height"), cal("rolling_shutter_direction")
    shutter, trigger, done = (img(f"rolling_shutter_params.{c}") for c in
                              ("shutter", "camera_trigger_time", "camera_readout_done_time"))
    readout, start = done - trigger - shutter, trigger + 0.5 * shutter
    t_principal = {1: start + readout / H * c_v, 2: start + readout / W * c_u,  # GetPixelTimestamp
                   3: start + readout / H * (H - c_v), 4: start + readout / W * (W - c_u)}[direction]
    t_pose_offset = img("pose_timestamp") - t_principal

    def image_to_direction(u_d, v_d):  # IterateUndistortion
        k1, k2, p1, p2, k3 = coeffs
        u_nd, v_nd = (u_d - c_u) / f_u, (v_d - c_v) / f_v
        u, v = u_nd, v_nd
        for _ in range(20):
            r2 = u * u + v * v
            rd = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
            u, v = ((u_nd - 2 * p1 * u * v - p2 * (r2 + 2 * u * u)) / rd,
                    (v_nd - 2 * p2 * u * v - p1 * (r2 + 2 * v * v)) / rd)
        return u, v

    horizontal = direction in (2, 4)
    span = (image_to_direction(W, H / 2)[0] - image_to_direction(0, H / 2)[0] if horizontal else
            image_to_direction(W / 2, H)[1] - image_to_direction(W / 2, 0)[1])
    factor = (-readout if direction in (3, 4) else readout) / span

    def skew(x):
        return np.array([[0, -x[2], x[1]], [x[2], 0, -x[0]], [-x[1], x[0], 0]])

    n_tfm_cam0 = pose @ E
    w_vehicle = np.array([img(f"velocity.angular_velocity.{a}") for a in "xyz"])
    n_vel_cam0 = np.array([img(f"velocity.linear_velocity.{a}") for a in "xyz"]) + \
        skew(pose[:3, :3] @ w_vehicle) @ (pose[:3, :3] @ E[:3, 3])  # the lever arm
    cam0_dcm_n = n_tfm_cam0[:3, :3].T
    skew_omega_dcm = -skew(E[:3, :3].T @ w_vehicle) @ cam0_dcm_n

    def camera_point(t):  # (N, 3) for (N,) times after the pose
        dcm = cam0_dcm_n[None] + t[:, None, None] * skew_omega_dcm[None]
        return np.einsum("nij,nj->ni", dcm, world - n_tfm_cam0[:3, 3] - t[:, None] * n_vel_cam0)

    def residual(t):
        p = camera_point(t)
        spacing = -p[:, 1] / p[:, 0] if horizontal else -p[:, 2] / p[:, 0]
        return t - spacing * factor + t_pose_offset

    lo, hi = np.full(len(world), -0.2), np.full(len(world), 0.2)
    with np.errstate(divide="ignore", invalid="ignore"):  # points behind the camera: not compared
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            neg = residual(mid) < 0
            lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
        t = 0.5 * (lo + hi)
        p = camera_point(t)
        px, valid = waymo_pixel(p, np.array([[f_u, 0, c_u], [0, f_v, c_v], [0, 0, 1]]), coeffs)
    return px, valid, p, t


def test_rolling_shutter_points_land_on_waymos_rolling_shutter_pixel(tmp_path):
    """Four cameras read out in the four directions (FRONT top to bottom, FRONT_LEFT left to right, FRONT_RIGHT
    bottom to top, SIDE_LEFT right to left) over 30 ms, Waymo-like lens and field of view, the ego car at 12 m/s
    turning at 0.2 rad/s. The LiDAR points, projected with the Frame's K, T_cam_lidar, distortion and
    rolling_shutter after a parquet round trip of the Frame, land on the pixel of Waymo's rolling-shutter model
    (`waymo_rolling_shutter_pixels`, pixel edge at 0, so 0.5 px less in the Frame's pixel-centre convention) within
    0.01 px, at its depth; the pose-time camera alone (the global shutter) misses by pixels."""
    from raydseg.data.schema import frames_to_table, table_to_frames

    w, h = 480, 320
    directions = {"FRONT": 1, "FRONT_LEFT": 2, "FRONT_RIGHT": 3, "SIDE_LEFT": 4}
    write_moving_car(tmp_path, f=500.0, cameras={n: (w, h) for n in directions}, directions=directions,
                     readout=0.03, lens=fixtures.WAYMO_LIKE_DISTORTION)
    rows, rejects = read_all(cfg_for(tmp_path, "data.sync_tolerance_us=100000"))
    assert rejects == [] and len(rows) == 2
    rows = table_to_frames(frames_to_table(rows))
    base = tmp_path / "training"
    images = pq.read_table(base / "camera_image" / "seg-0001.parquet").to_pylist()
    calib = {r["key.camera_name"]: r
             for r in pq.read_table(base / "camera_calibration" / "seg-0001.parquet").to_pylist()}
    vpose = {r["key.frame_timestamp_micros"]: np.reshape(r["[VehiclePoseComponent].world_from_vehicle.transform"],
                                                         (4, 4))
             for r in pq.read_table(base / "vehicle_pose" / "seg-0001.parquet").to_pylist()}
    for r in rows:
        assert validate_frame(r) is None
        pts = r["points"][:, :3].astype(np.float64)
        world = (vpose[r["timestamp_us"]] @ fixtures.WAYMO_TOP_EXT @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]
        for cam in r["cameras"]:
            k = waymo.CAMERAS[cam["name"]]
            (image_row,) = [x for x in images if (x["key.frame_timestamp_micros"], x["key.camera_name"]) ==
                            (r["timestamp_us"], k)]
            want, valid, p, t = waymo_rolling_shutter_pixels(world, image_row, calib[k])
            seen = valid & (p[:, 0] > 1) & (want[:, 0] >= 1) & (want[:, 0] < w - 1) & (want[:, 1] >= 1) & \
                (want[:, 1] < h - 1)
            assert seen.sum() > 50 and np.ptp(t[seen]) > 0.015  # the points span more than half the readout
            u, v, depth, inside = project_points(pts, cam["K"], cam["T_cam_lidar"], w, h,
                                                 distortion=cam["distortion"], rolling_shutter=cam["rolling_shutter"])
            assert inside[seen].all()
            err = np.hypot(u - (want[:, 0] - 0.5), v - (want[:, 1] - 0.5))[seen]
            np.testing.assert_allclose(depth[seen], p[seen, 0], atol=1e-4)
            assert err.max() < 0.01, err.max()
            u0, v0, _, _ = project_points(pts, cam["K"], cam["T_cam_lidar"], w, h, distortion=cam["distortion"])
            miss = np.hypot(u0 - (want[:, 0] - 0.5), v0 - (want[:, 1] - 0.5))[seen]
            print(f"{r['frame_id']} {cam['name']} (direction {directions[cam['name']]}): {seen.sum()} points over "
                  f"{1e3 * np.ptp(t[seen]):.1f} ms, rolling shutter {err.max():.1e} px max; global shutter "
                  f"{np.median(miss):.2f} px median / {miss.max():.2f} px max")
            assert miss.max() > 5, miss.max()


def test_camera_without_rolling_shutter_data_stays_global_shutter(tmp_path, caplog):
    """A camera_image row with a null velocity value, a camera whose calibration says GLOBAL_SHUTTER (5), and a
    segment without the velocity / rolling_shutter_params columns (`write_waymo`'s, as older conversions) read as
    global shutter: rolling_shutter None and T_cam_lidar the camera at its pose time (projections as before); the
    segment logs how many camera images did."""
    write_moving_car(tmp_path / "a", cameras={"FRONT": (192, 128), "FRONT_LEFT": (192, 128)},
                     directions={"FRONT": 1, "FRONT_LEFT": 5})
    path = tmp_path / "a" / "training" / "camera_image" / "seg-0001.parquet"
    t = pq.read_table(path)
    col = "[CameraImageComponent].velocity.angular_velocity.z"
    vals = t.column(col).to_pylist()
    t = t.set_column(t.column_names.index(col), col, pa.array([None] + vals[1:], pa.float64()))  # frame 0 FRONT
    pq.write_table(t, path)
    with caplog.at_level(logging.DEBUG, logger=waymo.__name__):
        rows, rejects = read_all(cfg_for(tmp_path / "a", "data.sync_tolerance_us=100000"))
    assert rejects == [] and len(rows) == 2
    has = [[c["rolling_shutter"] is not None for c in r["cameras"]] for r in rows]
    assert [[c["name"] for c in r["cameras"]] for r in rows] == [["FRONT", "FRONT_LEFT"]] * 2
    assert has == [[False, False], [True, False]]
    assert "seg-0001: 3 of 4 camera images have no rolling-shutter data (or no pose): global shutter" in caplog.text
    for i, r in enumerate(rows):  # FRONT: the camera at its pose time, 50 ms after the frame
        T = waymo.WAYMO_TO_OPENCV @ np.linalg.inv(fixtures.WAYMO_CAM_EXT) @ \
            np.linalg.inv(moving_car_pose(0.1 * i + 0.05)) @ moving_car_pose(0.1 * i) @ fixtures.WAYMO_TOP_EXT
        np.testing.assert_allclose(r["cameras"][0]["T_cam_lidar"], T, atol=1e-9)
    fixtures.write_waymo(str(tmp_path / "b"), n_frames=1)
    rows, rejects = read_all(cfg_for(tmp_path / "b"))
    assert rejects == [] and rows[0]["cameras"][0]["rolling_shutter"] is None


def test_camera_without_pose_keeps_the_static_extrinsics(tmp_path, caplog):
    """A camera row whose pose is null, or a frame without a vehicle pose, gets T_cam_lidar from the static
    extrinsics (no failure) and the segment logs how many cameras did."""
    oracle = write_moving_car(tmp_path)
    path = tmp_path / "training" / "camera_image" / "seg-0001.parquet"
    t = pq.read_table(path)
    col = "[CameraImageComponent].pose.transform"
    poses = t.column(col).to_pylist()
    # as list<double>: pyarrow 25 cannot read back a null in a parquet fixed_size_list column
    t = t.set_column(t.column_names.index(col), col, pa.array([None] + poses[1:], pa.list_(pa.float64())))
    pq.write_table(t, path)
    static = waymo.WAYMO_TO_OPENCV @ np.linalg.inv(fixtures.WAYMO_CAM_EXT) @ fixtures.WAYMO_TOP_EXT
    with caplog.at_level(logging.DEBUG, logger=waymo.__name__):
        rows, rejects = read_all(cfg_for(tmp_path, "data.sync_tolerance_us=100000"))
    assert rejects == [] and [r["frame_id"] for r in rows] == list(oracle["frames"])
    np.testing.assert_allclose(rows[0]["cameras"][0]["T_cam_lidar"], static, atol=1e-12)
    assert np.abs(rows[1]["cameras"][0]["T_cam_lidar"] - static).max() > 0.1  # 0.6 m of motion in 50 ms
    assert "seg-0001: 1 of 2 camera images have no camera or vehicle pose" in caplog.text
    (tmp_path / "training" / "vehicle_pose" / "seg-0001.parquet").unlink()
    rows, rejects = read_all(cfg_for(tmp_path, "data.sync_tolerance_us=100000"))
    assert rejects == [] and all(np.allclose(r["cameras"][0]["T_cam_lidar"], static, atol=1e-12) for r in rows)


def test_truncated_image_is_rejected_with_its_reason_with_and_without_distortion(tmp_path):
    """A JPEG cut in half still has a readable header: the reader keeps its bytes (with or without distortion) and
    the ingest validation rejects that frame alone, with the decoder's reason."""
    from raydseg.data.schema import split_valid

    for distorted in (False, True):
        root = tmp_path / f"d{int(distorted)}"
        oracle = fixtures.write_waymo(str(root), n_frames=2, photo=True,
                                      distortion=fixtures.WAYMO_LIKE_DISTORTION if distorted else (0.0,) * 5)
        ids = list(oracle["frames"])
        path = root / "training" / "camera_image" / "seg-0001.parquet"
        t = pq.read_table(path)
        col = "[CameraImageComponent].image"
        images = t.column(col).to_pylist()
        images[0] = images[0][:len(images[0]) // 2]
        pq.write_table(t.set_column(t.column_names.index(col), col, [images]), path)
        rows, rejects = read_all(cfg_for(root))
        good, bad = split_valid(rows)
        assert [r["frame_id"] for r in good] == [ids[1]]
        (reject,) = rejects + bad
        assert reject["id"] == ids[0]
        assert reject["reason"].startswith("camera FRONT: undecodable image (OSError: image file is truncated"), \
            reject["reason"]


def per_pixel_reference(ri, E, incl, pixel_pose, wfv):
    """The vehicle-frame points of `range_image_to_points` computed pixel by pixel's formula with one rotation
    matrix per valid pixel (the module docstring's formulas), for comparison with its per-column shortcut."""
    from raydseg.data.sources.select import euler_to_matrix

    H, W = ri.shape[:2]
    rows, cols = np.nonzero(ri[..., 0] > 0)
    az = ((W - np.arange(W) - 0.5) / W * 2.0 - 1.0) * np.pi - np.arctan2(E[1, 0], E[0, 0])
    r = ri[rows, cols, 0].astype(np.float64)
    rc = r * np.cos(incl)[rows]
    p = np.stack([rc * np.cos(az)[cols], rc * np.sin(az)[cols], r * np.sin(incl)[rows]], axis=1)
    p = p @ E[:3, :3].T + E[:3, 3]
    pp = pixel_pose[rows, cols].astype(np.float64)
    world = np.einsum("nij,nj->ni", euler_to_matrix(pp[:, 0], pp[:, 1], pp[:, 2]), p) + pp[:, 3:6]
    inv = np.linalg.inv(wfv)
    return world @ inv[:3, :3].T + inv[:3, 3], ri[rows, cols, 1].astype(np.float64), rows


@pytest.mark.parametrize("per_column", [True, False])
def test_per_pixel_pose_gives_the_per_pixel_formulas_points(per_column, monkeypatch):
    """A pose that is the same down every column (a spinning LiDAR's) is turned into W rotations, not one per point;
    a pose that varies within a column takes the per-pixel path. Both reproduce the per-pixel formula (to one float32
    ulp: the kernel sums in its own order), whatever the invalid pixels hold, and on a per-column pose the two paths
    give the same points bit for bit."""
    rng = np.random.default_rng(5)
    H, W = 12, 300
    ri = np.zeros((H, W, 4), np.float32)
    ri[..., 0] = np.where(rng.uniform(size=(H, W)) < 0.6, rng.uniform(1, 70, (H, W)), 0)
    ri[..., 1] = rng.uniform(0, 2, (H, W))
    pose = np.broadcast_to(np.c_[rng.normal(0, 0.02, (W, 2)), np.linspace(0.3, 0.5, W), 100 + rng.normal(0, 1, (W, 3))],
                           (H, W, 6)).astype(np.float32).copy()
    pose[ri[..., 0] <= 0] = 0.0  # what an invalid pixel holds does not matter
    if not per_column:
        pose[..., 2] += rng.normal(0, 1e-3, (H, W)).astype(np.float32)
    E = fixtures.WAYMO_TOP_EXT
    incl = np.linspace(0.04, -0.3, H)
    wfv = fixtures.rigid(fixtures._rot(0.0, 0.0, 0.4), [100.0, 50.0, 1.0])
    assert (waymo.column_poses(pose, ri[..., 0] > 0) is not None) == per_column
    got = waymo.range_image_to_points(ri, E, incl, pose, wfv)
    xyz, inten, rows = per_pixel_reference(ri, E, incl, pose, wfv)
    assert got[0].dtype == np.float32 and got[0].shape == (len(xyz), 4)
    np.testing.assert_array_max_ulp(got[0][:, :3], xyz.astype(np.float32), maxulp=1)
    np.testing.assert_array_equal(got[0][:, 3], np.tanh(np.clip(inten, 0, None)).astype(np.float32))
    np.testing.assert_array_equal(got[1], rows)
    if per_column:
        monkeypatch.setattr(waymo, "column_poses", lambda pixel_pose, valid: None)
        for a, b in zip(waymo.range_image_to_points(ri, E, incl, pose, wfv), got):
            np.testing.assert_array_equal(a, b)


def test_second_return_is_read_only_when_asked(tmp_path):
    """data.returns=1 does not read return2's columns; returns=2 appends its points after return1's."""
    fixtures.write_waymo(str(tmp_path), n_frames=1, second_return=0.3)
    t = pq.read_table(tmp_path / "training" / "lidar" / "seg-0001.parquet")
    r2 = np.asarray(t.column("[LiDARComponent].range_image_return2.values")[0].values).reshape(16, 180, 4)
    one, _ = read_all(cfg_for(tmp_path))
    two, _ = read_all(cfg_for(tmp_path, "data.returns=2"))
    n1, n2 = len(one[0]["points"]), len(two[0]["points"])
    assert n2 - n1 == (r2[..., 0] > 0).sum() > 0
    np.testing.assert_array_equal(two[0]["points"][:n1], one[0]["points"])
    tab = waymo._read_component(str(tmp_path / "training"), "lidar", "seg-0001", waymo.RETURN2)
    assert not set(waymo.RETURN2) & set(tab.column_names)
