"""Per-sweep proposals: density subsampling -> range image -> ground -> segments -> per-camera segment images.

Pure functions over Frame rows (raydseg.data.schema row form) and a ProposalsConfig; the Ray stage
(raydseg.stages.proposals) only maps `frame_outputs` over part files and summarises them with `proposal_metrics`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raydseg.config import ProposalsConfig
from raydseg.data.schema import encode_png
from raydseg.geometry.ground import ground_points
from raydseg.geometry.project import project_segments
from raydseg.geometry.range_image import RangeImage, beam_rows, build_range_image
from raydseg.geometry.sky import top_beam_elevation
from raydseg.geometry.segment import segment_points


@dataclass
class SweepSegments:
    """Result of one sweep. use/ground (N,) bool, segment_id (N,) uint16 (0 = none), ri the range image,
    stats the segments' segment.segment_stats, top_beam (rad) the highest elevation of any of its returns (the sky's
    upper bound, or what tells its open columns, in every camera, `raydseg.geometry.sky`)."""

    use: np.ndarray
    ground: np.ndarray
    segment_id: np.ndarray
    ri: RangeImage
    stats: dict[str, np.ndarray]
    top_beam: float


def density_mask(xyz: np.ndarray, ring: np.ndarray | None, cfg: ProposalsConfig,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Points kept by the density ablation: every `beam_stride`-th beam, then a random `point_fraction`.

    Args: xyz (N, 3) m; ring (N,) or None. Returns (keep (N,) bool, ring to use for the range image: the source's
    ring, or the elevation-binned beam rows when beams had to be derived for the stride).
    """
    n = len(xyz)
    keep = np.ones(n, bool)
    if cfg.beam_stride > 1:
        rows, _ = beam_rows(xyz, ring, cfg.n_beams)
        keep &= rows % cfg.beam_stride == 0
        ring = rows if ring is None else ring
    if cfg.point_fraction < 1.0:
        keep &= np.random.default_rng(seed).random(n) < cfg.point_fraction
    return keep, ring


def sweep_segments(points: np.ndarray, ring: np.ndarray | None, cfg: ProposalsConfig, seed: int = 0) -> SweepSegments:
    """Ground mask and segment ids of one sweep.

    Args: points (N, >=3) float32 m (x, y, z, ...); ring (N,) beam index or None; seed for subsampling.
    """
    xyz = np.asarray(points)[:, :3]
    keep, ring_used = density_mask(xyz, ring, cfg, seed)
    ri = build_range_image(xyz, ring_used, n_beams=cfg.n_beams, n_cols=cfg.n_cols, valid=keep,
                           min_range=cfg.min_range_m)
    use = ri.row >= 0
    ground, ground_px = ground_points(ri, xyz, use, method=cfg.ground_method, angle_deg=cfg.ground_angle_deg,
                                      start_max_deg=cfg.ground_start_max_deg, max_slope_deg=cfg.ground_max_slope_deg,
                                      sg_window=cfg.ground_sg_window, max_gap=cfg.ground_max_gap,
                                      step_m=cfg.ground_step_m, plane_threshold_m=cfg.ground_plane_threshold_m,
                                      seed=seed, per_point=False)
    ground, seg, stats = segment_points(ri, xyz, ground, ground_px, method=cfg.segment_method,
                                        beta_deg=cfg.beta_deg, max_gap=cfg.segment_max_gap,
                                        dbscan_eps=cfg.dbscan_eps_m, dbscan_min_points=cfg.dbscan_min_points,
                                        min_points=cfg.min_points, max_points=cfg.max_points,
                                        min_extent_m=cfg.min_extent_m, max_extent_m=cfg.max_extent_m)
    ground &= use
    return SweepSegments(use=use, ground=ground, segment_id=seg, ri=ri, stats=stats,
                         top_beam=top_beam_elevation(xyz) if cfg.sky_margin >= 0 else -np.inf)


