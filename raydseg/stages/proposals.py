"""Stage `proposals`: LiDAR ground removal, 3D segmentation and projection into every camera, part by part on Ray.

Reads `ingest/frames/part-*.parquet`, writes (same part names):
  `proposals/segments/`: one row per frame x camera (SEGMENTS_SCHEMA): uint16 segment-id PNG, per-segment stats,
                         ground-hit PNG;
  `proposals/points/`:   one row per frame (POINTS_SCHEMA): per-point ground flag and segment id, aligned with the
                         frame's points (points dropped by the density ablation: 0 / 0);
  `proposals/stats/`:    one row per frame (STATS_SCHEMA), for the stage metrics.
A camera with no LiDAR point in front of it inside the image is rejected (`<frame_id>/<camera>`) and the others go
on; a frame whose every camera is rejected is rejected as a whole (`<frame_id>`) and gets no output rows.
"""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from raydseg import stage_requests, storage
from raydseg.alloc import keep_freed_memory
from raydseg.config import ProposalsConfig, config_from_dict
from raydseg.data.schema import encode_png, table_to_frames
from raydseg.geometry.proposals import camera_segments, frame_seed, sweep_segments
from raydseg.pipeline import StageContext, StageResult

NAME = "proposals"
INPUTS: tuple[str, ...] = ("ingest",)
CONFIG_SECTIONS = ("proposals",)

