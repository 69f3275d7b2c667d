"""KITTI reader: object + raw layouts written from known geometry, corrupt inputs, S3 == disk, real samples."""
import json
import os

import numpy as np
import pytest

from raydseg.config import load_config
from raydseg.data.schema import decode_image, encode_png, validate_frame
from raydseg.data.sources import fixtures, kitti
from raydseg.data.sources.overlay import overlay, project


def cfg_for(root, *extra):
    return load_config(overrides=["data.source=kitti", f"data.root={root}", *extra])


def read_all(cfg):
    rows, rejects = [], []
    for s in kitti.list_shards(cfg):
        json.dumps(s)  # shards are JSON-serialisable
        r, j = kitti.read_shard(s, cfg)
        rows += r
        rejects += j
    return rows, rejects


def pixels(row, cam=0):
    c = row["cameras"][cam]
    xyz = np.c_[row["points"][:, :3].astype(np.float64), np.ones(len(row["points"]))]
    uvw = (c["K"] @ (c["T_cam_lidar"] @ xyz.T)[:3]).T
    return uvw[:, :2] / uvw[:, 2:3]


def test_object_layout_points_land_on_the_kitti_formula_pixels(tmp_path):
    oracle = fixtures.write_kitti_object(str(tmp_path), n_frames=3)
    rows, rejects = read_all(cfg_for(tmp_path))
    assert rejects == []
    assert [r["frame_id"] for r in rows] == ["kitti/training/000000", "kitti/training/000001", "kitti/training/000002"]
    for r in rows:
        assert validate_frame(r) is None
        fr = oracle["frames"][r["frame_id"].split("/")[-1]]
        np.testing.assert_array_equal(r["points"], fr["points"])
        assert [c["name"] for c in r["cameras"]] == ["image_2"]
        assert np.abs(pixels(r) - fr["pixels"]).max() < 0.5
        np.testing.assert_allclose(r["cameras"][0]["K"], oracle["P2"][:, :3])


def test_raw_layout_projection_timestamps_and_sync_reject(tmp_path):
    oracle = fixtures.write_kitti_raw(str(tmp_path), n_frames=3, late_frame=1, late_us=80_000)
    rows, rejects = read_all(cfg_for(tmp_path))
    drive = oracle["drive"]
    assert [r["frame_id"] for r in rows] == [f"kitti/{drive}/0000000000", f"kitti/{drive}/0000000002"]
    assert rejects == [{"id": f"kitti/{drive}/0000000001",
                        "reason": "time sync: camera image_02 timestamp differs from LiDAR by 80000 us > "
                                  "sync_tolerance_us=50000 (1 camera(s) out of tolerance)"}]
    assert rows[1]["timestamp_us"] - rows[0]["timestamp_us"] == 206_000
    assert rows[0]["cameras"][0]["timestamp_us"] - rows[0]["timestamp_us"] == 4_000
    for r in rows:
        assert validate_frame(r) is None
        assert np.abs(pixels(r) - oracle["frames"][r["frame_id"].split("/")[-1]]["pixels"]).max() < 0.5
    # a looser tolerance keeps the late frame
    rows, rejects = read_all(cfg_for(tmp_path, "data.sync_tolerance_us=100000"))
    assert len(rows) == 3 and rejects == []


def test_stride_max_frames_and_camera_selection(tmp_path):
    fixtures.write_kitti_object(str(tmp_path), n_frames=5)
    rows, _ = read_all(cfg_for(tmp_path, "data.frame_stride=2"))
    assert [r["frame_id"][-1] for r in rows] == ["0", "2", "4"]
    rows, _ = read_all(cfg_for(tmp_path, "data.frame_stride=2", "data.max_frames=2"))
    assert [r["frame_id"][-1] for r in rows] == ["0", "2"]
    shards = kitti.list_shards(cfg_for(tmp_path, "data.shard_frames=2"))
    assert [s["frames"] for s in shards] == [["000000", "000001"], ["000002", "000003"], ["000004"]]
    rows, rejects = read_all(cfg_for(tmp_path, "data.cameras=[image_3]"))
    assert rows == [] and len(rejects) == 5 and "no camera of ['image_3']" in rejects[0]["reason"]


