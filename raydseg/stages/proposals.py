"""Stage `proposals`: LiDAR ground removal, 3D segmentation and projection into every camera, part by part on Ray.

Reads `ingest/frames/part-*.parquet`, writes (same part names):
  `proposals/segments/`: one row per frame x camera (SEGMENTS_SCHEMA): uint16 segment-id PNG, per-segment stats,
                         ground-hit PNG;
  `proposals/points/`:   one row per frame (POINTS_SCHEMA): per-point ground flag and segment id, aligned with the
                         frame's points (points dropped by the density ablation: 0 / 0);
  `proposals/stats/`:    one row per frame (STATS_SCHEMA), for the stage metrics.
A camera with no LiDAR point in front of it inside the image is rejected (`<frame_id>/<camera>`) and the others go
on; a frame whose every camera is rejected is rejected as a whole (`<frame_id>`) and gets no output rows. The
per-frame work and the stage metrics are raydseg.geometry.proposals' `frame_outputs` and `proposal_metrics`.
"""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from raydseg import stage_requests, storage
from raydseg.alloc import keep_freed_memory
from raydseg.config import config_from_dict
from raydseg.data.schema import table_to_frames
from raydseg.geometry.proposals import frame_outputs, proposal_metrics
from raydseg.parts import map_parts, part_names
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


def _parts(out_dir: str, key: str, columns: list[str] | None = None) -> list[pa.Table]:
    return [storage.read_table(storage.join(out_dir, key, n), columns=columns)
            for n in part_names(storage.join(out_dir, key))]


def run(ctx: StageContext) -> StageResult:
    fn = functools.partial(process_table, cfg_dict=ctx.cfg.to_dict()["proposals"], seed=ctx.cfg.run.seed)
    res = map_parts(storage.join(ctx.stage_dir("ingest"), "frames"), ctx.out_dir, fn,
                   **stage_requests.proposals(ctx.cfg).ray_options())
    counts = {"frames": res.counts.get("rows_out_points", 0), "camera_rows": res.counts.get("rows_out_segments", 0),
              "parts": res.counts.get("parts", 0), "parts_resumed": res.counts.get("parts_resumed", 0)}
    if counts["camera_rows"] == 0:
        raise RuntimeError(f"proposals produced no camera rows ({len(res.rejects)} rejects, first: {res.rejects[:1]})")
    metrics = proposal_metrics(_parts(ctx.out_dir, "stats"),
                               _parts(ctx.out_dir, "segments", columns=["width", "height", "seg_n_pixels"]))
    return StageResult(counts=counts, metrics=metrics, rejects=res.rejects)
