"""One-shot GPU check: `python jobs/benchmarks/gpu_check.py --out gpu.json` (about 5 min on one H100/H200).

Needs torch and timm only (the device machine has no Ray, open3d, faiss or mlflow, and no network): it fails if
anything it imports pulls in one of NOT_ON_DEVICE. Measures, each against a named baseline in the same run:
- the teacher train step (ViT-S/16 Segmenter, 512 crops, bf16) eager and with torch.compile: images/s, peak memory,
  MFU against the bf16 peak (baseline: the linear decoder, as in train_step.py);
- feature extraction: masked-crop [CLS] forwards at 224, crops/s in bf16 (baseline: fp32);
- sliding-window evaluation (shorter side 1024, window 512, stride 128): images/s (baseline: whole image);
- one single-process DDP step (NCCL on GPU, gloo on CPU): images/s (baseline: the same step without DDP).
`--tiny --device cpu` runs every path on a ViT-Ti at toy sizes in seconds (the test suite does this).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import bench as train_step_bench  # noqa: E402
from train_step import peak_tflops, sgd_step  # noqa: E402

from raydseg.models.segmenter import build_segmenter  # noqa: E402
from raydseg.ports import free_port  # noqa: E402

GOALS = {"teacher_step_mfu": 0.35, "features_crops_per_s": 5000.0}
NOT_ON_DEVICE = ("ray", "pyarrow", "pydantic", "mlflow", "open3d", "faiss")  # absent on the device machine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Seconds per call of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def features(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Masked-crop [CLS] forwards of the features stage's backbone: crops/s in bf16 and fp32."""
    from raydseg.features.backbone import create_backbone

    model = create_backbone(args.feature_backbone, seed=0).to(device)
    crops = torch.randn(args.feature_batch, 3, args.crop, args.crop, device=device)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        def step() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model.forward_features(crops)[:, 0].float()
        out[name] = args.feature_batch / _timed(step, device, args.warmup, args.reps)
    return {"features_crops_per_s": out["bf16"], "features_baseline": "fp32", "features_fp32_crops_per_s": out["fp32"],
            "features_ratio_vs_baseline": out["bf16"] / out["fp32"]}


def evaluation(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """`predict_image` as the evaluate stage runs it: sliding window in bf16 on a Cityscapes-shaped image."""
    import numpy as np

    from raydseg.models.infer import predict_image

    torch.manual_seed(0)
    model = build_segmenter({"backbone": args.backbone, "n_cls": args.n_cls, "decoder": "mask"}).to(device).eval()
    image = np.random.default_rng(0).integers(0, 255, (args.eval_h, 2 * args.eval_h, 3), dtype=np.uint8)
    dtype = torch.bfloat16 if device.type == "cuda" or args.tiny else None
    window = dict(size=args.eval_h, window=args.eval_window, stride=args.eval_window // 4)
    s_window = _timed(lambda: predict_image(model, image, autocast_dtype=dtype, **window), device, 1, args.reps)
    s_whole = _timed(lambda: predict_image(model, image, autocast_dtype=dtype, size=args.eval_h), device, 1,
                     args.reps)
    return {"eval_images_per_s": 1 / s_window, "eval_baseline": "whole_image", "eval_whole_images_per_s": 1 / s_whole,
            "eval_ratio_vs_baseline": s_whole / s_window}


def ddp_step(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """One process, world size 1: the DDP wrapper and its all-reduce (NCCL on GPU) against the bare model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    port = free_port()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_segmenter({"backbone": args.backbone, "n_cls": args.n_cls}).to(device).train()
        wrapped = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, args.n_cls, (args.batch, args.size, args.size), device=device)
        out = {}
        for name, net in (("ddp", wrapped), ("plain", model)):
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
            out[name] = args.batch / _timed(lambda: sgd_step(net, opt, x, y, device), device, args.warmup,
                                            args.reps)
    finally:
        dist.destroy_process_group()
    return {"ddp_step_backend": backend, "ddp_step_images_per_s": out["ddp"], "ddp_baseline": "no_ddp",
            "ddp_plain_images_per_s": out["plain"], "ddp_ratio_vs_baseline": out["ddp"] / out["plain"]}


def teacher_step(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """train_step.py's measurement of the paper's teacher, eager and (on CUDA) compiled."""
    out = {}
    for compiled in (False, True) if device.type == "cuda" else (False,):
        bench_args = argparse.Namespace(backbone=args.backbone, n_cls=args.n_cls, size=args.size, batch=args.batch,
                                        steps=args.reps, warmup=args.warmup, compile=compiled)
        r = train_step_bench("mask", bench_args, device)
        key = "teacher_step_compiled" if compiled else "teacher_step"
        out.update({f"{key}_images_per_s": r["images_per_s"], f"{key}_mfu": r["mfu"],
                    f"{key}_peak_gpu_mem_gb": r.get("peak_gpu_mem_gb")})
    base = train_step_bench("linear", argparse.Namespace(backbone=args.backbone, n_cls=args.n_cls, size=args.size,
                                                         batch=args.batch, steps=args.reps, warmup=args.warmup,
                                                         compile=False), device)
    out.update(teacher_step_baseline="linear_decoder", teacher_step_baseline_images_per_s=base["images_per_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the flat results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="ViT-Ti at toy sizes: checks that every path runs")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per measurement (0 = 10, tiny 1)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.backbone = "vit_tiny_patch16_224" if tiny else "vit_small_patch16_224"
    args.feature_backbone = args.backbone
    args.n_cls, args.size, args.batch = (5, 64, 2) if tiny else (31, 512, 8)
    args.crop, args.feature_batch = (32, 8) if tiny else (224, 512)
    args.eval_h, args.eval_window = (64, 32) if tiny else (1024, 512)
    args.reps, args.warmup = args.reps or (1 if tiny else 10), 1 if tiny else 3
    device = torch.device(args.device)
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "tiny": tiny,
        "torch": torch.__version__, "bf16_peak_tflops": peak_tflops(torch.cuda.get_device_name(device))
        if device.type == "cuda" else None}
    for part in (teacher_step, features, evaluation, ddp_step):
        t0 = time.perf_counter()
        result.update(part(args, device))
        result[f"{part.__name__}_wall_s"] = time.perf_counter() - t0
        print(f"{part.__name__}: done in {result[f'{part.__name__}_wall_s']:.1f} s", flush=True)
        with open(args.out, "w") as f:  # what was measured survives a later part's failure or a kill
            json.dump(result, f, indent=1)
    result["imported_not_on_device"] = ",".join(m for m in NOT_ON_DEVICE if m in sys.modules)
    if result["imported_not_on_device"]:
        raise RuntimeError(f"gpu_check imported {result['imported_not_on_device']}: the device machine has none")
    for key, goal in GOALS.items():
        value = result.get(key)
        result[f"{key}_goal_met"] = None if value is None else bool(value >= goal)
    for k, v in result.items():
        print(f"{k:42s} {v:.4g}" if isinstance(v, float) else f"{k:42s} {v}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