SEGMENTS_SCHEMA = pa.schema([
    ("frame_id", pa.string()), ("camera", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("segment_ids", pa.binary()), ("n_segments", pa.int32()), ("seg_id", pa.list_(pa.uint16())),
    ("seg_n_points", pa.list_(pa.int32())), ("seg_centroid", pa.list_(pa.float32())),
    ("seg_extent", pa.list_(pa.float32())), ("seg_range", pa.list_(pa.float32())),
    ("seg_n_pixels", pa.list_(pa.int32())), ("ground_px", pa.binary()),
])
POINTS_SCHEMA = pa.schema([("frame_id", pa.string()), ("is_ground", pa.large_list(pa.uint8())),
                           ("segment_id", pa.large_list(pa.uint16()))])
STATS_SCHEMA = pa.schema([("frame_id", pa.string()), ("n_points", pa.int64()), ("n_used", pa.int64()),
                          ("n_ground", pa.int64()), ("n_segmented", pa.int64()), ("n_segments", pa.int32())])


def frame_outputs(frame: dict, cfg: ProposalsConfig, seed: int = 0) -> tuple[list[dict], dict | None, dict,
                                                                              list[dict]]:
    """Proposals of one Frame row: (segment rows, points row or None, stats row, rejects)."""
    fid = frame["frame_id"]
    pts = np.asarray(frame["points"], np.float32).reshape(-1, 4)
    sw = sweep_segments(pts, frame.get("ring"), cfg, seed=frame_seed(fid, seed))
    rows, rejects = [], []
    for cam in frame["cameras"]:
        w, h = int(cam["width"]), int(cam["height"])
        out = camera_segments(pts[:, :3], sw, cam["K"], cam["T_cam_lidar"], w, h, cfg)
        if out["n_in_image"] == 0:
            rejects.append({"id": f"{fid}/{cam['name']}",
                            "reason": f"camera {cam['name']}: no LiDAR points in front of the camera inside the image"})
            continue
        rows.append({"frame_id": fid, "camera": cam["name"], "width": w, "height": h,
                     "segment_ids": encode_png(out["segment_ids"]), "n_segments": int(len(out["seg_id"])),
                     "seg_id": out["seg_id"].tolist(), "seg_n_points": out["seg_n_points"].tolist(),
                     "seg_centroid": out["seg_centroid"].reshape(-1).tolist(),
                     "seg_extent": out["seg_extent"].reshape(-1).tolist(), "seg_range": out["seg_range"].tolist(),
                     "seg_n_pixels": out["seg_n_pixels"].tolist(), "ground_px": encode_png(out["ground_px"])})
    stats = {"frame_id": fid, "n_points": len(pts), "n_used": int(sw.use.sum()), "n_ground": int(sw.ground.sum()),
             "n_segmented": int((sw.segment_id > 0).sum()), "n_segments": int(sw.segment_id.max(initial=0))}
    if not rows:
        reasons = "; ".join(r["reason"] for r in rejects) or "frame has no cameras"
        return [], None, stats, [{"id": fid, "reason": reasons}]
    points = {"frame_id": fid, "is_ground": sw.ground.astype(np.uint8), "segment_id": sw.segment_id}
    return rows, points, stats, rejects


def _large(values: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    lengths = np.array([len(v) for v in values], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = np.concatenate(values) if values else np.zeros(0)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(data, type=typ))


def process_table(table: pa.Table, cfg_dict: dict, seed: int = 0) -> tuple[dict[str, pa.Table], list[dict]]:
    """One ingest part -> {"segments", "points", "stats"} tables and rejects. A frame that raises is rejected."""
    keep_freed_memory()  # the sweep kernels' scratch is reused instead of page-faulted in afresh (raydseg.alloc)
    cfg = config_from_dict({"proposals": cfg_dict}).proposals
    seg_rows, pt_rows, stat_rows, rejects = [], [], [], []
    for frame in table_to_frames(table):
        try:
            rows, points, stats, rej = frame_outputs(frame, cfg, seed)
        except Exception as e:  # noqa: BLE001 - one broken sweep is a reject, not the end of the stage
            rejects.append({"id": frame["frame_id"], "reason": f"proposals failed: {type(e).__name__}: {e}"})
            continue
        seg_rows += rows
        rejects += rej
        stat_rows.append(stats)
        if points is not None:
            pt_rows.append(points)
    points_table = pa.Table.from_arrays(
        [pa.array([p["frame_id"] for p in pt_rows], pa.string()),
         _large([p["is_ground"] for p in pt_rows], pa.uint8()),
         _large([p["segment_id"] for p in pt_rows], pa.uint16())], schema=POINTS_SCHEMA)
    return ({"segments": pa.Table.from_pylist(seg_rows, schema=SEGMENTS_SCHEMA), "points": points_table,
             "stats": pa.Table.from_pylist(stat_rows, schema=STATS_SCHEMA)}, rejects)


def summarize(out_dir: str) -> dict[str, float]:
    """Stage metrics from the written parts: segments per frame, points per segment, image coverage, ground share."""
    from raydseg.parts import part_names

    stats = [storage.read_table(storage.join(out_dir, "stats", n)) for n in part_names(storage.join(out_dir, "stats"))]
    segs = [storage.read_table(storage.join(out_dir, "segments", n),
                               columns=["width", "height", "seg_n_pixels"])
            for n in part_names(storage.join(out_dir, "segments"))]
    m: dict[str, float] = {}
    if stats:
        st = pa.concat_tables(stats)
        n_seg = np.asarray(st["n_segments"], float)
        seg_pts = np.asarray(st["n_segmented"], float)
        used = np.maximum(np.asarray(st["n_used"], float), 1)
        m["segments_per_frame"] = float(n_seg.mean())
        m["points_per_segment"] = float(seg_pts.sum() / max(n_seg.sum(), 1))
        m["ground_fraction"] = float((np.asarray(st["n_ground"], float) / used).mean())
        m["segmented_fraction"] = float((seg_pts / used).mean())
    if segs:
        sg = pa.concat_tables(segs)
        px = np.array([sum(v) for v in sg["seg_n_pixels"].to_pylist()], float)
        area = np.asarray(sg["width"], float) * np.asarray(sg["height"], float)
        if len(px):
            m["image_coverage"] = float((px / area).mean())
            m["segments_per_image"] = float(np.mean([len(v) for v in sg["seg_n_pixels"].to_pylist()]))
    return m


def run(ctx: StageContext) -> StageResult:
    from raydseg.parts import map_parts

    fn = functools.partial(process_table, cfg_dict=ctx.cfg.to_dict()["proposals"], seed=ctx.cfg.run.seed)
    res = map_parts(storage.join(ctx.stage_dir("ingest"), "frames"), ctx.out_dir, fn,
                   **stage_requests.proposals(ctx.cfg).ray_options())
    counts = {"frames": res.counts.get("rows_out_points", 0), "camera_rows": res.counts.get("rows_out_segments", 0),
              "parts": res.counts.get("parts", 0), "parts_resumed": res.counts.get("parts_resumed", 0)}
    if counts["camera_rows"] == 0:
        raise RuntimeError(f"proposals produced no camera rows ({len(res.rejects)} rejects, first: {res.rejects[:1]})")
    return StageResult(counts=counts, metrics=summarize(ctx.out_dir), rejects=res.rejects)
