"""Per-sweep proposals: density subsampling -> range image -> ground -> segments -> per-camera segment images.

Pure functions over Frame rows (raydseg.data.schema row form) and a ProposalsConfig; the Ray stage
(raydseg.stages.proposals) only maps `sweep_segments` / `camera_segments` over part files.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from raydseg.config import ProposalsConfig
from raydseg.geometry.ground import ground_points
from raydseg.geometry.project import project_segments
from raydseg.geometry.range_image import RangeImage, beam_rows, build_range_image
from raydseg.geometry.segment import segment_points


@dataclass
class SweepSegments:
    """Result of one sweep. use/ground (N,) bool, segment_id (N,) uint16 (0 = none), ri the range image,
    stats the segments' segment.segment_stats."""

    use: np.ndarray
    ground: np.ndarray
    segment_id: np.ndarray
    ri: RangeImage
    stats: dict[str, np.ndarray]


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
    return SweepSegments(use=use, ground=ground, segment_id=seg, ri=ri, stats=stats)


def camera_segments(xyz: np.ndarray, sw: SweepSegments, K: np.ndarray, T_cam_lidar: np.ndarray, width: int,
                    height: int, cfg: ProposalsConfig) -> dict:
    """Segment-id image, ground-hit mask and per-segment stats of one camera (see project.project_segments).

    Returns dict: segment_ids (H, W) uint16, ground_px (H, W) uint8, n_in_image, n_visible, and per visible
    segment (ids with >= 1 pixel): seg_id (n,) uint16, seg_n_points (n,) int32 (3D points of the whole segment),
    seg_centroid (n, 3) float32 m, seg_extent (n, 3) float32 m, seg_range (n,) float32 m, seg_n_pixels (n,) int32.
    """
    out = project_segments(xyz, sw.segment_id, sw.ground, K, T_cam_lidar, width, height, near=cfg.near_m,
                           use=sw.use, zbuf_radius_px=cfg.zbuf_radius_px, zbuf_rel_tol=cfg.zbuf_rel_tol,
                           zbuf_abs_tol=cfg.zbuf_abs_tol_m, radius_px=cfg.densify_radius_px,
                           fill_gap_px=cfg.fill_gap_px, ground_fill_px=cfg.ground_fill_px)
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
