"""One DINO recipe run without Ray (raydseg.train.pretrain.pretrain_local, the stage's task and schedules).

`THREADS=1 python jobs/benchmarks/dino_recipe.py DATA OUT [pretrain_key=value ...]`: DATA from dino_images.py;
each key=value is `--set pretrain.key=value` of the embedded default; logs loss / teacher entropy / k-NN accuracy
of the probe's LiDAR segments; writes OUT/history.json and the backbone OUT/backbone.safetensors.
"""
import json
import os
import sys
import time

import numpy as np
import torch

from raydseg.cli import guarded
from raydseg.config import load_config
from raydseg.train.pretrain import build_knn_probe, pretrain_local


def main(argv: list[str]) -> None:
    data, out = argv[0], argv[1]
    cfg = load_config("configs/default.yaml", [f"pretrain.{kv}" for kv in argv[2:]])
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    p = cfg.pretrain.model_dump()
    p.update(seed=0, out_dir=out)
    imgs = list(np.load(f"{data}/images.npy"))
    t0 = time.time()
    probe = build_knn_probe(f"{data}/frames", cfg.proposals, 16, 0)
    print("probe", len(probe["seg_id"]), time.time() - t0, flush=True)
    os.makedirs(out, exist_ok=True)
    hist = pretrain_local(p, imgs, "cpu", probe=probe, log=lambda s: print(s, flush=True))
    with open(f"{out}/history.json", "w") as f:
        json.dump({"config": p, "history": hist}, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(guarded(main)(sys.argv[1:]))
