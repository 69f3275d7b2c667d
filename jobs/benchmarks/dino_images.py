"""Unlabelled synthetic camera images for DINO recipe runs, and the k-NN probe's frames, without Ray.

`python jobs/benchmarks/dino_images.py N_SEQ FRAMES_PER_SEQ CONDITIONS OUT` (e.g. `24 8 day /tmp/exp/d1`):
OUT/images.npy (N, H, W, 3) uint8 from train-stream sequences 1000.. (the default run uses 0..3), frames 3x the
default spacing apart; OUT/frames/part-00000.parquet: the default run's 24 training frames (LiDAR + ground truth).
"""
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from raydseg.config import load_config
from raydseg.data.schema import frames_to_table
from raydseg.data.sources import synthetic as S

cfg = load_config("configs/default.yaml")
sc = cfg.synthetic
n_seq, per = int(sys.argv[1]), int(sys.argv[2])
conds = sys.argv[3].split(",")
out = sys.argv[4]
os.makedirs(out, exist_ok=True)
dt_s = 3 * sc.frame_interval_us * 1e-6  # 3x the default frame spacing: more varied images per sequence
t0 = time.time()
imgs = []
for i in range(n_seq):
    cond = conds[i % len(conds)]
    seed = S._scene_seed(0, S._TRAIN_STREAM, 1000 + i)  # indices the default run (0..3) never uses
    rig = S._Rig(seed, per, sc.ego_speed_mps * dt_s, dt_s, sc)
    for k in range(per):
        rng = np.random.default_rng([seed, k])
        _, rgb, _, _ = rig.camera(k, cond, rng, sc.width, sc.height)
        imgs.append(rgb)
np.save(f"{out}/images.npy", np.stack(imgs))
print("images", len(imgs), time.time() - t0)
# probe frames: the default run's 4 training sequences (with LiDAR + gt)
rows = []
for shard in S.list_shards(sc, 0):
    rows += S.generate_sequence(shard, sc)
os.makedirs(f"{out}/frames", exist_ok=True)
pq.write_table(frames_to_table(rows), f"{out}/frames/part-00000.parquet")
print("frames", len(rows), time.time() - t0)
