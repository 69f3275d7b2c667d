"""A run's teacher and student on N one-image eval scenes per condition, with the bootstrap standard error at 32 and N.

`python jobs/benchmarks/eval_split_se.py --out se.json --n 64 RUN [RUN ...]`: each run (a `quality.py` run folder
q<S>; its seed is the trailing digit) keeps its models and its evaluate stage's Hungarian mapping; the scenes are the
first N of the run's own eval stream (`synthetic.eval_images_per_scene` 1), so the first 32 reproduce a 32-scene
run's figures. Writes {"RUN/model/condition/M": {miou, se} points} for M = 32 and N (500 resamples of the images).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from quality import CONDITIONS, bootstrap_std, rendered_confusions, run_models
from raydseg.config import load_config
from raydseg.eval.metrics import scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("runs", nargs="+")
    a = p.parse_args()
    out = {}
    for run in a.runs:
        seed = int(run.rstrip("/")[-1])
        syn = load_config(os.path.join(run, "config.yaml")).synthetic.model_copy(
            update=dict(eval_images_per_condition=a.n, eval_images_per_scene=1))
        nets = run_models(run, ["teacher", "student"])
        for c in CONDITIONS:
            for model, per in rendered_confusions(nets, syn, c, seed).items():
                rng = np.random.default_rng(0)
                for m in (32, a.n):
                    out[f"{run}/{model}/{c}/{m}"] = {"miou": 100 * scores(per[:m].sum(0))["miou"],
                                                     "se": bootstrap_std(per[:m], 500, rng)}
                print(run, model, c, out[f"{run}/{model}/{c}/{a.n}"], flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
