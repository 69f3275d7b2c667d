"""Do better segment descriptors make purer clusters? k-means of the quality ladder's 48-drive probe, random ViT vs a
checkpoint, under the cluster stage's pre-processing options.

`python jobs/benchmarks/cluster_purity.py --out OUT.json --weights CKPT [--root ROOT --seeds 0,1,2]`: for
each seed the probe of `quality.drive_knn` (one LiDAR frame of each of 24 drives of world S and of world 1000 + S,
cached under ROOT/probe<S>), crop_cls descriptors (`features.descriptor` of the default config) of the seeded
random-init ViT (the baseline) and of CKPT, clustered by the cluster stage's `kmeans_local` (faiss, `cluster.k`,
`n_iter`, `n_restarts` of the default) after `preprocess` with each of: none (the default), whitening, PCA 32 / 64
whitened. Scores: the clusters' majority-class purity of the segments' ground truth, weighted by pixels and by
segment, in points. Writes {seed: {backbone/preprocessing: {purity_pixels, purity_segments}}} and their means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

PREPROCESSING = {"none": (0, False), "whiten": (0, True), "pca32_whiten": (32, True), "pca64_whiten": (64, True)}


def purities(labels: np.ndarray, classes: np.ndarray, pixels: np.ndarray) -> dict[str, float]:
    """Majority-class purity (points) of clusters `labels` (S,) over segments of true `classes` (S,) with `pixels`
    (S,) each: weighted by pixels and by segment."""
    by_px = sum(np.bincount(classes[labels == c], weights=pixels[labels == c]).max() for c in np.unique(labels))
    by_seg = sum(np.bincount(classes[labels == c]).max() for c in np.unique(labels))
    return {"purity_pixels": 100 * by_px / pixels.sum(), "purity_segments": 100 * by_seg / len(classes)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", required=True, help="the checkpoint to compare with the random ViT")
    ap.add_argument("--root", default="/tmp/cluster_purity", help="probe frames cache (quality.py's --root works)")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality import PROBE_DRIVES, UNSEEN

    from raydseg.clustering.kmeans import kmeans_local, preprocess
    from raydseg.config import load_config
    from raydseg.features.backbone import create_backbone
    from raydseg.features.pooling import CROP_DESCRIPTORS
    from raydseg.train.pretrain import probe_cls_descriptors, synthetic_drive_probe

    cfg = load_config(None)
    c = cfg.cluster
    out: dict = {"weights": a.weights, "k": c.k, "seeds": {}}
    for seed in [int(s) for s in a.seeds.split(",")]:
        probe = synthetic_drive_probe(cfg, [seed, UNSEEN + seed], PROBE_DRIVES, os.path.join(a.root, f"probe{seed}"))
        classes = probe["seg_class"].numpy()
        pixels = np.array([int((probe["segment_ids"][i] == s).sum())
                           for i, s in zip(probe["seg_image"].tolist(), probe["seg_id"].tolist())], np.float64)
        row = {}
        for name, weights in (("random", ""), ("pretrained", a.weights)):
            backbone = create_backbone(cfg.features.backbone, weights, seed=seed)
            x = probe_cls_descriptors(backbone, probe, cfg.features.crop_size,
                                      pool=CROP_DESCRIPTORS[cfg.features.descriptor])
            for pre, (dim, whiten) in PREPROCESSING.items():
                y = preprocess(x, dim, whiten, seed=seed)
                labels = kmeans_local(y, c.k, n_iter=c.n_iter, n_restarts=c.n_restarts, seed=seed,
                                      use_faiss=True).labels
                row[f"{name}/{pre}"] = purities(labels, classes, pixels)
                print(seed, name, pre, {k: round(v, 1) for k, v in row[f"{name}/{pre}"].items()}, flush=True)
        out["seeds"][seed] = row
    keys = list(next(iter(out["seeds"].values())))
    out["mean"] = {k: {m: float(np.mean([r[k][m] for r in out["seeds"].values()])) for m in
                       ("purity_pixels", "purity_segments")} for k in keys}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sys.exit(main(sys.argv[1:]))
