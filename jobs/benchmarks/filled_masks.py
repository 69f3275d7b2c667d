"""Segment masks and pseudo-labels before / after filling, against the synthetic ground truth of one run's frames.

`python jobs/benchmarks/filled_masks.py --run outputs/default --out FILE.json [--variants 0:0,12:0,0:48,12:48]
[--set proposals.KEY=VALUE ...]`

For every variant `fill_gap_px:ground_fill_px[:sky_margin_deg]` (no third field: the sky off) the proposals of the
run's `ingest/frames` are recomputed (all other proposals settings from the run's config and --set) and painted with
the run's k-means assignments (`cluster/assignments`), so only the masks change. Per variant: segment-image
agreement with the ground-truth instances (`geometry.quality.image_agreement`), segment pixels per image,
pseudo-label coverage, the ground's share of the labels, its recall / precision against road + sidewalk + terrain,
the sky pseudo-class's recall / precision against the true sky (`raydseg.geometry.sky`), and the Hungarian mIoU /
pixel accuracy of the pseudo-labels on the pixels they cover. Writes one flat JSON object (`<variant>_<figure>`)
and prints a table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--run", required=True, help="a pipeline run directory with ingest and cluster outputs")
    p.add_argument("--variants", default="0:0,12:0,0:48,12:48")
    p.add_argument("--set", action="append", default=[], help="proposals.key=value, for every variant")
    args = p.parse_args(argv)

    from raydseg import storage
    from raydseg.clustering.pseudolabels import paint_labels
    from raydseg.config import ground_pseudo_classes, load_config, painted_classes, sky_pseudo_class
    from raydseg.data.schema import decode_image, table_to_frames
    from raydseg.eval.matching import covered_scores
    from raydseg.geometry import quality
    from raydseg.geometry.proposals import camera_segments, frame_seed, sweep_segments

    run_cfg = load_config(os.path.join(args.run, "config.yaml"), args.set)
    if ground_pseudo_classes(run_cfg) > 1:
        raise SystemExit(f"--run {args.run}: repainting the ground patches' classes (cluster.ground_k > 1) is not "
                         "supported")
    frames = []
    for path in sorted(glob.glob(os.path.join(args.run, "ingest", "frames", "part-*.parquet"))):
        frames += table_to_frames(storage.read_table(path))
    assign: dict = {}
    for path in sorted(glob.glob(os.path.join(args.run, "cluster", "assignments", "part-*.parquet"))):
        for r in storage.read_table(path).to_pylist():
            assign.setdefault((r["frame_id"], r["camera"]), {})[r["segment_id"]] = r["pseudo_class"]
    flat: dict = {"frames": len(frames)}
    for variant in args.variants.split(","):
        gap, ground_gap, *sky_margin = variant.split(":")
        gap, ground_gap, sky_margin = int(gap), int(ground_gap), float(sky_margin[0]) if sky_margin else -1.0
        cfg = run_cfg.proposals.model_copy(update=dict(fill_gap_px=gap, ground_fill_px=ground_gap,
                                                       sky_margin_deg=sky_margin))
        with_cfg = run_cfg.model_copy(update={"proposals": cfg})
        n_cls, sky = painted_classes(with_cfg), sky_pseudo_class(with_cfg)
        agree, n_seg_px, labels, gts = 0.0, 0, [], []
        for f in frames:
            pts = np.asarray(f["points"], np.float32).reshape(-1, 4)
            sw = sweep_segments(pts, f.get("ring"), cfg, seed=frame_seed(f["frame_id"], run_cfg.run.seed))
            for cam in f["cameras"]:
                out = camera_segments(pts[:, :3], sw, cam["K"], cam["T_cam_lidar"], cam["width"], cam["height"], cfg)
                a, n = quality.image_agreement(out["segment_ids"], decode_image(cam["gt_instance"]))
                agree, n_seg_px = agree + a * n, n_seg_px + n
                m = assign.get((f["frame_id"], cam["name"]), {})
                labels.append(paint_labels(out["segment_ids"], np.array(list(m), np.int64),
                                           np.array(list(m.values()), np.int64), out["ground_px"],
                                           0 if run_cfg.cluster.ground_class else None, sky))
                gts.append(decode_image(cam["gt_semantic"]))
        lab, gt = np.stack(labels), np.stack(gts)
        sc = covered_scores(lab, gt, n_cls)
        ground_gt, ground = np.isin(gt, quality.GROUND_TRAIN_IDS), lab == 0
        key = f"fill{gap}_ground{ground_gap}" + (f"_sky{sky_margin:g}" if sky is not None else "")
        flat.update({f"{key}_agreement": agree / max(n_seg_px, 1), f"{key}_segment_px_frac": n_seg_px / lab.size,
                     f"{key}_coverage": sc["coverage"],
                     f"{key}_ground_share": float(ground.sum() / max((lab != 255).sum(), 1)),
                     f"{key}_ground_recall": float((ground & ground_gt).sum() / max(ground_gt.sum(), 1)),
                     f"{key}_ground_precision": float((ground & ground_gt).sum() / max(ground.sum(), 1)),
                     f"{key}_pl_miou_covered": 100 * sc["miou"], f"{key}_pl_pixel_acc_covered": 100 * sc["pixel_acc"]})
        if sky is not None:
            sky_gt, sky_lab = gt == quality.SKY_TRAIN_ID, lab == sky
            hit = (sky_lab & sky_gt).sum()
            flat.update({f"{key}_sky_recall": float(hit / max(sky_gt.sum(), 1)),
                         f"{key}_sky_precision": float(hit / max((sky_lab & (gt != 255)).sum(), 1)),
                         f"{key}_sky_share": float(sky_lab.sum() / max((lab != 255).sum(), 1))})
        print(f"{key:18s} agreement {flat[f'{key}_agreement']:.3f} coverage {flat[f'{key}_coverage']:.3f} "
              f"ground share {flat[f'{key}_ground_share']:.3f} recall {flat[f'{key}_ground_recall']:.3f} "
              f"mIoU {flat[f'{key}_pl_miou_covered']:.1f}", flush=True)
    with open(args.out, "w") as fh:
        json.dump(flat, fh, indent=1)
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
