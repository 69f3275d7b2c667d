"""Unlabelled masked segment crops for DINO recipe runs: what the features stage feeds the ViT, without labels.

`python jobs/benchmarks/dino_segment_crops.py N_SEQ FRAMES_PER_SEQ OUT [CROP_PX] [MIN_PIXELS]` (e.g.
`24 6 /tmp/exp/s1`): LiDAR sweeps and day images of train-stream sequences 1000.. (the default run uses 0..3), the
proposals of the embedded default, and for every segment of >= MIN_PIXELS (64) pixels its tight crop with the
pixels outside the mask set to the ImageNet mean colour (zero after normalisation, as `masked_crops`), resized to
CROP_PX (112). OUT/images.npy (N, CROP_PX, CROP_PX, 3) uint8, read by dino_recipe.py; OUT/frames as dino_images.py
(the default run's 24 frames for the k-NN probe). No ground truth is read for the crops.
"""
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from raydseg.config import load_config
from raydseg.data.schema import decode_image, frames_to_table
from raydseg.data.sources import synthetic as S
from raydseg.geometry.proposals import camera_segments, frame_seed, sweep_segments
from raydseg.train.pretrain import segment_crops


def main(argv: list[str]) -> None:
    n_seq, per, out = int(argv[0]), int(argv[1]), argv[2]
    size = int(argv[3]) if len(argv) > 3 else 112
    min_pixels = int(argv[4]) if len(argv) > 4 else 64
    cfg = load_config("configs/default.yaml")
    sc = cfg.synthetic
    os.makedirs(f"{out}/frames", exist_ok=True)
    t0 = time.time()
    crops: list[np.ndarray] = []
    for i in range(n_seq):
        shard = {"sequence": f"pre{i:04d}", "seed": S._scene_seed(0, S._TRAIN_STREAM, 1000 + i), "condition": "day",
                 "index": 1000 + i, "frames": per}
        for frame in S.generate_sequence(shard, sc):
            pts = np.asarray(frame["points"], np.float32).reshape(-1, 4)
            sw = sweep_segments(pts, frame.get("ring"), cfg.proposals, seed=frame_seed(frame["frame_id"], 0))
            for cam in frame["cameras"]:
                seg = camera_segments(pts[:, :3], sw, cam["K"], cam["T_cam_lidar"], int(cam["width"]),
                                      int(cam["height"]), cfg.proposals)["segment_ids"]
                crops += list(segment_crops(decode_image(cam["image"]), seg, size, min_pixels)[1])
        print("sequence", i, "crops", len(crops), f"{time.time() - t0:.0f} s", flush=True)
    np.save(f"{out}/images.npy", np.stack(crops))
    rows = []
    for shard in S.list_shards(sc, 0):  # the probe: the default run's 4 training sequences (LiDAR + gt)
        rows += S.generate_sequence(shard, sc)
    pq.write_table(frames_to_table(rows), f"{out}/frames/part-00000.parquet")
    print("crops", len(crops), "frames", len(rows), f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
