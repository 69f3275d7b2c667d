"""Frames/s per core of each real-data reader on its fixture (written at realistic sensor sizes).

    python jobs/benchmarks/readers.py --out readers.json [--frames 8] [--scaling] [--profile 12]

Each reader runs `list_shards` + `read_shard` in this one process (one core: numpy's BLAS / OpenMP pools and
pyarrow's CPU and IO pools are pinned to one thread before anything runs; torch is not imported), then the ingest
stage's Frame validation (`schema.split_valid`). `<reader>_frames_per_s_per_core` is the read alone,
`<reader>_validated_frames_per_s_per_core` read + validation (the ingest stage's work per frame less the write);
`_cpu_s_per_frame` and `_validated_cpu_s_per_frame` the same as CPU seconds per frame.
Baseline: `kitti_object` (the simplest reader: one .bin + one PNG + one text file per frame); every other reader is
reported as a ratio to it, read to read and validated to validated.

Waymo fixtures: `waymo_top` is the TOP LiDAR (64 x 2650) + FRONT (1920x1280, uniform-noise JPEG); `waymo_5cam` the
TOP LiDAR with a second return and a per-pixel pose + the five cameras at their real sizes (three 1920x1280, two
1920x886; JPEGs with a photo's entropy at quality 90), without lens distortion; `waymo_5cam_distorted` the same with
Waymo-like distortion, which the reader carries into the Frame (the images keep their bytes). Frames/s are the best
of three reads. `--profile N` prints where a read and validation of each 5-camera fixture spends its time: ms per frame of each phase (`PHASES`, cProfile's cumulative times, the least of three runs)
and the N functions with the most own time.
`--scaling` also times the ingest stage on the KITTI fixture with Ray limited to 1 and then 2 CPUs.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy's import
    os.environ[_var] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import pyarrow as pa  # noqa: E402

from raydseg.config import load_config  # noqa: E402
from raydseg.data.schema import split_valid  # noqa: E402
from raydseg.data.sources import fixtures, kitti, nuscenes, waymo  # noqa: E402

BASELINE = "kitti_object"
WAYMO_FOCAL_PX = 2060.0  # about the real cameras' f_u, f_v at 1920 px wide


def read_and_validate(mod, cfg) -> tuple[float, float, float, float, int]:
    """(read wall s, validation wall s, read cpu s, validation cpu s, valid frames) of one full read of a source
    (`list_shards` counts as read)."""
    t, c = time.perf_counter(), time.process_time()
    shards = mod.list_shards(cfg)
    t_read, c_read, t_val, c_val, n = time.perf_counter() - t, time.process_time() - c, 0.0, 0.0, 0
    for shard in shards:
        t, c = time.perf_counter(), time.process_time()
        rows, _ = mod.read_shard(shard, cfg)
        t_read, c_read = t_read + time.perf_counter() - t, c_read + time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        good, _ = split_valid(rows)
        t_val, c_val, n = t_val + time.perf_counter() - t, c_val + time.process_time() - c, n + len(good)
    return t_read, t_val, c_read, c_val, n


def time_reader(mod, cfg, repeats: int = 2) -> tuple[float, float, float, float, int]:
    """The fastest of `repeats` `read_and_validate` results by read + validation wall s."""
    return min((read_and_validate(mod, cfg) for _ in range(repeats)), key=lambda r: r[0] + r[1])


PHASES = {  # key -> (label, the functions whose cumulative time the phase is: (file suffix, name))
    "parquet": ("parquet reading", (("raydseg/storage.py", "read_table"), ("raydseg/storage.py", "parquet_columns"))),
    "segment_filter": ("segment filter (pyarrow compute)", (("pyarrow/compute.py", "wrapper"),)),
    "points": ("range image -> points", (("raydseg/data/sources/waymo.py", "range_image_to_points"),)),
    "image_headers": ("image headers (schema.image_size)", (("raydseg/data/schema.py", "image_size"),)),
    "validation": ("validation (schema.validate_frame)", (("raydseg/data/schema.py", "validate_frame"),)),
}


def phase_seconds(stats: dict, phases: dict) -> dict[str, float]:
    """Cumulative s of each phase of `phases` (key -> (label, functions)) from a pstats `stats` dict."""
    out = {}
    for key, (_, funcs) in phases.items():
        total = 0.0
        for suffix, name in funcs:
            total += sum(v[3] for (path, _, func), v in stats.items() if path.endswith(suffix) and func == name)
        out[key] = total
    return out


def profile_read(mod, cfg, runs: int, top: int) -> dict[str, float]:
    """ms per frame of each phase of a read + validation, "other" and "total" (cProfile; the least of `runs` runs
    per phase), printed with the `top` functions by own time of the last run."""
    best: dict[str, float] = {}
    for _ in range(runs):
        prof = cProfile.Profile()
        prof.enable()
        t = time.perf_counter()
        frames = max(read_and_validate(mod, cfg)[-1], 1)
        wall = time.perf_counter() - t
        prof.disable()
        stats = pstats.Stats(prof)
        ms = {k: 1e3 * v / frames for k, v in phase_seconds(stats.stats, PHASES).items()}
        ms["total"] = 1e3 * wall / frames
        ms["other"] = ms["total"] - sum(v for k, v in ms.items() if k in PHASES)
        best = {k: min(v, best.get(k, v)) for k, v in ms.items()}
    stats.sort_stats("tottime").print_stats(top)
    for k in (*PHASES, "other", "total"):
        print(f"{PHASES[k][0] if k in PHASES else k:48s} {best[k]:8.1f} ms/frame")
    return best


def write_waymo_5cam(root: str, n: int, distorted: bool) -> dict:
    """The five cameras at their real sizes + TOP with a second return (10 % of pixels) and a per-pixel pose."""
    return fixtures.write_waymo(root, n_frames=n, H=64, W=2650, w=1920, h=1280, cameras=fixtures.WAYMO_CAMERA_SIZES,
                                focal=(WAYMO_FOCAL_PX, WAYMO_FOCAL_PX), photo=True, second_return=0.1,
                                distortion=fixtures.WAYMO_LIKE_DISTORTION if distorted else (0.0,) * 5)


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
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N functions with the most own time in one read of each 5-camera fixture")
    args = p.parse_args(argv)
    n = args.frames
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {
            "kitti_object": (kitti, lambda r: fixtures.write_kitti_object(r, n, w=1242, h=375, n_points=120_000),
                             []),
            "kitti_raw": (kitti, lambda r: fixtures.write_kitti_raw(r, n, w=1242, h=375, n_points=120_000), []),
            "nuscenes": (nuscenes, lambda r: fixtures.write_nuscenes(r, n, w=1600, h=900, n_points=34_688), []),
            "waymo_top": (waymo, lambda r: fixtures.write_waymo(r, n_frames=n, H=64, W=2650, w=1920, h=1280),
                          ["data.split=training"]),
            "waymo_5cam": (waymo, lambda r: write_waymo_5cam(r, n, distorted=False), ["data.split=training"]),
            "waymo_5cam_distorted": (waymo, lambda r: write_waymo_5cam(r, n, distorted=True),
                                     ["data.split=training"]),
        }
        rows = []
        for name, (mod, write, extra) in setups.items():
            root = os.path.join(tmp, name)
            write(root)
            cfg = load_config(overrides=[f"data.source={mod.__name__.rsplit('.', 1)[-1]}", f"data.root={root}",
                                         "data.sync_tolerance_us=0", *extra])
            repeats = 3 if name.startswith("waymo_5cam") else 2
            read, val, cpu_read, cpu_val, frames = time_reader(mod, cfg, repeats)
            per = max(frames, 1)
            results[f"{name}_frames_per_s_per_core"] = frames / read
            results[f"{name}_validated_frames_per_s_per_core"] = frames / (read + val)
            results[f"{name}_cpu_s_per_frame"] = cpu_read / per
            results[f"{name}_validated_cpu_s_per_frame"] = (cpu_read + cpu_val) / per
            results[f"{name}_validate_s_per_frame"] = val / per
            results[f"{name}_frames"] = frames
            rows.append((name, frames, frames / read, frames / (read + val), (cpu_read + cpu_val) / per))
            if args.profile and name.startswith("waymo_5cam"):
                print(f"--- profile: read + validation of {name} ({frames} frames), least of 3 runs per phase")
                for phase, ms in profile_read(mod, cfg, 3, args.profile).items():
                    results[f"{name}_{phase}_ms_per_frame"] = ms
        base = results[f"{BASELINE}_frames_per_s_per_core"]
        base_v = results[f"{BASELINE}_validated_frames_per_s_per_core"]
        print(f"{'reader':20s} {'frames':>6s} {'read frames/s/core':>18s} {'+validation':>12s} {'+val cpu s/fr':>13s} "
              f"{'ratio vs ' + BASELINE:>22s} {'validated ratio':>16s}")
        for name, frames, fps, fps_v, cpf in rows:
            results[f"{name}_ratio_vs_{BASELINE}"] = fps / base
            results[f"{name}_validated_ratio_vs_{BASELINE}"] = fps_v / base_v
            print(f"{name:20s} {frames:6d} {fps:18.2f} {fps_v:12.2f} {cpf:13.4f} {fps / base:22.3f} "
                  f"{fps_v / base_v:16.3f}")
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
