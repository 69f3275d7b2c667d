"""What projecting through the lens costs: the Waymo 5-camera frame's points into its five cameras, pinhole (the
baseline) against the same cameras with Waymo-like distortion, on one core.

    python jobs/benchmarks/lens_projection.py --out lens_projection.json [--repeat 15]

The frame is `fixtures.write_waymo`'s TOP LiDAR (64 x 2650, about 119k points) with the five cameras at their real
sizes, read by the Waymo reader. `project_ms` is `project_points` into the five cameras, `camera_segments_ms` the
proposals' projection + z-buffer + densification (`camera_segments`, default config) into the five; ms per frame,
the least of `--repeat` runs. `<key>_distorted_ratio` is distorted / pinhole.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy's import
    os.environ[_var] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from raydseg.config import load_config  # noqa: E402
from raydseg.data.sources import fixtures, waymo  # noqa: E402
from raydseg.geometry.project import project_points  # noqa: E402
from raydseg.geometry.proposals import camera_segments, sweep_segments  # noqa: E402
from raydseg.procstats import write_figures  # noqa: E402

WAYMO_FOCAL_PX = 2060.0  # about the real cameras' f_u, f_v at 1920 px wide

def least_ms(f, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        f()
        best = min(best, time.process_time() - t)
    return 1e3 * best

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fixtures.write_waymo(tmp, n_frames=1, H=64, W=2650, cameras=fixtures.WAYMO_CAMERA_SIZES,
                             focal=(WAYMO_FOCAL_PX, WAYMO_FOCAL_PX), distortion=fixtures.WAYMO_LIKE_DISTORTION)
        cfg = load_config(overrides=["data.source=waymo", f"data.root={tmp}", "data.split=training"])
        (frame,), _ = waymo.read_shard(waymo.list_shards(cfg)[0], cfg)
    pts, cams = frame["points"], frame["cameras"]
    pcfg = load_config().proposals
    sw = sweep_segments(pts, frame["ring"], pcfg)
    out: dict[str, float] = {"points": len(pts)}
    for lens in ("pinhole", "distorted"):
        dist = [c["distortion"] if lens == "distorted" else None for c in cams]
        out[f"project_ms_{lens}"] = least_ms(lambda: [project_points(
            pts, c["K"], c["T_cam_lidar"], c["width"], c["height"], distortion=d) for c, d in zip(cams, dist)],
            args.repeat)
        out[f"camera_segments_ms_{lens}"] = least_ms(lambda: [camera_segments(
            pts[:, :3], sw, c["K"], c["T_cam_lidar"], c["width"], c["height"], pcfg, d) for c, d in zip(cams, dist)],
            args.repeat)
        out[f"in_image_{lens}"] = float(sum(int(project_points(pts, c["K"], c["T_cam_lidar"], c["width"], c["height"],
                                                               distortion=d)[3].sum()) for c, d in zip(cams, dist)))
    for key in ("project_ms", "camera_segments_ms"):
        out[f"{key}_distorted_ratio"] = out[f"{key}_distorted"] / out[f"{key}_pinhole"]
    write_figures(out, args.out)
    return 0

if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
