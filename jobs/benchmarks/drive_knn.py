"""Pretrained vs random ViT on the quality ladder's 48-drive segment k-NN probe, over seeds: the figure of issue 15's
goal "pretrained k-NN >= random + 10", for checkpoints that have no ladder run of their own.

`python jobs/benchmarks/drive_knn.py --out OUT.json --weights [NAME=]CKPT [--weights ...] [--root ROOT --seeds
0,1,2,3,4 --descriptors crop_cls,crop_mean]`: for each seed S, `quality.drive_knn` (one LiDAR frame of each of 24
drives of world S and of world 1000 + S, split by drive, k = eval.knn_k; cached under ROOT/probe<S>, so quality.py's
--root works) scores the seeded random-init ViT (the baseline), CKPT and the colour histogram, with each
`features.descriptor`, on plain and per-dimension standardised descriptors. Writes the rows and, per checkpoint and
descriptor, the paired gain over the random ViT in points: mean, standard error and each seed's. With `--against
NAME` also each other checkpoint's paired difference to checkpoint NAME (`vs_NAME`): whether a recipe beats it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402


def summary(d: list[float]) -> dict:
    """Mean, standard error (`quality.stats`) and per-seed values of paired differences `d` (points)."""
    s = quality.stats(d)
    return {"mean": s["mean"], "se": s["se"], "per_seed": d}


def paired_gain(rows: list[dict[str, float]], key: str) -> dict:
    """`summary` of rows' `<key>_pretrained - <key>_random`."""
    return summary([r[f"{key}_pretrained"] - r[f"{key}_random"] for r in rows])


def show(gains: dict[str, dict]) -> dict[str, str]:
    """Each summary as "mean ± SE", for the log."""
    return {k: f"{g['mean']:+.1f} ± {g['se']:.1f}" for k, g in gains.items()}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", action="append", required=True, help="[NAME=]checkpoint, repeatable")
    ap.add_argument("--root", default="/tmp/drive_knn", help="probe frames cache (quality.py's --root works)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--descriptors", default="crop_cls,crop_mean", help="features.descriptor values")
    ap.add_argument("--against", default="", help="NAME of a --weights checkpoint to pair the others with")
    a = ap.parse_args(argv)
    checkpoints = [(name or path, path) for name, _, path in (spec.rpartition("=") for spec in a.weights)]
    names = [name for name, _ in checkpoints]
    if len(set(names)) < len(names):
        ap.error(f"--weights: each checkpoint needs its own NAME, {names} repeats one")
    if a.against and a.against not in names:
        ap.error(f"--against {a.against}: not among the --weights names {names}")
    from raydseg.checks import weights_problem

    for problem in filter(None, (weights_problem(f"--weights {name}", path) for name, path in checkpoints)):
        ap.error(problem)
    from raydseg.config import load_config

    seeds = [int(s) for s in a.seeds.split(",") if s]
    out: dict = {"seeds": seeds, "checkpoints": {}}
    descriptors = a.descriptors.split(",")
    for name, path in checkpoints:
        ckpt = out["checkpoints"][name] = {"weights": path}
        for desc in descriptors:
            cfg = load_config(None, [f"features.descriptor={desc}"])
            rows = [quality.drive_knn(a.root, cfg, path, cfg.eval.knn_k, s) for s in seeds]
            gains = {f"{key}_gain": paired_gain(rows, key) for key in ("drive_knn", "drive_knn_std")}
            ckpt[desc] = {"rows": rows, **gains}
            print(name, desc, show(gains), flush=True)
    base = out["checkpoints"].get(a.against)
    for name, ckpt in out["checkpoints"].items():
        if base is None or name == a.against:
            continue
        for desc in descriptors:
            vs = ckpt[desc][f"vs_{a.against}"] = {
                key: summary([x - y for x, y in zip(ckpt[desc][key]["per_seed"], base[desc][key]["per_seed"])])
                for key in ("drive_knn_gain", "drive_knn_std_gain")}
            print(name, desc, f"vs {a.against}", show(vs))
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
