"""Benchmark of the proposals geometry: ms per sweep (ground + range-image segmentation + projection into one
640x320 camera, one core; CPU time, wall time beside it) against open3d DBSCAN on the same non-ground points,
with quality against the synthetic ground truth (HDL-64E-like sweeps), and the Ray stage's throughput with 1 and
2 workers. The headline runs with the allocator setting the stage's workers use (raydseg.alloc); the same sweeps
are first timed with glibc's default malloc (`ms_per_sweep_default_malloc`).

    python jobs/benchmarks/proposals.py --out proposals.json [--frames 3] [--beams 64] [--columns 2048]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core for open3d's DBSCAN too (before open3d is imported)

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from raydseg.alloc import keep_freed_memory  # noqa: E402
from raydseg.config import load_config  # noqa: E402
from raydseg.data.schema import decode_image  # noqa: E402
from raydseg.geometry import quality  # noqa: E402
from raydseg.geometry.ground import ground_range_image  # noqa: E402
from raydseg.geometry.proposals import camera_segments, sweep_segments  # noqa: E402
from raydseg.geometry.segment import filter_segments, segment_dbscan, segment_points  # noqa: E402


def synthetic_frames(n: int, beams: int, columns: int, seed: int) -> list[dict]:
    from raydseg.data.sources import synthetic

    cfg = load_config(overrides=[f"synthetic.beams={beams}", f"synthetic.azimuth_steps={columns}",
                                 f"synthetic.frames_per_sequence={n}", "synthetic.fov_up_deg=2.0",
                                 "synthetic.fov_down_deg=-24.8"]).synthetic  # HDL-64E-like vertical FOV
    return synthetic.generate_sequence(synthetic.list_shards(cfg, seed)[0], cfg)


def time_ms(fn, repeat: int) -> tuple[float, float, object]:
    """(median CPU ms of this process, median wall ms, result) over `repeat` calls after one warm-up call.

    CPU time is the headline: the benchmark machine may be shared, and everything timed here runs on one core
    (numba without parallel loops, open3d with OMP_NUM_THREADS=1), so CPU time ~ single-core wall time unloaded."""
    out = fn()  # warm-up (numba cache load / compile)
    cpu, wall = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return 1000 * float(np.median(cpu)), 1000 * float(np.median(wall)), out


def ray_scaling(frames: list[dict], overrides: list[str], n_parts: int = 8) -> dict[str, float]:
    """Sweeps/s of the Ray stage (map_parts over `n_parts` part files) with 1 and 2 CPUs."""
    import ray

    from raydseg import storage
    from raydseg.data.schema import frames_to_table
    from raydseg.pipeline import StageContext
    from raydseg.stages import proposals

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        per = max(1, -(-len(frames) // n_parts))
        for i in range(0, len(frames), per):
            storage.write_table(frames_to_table(frames[i:i + per]), f"{tmp}/ingest/frames/part-{i // per:05d}.parquet")
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, configure_logging=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
            try:
                # warm the workers (imports, numba cache) on a throwaway copy, then time a fresh run
                for name in ("warm", "timed"):
                    ctx = StageContext(cfg=load_config(overrides=overrides), run_root=tmp,
                                       out_dir=f"{tmp}/proposals-{workers}-{name}", tracking_uri="")
                    t = time.perf_counter()
                    proposals.run(ctx)
                    dt = time.perf_counter() - t
            finally:
                ray.shutdown()
            out[f"ray_{workers}w_sweeps_per_s"] = len(frames) / dt
    out["ray_scaling_2w_over_1w"] = out["ray_2w_sweeps_per_s"] / out["ray_1w_sweeps_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--frames", type=int, default=3, help="synthetic sweeps to measure")
    ap.add_argument("--beams", type=int, default=64)
    ap.add_argument("--columns", type=int, default=2048, help="azimuth steps per revolution")
    ap.add_argument("--repeat", type=int, default=15, help="timed repetitions per sweep (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray stage scaling measurement")
    ap.add_argument("--ray-sweeps", type=int, default=48,
                    help="sweeps through the Ray stage (the measured sweeps repeated), in 8 part files")
    ap.add_argument("--set", action="append", default=[], metavar="proposals.key=value",
                    help="config overrides, e.g. --set proposals.beta_deg=8")
    args = ap.parse_args(argv)

    cfg = load_config(overrides=args.set).proposals
    t = time.perf_counter()
    frames = synthetic_frames(args.frames, args.beams, args.columns, args.seed)
    print(f"generated {len(frames)} synthetic sweeps ({args.beams} beams x {args.columns}) in "
          f"{time.perf_counter() - t:.1f} s")
    def proposals_ms(f: dict) -> float:
        cam = f["cameras"][0]
        return time_ms(lambda: camera_segments(f["points"][:, :3], sweep_segments(f["points"], f["ring"], cfg),
                                               cam["K"], cam["T_cam_lidar"], cam["width"], cam["height"], cfg),
                       args.repeat)[0]

    default_malloc_ms = float(np.mean([proposals_ms(f) for f in frames]))  # before keep_freed_memory: no undo
    tuned = keep_freed_memory()
    ours = []  # all of ours first, then DBSCAN: open3d's allocations in between would change our heap's state
    for f in frames:
        cam = f["cameras"][0]
        ms_seg, wall_seg, sw = time_ms(lambda: sweep_segments(f["points"], f["ring"], cfg), args.repeat)
        ms_cam, wall_cam, out = time_ms(lambda: camera_segments(f["points"][:, :3], sw, cam["K"], cam["T_cam_lidar"],
                                                                cam["width"], cam["height"], cfg), args.repeat)
        # the step DBSCAN stands in for: clustering the non-ground points, given the ground (BFS labelling, labels
        # to the points, filtering)
        gpx = ground_range_image(sw.ri, angle_deg=cfg.ground_angle_deg, start_max_deg=cfg.ground_start_max_deg,
                                 max_slope_deg=cfg.ground_max_slope_deg, sg_window=cfg.ground_sg_window,
                                 max_gap=cfg.ground_max_gap, step_m=cfg.ground_step_m)
        ms_clu = time_ms(lambda: segment_points(sw.ri, f["points"][:, :3], sw.ground, gpx, beta_deg=cfg.beta_deg,
                                                max_gap=cfg.segment_max_gap, min_points=cfg.min_points,
                                                max_points=cfg.max_points), args.repeat)[0]
        ours.append((ms_seg, wall_seg, sw, ms_cam, wall_cam, out, ms_clu))
    rows = []
    for f, (ms_seg, wall_seg, sw, ms_cam, wall_cam, out, ms_clu) in zip(frames, ours):
        pts, cam = f["points"], f["cameras"][0]
        xyz = pts[:, :3]
        nonground = sw.use & ~sw.ground
        ms_db, wall_db, raw = time_ms(lambda: segment_dbscan(xyz, nonground, eps=cfg.dbscan_eps_m,
                                                             min_points=cfg.dbscan_min_points),
                                      max(1, args.repeat // 2))
        db = filter_segments(raw, xyz, min_points=cfg.min_points, max_points=cfg.max_points)
        gp, gr = quality.ground_precision_recall(sw.ground, f["gt_label"], sw.use)
        agree, _ = quality.image_agreement(out["segment_ids"], decode_image(cam["gt_instance"]))
        rows.append({
            "n_points": len(pts), "n_nonground": int(nonground.sum()),
            "ms_segment": ms_seg, "ms_project": ms_cam, "ms": ms_seg + ms_cam, "ms_cluster": ms_clu, "ms_dbscan": ms_db,
            "wall_ms": wall_seg + wall_cam, "wall_ms_dbscan": wall_db,
            "purity": quality.segment_purity(sw.segment_id, f["gt_label"], f["gt_instance"]),
            "dbscan_purity": quality.segment_purity(db, f["gt_label"], f["gt_instance"]),
            "recall": quality.instance_recall(sw.segment_id, f["gt_instance"])[0],
            "dbscan_recall": quality.instance_recall(db, f["gt_instance"])[0],
            "gp": gp, "gr": gr, "agree": agree, "n_segments": int(sw.segment_id.max()),
            "n_dbscan_segments": int(db.max())})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    res = {
        "n_sweeps": len(rows), "points_per_sweep": mean["n_points"], "nonground_points_per_sweep": mean["n_nonground"],
        "ms_per_sweep": mean["ms"], "ms_ground_segment_per_sweep": mean["ms_segment"],
        "ms_projection_per_sweep": mean["ms_project"], "ms_per_sweep_default_malloc": default_malloc_ms,
        "malloc_tuned": float(tuned), "dbscan_ms_per_sweep": mean["ms_dbscan"],
        "wall_ms_per_sweep": mean["wall_ms"], "dbscan_wall_ms_per_sweep": mean["wall_ms_dbscan"],
        "load_average_1min": os.getloadavg()[0],
        "dbscan_over_ours_time_ratio": mean["ms_dbscan"] / mean["ms"],
        "dbscan_over_ours_segmentation_time_ratio": mean["ms_dbscan"] / mean["ms_segment"],
        "ms_clustering_per_sweep": mean["ms_cluster"],
        "dbscan_over_ours_clustering_time_ratio": mean["ms_dbscan"] / mean["ms_cluster"],
        "purity": mean["purity"], "dbscan_purity": mean["dbscan_purity"], "instance_recall": mean["recall"],
        "dbscan_instance_recall": mean["dbscan_recall"], "ground_precision": mean["gp"], "ground_recall": mean["gr"],
        "segment_image_agreement": mean["agree"], "segments_per_sweep": mean["n_segments"],
        "dbscan_segments_per_sweep": mean["n_dbscan_segments"], "omp_num_threads": int(os.environ["OMP_NUM_THREADS"]),
    }
    if not args.no_ray:
        res.update(ray_scaling((frames * args.ray_sweeps)[:args.ray_sweeps], args.set))
        res["ray_sweeps"] = args.ray_sweeps
    print(f"{'figure':<44}{'value':>12}")
    for k, v in res.items():
        print(f"{k:<44}{v:>12.4g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
