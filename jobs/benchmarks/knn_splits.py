"""Descriptor k-NN of quality-ladder runs under both probe splits: by frame (the old one) and by drive (now).

`python jobs/benchmarks/knn_splits.py --out knn_splits.json RUN [RUN ...] [--weights NAME=FILE ...]`: for each
run (a `quality.py` run folder q<S>; its seed is the trailing digit) the probe of 16 frames' LiDAR segments
(raydseg.train.pretrain.build_knn_probe), described by the colour-histogram baseline, a random-init ViT (seeded
like `quality.py`) and each checkpoint; k-NN accuracy (k = 5) with every other frame, then every other drive, as
the test side, and the majority class of the training side as the floor. Writes {run: {descriptor/split: {knn_acc,
knn_mean_class_acc} points}}.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from raydseg.config import load_config
from raydseg.eval.knn import colour_histogram, knn_accuracy, scene_split
from raydseg.features.backbone import create_backbone
from raydseg.train.pretrain import build_knn_probe, probe_cls_descriptors, probe_descriptors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--weights", action="append", default=[], help="NAME=FILE, a timm-layout checkpoint")
    p.add_argument("runs", nargs="+")
    a = p.parse_args()
    torch.set_num_threads(1)
    checkpoints = {"random": "", **dict(w.split("=", 1) for w in a.weights)}
    out = {}
    for run in a.runs:
        seed = int(run.rstrip("/")[-1])
        cfg = load_config(os.path.join(run, "config.yaml"))
        probe = build_knn_probe(os.path.join(run, "ingest", "frames"), cfg.proposals, 16, seed)
        y = probe["seg_class"].numpy()
        frames = [probe["frame_ids"][i] for i in probe["seg_image"].numpy()]
        splits = {"frame": scene_split(frames), "drive": scene_split(frames, probe["sequences"])}
        descs = {"colour_hist": probe_descriptors(probe, colour_histogram, 64)}
        for name, w in checkpoints.items():
            torch.manual_seed(seed)
            net = create_backbone(cfg.features.backbone, w, dynamic_img_size=True, num_classes=0)
            descs[name] = probe_cls_descriptors(net, probe, cfg.features.crop_size)
        row: dict = {"n_segments": len(y), "n_drives": len(set(probe["sequences"].values()))}
        for s, t in splits.items():
            row[f"majority/{s}"] = {"knn_acc": 100 * float(np.mean(y[t] == np.bincount(y[~t]).argmax()))}
            for d, x in descs.items():
                row[f"{d}/{s}"] = {k: 100 * v for k, v in knn_accuracy(x[~t], y[~t], x[t], y[t], 5).items()}
        out[run] = row
        print(run, json.dumps({k: round(v["knn_acc"], 1) for k, v in row.items() if "/" in k}), flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
