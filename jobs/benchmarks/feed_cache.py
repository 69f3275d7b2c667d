"""Benchmark: the training feed's part cache (`raydseg.train.feed.PART_CACHE_BYTES`) and the pretrain feed's cache
of decoded images (`raydseg.train.pretrain.DECODED_CACHE_BYTES`) on the pretrain stage's feed, against a cache of the
newest part only and no decoded images (the baseline, `one_part`: the former code kept two parts), in one process
without Ray.

`python jobs/benchmarks/feed_cache.py --frames DIR --out feed_cache.json [--steps 20] [--batch 32]`

DIR: an ingest's frames folder, e.g. `make pretrain ARGS="--config configs/pretrain_mae.yaml"`'s
`outputs/pretrain_mae/ingest/frames` (100 parts of 4 frames, one 640 x 320 camera each). The pretrain feed of
configs/pretrain_mae.yaml reads `--steps` batches of `--batch` images (decode, two 112 px crops each; one torch
thread) under each variant (`one_part`, `cached_parts`, `cached`: both caches), twice, alternating, each after one
untimed epoch (a long run's steady state: the caches filled). The samples of a step come from random parts.
Keys: `<variant>_images_per_s` (best of the two passes), `part_reads_<variant>` (in the timed steps, the sample
index's one read per part included), `<variant>_over_one_part` (speed ratio, > 1 is faster), `same_batches` (every
variant's timed batches are byte-equal to the baseline's); and the cost of seeding each image's crops,
`seeded_views`' CPU generator against `torch.manual_seed` (the baseline, which also queues a CUDA seed with its
stack trace): `<name>_us` per call and their ratio (< 1 is faster).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()

    import torch

    from raydseg.config import load_config
    from raydseg.procstats import write_figures
    from raydseg.train import feed as F
    from raydseg.train import pretrain as P

    torch.set_num_threads(1)
    cfg = load_config(os.path.join(REPO, "configs", "pretrain_mae.yaml"), [])
    feed = P.pretrain_feed(a.frames, cfg.pretrain.model_dump())
    budgets = {"one_part": (0, 0), "cached_parts": (F.PART_CACHE_BYTES, 0),  # (parts, decoded images)
               "cached": (F.PART_CACHE_BYTES, P.DECODED_CACHE_BYTES)}
    reads = {name: 0 for name in budgets}
    real = F._parquet

    def run(name: str) -> tuple[float, list]:
        F._PARTS.budget, P._DECODED.budget = budgets[name]
        F._PARTS.clear()
        P._DECODED.clear()

        def counted(path: str):
            reads[name] += 1
            return real(path)

        F._parquet = counted
        warm = -(-len(F.sample_index(feed)) // a.batch)  # one epoch: a long run's steady state, the cache filled
        for _ in F.local_batches(feed, seed=0, start=0, steps=warm, micro=a.batch):
            pass
        reads[name] = 0
        t = time.perf_counter()
        batches = list(F.local_batches(feed, seed=0, start=warm, steps=warm + a.steps, micro=a.batch))
        return a.steps * a.batch / (time.perf_counter() - t), batches

    best: dict[str, float] = {name: 0.0 for name in budgets}
    kept: dict[str, list] = {}
    for _ in range(2):
        for name in budgets:
            rate, kept[name] = run(name)
            best[name] = max(best[name], rate)
    F._parquet = real
    out: dict[str, float | int | bool] = {f"{k}_images_per_s": v for k, v in best.items()}
    out.update({f"part_reads_{k}": v for k, v in reads.items()})
    for name in ("cached_parts", "cached"):
        out[f"{name}_over_one_part"] = best[name] / best["one_part"]
    out["same_batches"] = all(np.array_equal(x[k], y[k]) for name in ("cached_parts", "cached")
                              for x, y in zip(kept[name], kept["one_part"]) for k in x)
    out["parts"] = len(feed.paths)
    seeders = {"torch_manual_seed": torch.manual_seed, "cpu_generator_seed": torch.default_generator.manual_seed}
    for name, seed in seeders.items():
        t = time.perf_counter()
        for i in range(2000):
            seed(i)
        out[f"{name}_us"] = 1e6 * (time.perf_counter() - t) / 2000
    out["cpu_generator_seed_over_torch_manual_seed"] = out["cpu_generator_seed_us"] / out["torch_manual_seed_us"]
    write_figures(out, a.out)


if __name__ == "__main__":
    main()
