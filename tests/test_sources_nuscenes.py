"""nuScenes reader: v1.0 tables written from known geometry, sync rejects, corrupt inputs, S3 == disk, real sample."""
import json
import os

import numpy as np

from raydseg.config import load_config
from raydseg.data.schema import decode_image, encode_png, validate_frame
from raydseg.data.sources import fixtures, nuscenes
from raydseg.data.sources.overlay import overlay, project
from raydseg.data.sources.select import matrix_to_quat


def cfg_for(root, *extra):
    return load_config(overrides=["data.source=nuscenes", f"data.root={root}", *extra])


def read_all(cfg):
    rows, rejects = [], []
    for s in nuscenes.list_shards(cfg):
        json.dumps(s)
        r, j = nuscenes.read_shard(s, cfg)
        rows += r
        rejects += j
    return rows, rejects


def pixels(row):
    c = row["cameras"][0]
    xyz = np.c_[row["points"][:, :3].astype(np.float64), np.ones(len(row["points"]))]
    uvw = (c["K"] @ (c["T_cam_lidar"] @ xyz.T)[:3]).T
    return uvw[:, :2] / uvw[:, 2:3]


def test_world_points_land_on_expected_pixels_through_the_ego_pose_chain(tmp_path):
    oracle = fixtures.write_nuscenes(str(tmp_path), n_samples=3, cam_offsets_us=(20_000, 45_000, 30_000))
    rows, rejects = read_all(cfg_for(tmp_path))
    assert rejects == [] and [r["frame_id"] for r in rows] == list(oracle["frames"])
    for r in rows:
        assert validate_frame(r) is None
        fr = oracle["frames"][r["frame_id"]]
        # the ego moves ~0.45 m between LiDAR and camera time: the chain must compensate it
        assert np.abs(pixels(r) - fr["pixels"]).max() < 0.5
        np.testing.assert_allclose(r["points"][:, :3], fr["points"][:, :3])
        np.testing.assert_allclose(r["points"][:, 3], fr["points"][:, 3] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(r["ring"], fr["points"][:, 4].astype(np.uint8))
        assert r["cameras"][0]["timestamp_us"] - r["timestamp_us"] == fr["cam_offset_us"]
        assert r["sequence"] == "nuscenes/scene-0001"


def test_out_of_tolerance_camera_is_rejected_with_the_reason(tmp_path):
    oracle = fixtures.write_nuscenes(str(tmp_path), n_samples=3, cam_offsets_us=(20_000, 90_000, 30_000))
    late = list(oracle["frames"])[1]
    rows, rejects = read_all(cfg_for(tmp_path))
    assert [r["frame_id"] for r in rows] == [f for f in oracle["frames"] if f != late]
    assert rejects == [{"id": late, "reason": "time sync: camera CAM_FRONT timestamp differs from LiDAR by 90000 us "
                                              "> sync_tolerance_us=50000 (1 camera(s) out of tolerance)"}]
    rows, _ = read_all(cfg_for(tmp_path, "data.frame_stride=2", "data.sync_tolerance_us=0"))
    assert [r["frame_id"] for r in rows] == [list(oracle["frames"])[0], list(oracle["frames"])[2]]
    rows, _ = read_all(cfg_for(tmp_path, "data.max_frames=1"))
    assert len(rows) == 1


def test_corrupt_inputs_become_rejects_with_reasons(tmp_path):
    oracle = fixtures.write_nuscenes(str(tmp_path), n_samples=4)
    ids = list(oracle["frames"])
    tables = {t: json.loads((tmp_path / "v1.0-mini" / f"{t}.json").read_text()) for t in ("sample_data",)}
    by_tok = {sd["token"]: sd for sd in tables["sample_data"]}
    lidar0 = tmp_path / by_tok["sdl0"]["filename"]
    lidar0.write_bytes(lidar0.read_bytes()[:-8])
    (tmp_path / by_tok["sdc1"]["filename"]).write_bytes(b"\xff\xd8\xff not a jpeg")
    by_tok["sdc2"]["calibrated_sensor_token"] = "cs_gone"
    (tmp_path / "v1.0-mini" / "sample_data.json").write_text(json.dumps(tables["sample_data"]))
    rows, rejects = read_all(cfg_for(tmp_path))
    assert [r["frame_id"] for r in rows] == [ids[3]]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons[ids[0]] == (f"truncated point cloud {lidar0.name}: 5992 bytes is not a positive multiple of 20 "
                               "(5 float32 per point)")
    assert reasons[ids[1]].startswith(f"unreadable image {by_tok['sdc1']['filename']}: ")
    assert reasons[ids[2]] == f"missing calibrated_sensor row cs_gone for {by_tok['sdc2']['filename']}"


def test_s3_and_disk_give_identical_frames(tmp_path, s3_bucket):
    fixtures.write_nuscenes(str(tmp_path / "ns"), n_samples=2)
    url = f"s3://{s3_bucket}/nuscenes"
    fixtures.upload_tree(str(tmp_path / "ns"), url)
    disk, _ = read_all(cfg_for(tmp_path / "ns"))
    s3, _ = read_all(cfg_for(url))
    assert len(disk) == 2 and fixtures.frames_differ(disk, s3) is None


def write_real_tables(shared: str, root: str) -> dict:
    """v1.0 tables for the shared keyframe, from its derived calibration; the sensor files are symlinked."""
    d = json.loads(open(os.path.join(shared, "derived_calibration.json")).read())
    os.makedirs(root, exist_ok=True)
    os.symlink(os.path.join(shared, "samples"), os.path.join(root, "samples"))
    ego = np.array(d["ego2global"])
    t_l = int(round(d["timestamp_s"] * 1e6))

    def cs(tok, sensor, M, K=None):
        M = np.array(M)
        return {"token": tok, "sensor_token": sensor, "translation": M[:3, 3].tolist(),
                "rotation": matrix_to_quat(M[:3, :3]), "camera_intrinsic": K or []}

    sensors = [{"token": "s_LIDAR_TOP", "channel": "LIDAR_TOP", "modality": "lidar"}]
    cals = [cs("cs_LIDAR_TOP", "s_LIDAR_TOP", d["lidar"]["lidar2ego"])]
    poses, sds = [], []
    entries = [("LIDAR_TOP", d["lidar"]["path"], t_l)] + [
        (c, v["path"], int(round(v["timestamp_s"] * 1e6))) for c, v in d["cameras"].items()]
    for ch, path, t in entries:
        if ch != "LIDAR_TOP":
            sensors.append({"token": f"s_{ch}", "channel": ch, "modality": "camera"})
            cals.append(cs(f"cs_{ch}", f"s_{ch}", d["cameras"][ch]["cam2ego"], d["cameras"][ch]["K"]))
        E = ego
        if ch != "LIDAR_TOP":  # the ego pose at camera time that mmdet3d's lidar2cam chain used (~0.3 m of motion):
            # T_cam_lidar = inv(cam2ego) inv(E_cam) E_lidar lidar2ego  =>  E_cam = E_lidar lidar2ego inv(T) inv(cam2ego)
            E = (ego @ np.array(d["lidar"]["lidar2ego"]) @ np.linalg.inv(d["cameras"][ch]["T_cam_lidar"])
                 @ np.linalg.inv(d["cameras"][ch]["cam2ego"]))
        poses.append({"token": f"ep_{ch}", "timestamp": t, "translation": E[:3, 3].tolist(),
                      "rotation": matrix_to_quat(E[:3, :3])})
        sds.append({"token": f"sd_{ch}", "sample_token": d["sample_token"], "ego_pose_token": f"ep_{ch}",
                    "calibrated_sensor_token": f"cs_{ch}", "timestamp": t, "fileformat": path.rsplit(".", 1)[-1],
                    "is_key_frame": True, "height": 900, "width": 1600, "filename": path, "prev": "", "next": ""})
    tables = {"scene": [{"token": "sc", "log_token": "lg", "nbr_samples": 1, "first_sample_token": d["sample_token"],
                         "last_sample_token": d["sample_token"], "name": "scene-demo", "description": ""}],
              "sample": [{"token": d["sample_token"], "timestamp": t_l, "scene_token": "sc", "prev": "", "next": ""}],
              "sample_data": sds, "calibrated_sensor": cals, "ego_pose": poses, "sensor": sensors}
    os.makedirs(os.path.join(root, "v1.0-mini"))
    for name, rows in tables.items():
        with open(os.path.join(root, "v1.0-mini", f"{name}.json"), "w") as f:
            json.dump(rows, f)
    return d


def test_real_keyframe_projects_into_six_cameras_with_plausible_depth(shared_data, tmp_path):
    d = write_real_tables(str(shared_data / "mmdet3d_demo_nuscenes"), str(tmp_path / "ns"))
    rows, rejects = read_all(cfg_for(tmp_path / "ns"))
    assert rejects == [] and len(rows) == 1
    r = rows[0]
    assert validate_frame(r) is None
    assert r["frame_id"] == "nuscenes/scene-demo/1532402927647951" and len(r["points"]) == 34688
    assert r["ring"].max() == 31 and 0 <= r["points"][:, 3].min() and r["points"][:, 3].max() <= 1.0
    assert sorted(c["name"] for c in r["cameras"]) == sorted(d["cameras"])
    for cam in r["cameras"]:
        ref = d["cameras"][cam["name"]]
        assert (cam["width"], cam["height"]) == (1600, 900)
        np.testing.assert_allclose(cam["K"], ref["K"])
        np.testing.assert_allclose(cam["T_cam_lidar"], ref["T_cam_lidar"], atol=2e-5)
        uv, depth, idx = project(r["points"], cam["K"], cam["T_cam_lidar"], 1600, 900, near_m=0.0)
        assert abs(len(idx) - ref["points_in_image"]) <= 5
        bottom, middle = depth[uv[:, 1] > 700], depth[(uv[:, 1] > 400) & (uv[:, 1] < 550)]
        assert np.median(bottom) < np.median(middle)  # the road below the horizon is nearer
        if cam["name"] == "CAM_FRONT":
            img = decode_image(cam["image"])
            path = tmp_path / "nuscenes_CAM_FRONT_overlay.png"
            path.write_bytes(encode_png(overlay(img, uv, depth)))
            assert (decode_image(path.read_bytes()) != img).any(axis=2).sum() > 1000
