"""The `proposals` stage on a real local Ray cluster: output contract, rejects with reasons, resume."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raydseg import storage
from raydseg.config import load_config
from raydseg.data.schema import decode_image, encode_png, frames_to_table
from raydseg.geometry import analytic
from raydseg.geometry.project import SKY_PX
from raydseg.pipeline import StageContext

SEGMENT_COLUMNS = ["frame_id", "camera", "width", "height", "segment_ids", "n_segments", "seg_id", "seg_n_points",
                   "seg_centroid", "seg_extent", "seg_range", "seg_n_pixels", "ground_px"]


def _frame(frame_id: str, boxes, *, behind_only: bool = False) -> dict:
    s = analytic.raycast(boxes, beams=32, columns=512, noise_m=0.01, seed=len(frame_id))
    pts = s["points"]
    if behind_only:  # every point behind the forward camera
        pts = pts[pts[:, 0] < -1.0]
    K, T = analytic.camera(160, 80, focal=80.0)
    image = encode_png(np.full((80, 160, 3), 128, np.uint8))
    return {"frame_id": frame_id, "sequence": "s", "timestamp_us": 0, "points": pts,
            "ring": s["ring"][: len(pts)] if not behind_only else s["ring"][s["points"][:, 0] < -1.0],
            "cameras": [{"name": "front", "image": image, "width": 160, "height": 80, "K": K, "T_cam_lidar": T,
                         "timestamp_us": 0}]}


@pytest.mark.ray
def test_proposals_stage_writes_the_contract_and_rejects_a_frame_with_nothing_in_front(ray_local, tmp_path):
    from raydseg.stages import proposals

    boxes = analytic.street_boxes()
    frames = [_frame("f0", boxes), _frame("f1", boxes[:2]), _frame("f2-behind", boxes, behind_only=True)]
    storage.write_table(frames_to_table(frames[:2]), str(tmp_path / "ingest" / "frames" / "part-00000.parquet"))
    storage.write_table(frames_to_table(frames[2:]), str(tmp_path / "ingest" / "frames" / "part-00001.parquet"))
    cfg = load_config(overrides=["proposals.min_points=10"])
    ctx = StageContext(cfg=cfg, run_root=str(tmp_path), out_dir=str(tmp_path / "proposals"), tracking_uri="")
    res = proposals.run(ctx)

    assert res.counts["frames"] == 2 and res.counts["camera_rows"] == 2 and res.counts["parts"] == 2
    assert len(res.rejects) == 1 and res.rejects[0]["id"] == "f2-behind"
    assert "no LiDAR points in front of the camera" in res.rejects[0]["reason"]
    assert 0 < res.metrics["ground_fraction"] < 1 and res.metrics["segments_per_frame"] >= 2
    assert 0 < res.metrics["image_coverage"] < 1

    seg = storage.read_table(str(tmp_path / "proposals" / "segments" / "part-00000.parquet"))
    assert seg.schema.names == SEGMENT_COLUMNS
    assert seg.schema.field("seg_id").type.value_type == pa.uint16()
    assert seg.schema.field("seg_centroid").type.value_type == pa.float32()
    assert storage.read_table(str(tmp_path / "proposals" / "segments" / "part-00001.parquet")).num_rows == 0
    for row in seg.to_pylist():
        img = decode_image(row["segment_ids"])
        assert img.dtype == np.uint16 and img.shape == (row["height"], row["width"])
        ids, counts = np.unique(img[img > 0], return_counts=True)
        assert ids.tolist() == sorted(row["seg_id"]) and row["n_segments"] == len(ids)
        assert dict(zip(row["seg_id"], row["seg_n_pixels"])) == dict(zip(ids.tolist(), counts.tolist()))
        assert len(row["seg_centroid"]) == len(row["seg_extent"]) == 3 * row["n_segments"]
        ground = decode_image(row["ground_px"])
        assert ground.shape == img.shape and set(np.unique(ground)) <= {0, 1, SKY_PX} and (ground == 1).sum() > 0

    pts = storage.read_table(str(tmp_path / "proposals" / "points" / "part-00000.parquet")).to_pylist()
    assert [p["frame_id"] for p in pts] == ["f0", "f1"]
    for p, f in zip(pts, frames):
        assert len(p["is_ground"]) == len(p["segment_id"]) == len(f["points"])
        sid = np.array(p["segment_id"])
        # a segment is one box: the majority box of the points of each segment covers >= 95 % of them
        inst = analytic.raycast(analytic.street_boxes() if f["frame_id"] == "f0" else analytic.street_boxes()[:2],
                                beams=32, columns=512, noise_m=0.01, seed=len(f["frame_id"]))["instance"]
        for s in np.unique(sid[sid > 0]):
            assert np.bincount(inst[sid == s]).max() >= 0.95 * (sid == s).sum()
        assert np.array(p["is_ground"], bool)[inst == 0].mean() > 0.97

    # resume: every part is marked done, a rerun skips them all and reports the same counts
    res2 = proposals.run(ctx)
    assert res2.counts["parts_resumed"] == 2 and res2.counts["frames"] == 2 and len(res2.rejects) == 1
