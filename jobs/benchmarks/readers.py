"""Frames/s per core of each real-data reader on its fixture (written at realistic sensor sizes).

    python jobs/benchmarks/readers.py --out readers.json [--frames 8] [--scaling]

Each reader runs `list_shards` + `read_shard` in this one process (one core). Baseline: `kitti_object` (the
simplest reader: one .bin + one PNG + one text file per frame); every other reader is reported as a ratio to it.
`--scaling` also times the ingest stage on the KITTI fixture with Ray limited to 1 and then 2 CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from raydseg.config import load_config  # noqa: E402
from raydseg.data.sources import fixtures, kitti, nuscenes, waymo  # noqa: E402

BASELINE = "kitti_object"


def time_reader(mod, cfg, repeats: int = 2) -> tuple[float, float, int]:
    """(wall s, cpu s, frames) of the fastest of `repeats` full reads."""
    best = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for shard in mod.list_shards(cfg):
            rows, _ = mod.read_shard(shard, cfg)
            n += len(rows)
        res = (time.perf_counter() - t0, time.process_time() - c0, n)
        best = res if best is None or res[0] < best[0] else best
    return best


def ingest_scaling(root: str, work: str) -> dict[str, float]:
    import ray

    from raydseg.pipeline import run_pipeline

    out = {}
    for cpus in (1, 2):
        ray.shutdown()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        cfg = load_config(overrides=["data.source=kitti", f"data.root={root}", "data.shard_frames=2",
                                     f"run.output_root={work}/out{cpus}", "run.name=bench",
                                     f"tracking.uri=sqlite:///{work}/mlflow{cpus}.db"])
        t0 = time.perf_counter()
        res = run_pipeline(cfg, stages=["ingest"], log=lambda m: None)
        out[f"ingest_{cpus}cpu_s"] = time.perf_counter() - t0
        out[f"ingest_{cpus}cpu_frames"] = res.reports[-1].counts["frames"]
    ray.shutdown()
    out["ingest_speedup_2_vs_1"] = out["ingest_1cpu_s"] / out["ingest_2cpu_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--scaling", action="store_true")
    args = p.parse_args(argv)
    n = args.frames
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {
            "kitti_object": (kitti, lambda r: fixtures.write_kitti_object(r, n, w=1242, h=375, n_points=120_000),
                             []),
            "kitti_raw": (kitti, lambda r: fixtures.write_kitti_raw(r, n, w=1242, h=375, n_points=120_000), []),
            "nuscenes": (nuscenes, lambda r: fixtures.write_nuscenes(r, n, w=1600, h=900, n_points=34_688), []),
            "waymo_top": (waymo, lambda r: fixtures.write_waymo(r, n_frames=n, H=64, W=2650, w=1920, h=1280),
                          ["data.split=training"]),
        }
        rows = []
        for name, (mod, write, extra) in setups.items():
            root = os.path.join(tmp, name)
            write(root)
            cfg = load_config(overrides=[f"data.source={mod.__name__.rsplit('.', 1)[-1]}", f"data.root={root}",
                                         "data.sync_tolerance_us=0", *extra])
            wall, cpu, frames = time_reader(mod, cfg)
            results[f"{name}_frames_per_s_per_core"] = frames / wall
            results[f"{name}_cpu_s_per_frame"] = cpu / max(frames, 1)
            results[f"{name}_frames"] = frames
            rows.append((name, frames, frames / wall, cpu / max(frames, 1)))
        base = results[f"{BASELINE}_frames_per_s_per_core"]
        ratio = "ratio vs " + BASELINE
        print(f"{'reader':14s} {'frames':>6s} {'frames/s/core':>14s} {'cpu s/frame':>12s} {ratio:>20s}")
        for name, frames, fps, cpf in rows:
            results[f"{name}_ratio_vs_{BASELINE}"] = fps / base
            print(f"{name:14s} {frames:6d} {fps:14.2f} {cpf:12.4f} {fps / base:20.2f}")
        if args.scaling:
            fixtures.write_kitti_object(os.path.join(tmp, "scale"), 8, w=1242, h=375, n_points=120_000)
            sc = ingest_scaling(os.path.join(tmp, "scale"), tmp)
            results.update(sc)
            print(f"ingest 8 KITTI frames: 1 CPU {sc['ingest_1cpu_s']:.1f} s, 2 CPUs {sc['ingest_2cpu_s']:.1f} s, "
                  f"speedup {sc['ingest_speedup_2_vs_1']:.2f}x")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
