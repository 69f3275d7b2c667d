"""Training-step throughput of the Segmenter: `python jobs/benchmarks/train_step.py --out FILE.json [options]`.

Default: ViT-S/16 Segmenter (1-layer mask transformer) at 512 x 512, batch 8 -- the paper's teacher -- against the
named baseline `linear` (same encoder, linear decoder) in the same run, so the ratio isolates the decoder's cost.
CPU: images/s and peak RSS. CUDA: bf16 autocast, optional torch.compile, peak GPU memory and model FLOPs
utilisation (3 x forward FLOPs per image, against the GPU's dense bf16 peak).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from raydseg.models.losses import ce_loss
from raydseg.models.segmenter import build_segmenter, count_flops_per_image

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40": 181.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is KiB on Linux


def sgd_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             device: torch.device) -> float:
    """One training step of a Segmenter on (x, y): CE on the sparse labels, bf16 autocast on CUDA; returns the loss."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = ce_loss(net(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def bench(decoder: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_segmenter({"backbone": args.backbone, "n_cls": args.n_cls, "decoder": decoder}).to(device).train()
    flops = count_flops_per_image(model, args.size, args.size)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step_fn = model
    if args.compile and device.type == "cuda":
        step_fn = torch.compile(model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.n_cls, (args.batch, args.size, args.size), device=device)
    y[:, :, : args.size // 3] = 255  # sparse pseudo-labels: a third unlabelled

    def step() -> float:
        return sgd_step(step_fn, opt, x, y, device)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ips = args.batch * args.steps / dt
    out = {"images_per_s": ips, "s_per_step": dt / args.steps, "gflops_per_image_fwd": flops / 1e9}
    if device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name())
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["mfu"] = 3 * flops * ips / (peak * 1e12) if peak else None
    else:
        out["mfu"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--backbone", default="vit_small_patch16_224", help="timm ViT (paper: ViT-S/16)")
    p.add_argument("--size", type=int, default=512, help="square crop side in px (paper: 512)")
    p.add_argument("--batch", type=int, default=8, help="images per step (paper: 8)")
    p.add_argument("--n-cls", type=int, default=31)
    p.add_argument("--steps", type=int, default=3, help="timed steps (CPU: keep it small)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile on CUDA")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"

    base = bench("linear", args, device)
    seg = bench("mask", args, device)
    result = {
        "device": name, "backbone": args.backbone, "crop_px": args.size, "batch": args.batch,
        "images_per_s": seg["images_per_s"], "s_per_step": seg["s_per_step"],
        "gflops_per_image_fwd": seg["gflops_per_image_fwd"], "mfu": seg["mfu"],
        "baseline": "linear_decoder", "baseline_images_per_s": base["images_per_s"],
        "ratio_vs_baseline": seg["images_per_s"] / base["images_per_s"],
        "peak_rss_gb": peak_rss_gb(), "compile": bool(args.compile and device.type == "cuda"),
    }
    if device.type == "cuda":
        result["peak_gpu_mem_gb"] = seg["peak_gpu_mem_gb"]
        result["baseline_mfu"] = base["mfu"]
    rows = [("model", "images/s", "s/step", "MFU"),
            ("segmenter (mask, 1 layer)", f"{seg['images_per_s']:.2f}", f"{seg['s_per_step']:.2f}",
             "n/a (CPU)" if seg["mfu"] is None else f"{seg['mfu']:.1%}"),
            ("baseline: linear decoder", f"{base['images_per_s']:.2f}", f"{base['s_per_step']:.2f}",
             "n/a (CPU)" if base["mfu"] is None else f"{base['mfu']:.1%}")]
    for r in rows:
        print(f"{r[0]:28s} {r[1]:>10s} {r[2]:>8s} {r[3]:>10s}")
    print(f"ratio segmenter / baseline: {result['ratio_vs_baseline']:.3f}; peak RSS {result['peak_rss_gb']:.2f} GB "
          f"on {name}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