def test_corrupt_inputs_become_rejects_with_reasons(tmp_path):
    fixtures.write_kitti_object(str(tmp_path), n_frames=4)
    tr = tmp_path / "training"
    data = (tr / "velodyne" / "000000.bin").read_bytes()
    (tr / "velodyne" / "000000.bin").write_bytes(data[:-6])
    calib = (tr / "calib" / "000001.txt").read_text().splitlines()
    (tr / "calib" / "000001.txt").write_text("\n".join(ln for ln in calib if not ln.startswith("Tr_velo_to_cam")))
    (tr / "image_2" / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows, rejects = read_all(cfg_for(tmp_path))
    assert [r["frame_id"] for r in rows] == ["kitti/training/000003"]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["kitti/training/000000"] == ("truncated point cloud 000000.bin: 7994 bytes is not a positive "
                                               "multiple of 16 (4 float32 per point)")
    assert reasons["kitti/training/000001"] == "calibration calib/000001.txt has no Tr_velo_to_cam row"
    assert reasons["kitti/training/000002"].startswith("unreadable image 000002.png: ")


def test_s3_and_disk_give_identical_frames(tmp_path, s3_bucket):
    fixtures.write_kitti_object(str(tmp_path / "obj"), n_frames=2)
    fixtures.write_kitti_raw(str(tmp_path / "raw"), n_frames=2)
    for layout in ("obj", "raw"):
        url = f"s3://{s3_bucket}/kitti_{layout}"
        assert fixtures.upload_tree(str(tmp_path / layout), url) > 0
        disk, _ = read_all(cfg_for(tmp_path / layout))
        s3, _ = read_all(cfg_for(url))
        assert len(disk) == 2 and fixtures.frames_differ(disk, s3) is None


REAL = ["kitti_object_vis", "kitti_velo2cam", "kitti_reduced_kazuki_hara", "mmdet3d_demo_kitti"]


@pytest.mark.parametrize("folder", REAL)
def test_real_samples_project_with_plausible_depth_and_overlay(shared_data, tmp_path, folder):
    root = shared_data / folder
    derived = json.loads((root / "derived_frames.json").read_text())["frames"]
    rows, rejects = read_all(cfg_for(root))
    assert rejects == [] and sorted(r["frame_id"].split("/")[-1] for r in rows) == sorted(derived)
    for r in rows:
        assert validate_frame(r) is None
        num = r["frame_id"].split("/")[-1]
        d, cam = derived[num], r["cameras"][0]
        assert len(r["points"]) == d["num_points"]
        assert (cam["width"], cam["height"]) == tuple(d["image_size_wh"])
        np.testing.assert_allclose(cam["K"], d["K"], atol=1e-9)
        np.testing.assert_allclose(cam["T_cam_lidar"], d["T_cam2_lidar"], atol=1e-6)
        uv, depth, idx = project(r["points"], cam["K"], cam["T_cam_lidar"], cam["width"], cam["height"], near_m=0.0)
        assert abs(len(idx) - d["points_in_image"]) <= 2
        # plausible depth: camera depth ~ Velodyne forward distance; lower image rows (road) are nearer
        assert np.corrcoef(depth, r["points"][idx, 0])[0, 1] > 0.99
        h = cam["height"]
        bottom, middle = depth[uv[:, 1] > 0.75 * h], depth[(uv[:, 1] > 0.4 * h) & (uv[:, 1] < 0.6 * h)]
        assert np.median(bottom) < np.median(middle)
        img = decode_image(cam["image"])
        out = overlay(img, uv, depth)
        path = tmp_path / f"{folder}_{num}_overlay.png"
        path.write_bytes(encode_png(out))
        assert os.path.getsize(path) > 1000 and (decode_image(path.read_bytes()) != img).any(axis=2).sum() > 1000


@pytest.mark.ray
def test_prepare_data_job_ingests_kitti_with_rejects_and_resumes(tmp_path, ray_local, capsys):
    import pyarrow.parquet as pq
    import runpy

    fixtures.write_kitti_object(str(tmp_path / "kitti"), n_frames=3)
    (tmp_path / "kitti" / "training" / "velodyne" / "000001.bin").write_bytes(b"\x00" * 10)
    main = runpy.run_path(str(os.path.join(os.path.dirname(__file__), "..", "jobs", "prepare_data.py")))["main"]
    argv = ["--source", "kitti", "--input", str(tmp_path / "kitti"), "--output", str(tmp_path / "out"),
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "data.shard_frames=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ingest ran: shards=2" in out and "frames=2" in out and "rejects: 1" in out
    assert "truncated point cloud 000001.bin: 10 bytes" in out
    frames = pq.read_table(str(tmp_path / "out" / "prepare_kitti" / "ingest" / "frames"))  # plain pyarrow
    assert sorted(frames.column("frame_id").to_pylist()) == ["kitti/training/000000", "kitti/training/000002"]
    assert frames.column("n_points").to_pylist() == [500, 500]
    assert main(argv) == 0 and "ingest skipped" in capsys.readouterr().out
