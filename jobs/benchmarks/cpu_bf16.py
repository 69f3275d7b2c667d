"""CPU training steps in bf16 autocast against fp32 (the named baseline): `python jobs/benchmarks/cpu_bf16.py --out
FILE.json [--threads 1,2] [--steps 8] [--repeats 2]`.

The embedded default's teacher and student steps as the stages run them (`SegmentationStep` / `DistillationStep`
with its frozen teacher, ClassMix and soft targets, `train_one_step`, AdamW) at the config's backbone, crop and
batch, on fixed random batches; fp32 and bf16 alternate `--repeats` times per thread count so that drift of the
machine hits both. Reports s/step (median of the repeats), the bf16 / fp32 time ratio, and the loss of both after
the same steps (a sanity check only: on random labels both stay near ln(n_cls); the quality ladder measures what
bf16 does to the models). `amp: auto` (raydseg.train.precision) uses bf16 on CPUs where `cpu_has_bf16()`; this
script runs bf16 anyway and says whether the CPU has it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from raydseg.config import Config, load_config
from raydseg.models.segmenter import build_segmenter, resolve_model_cfg
from raydseg.train.engine import make_optimizer, train_one_step
from raydseg.train.precision import cpu_has_bf16
from raydseg.train.steps import DistillationStep, SegmentationStep
from raydseg.train.teacher import model_cfg_from


def fixed_batches(batch: int, size: int, n_cls: int, seed: int = 0):
    """An endless stream of the same random {image, degraded (B,S,S,3) uint8, label (B,S,S) uint8} batches."""
    g = torch.Generator().manual_seed(seed)
    fixed = [{"image": torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8),
              "degraded": torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8),
              "label": torch.randint(0, n_cls, (batch, size, size), generator=g, dtype=torch.uint8)} for _ in range(2)]
    while True:
        yield from fixed


def run(stage: str, bf16: bool, cfg: Config, steps: int, warmup: int) -> dict[str, float]:
    """s/step and the final loss of `steps` timed steps (after `warmup`) of the stage's objective."""
    t = cfg.teacher if stage == "teacher" else cfg.student
    model_cfg = resolve_model_cfg(model_cfg_from(cfg))  # the teacher stage's model, which the student copies
    n_cls = model_cfg["n_cls"]
    torch.manual_seed(0)
    model = build_segmenter(model_cfg).train()
    if stage == "teacher":
        step_fn = SegmentationStep(model_cfg["mean"], model_cfg["std"], cfg.teacher.class_balance)
    else:  # refinement needs the LiDAR segments, which random batches lack
        step_fn = DistillationStep(build_segmenter(model_cfg).eval(), n_cls,
                                   {**cfg.student.model_dump(), "refine": False}, model_cfg["mean"], model_cfg["std"])
    opt = make_optimizer(model, t.model_dump())
    batches = fixed_batches(t.batch_size, t.crop_size, n_cls)
    for k in range(warmup):
        train_one_step(model, opt, batches, step_fn, k, amp=bf16)
    t0 = time.perf_counter()
    for k in range(steps):
        loss = train_one_step(model, opt, batches, step_fn, warmup + k, amp=bf16)["loss"]
    return {"s_per_step": (time.perf_counter() - t0) / steps, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts to time (the ladder's reruns use 1)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="fp32 / bf16 alternations per thread count")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="config override (e.g. teacher.crop_size=32 for a quick check)")
    args = p.parse_args(argv)
    cfg = load_config(overrides=args.set)
    result: dict = {"baseline": "fp32", "cpu_has_bf16": cpu_has_bf16(), "backbone": cfg.teacher.backbone,
                    "steps": args.steps, "repeats": args.repeats, "rows": []}
    print(f"CPU native bf16: {result['cpu_has_bf16']}")
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for stage in ("teacher", "student"):
            t = cfg.teacher if stage == "teacher" else cfg.student
            runs = {False: [], True: []}
            for _ in range(args.repeats):
                for bf16 in (False, True):
                    runs[bf16].append(run(stage, bf16, cfg, args.steps, args.warmup))
            fp32, bf16 = (statistics.median(r["s_per_step"] for r in runs[k]) for k in (False, True))
            row = {"stage": stage, "threads": threads, "batch": t.batch_size, "crop_px": t.crop_size,
                   "fp32_s_per_step": fp32, "bf16_s_per_step": bf16, "ratio_bf16_vs_fp32": bf16 / fp32,
                   "fp32_loss": runs[False][0]["loss"], "bf16_loss": runs[True][0]["loss"]}
            result["rows"].append(row)
            print(f"{stage:8s} threads {threads}: fp32 {fp32:.3f} s/step, bf16 {bf16:.3f} s/step, ratio "
                  f"{row['ratio_bf16_vs_fp32']:.3f}; loss after {args.warmup + args.steps} steps "
                  f"{row['fp32_loss']:.4f} / {row['bf16_loss']:.4f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
