"""Masked-autoencoder pretraining (raydseg.models.mae) of the features stage's ViT without Ray, scored on a larger
segment k-NN probe than the pretrain stage's: does it beat the random-init ViT where DINO does not?

`THREADS=1 python jobs/benchmarks/mae_recipe.py --images DIR --out OUT [--steps N --batch B --mask 0.75
--norm-pix 0|1 --scale-min 0.2 --bicubic 0|1 --probe-drives 24 --probe-worlds 0,1 --knn-every N]
[--eval-only CHECKPOINT [--blocks 4,8,12]]`:
- DIR from `dino_images.py` (images.npy or images.bin): unlabelled images of train-stream sequences the default
  run never uses, or `dino_segment_crops.py`'s masked segment crops; `DIR1,DIR2` trains on both;
- the probe: one LiDAR frame of each of `--probe-drives` drives per world (world W's train stream, as a run with
  `run.seed=W`, `synthetic.n_sequences=D`, `frames_per_sequence=1` ingests), its segments' majority ground-truth
  class, split by drive (every other drive tests: 24 against 24 with two worlds, not the ladder's 2 against 2);
- descriptors: crop_cls, mask_pool and crop_mean (raydseg.features.pooling), and the 64-bin colour histogram, k = 5;
- model: ViT-Tiny/16 on 112 px random resized crops (scale `--scale-min`, default 0.2, to 1) + flips, MAE's
  augmentation, `--batch` images per step; AdamW lr 1.5e-4 x batch / 256, betas (0.9, 0.95), weight decay 0.05,
  cosine with 5 % warmup;
- `--eval-only CHECKPOINT`: score a backbone file (`random`: the seed's random init) on the probe and stop;
  `--blocks`: also the descriptors of its first n blocks (then its final norm), for each n.
Writes OUT/history.json (loss and k-NN per probe step) and OUT/backbone.safetensors (timm layout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn


def probe_scores(backbone: nn.Module, probe: dict) -> dict[str, float]:
    """k-NN accuracy (points) of the probe's segments under three descriptors of `backbone` (eval mode)."""
    from raydseg.features.pooling import segment_descriptors
    from raydseg.train.pretrain import probe_descriptors, probe_knn_scores

    was = backbone.training
    backbone.eval()
    out = {}
    with torch.no_grad():
        for name in ("crop_cls", "mask_pool", "crop_mean"):
            kw = {} if name == "mask_pool" else {"crop_size": 112}
            x = probe_descriptors(probe, lambda i, s, ids: segment_descriptors(backbone, i, s, ids, name, **kw),
                                  backbone.num_features)
            out[name] = 100 * probe_knn_scores(probe, x)["knn_acc"]
    backbone.train(was)
    return out


def load_images(folders: str) -> list[np.ndarray]:
    """The images of one folder, or of several joined by commas (e.g. street images and segment crops)."""
    if "," in folders:
        return [im for f in folders.split(",") for im in load_images(f)]
    folder = folders
    if os.path.exists(f"{folder}/images.npy"):
        return list(np.load(f"{folder}/images.npy"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dino_images import read_images
    from raydseg.train.pretrain import as_rgb

    return [as_rgb(b) for b in read_images(folder)]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="", help="training images (not needed with --eval-only)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mask", type=float, default=0.75)
    ap.add_argument("--norm-pix", type=int, default=0)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--scale-min", type=float, default=0.2, help="random resized crop scale (min, 1)")
    ap.add_argument("--bicubic", type=int, default=0, help="1: resize crops bicubically, as the stage's MultiCrop")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--probe-drives", type=int, default=24)
    ap.add_argument("--probe-worlds", default="0")
    ap.add_argument("--knn-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", default="", help="a backbone checkpoint (or `random`): score it and stop")
    ap.add_argument("--blocks", default="", help="with --eval-only: block counts n to score the first n blocks of")
    a = ap.parse_args(argv)
    if not (a.images or a.eval_only):
        ap.error("--images: required unless --eval-only")
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    os.makedirs(a.out, exist_ok=True)
    from torchvision.transforms import v2

    from raydseg.config import load_config
    from raydseg.eval.knn import colour_histogram
    from raydseg.features.backbone import create_backbone, input_stats, input_stats_metadata
    from raydseg.models.mae import MaskedAutoencoder
    from raydseg.train.dino import cosine_schedule
    from raydseg.train.pretrain import probe_descriptors, probe_knn_scores, save_backbone, synthetic_drive_probe

    t0 = time.time()
    probe = synthetic_drive_probe(load_config("configs/default.yaml"), [int(w) for w in a.probe_worlds.split(",")],
                                  a.probe_drives, f"{a.out}/probe_frames")
    hist = probe_knn_scores(probe, probe_descriptors(probe, colour_histogram, 64))
    print(f"probe {len(probe['seg_id'])} segments, {len(set(probe['sequences'].values()))} drives, "
          f"colour histogram {100 * hist['knn_acc']:.1f} ({time.time() - t0:.0f} s)", flush=True)
    torch.manual_seed(a.seed)
    backbone = create_backbone("vit_tiny_patch16_224", a.eval_only, num_classes=0)  # "random": random init
    if a.eval_only:
        blocks = backbone.blocks
        for n in [int(b) for b in a.blocks.split(",") if b] or [len(blocks)]:
            backbone.blocks = blocks[:n]
            print({"weights": a.eval_only, "blocks": n, **probe_scores(backbone, probe)}, flush=True)
        return
    images = load_images(a.images)
    model = MaskedAutoencoder(backbone, a.mask, norm_pix=bool(a.norm_pix))
    lr = a.lr or 1.5e-4 * a.batch / 256
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = cosine_schedule(lr, 0.0, a.steps, max(1, a.steps // 20))
    interp = v2.InterpolationMode.BICUBIC if a.bicubic else v2.InterpolationMode.BILINEAR
    aug = v2.Compose([v2.RandomResizedCrop(a.size, scale=(a.scale_min, 1.0), interpolation=interp, antialias=True),
                      v2.RandomHorizontalFlip()])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in input_stats(backbone))
    rng = np.random.default_rng(a.seed)

    def knn(step: int) -> dict:
        return {"step": step, **probe_scores(backbone, probe)}

    history = [{**knn(0), "colour_histogram": 100 * hist["knn_acc"], "segments": len(probe["seg_id"])}]
    print(history[-1], flush=True)
    t1, losses = time.time(), []
    model.train()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = float(sched[step])
        idx = rng.integers(len(images), size=a.batch)
        batch = torch.stack([aug(torch.from_numpy(images[i]).permute(2, 0, 1)) for i in idx]).float() / 255
        loss, _ = model((batch - mean) / std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % a.knn_every == 0 or step + 1 == a.steps:
            row = {**knn(step + 1), "loss": float(np.mean(losses[-50:])),
                   "images_per_s": (step + 1) * a.batch / (time.time() - t1)}
            history.append(row)
            print(row, flush=True)
            with open(f"{a.out}/history.json", "w") as f:
                json.dump({"args": vars(a), "history": history}, f, indent=1)
    save_backbone(nn.ModuleDict({"backbone": backbone}), f"{a.out}/backbone.safetensors",
                  {"backbone": "vit_tiny_patch16_224", "format": "timm", "source": "raydseg mae_recipe",
                   **input_stats_metadata(backbone)})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
