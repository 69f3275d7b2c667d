"""Waymo v2 reader: parquet components written from known geometry, range-image round trip, rejects, S3 == disk."""
import io
import json

import numpy as np
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


def test_distorted_camera_is_undistorted_at_ingest_onto_the_pinhole_k(tmp_path):
    """Waymo's camera model with distortion (camera_model.cc: OpenCV's k1, k2, p1, p2, k3 on u_n = -y/x, v_n = -z/x,
    then u = f_u u_nd + c_u from the pixel edge): a blob drawn where that model puts five known camera points lands,
    after ingest, where the Frame's pinhole K and T_cam_lidar project them (to 0.15 px); a camera without distortion
    keeps its image bytes."""
    from PIL import Image

    from raydseg.data.schema import decode_image
    from raydseg.geometry.distortion import distort

    w, h, sigma = 96, 64, 1.2
    coeffs = np.array([-0.25, 0.08, 0.002, -0.003, 0.01])
    oracle = fixtures.write_waymo(str(tmp_path), n_frames=1, H=4, W=24, w=w, h=h)
    plain = read_all(cfg_for(tmp_path))[0][0]["cameras"][0]["image"]
    assert plain == pq.read_table(tmp_path / "training" / "camera_image" / "seg-0001.parquet").column(
        "[CameraImageComponent].image")[0].as_py()  # no distortion: the bytes as stored
    (f_u, _, c_u), (_, f_v, c_v) = oracle["K"][0], oracle["K"][1]
    p_cam = np.array([[10.0, 0.0, 0.0], [10.0, 8.0, 5.0], [8.0, -6.0, -3.5], [12.0, 5.0, -3.0], [9.0, -7.0, 4.0]])
    u_n, v_n = -p_cam[:, 1] / p_cam[:, 0], -p_cam[:, 2] / p_cam[:, 0]
    u_nd, v_nd = distort(u_n, v_n, coeffs)
    # the distorted image: Gaussian blobs at Waymo's pixels, moved to pixel-centre coordinates
    uu, vv = np.meshgrid(np.arange(w), np.arange(h))
    img = sum(np.exp(-((uu - (f_u * a + c_u - 0.5)) ** 2 + (vv - (f_v * b + c_v - 0.5)) ** 2) / (2 * sigma ** 2))
              for a, b in zip(u_nd, v_nd))
    buf = io.BytesIO()
    Image.fromarray(np.repeat((255 * np.clip(img, 0, 1)).astype(np.uint8)[..., None], 3, 2)).save(buf, format="PNG")
    for comp, cols in (("camera_image", {"[CameraImageComponent].image": buf.getvalue()}),
                       ("camera_calibration", {f"[CameraCalibrationComponent].intrinsic.{c}": float(k)
                                               for c, k in zip(waymo.DISTORTION, coeffs)})):
        path = tmp_path / "training" / comp / "seg-0001.parquet"
        t = pq.read_table(path)
        for col, value in cols.items():
            t = t.set_column(t.column_names.index(col), col, [[value] * t.num_rows])
        pq.write_table(t, path)
    rows, rejects = read_all(cfg_for(tmp_path))
    assert rejects == []
    cam = rows[0]["cameras"][0]
    out = decode_image(cam["image"])[..., 0].astype(np.float64)
    assert out.shape == (h, w)
    p_veh = (fixtures.WAYMO_CAM_EXT @ np.c_[p_cam, np.ones(len(p_cam))].T).T
    p_lidar = (np.linalg.inv(fixtures.WAYMO_TOP_EXT) @ p_veh.T).T[:, :3]
    u, v, _, inside = project_points(p_lidar, cam["K"], cam["T_cam_lidar"], w, h)
    assert inside.all()
    ud, vd = f_u * u_nd + c_u - 0.5, f_v * v_nd + c_v - 0.5
    moved = np.hypot(ud - u, vd - v) > 3  # where the lens moves a point by > 3 px, ignoring it would miss the blob
    assert moved.sum() >= 3
    for ui, vi, udi, vdi, m in zip(u, v, ud, vd, moved):
        win = (np.abs(uu - ui) <= 3) & (np.abs(vv - vi) <= 3)
        cu, cv = (out * win * uu).sum() / (out * win).sum(), (out * win * vv).sum() / (out * win).sum()
        assert np.hypot(cu - ui, cv - vi) < 0.15, (cu, cv, ui, vi)
        if m:
            assert out[int(round(vdi)), int(round(udi))] < 0.2 * out[int(round(vi)), int(round(ui))]
