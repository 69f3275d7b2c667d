"""Unlabelled synthetic camera images for DINO recipe runs, and the k-NN probe, without Ray.

`python jobs/benchmarks/dino_images.py N_SEQ FRAMES_PER_SEQ CONDITIONS OUT [--scale S --jpeg Q --procs P]`
(e.g. `24 8 day /tmp/exp/d1`): images of train-stream sequences 1000.. (the default run uses 0..3), frames 3x the
default spacing apart, sequence i rendered in condition CONDITIONS[i % len]:
- OUT/images.npy (N, H, W, 3) uint8; with `--jpeg Q` instead OUT/images.bin (the JPEG files, quality Q, one after
  the other) + OUT/offsets.npy (N + 1,) int64 byte offsets: what a device machine gets (read by `read_images`);
- `--scale S` resizes each image by S (antialiased) first;
- OUT/frames/part-00000.parquet: the default run's 24 training frames (LiDAR + ground truth), and OUT/probe.pt: the
  k-NN probe built from them (raydseg.train.pretrain.build_knn_probe, 16 frames, seed 0), loadable without Ray.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from multiprocessing import Pool
from typing import Any

import numpy as np


def render(args: tuple[int, str, int, Any]) -> list[np.ndarray]:
    """The camera images of train-stream sequence 1000 + i in condition `cond` ((H, W, 3) uint8 each); `sc`: the
    embedded default's `synthetic` section."""
    from raydseg.data.sources import synthetic as S

    i, cond, per, sc = args
    dt_s = 3 * sc.frame_interval_us * 1e-6  # 3x the default frame spacing: more varied images per sequence
    seed = S._scene_seed(0, S._TRAIN_STREAM, 1000 + i)  # indices the default run (0..3) never uses
    rig = S._Rig(seed, per, sc.ego_speed_mps * dt_s, dt_s, sc)
    return [rig.camera(k, cond, np.random.default_rng([seed, k]), sc.width, sc.height)[1] for k in range(per)]


def encode(image: np.ndarray, scale: float, quality: int) -> bytes:
    from PIL import Image

    im = Image.fromarray(image)
    if scale != 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_images(folder: str) -> list[bytes]:
    """The encoded images of OUT/images.bin + OUT/offsets.npy, one bytes object each."""
    offsets = np.load(os.path.join(folder, "offsets.npy"))
    with open(os.path.join(folder, "images.bin"), "rb") as f:
        data = f.read()
    return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n_seq", type=int)
    p.add_argument("per", type=int)
    p.add_argument("conditions")
    p.add_argument("out")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--jpeg", type=int, default=0, help="JPEG quality (0: raw images.npy)")
    p.add_argument("--procs", type=int, default=1)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    conds = a.conditions.split(",")
    t0 = time.time()
    from raydseg.config import load_config

    cfg = load_config("configs/default.yaml")
    with Pool(a.procs) as pool:
        imgs = [im for seq in pool.map(render, [(i, conds[i % len(conds)], a.per, cfg.synthetic)
                                                for i in range(a.n_seq)]) for im in seq]
    if a.jpeg:
        blobs = [encode(im, a.scale, a.jpeg) for im in imgs]
        np.save(f"{a.out}/offsets.npy", np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64))
        with open(f"{a.out}/images.bin", "wb") as f:
            f.write(b"".join(blobs))
    else:
        np.save(f"{a.out}/images.npy", np.stack(imgs))
    print("images", len(imgs), f"{time.time() - t0:.0f} s", flush=True)

    import pyarrow.parquet as pq
    import torch

    from raydseg.data.schema import frames_to_table
    from raydseg.data.sources import synthetic as S
    from raydseg.train.pretrain import build_knn_probe

    rows = []  # probe frames: the default run's 4 training sequences (with LiDAR + gt)
    for shard in S.list_shards(cfg.synthetic, 0):
        rows += S.generate_sequence(shard, cfg.synthetic)
    os.makedirs(f"{a.out}/frames", exist_ok=True)
    pq.write_table(frames_to_table(rows), f"{a.out}/frames/part-00000.parquet")
    probe = build_knn_probe(f"{a.out}/frames", cfg.proposals, 16, 0)
    if all(int(s.max()) < 2 ** 15 for s in probe["segment_ids"]):  # half the bytes to carry to a device machine
        probe["segment_ids"] = [s.to(torch.int16) for s in probe["segment_ids"]]
    torch.save(probe, f"{a.out}/probe.pt")
    print("frames", len(rows), "probe segments", len(probe["seg_id"]), f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