def camera_segments(xyz: np.ndarray, sw: SweepSegments, K: np.ndarray, T_cam_lidar: np.ndarray, width: int,
                    height: int, cfg: ProposalsConfig, distortion: np.ndarray | None = None,
                    rolling_shutter: np.ndarray | None = None) -> dict:
    """Segment-id image, ground-hit mask and per-segment stats of one camera (see project.project_segments;
    distortion (5,) k1, k2, p1, p2, k3 of the camera's lens, None = pinhole; rolling_shutter (9,) the camera's
    motion and readout, None = global shutter; both as the Frame's camera record carries them).

    Returns dict: segment_ids (H, W) uint16, ground_px (H, W) uint8, n_in_image, n_visible, and per visible
    segment (ids with >= 1 pixel): seg_id (n,) uint16, seg_n_points (n,) int32 (3D points of the whole segment),
    seg_centroid (n, 3) float32 m, seg_extent (n, 3) float32 m, seg_range (n,) float32 m, seg_n_pixels (n,) int32.
    """
    out = project_segments(xyz, sw.segment_id, sw.ground, K, T_cam_lidar, width, height, distortion=distortion,
                           rolling_shutter=rolling_shutter, near=cfg.near_m, use=sw.use,
                           zbuf_radius_px=cfg.zbuf_radius_px, zbuf_rel_tol=cfg.zbuf_rel_tol,
                           zbuf_abs_tol=cfg.zbuf_abs_tol_m,
                           radius_px=cfg.densify_radius_px, fill_gap_px=cfg.fill_gap_px,
                           ground_fill_px=cfg.ground_fill_px, sky_margin_deg=cfg.sky_margin, top_beam=sw.top_beam,
                           sky_above_top_beam=cfg.sky_above_top_beam)
    n_px = out.pop("n_pixels")
    st = sw.stats
    vis = n_px[st["id"]] > 0
    out.update(seg_id=st["id"][vis].astype(np.uint16), seg_n_points=st["n_points"][vis].astype(np.int32),
               seg_centroid=st["centroid"][vis].astype(np.float32), seg_extent=st["extent"][vis].astype(np.float32),
               seg_range=st["range"][vis].astype(np.float32), seg_n_pixels=n_px[st["id"][vis]].astype(np.int32))
    return out


def frame_seed(frame_id: str, seed: int) -> int:
    """Deterministic per-frame seed for the subsampling (independent of processing order)."""
    return (zlib.crc32(frame_id.encode()) + 1_000_003 * seed) % (2**32)


def frame_outputs(frame: dict, cfg: ProposalsConfig, seed: int = 0) -> tuple[list[dict], dict | None, dict,
                                                                              list[dict]]:
    """Proposals of one Frame row: (segment rows, points row or None, stats row, rejects), in the rows of the stage's
    SEGMENTS_SCHEMA / POINTS_SCHEMA / STATS_SCHEMA. A camera with no LiDAR point in front of it inside the image is a
    reject; a frame whose every camera is one is rejected as a whole (no segment rows, no points row)."""
    fid = frame["frame_id"]
    pts = np.asarray(frame["points"], np.float32).reshape(-1, 4)
    sw = sweep_segments(pts, frame.get("ring"), cfg, seed=frame_seed(fid, seed))
    rows, rejects = [], []
    for cam in frame["cameras"]:
        w, h = int(cam["width"]), int(cam["height"])
        out = camera_segments(pts[:, :3], sw, cam["K"], cam["T_cam_lidar"], w, h, cfg, cam.get("distortion"),
                              cam.get("rolling_shutter"))
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


def proposal_metrics(stats: list[pa.Table], segments: list[pa.Table]) -> dict[str, float]:
    """Segments per frame, points per segment, ground and segmented share of the used points (per frame, averaged),
    image coverage and segments per image, from the stage's parts: `stats` STATS_SCHEMA tables, `segments` tables
    with the width, height and seg_n_pixels columns of SEGMENTS_SCHEMA. A metric without parts is left out."""
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
    if segments:
        sg = pa.concat_tables(segments)
        px = np.array([sum(v) for v in sg["seg_n_pixels"].to_pylist()], float)
        area = np.asarray(sg["width"], float) * np.asarray(sg["height"], float)
        if len(px):
            m["image_coverage"] = float((px / area).mean())
            m["segments_per_image"] = float(np.mean([len(v) for v in sg["seg_n_pixels"].to_pylist()]))
    return m
