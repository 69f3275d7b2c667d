"""What projecting through the lens and the rolling shutter costs: the Waymo 5-camera frame's points into its five
cameras, pinhole (the baseline) against the same cameras with Waymo-like distortion, and with distortion and a rolling
shutter, on one core.

    python jobs/benchmarks/lens_projection.py --out lens_projection.json [--repeat 15]

The frame is `fixtures.write_waymo`'s TOP LiDAR (64 x 2650, about 119k points) with the five cameras at their real
sizes, read by the Waymo reader. `project_ms` is `project_points` into the five cameras, `camera_segments_ms` the
proposals' projection + z-buffer + densification (`camera_segments`, default config) into the five; ms per frame,
the least of `--repeat` runs. `<key>_distorted_ratio` is distorted / pinhole, `<key>_rolling_ratio` distorted with a
rolling shutter / pinhole: the car drives at `SPEED_M_S` and turns at `YAW_RATE_RAD_S`, each camera read out top to
bottom over `READOUT_S`, its middle line at the camera's time (`rolling_shutter_of`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy's import
    os.environ[_var] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from raydseg.config import load_config  # noqa: E402
from raydseg.data.sources import fixtures, waymo  # noqa: E402
from raydseg.geometry.project import project_points  # noqa: E402
from raydseg.geometry.proposals import camera_segments, sweep_segments  # noqa: E402
from raydseg.geometry.rolling_shutter import rolling_shutter_record  # noqa: E402
from raydseg.procstats import write_figures  # noqa: E402

WAYMO_FOCAL_PX = 2060.0  # about the real cameras' f_u, f_v at 1920 px wide
SPEED_M_S, YAW_RATE_RAD_S, READOUT_S = 12.0, 0.2, 0.03  # the benchmark's ego motion and readout


def rolling_shutter_of(camera: dict) -> np.ndarray:
    """(9,) rolling-shutter record of a Frame camera for the benchmark's motion: the vehicle's velocity and yaw rate
    (x forward, z up in the fixture's TOP frame, which is nearly the vehicle's) rotated into the camera, and a
    top-to-bottom readout over READOUT_S centred on the camera's time (dt_dy = READOUT_S / the image's normalised
    height)."""
    R = np.asarray(camera["T_cam_lidar"])[:3, :3]
    return rolling_shutter_record(R @ [SPEED_M_S, 0.0, 0.0], R @ [0.0, 0.0, YAW_RATE_RAD_S], 0.0, 0.0,
                                  READOUT_S * camera["K"][1, 1] / camera["height"])

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
    for lens in ("pinhole", "distorted", "rolling"):
        models = [{"distortion": None if lens == "pinhole" else c["distortion"],
                   "rolling_shutter": rolling_shutter_of(c) if lens == "rolling" else None} for c in cams]
        out[f"project_ms_{lens}"] = least_ms(lambda: [project_points(
            pts, c["K"], c["T_cam_lidar"], c["width"], c["height"], **m) for c, m in zip(cams, models)], args.repeat)
        out[f"camera_segments_ms_{lens}"] = least_ms(lambda: [camera_segments(
            pts[:, :3], sw, c["K"], c["T_cam_lidar"], c["width"], c["height"], pcfg, **m)
            for c, m in zip(cams, models)], args.repeat)
        out[f"in_image_{lens}"] = float(sum(int(project_points(pts, c["K"], c["T_cam_lidar"], c["width"], c["height"],
                                                               **m)[3].sum()) for c, m in zip(cams, models)))
    for key in ("project_ms", "camera_segments_ms"):
        for lens in ("distorted", "rolling"):
            out[f"{key}_{lens}_ratio"] = out[f"{key}_{lens}"] / out[f"{key}_pinhole"]
    write_figures(out, args.out)
    return 0

if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
