"""Benchmark: what the training feed costs the training process, made in Ray tasks (`raydseg.train.feed.rank_batches`,
through `raydseg.ray_map.map_tasks`, ordered) against the former Ray Data path (the baseline, `ray_data`:
`from_items` -> `map_batches(read_samples)` -> `iter_torch_batches`, `preserve_order`), on the pretrain stage's feed.

`python jobs/benchmarks/train_feed.py --frames DIR --out train_feed.json [--steps 40] [--schedule 6000]
[--warm 10] [--object-store-mb 256]`

DIR: an ingest's frames folder, as for feed_cache.py. On a local Ray with 2 CPUs, a Ray task holding one of them (as
a training worker does; the other is the feed's) reads the micro-batches of configs/pretrain_mae.yaml's feed (32
images, two 112 px crops each) and runs a fixed step of torch work on 2 threads per batch (`step_only`: that step
alone, no feed, is the ceiling). The rank's schedule is `--schedule` steps long, as in a long run, of which `--steps`
are timed after `--warm` untimed ones (the feed's start-up, and its results filling the object store); two untimed
epochs first fill the task workers' caches. The feed's tasks make batches faster than the step reads them, so in a
long run their results fill their share of the object store and wait; a small store (`--object-store-mb`) reaches
that state within the warm-up steps instead of after minutes. Variants alternate, twice each; the best pass counts.
Keys: `<variant>_steps_per_s`, `<variant>_cpu_s_per_step` (the reading process's CPU seconds per step, the step's
own included), `tasks_over_ray_data` (speed ratio, > 1 is faster), `<variant>_over_step_only`, `same_batches` (both
feeds' timed batches are byte-equal).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time
from typing import Any, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ray_data_batches(feed: Any, *, seed: int, steps: int, micro: int) -> Iterator[dict[str, Any]]:
    """The former `rank_batches` (one rank): the same schedule through Ray Data, blocks of 8 micro-batches."""
    import ray.data

    from raydseg.train import feed as F

    cols = F._schedule_columns(feed, F.sample_index(feed), seed, start=0, steps=steps, micro=micro, world=1,
                               accum=1, rank=0)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{k: int(v[i]) for k, v in cols.items()} for i in range(len(cols["part"]))],
                             override_num_blocks=max(1, len(cols["part"]) // (micro * 8)))
    ds = ds.map_batches(F.read_samples, batch_format="numpy", batch_size=micro, num_cpus=1.0,
                        fn_kwargs={"feed": feed, "seed": seed})
    yield from ds.iter_torch_batches(batch_size=micro, device="cpu")


def pretrain_feed(frames: str) -> tuple[Any, int]:
    """configs/pretrain_mae.yaml's feed of `frames` and its batch size."""
    from raydseg.config import load_config
    from raydseg.train import pretrain as P

    cfg = load_config(os.path.join(REPO, "configs", "pretrain_mae.yaml"), [])
    return P.pretrain_feed(frames, cfg.pretrain.model_dump()), cfg.pretrain.batch_size


def timed_pass(name: str, frames: str, schedule: int, warm: int, steps: int) -> tuple[float, float, list[str]]:
    """Steps/s and CPU s per step of this process reading feed `name` under the fixed step, and the batches'
    digests."""
    import torch

    from raydseg.stage_requests import AUGMENT_TASK_CPUS
    from raydseg.train import feed as F

    feed, micro = pretrain_feed(frames)
    torch.set_num_threads(2)
    w = torch.randn(768, 768)
    if name == "ray_data":
        it = ray_data_batches(feed, seed=0, steps=schedule, micro=micro)
    elif name == "tasks":
        it = F.rank_batches(feed, seed=0, start=0, steps=schedule, micro=micro, world=1, accum=1, rank=0,
                            device="cpu", task_cpus=AUGMENT_TASK_CPUS)
    else:  # step_only: no feed
        it = iter(lambda: None, 0)
    digests = []
    for i in range(warm + steps):
        if i == warm:
            t, c = time.perf_counter(), time.process_time()
        batch = next(it)
        x = torch.randn(4096, 768)
        for _ in range(10):  # a fixed step of 2-thread work (about a MAE step here), the same for every variant
            x = torch.tanh(x @ w)
        if batch is not None and i >= warm:
            digests.append(hashlib.sha256(b"".join(v.numpy().tobytes() for v in batch.values())).hexdigest())
    t, c = time.perf_counter() - t, time.process_time() - c
    getattr(it, "close", lambda: None)()
    return steps / t, c / steps, digests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--schedule", type=int, default=6000)
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--object-store-mb", type=int, default=256)
    a = ap.parse_args()

    import ray

    from raydseg.procstats import write_figures
    from raydseg.stage_requests import AUGMENT_TASK_CPUS
    from raydseg.train import feed as F

    feed, micro = pretrain_feed(a.frames)
    ray.init(num_cpus=2, object_store_memory=a.object_store_mb << 20, include_dashboard=False, log_to_driver=False)
    try:
        epoch = -(-len(F.sample_index(feed)) // micro)
        for _ in F.rank_batches(feed, seed=1, start=0, steps=2 * epoch, micro=micro, world=1, accum=1, rank=0,
                                device="cpu", task_cpus=AUGMENT_TASK_CPUS):
            pass  # every image decoded in the task workers, as after a long run's first epochs
        reader = ray.remote(num_cpus=1)(timed_pass)  # a worker process holding one CPU, as a Ray Train worker does
        best: dict[str, tuple[float, float]] = {}
        kept: dict[str, list[str]] = {}
        for _ in range(2):
            for name in ("ray_data", "tasks", "step_only"):
                rate, cpu, kept[name] = ray.get(reader.remote(name, a.frames, a.schedule, a.warm, a.steps))
                if rate > best.get(name, (0.0, 0.0))[0]:
                    best[name] = (rate, cpu)
    finally:
        ray.shutdown()
    out: dict[str, float | int | bool] = {}
    for name, (rate, cpu) in best.items():
        out[f"{name}_steps_per_s"], out[f"{name}_cpu_s_per_step"] = rate, cpu
    out["tasks_over_ray_data"] = best["tasks"][0] / best["ray_data"][0]
    for name in ("ray_data", "tasks"):
        out[f"{name}_over_step_only"] = best[name][0] / best["step_only"][0]
    out["same_batches"] = kept["tasks"] == kept["ray_data"]
    out["schedule_steps"], out["timed_steps"], out["batch_images"] = a.schedule, a.steps, micro
    out["object_store_mb"] = a.object_store_mb
    write_figures(out, a.out)


if __name__ == "__main__":
    main()
