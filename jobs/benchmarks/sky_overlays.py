"""Where the sky from rays without a return (`proposals.sky_margin_deg`) lands on real frames, which have no
per-pixel truth here: overlays and per-frame figures for a look.

`python jobs/benchmarks/sky_overlays.py --source kitti --root DIR --out OUT [--set proposals.sky_margin_deg=2.0]`
reads the frames with the source's reader, computes every camera's proposals with the sky on, and writes
OUT/<frame>.png (the sky in magenta over the image) and OUT/sky_overlays.json: the sweep's top-beam elevation (deg),
the sky's pixel count and its rows (min / median / max).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="a reader of raydseg.data.sources: kitti, nuscenes, waymo")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], help="section.key=value")
    args = p.parse_args(argv)

    import importlib

    from raydseg.config import load_config
    from raydseg.data.schema import decode_image, encode_png
    from raydseg.geometry.project import SKY_PX
    from raydseg.geometry.proposals import camera_segments, sweep_segments

    cfg = load_config(overrides=[f"data.source={args.source}", f"data.root={args.root}",
                                 "proposals.sky_margin_deg=2.0", *args.set])
    reader = importlib.import_module(f"raydseg.data.sources.{args.source}")
    os.makedirs(args.out, exist_ok=True)
    out = {}
    for shard in reader.list_shards(cfg):
        for r in reader.read_shard(shard, cfg)[0]:
            pts = np.asarray(r["points"], np.float32).reshape(-1, 4)
            sw = sweep_segments(pts, r.get("ring"), cfg.proposals)
            for cam in r["cameras"]:
                seg = camera_segments(pts[:, :3], sw, cam["K"], cam["T_cam_lidar"], cam["width"], cam["height"],
                                      cfg.proposals, cam.get("distortion"), cam.get("rolling_shutter"))
                sky = seg["ground_px"] == SKY_PX
                rows = np.nonzero(sky)[0]
                name = f"{r['frame_id']}_{cam['name']}".replace("/", "_")
                out[name] = {"top_beam_deg": float(np.degrees(sw.top_beam)), "sky_px": int(sky.sum()),
                             "height": int(cam["height"]),
                             "sky_rows": [int(rows.min()), int(np.median(rows)), int(rows.max())] if len(rows) else []}
                img = decode_image(cam["image"]).copy()
                img[sky] = (0.3 * img[sky] + 0.7 * np.array([255, 0, 255])).astype(np.uint8)
                with open(os.path.join(args.out, f"{name}.png"), "wb") as f:
                    f.write(encode_png(img))
    with open(os.path.join(args.out, "sky_overlays.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
