"""Benchmark: the part-wise map of a stage three ways, on the same input parts and part function (issue 20).

`python jobs/benchmarks/map_parts.py --frames DIR --out map_parts.json [--repeats 2]`

DIR: an ingest stage's `frames/` folder (e.g. from `jobs/benchmarks/scale.py`, 64 parts of 384 frames). The part
function is the proposals stage's (`process_table`, default config). Variants, each writing to a fresh folder:
- `map_parts`: `parts.map_parts` as the stages run it (plain Ray tasks through `raydseg.ray_map.map_tasks`: bounded
  in flight, results streamed back, Ray's retries);
- `ray_tasks`: plain Ray tasks, one per part (`ray.remote(num_cpus=1)` around the same `_process`), all submitted
  at once, Ray's scheduler as the only queue: the floor of what a task queue costs;
- `ray_data_reserved`: the "before": map_parts as it was on Ray Data (from_items over the part names, map_batches
  with one part per batch) with Ray Data's default per-operator resource reservation.
Baseline for the ratios: `ray_tasks`. Keys: `<variant>_parts_per_s` (best of --repeats), `<variant>_over_ray_tasks`,
`map_parts_over_ray_data_reserved` (after / before).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time

import numpy as np


def run_variant(name: str, in_dir: str, out_dir: str, fn) -> float:
    """Seconds to map every part of `in_dir` into `out_dir` with variant `name`."""
    import ray

    from raydseg import parts

    t = time.perf_counter()
    if name == "ray_tasks":
        task = ray.remote(num_cpus=1)(parts._process)
        ray.get([task.remote(fn, in_dir, out_dir, n) for n in parts.part_names(in_dir)])
    elif name == "map_parts":
        parts.map_parts(in_dir, out_dir, fn)
    else:  # ray_data_reserved: the former Ray Data map_parts, Ray Data's default reservation
        def run_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"part": np.array([parts._process(fn, in_dir, out_dir, str(n))["part"] for n in batch["part"]])}
        names = parts.part_names(in_dir)
        ds = ray.data.from_items([{"part": n} for n in names], override_num_blocks=len(names))
        ds.map_batches(run_part, batch_size=1, num_cpus=1).materialize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    import ray

    from raydseg.config import load_config
    from raydseg.parts import part_names
    from raydseg.procstats import write_figures
    from raydseg.stages.proposals import process_table

    cfg = load_config()
    fn = functools.partial(process_table, cfg_dict=cfg.to_dict()["proposals"], seed=0)
    n_parts = len(part_names(a.frames))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict[str, float] = {"parts": n_parts}
    variants = ("ray_tasks", "map_parts", "ray_data_reserved")
    with tempfile.TemporaryDirectory() as tmp:
        run_variant("ray_tasks", a.frames, f"{tmp}/warm", fn)  # warm-up: workers started, numba compiled
        for r in range(a.repeats):
            for v in variants:
                dst = f"{tmp}/{v}_{r}"
                s = run_variant(v, a.frames, dst, fn)
                out[f"{v}_parts_per_s"] = max(out.get(f"{v}_parts_per_s", 0.0), n_parts / s)
                shutil.rmtree(dst)
    ray.shutdown()
    for v in variants:
        out[f"{v}_over_ray_tasks"] = out[f"{v}_parts_per_s"] / out["ray_tasks_parts_per_s"]
    out["map_parts_over_ray_data_reserved"] = out["map_parts_parts_per_s"] / out["ray_data_reserved_parts_per_s"]
    write_figures(out, a.out)


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
