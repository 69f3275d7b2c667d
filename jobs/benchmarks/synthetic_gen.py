"""Synthetic generation speed in frames/s per core: the default resolution (baseline) vs 1920x1080 / 64 beams.

`python jobs/benchmarks/synthetic_gen.py --out FILE.json [--width W --height H --beams B --frames N]`
--width/--height/--beams set the baseline (defaults: the embedded default config); the large case is always
1920x1080 with 64 beams and 2048 azimuth steps. Each case generates one sequence of --frames frames (scene build,
LiDAR sweep, camera render, PNG encoding: exactly what ingest does) on one thread; frames/s per core is
frames / process CPU seconds (robust on a shared machine), wall-clock figures are reported too.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from raydseg.config import SyntheticConfig  # noqa: E402
from raydseg.data.sources import synthetic  # noqa: E402


def measure(cfg: SyntheticConfig, frames: int, seed: int) -> dict[str, float]:
    """Generate one sequence of `frames` frames; CPU/wall time per frame and output sizes."""
    shard = dict(synthetic.list_shards(cfg, seed)[0], frames=frames)
    synthetic.generate_sequence(dict(shard, frames=1), cfg)  # warm-up (imports, open3d init)
    c0, w0 = time.process_time(), time.perf_counter()
    rows = synthetic.generate_sequence(shard, cfg)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"frames_per_s_per_core": frames / cpu, "frames_per_s_wall": frames / wall,
            "ms_per_frame_cpu": 1e3 * cpu / frames, "points_per_frame": sum(len(r["points"]) for r in rows) / frames,
            "png_kb_per_frame": sum(len(r["cameras"][0]["image"]) for r in rows) / frames / 1024}


def main() -> None:
    base = SyntheticConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the flat results")
    ap.add_argument("--width", type=int, default=base.width, help="baseline image width")
    ap.add_argument("--height", type=int, default=base.height, help="baseline image height")
    ap.add_argument("--beams", type=int, default=base.beams, help="baseline LiDAR beams")
    ap.add_argument("--frames", type=int, default=6, help="frames per measured sequence")
    ap.add_argument("--condition", default="day", choices=synthetic.CONDITIONS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    common = dict(raycast_threads=1, conditions=[args.condition])
    cases = {
        "default": base.model_copy(update=dict(width=args.width, height=args.height, beams=args.beams, **common)),
        "1080p_64beams": base.model_copy(update=dict(width=1920, height=1080, beams=64, azimuth_steps=2048, **common)),
    }
    out: dict[str, float | int | str] = {"baseline": "default", "frames": args.frames, "condition": args.condition}
    rows = []
    for name, cfg in cases.items():
        m = measure(cfg, args.frames, args.seed)
        for k, v in m.items():
            out[f"{k}_{name}"] = round(v, 4)
        out[f"width_{name}"], out[f"height_{name}"] = cfg.width, cfg.height
        out[f"beams_{name}"], out[f"azimuth_steps_{name}"] = cfg.beams, cfg.azimuth_steps
        rows.append((name, cfg, m))
    out["ratio_frames_per_s_1080p_64beams_vs_default"] = round(
        out["frames_per_s_per_core_1080p_64beams"] / out["frames_per_s_per_core_default"], 4)

    print(f"{'case':<15}{'size':>11}{'beams x az':>12}{'frames/s/core':>15}{'ms/frame':>10}{'wall f/s':>10}"
          f"{'points':>9}{'ratio':>8}")
    for name, cfg, m in rows:
        ratio = m["frames_per_s_per_core"] / rows[0][2]["frames_per_s_per_core"]
        print(f"{name:<15}{f'{cfg.width}x{cfg.height}':>11}{f'{cfg.beams}x{cfg.azimuth_steps}':>12}"
              f"{m['frames_per_s_per_core']:>15.2f}{m['ms_per_frame_cpu']:>10.0f}{m['frames_per_s_wall']:>10.2f}"
              f"{m['points_per_frame']:>9.0f}{ratio:>8.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
