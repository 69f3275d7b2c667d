"""Pretrained vs random ViT on the quality ladder's 48-drive segment k-NN probe, over seeds: the figure of issue 15's
goal "pretrained k-NN >= random + 10", for checkpoints that have no ladder run of their own.

`python jobs/benchmarks/drive_knn.py --out OUT.json --weights [NAME=]CKPT [--weights ...] [--root ROOT --seeds
0,1,2,3,4 --descriptors crop_cls,crop_mean]`: for each seed S, `quality.drive_knn` (one LiDAR frame of each of 24
drives of world S and of world 1000 + S, split by drive, k = eval.knn_k; cached under ROOT/probe<S>, so quality.py's
--root works) scores the seeded random-init ViT (the baseline), CKPT and the colour histogram, with each
`features.descriptor`, on plain and per-dimension standardised descriptors. Writes the rows and, per checkpoint and
descriptor, the paired gain over the random ViT in points: mean, standard error and each seed's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402


def paired_gain(rows: list[dict[str, float]], key: str) -> dict:
    """Mean, standard error (`quality.stats`) and per-seed values of rows' `<key>_pretrained - <key>_random`."""
    d = [r[f"{key}_pretrained"] - r[f"{key}_random"] for r in rows]
    s = quality.stats(d)
    return {"mean": s["mean"], "se": s["se"], "per_seed": d}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", action="append", required=True, help="[NAME=]checkpoint, repeatable")
    ap.add_argument("--root", default="/tmp/drive_knn", help="probe frames cache (quality.py's --root works)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--descriptors", default="crop_cls,crop_mean", help="features.descriptor values")
    a = ap.parse_args(argv)
    from raydseg.config import load_config

    seeds = [int(s) for s in a.seeds.split(",") if s]
    out: dict = {"seeds": seeds, "checkpoints": {}}
    for spec in a.weights:
        name, _, path = spec.rpartition("=")
        ckpt = out["checkpoints"][name or path] = {"weights": path}
        for desc in a.descriptors.split(","):
            cfg = load_config(None, [f"features.descriptor={desc}"])
            rows = [quality.drive_knn(a.root, cfg, path, cfg.eval.knn_k, s) for s in seeds]
            gains = {f"{key}_gain": paired_gain(rows, key) for key in ("drive_knn", "drive_knn_std")}
            ckpt[desc] = {"rows": rows, **gains}
            print(name or path, desc, {k: f"{g['mean']:+.1f} ± {g['se']:.1f}" for k, g in gains.items()}, flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
