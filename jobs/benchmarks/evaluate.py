"""Evaluation throughput and peak memory: single whole-image pass (baseline) vs resize vs sliding window.

`python jobs/benchmarks/evaluate.py --out FILE.json [--images N --backbone NAME --n-cls C --eval-dir DIR]`
Images: the synthetic source's day eval split at the embedded default resolution (rendered into a temp dir), or
a Cityscapes-layout `--eval-dir`. Each mode runs in a fresh spawned process (so its peak RSS is its own) and times
what one evaluate actor does per image: read image + label, predict_image, confusion-matrix update. The model
is a randomly initialised Segmenter of the default size (timing does not depend on the weights).
Modes (the paper's 1024 / 512 / 128 scaled to the image's shorter side S): whole (native, one pass; baseline),
sliding (native, window S/2, stride S/8), resize_half (shorter side S/2, one pass).
"""
from __future__ import annotations

import argparse
import sys
import json
import multiprocessing as mp
import resource
import tempfile
import time


def _run_mode(args: dict) -> dict:
    import torch

    from raydseg.eval.metrics import ConfusionAccumulator
    from raydseg.eval.sets import EvalSet, list_samples, load_image, load_label
    from raydseg.models.infer import predict_image
    from raydseg.models.segmenter import build_segmenter

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_segmenter({"backbone": args["backbone"], "n_cls": args["n_cls"]}).to(device).eval()
    samples = list_samples(EvalSet("bench", "cityscapes", args["eval_dir"]))[: args["images"]]
    kw = args["kw"]
    predict_image(model, load_image(samples[0]), **kw)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    acc = ConfusionAccumulator(n_gt=19)
    t0 = time.perf_counter()
    for s in samples:
        acc.update(predict_image(model, load_image(s), **kw), load_label(s))
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"images": len(samples), "images_per_s": len(samples) / wall, "ms_per_image": 1e3 * wall / len(samples),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "height_px": int(load_image(samples[0]).shape[0]), "width_px": int(load_image(samples[0]).shape[1]),
           "device": device}
    if device == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the flat results")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--backbone", default="vit_tiny_patch16_224")
    ap.add_argument("--n-cls", type=int, default=31)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-dir", default="", help="Cityscapes-layout dir (default: render the synthetic day split)")
    a = ap.parse_args()
    eval_dir = a.eval_dir
    if not eval_dir:
        from raydseg.config import SyntheticConfig
        from raydseg.data.sources import synthetic

        eval_dir = tempfile.mkdtemp(prefix="raydseg_bench_eval_")
        cfg = SyntheticConfig()
        cfg.eval_images_per_condition = a.images
        synthetic.write_eval_split(eval_dir, "day", cfg, seed=0)
    from PIL import Image

    from raydseg.eval.sets import EvalSet, list_samples

    first = list_samples(EvalSet("bench", "cityscapes", eval_dir))[0]
    with Image.open(first.image_path) as im:
        short = min(im.size)
    modes = {"whole": {}, "sliding": {"window": short // 2, "stride": max(short // 8, 1)},
             "resize_half": {"size": short // 2}}
    ctx = mp.get_context("spawn")
    results = {}
    for name, kw in modes.items():
        with ctx.Pool(1) as pool:
            results[name] = pool.apply(_run_mode, ({"eval_dir": eval_dir, "images": a.images, "kw": kw,
                                                    "backbone": a.backbone, "n_cls": a.n_cls,
                                                    "threads": a.threads},))
    base = results["whole"]["images_per_s"]
    w = results["whole"]
    flat: dict[str, float | str] = {"baseline": "whole", "images": w["images"], "height_px": w["height_px"],
                                    "width_px": w["width_px"], "device": w["device"], "threads": a.threads}
    print(f"{'mode':<12} {'settings':<26} {'images/s':>9} {'ms/image':>9} {'peak RSS GB':>12} {'vs whole':>9}")
    for name, r in results.items():
        ratio = r["images_per_s"] / base
        print(f"{name:<12} {json.dumps(modes[name]):<26} {r['images_per_s']:>9.2f} {r['ms_per_image']:>9.1f} "
              f"{r['peak_rss_gb']:>12.2f} {ratio:>8.2f}x"
              + (f"  cuda {r['peak_cuda_gb']:.2f} GB" if "peak_cuda_gb" in r else ""))
        flat[f"{name}_images_per_s"] = r["images_per_s"]
        flat[f"{name}_ms_per_image"] = r["ms_per_image"]
        flat[f"{name}_peak_rss_gb"] = r["peak_rss_gb"]
        flat[f"{name}_speed_ratio_vs_whole"] = ratio
        if "peak_cuda_gb" in r:
            flat[f"{name}_peak_cuda_gb"] = r["peak_cuda_gb"]
    with open(a.out, "w") as f:
        json.dump(flat, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
