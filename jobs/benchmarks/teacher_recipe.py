"""Teacher recipe on one run's data, in process (plain torch, no Ray): what a recipe reaches in a step budget.

`python jobs/benchmarks/teacher_recipe.py --run outputs/default --out FILE.json [--target label|gt|segment_gt]
[--proposals fill_gap_px=12,ground_fill_px=48] [--set teacher.KEY=VALUE ...] [--eval-images 24]`

Trains a Segmenter on the run's camera images (`cluster/pseudolabels`): `--target label` on its pseudo-labels
(frames of the validation hash held out, as in the teacher stage) or `--target gt` on the ground truth (the
**oracle**: the same architecture and step budget on dense true labels, 19 classes) or `--target segment_gt` on
the pseudo-labels that perfect descriptors and clustering would give (`segment_truth`: the same pixels, each segment
its majority true class; the **clustering oracle**), in the teacher stage's precision (`teacher.amp`). With
`--proposals`, the segment images are recomputed from `ingest/frames` with those proposals settings and painted
with the run's k-means assignments (`cluster/assignments`), so only the masks change. The model is scored on the
synthetic eval splits (day, night, fog; `--eval-images` per condition, rendered with the eval seed stream) with the
Hungarian mapping fitted on day, as the evaluate stage does. Writes one flat JSON object and prints it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np


def segment_truth(label: np.ndarray, segments: np.ndarray, gt: np.ndarray, n_ground: int = 1) -> np.ndarray:
    """The pseudo-labels a perfect descriptor and clustering would give: each segment's pixels carry the majority
    ground-truth class of the segment, the ground's pixels (pseudo-class 0 outside segments, `cluster.ground_class`)
    road (0), as both released Hungarian mappings send ground; the rest stays 255. (H, W) uint8 in the 19 classes.
    n_ground: the ground's pseudo-classes (0..n_ground-1, `config.ground_pseudo_classes`)."""
    out = np.full(label.shape, 255, np.uint8)
    out[(label < n_ground) & (segments == 0)] = 0
    valid = (segments > 0) & (gt != 255)
    seg, cls = segments[valid].astype(np.int64), gt[valid].astype(np.int64)
    counts = np.zeros((int(segments.max()) + 1, 19), np.int64)
    np.add.at(counts, (seg, cls), 1)
    majority = np.where(counts.sum(1) > 0, counts.argmax(1), 255).astype(np.uint8)
    inside = (segments > 0) & (label != 255)
    out[inside] = majority[segments[inside]]
    return out


def oracle_extras(target: np.ndarray, label: np.ndarray, segments: np.ndarray, gt: np.ndarray,
                  elevation: np.ndarray | None, fov_up_deg: float, extras: set[str], n_ground: int = 1) -> np.ndarray:
    """`segment_truth` with what the pseudo-labels lack, given perfectly: "ground" (the ground's pixels carry their
    true class, road / sidewalk / terrain, instead of road) and "sky" (true sky pixels within the LiDAR's vertical
    field of view, `elevation` (degrees) <= fov_up_deg, labelled sky: a perfect detector of rays without a return)."""
    from raydseg.geometry.quality import SKY_TRAIN_ID

    out = target.copy()
    if "ground" in extras:
        ground = (label < n_ground) & (segments == 0)
        out[ground] = gt[ground]
    if "sky" in extras:
        sky = (gt == SKY_TRAIN_ID) & (elevation <= fov_up_deg) & (out == 255)
        out[sky] = SKY_TRAIN_ID
    return out


def load_rows(run: str, proposals: dict, extras: frozenset = frozenset()) -> list[dict]:
    """Training rows {frame_id, image, label, gt[, segment_gt]} of a run (pseudo-labels as stored, with their
    `segment_truth`; or repainted with new masks)."""
    from raydseg import storage
    from raydseg.clustering.pseudolabels import paint_labels
    from raydseg.config import ground_pseudo_classes, load_config, sky_pseudo_class
    from raydseg.data.schema import decode_image, table_to_frames
    from raydseg.geometry.proposals import camera_segments, frame_seed, sweep_segments
    from raydseg.geometry.sky import camera_elevation

    rows = []
    run_cfg = load_config(os.path.join(run, "config.yaml"))
    n_ground = ground_pseudo_classes(run_cfg)
    if not proposals:
        elevation, fov_up = {}, run_cfg.synthetic.fov_up_deg
        if "sky" in extras:
            for p in sorted(glob.glob(os.path.join(run, "ingest", "frames", "part-*.parquet"))):
                for f in table_to_frames(storage.read_table(p)):
                    for cam in f["cameras"]:
                        elevation[(f["frame_id"], cam["name"])] = np.degrees(camera_elevation(
                            np.asarray(cam["K"]), np.asarray(cam["T_cam_lidar"]), cam["width"], cam["height"]))
        for p in sorted(glob.glob(os.path.join(run, "cluster", "pseudolabels", "part-*.parquet"))):
            d = storage.read_table(p).to_pydict()
            for i, fid in enumerate(d["frame_id"]):
                label, gt = decode_image(d["label"][i]), decode_image(d["gt_semantic"][i])
                segments = decode_image(d["segment_ids"][i])
                target = segment_truth(label, segments, gt, n_ground)
                if extras:
                    target = oracle_extras(target, label, segments, gt, elevation.get((fid, d["camera"][i])),
                                           fov_up, extras, n_ground)
                rows.append({"frame_id": fid, "image": decode_image(d["image"][i]), "label": label, "gt": gt,
                             "segment_gt": target})
        return rows
    if n_ground > 1:
        raise SystemExit("--proposals: repainting the ground patches' classes (cluster.ground_k > 1) is not supported")
    cfg = run_cfg.proposals.model_copy(update=proposals)
    sky = sky_pseudo_class(run_cfg.model_copy(update={"proposals": cfg}))
    assign: dict = {}
    for p in sorted(glob.glob(os.path.join(run, "cluster", "assignments", "part-*.parquet"))):
        for r in storage.read_table(p).to_pylist():
            assign.setdefault((r["frame_id"], r["camera"]), {})[r["segment_id"]] = r["pseudo_class"]
    for p in sorted(glob.glob(os.path.join(run, "ingest", "frames", "part-*.parquet"))):
        for f in table_to_frames(storage.read_table(p)):
            pts = np.asarray(f["points"], np.float32).reshape(-1, 4)
            sw = sweep_segments(pts, f.get("ring"), cfg, seed=frame_seed(f["frame_id"], run_cfg.run.seed))
            for cam in f["cameras"]:
                out = camera_segments(pts[:, :3], sw, cam["K"], cam["T_cam_lidar"], cam["width"], cam["height"], cfg)
                m = assign.get((f["frame_id"], cam["name"]), {})
                lab = paint_labels(out["segment_ids"], np.array(list(m), np.int64),
                                   np.array(list(m.values()), np.int64), out["ground_px"], 0 if n_ground else None,
                                   sky)
                rows.append({"frame_id": f["frame_id"], "image": decode_image(cam["image"]), "label": lab,
                             "gt": decode_image(cam["gt_semantic"])})
    return rows


def recipe_scores(confs: dict[str, np.ndarray]) -> dict[str, float]:
    """`<condition>_miou` / `_pixel_acc` (points) from (n_cls, 19) confusions, mapped by the Hungarian matching of
    day, as the evaluate stage scores; `day_pred_class0_share` is the day pixels predicted as class 0."""
    from raydseg.eval.matching import hungarian_mapping
    from raydseg.eval.metrics import apply_mapping, scores

    mapping = hungarian_mapping(confs["day"])
    out = {}
    for name, c in confs.items():
        sc = scores(apply_mapping(c, mapping))
        out[f"{name}_miou"] = 100 * sc["miou"]
        out[f"{name}_pixel_acc"] = 100 * sc["pixel_acc"]
    out["day_pred_class0_share"] = float(confs["day"][0].sum() / confs["day"].sum())
    return out


def target_quality(rows: list[dict], target: str, n_cls: int) -> dict[str, float]:
    """How good the training target is where it labels pixels: its Hungarian mIoU / pixel accuracy (points) against
    the ground truth on the pixels it covers (`covered_scores`, as quality.py scores the pseudo-labels)."""
    from raydseg.eval.matching import covered_scores

    sc = covered_scores(np.stack([r[target] for r in rows]), np.stack([r["gt"] for r in rows]), n_cls)
    return {"target_miou_covered": 100 * sc["miou"], "target_pixel_acc_covered": 100 * sc["pixel_acc"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--run", required=True, help="a pipeline run directory with ingest and cluster outputs")
    p.add_argument("--target", choices=["label", "gt", "segment_gt"], default="label")
    p.add_argument("--config", default=None, help="config file (default: the embedded default)")
    p.add_argument("--proposals", default="", help="KEY=VALUE,... proposals settings to recompute the masks with")
    p.add_argument("--set", action="append", default=[], help="teacher.KEY=VALUE (recipe overrides)")
    p.add_argument("--eval-images", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle-extras", default="", help="with --target segment_gt: ground,sky given perfectly "
                                                       "(oracle_extras)")
    args = p.parse_args(argv)
    extras = frozenset(e for e in args.oracle_extras.split(",") if e)
    if args.proposals and args.target == "segment_gt":
        p.error("--target segment_gt needs the stored segment images: drop --proposals")
    if extras and (args.target != "segment_gt" or not extras <= {"ground", "sky"}):
        p.error("--oracle-extras takes ground and / or sky, with --target segment_gt")

    import torch

    from raydseg.config import load_config, painted_classes
    from raydseg.data.sources.synthetic import render_eval_images
    from raydseg.eval.metrics import confusion_matrix
    from raydseg.models.infer import predict_image
    from raydseg.models.losses import ce_loss
    from raydseg.models.segmenter import build_segmenter, normalize
    from raydseg.train.data import augment_example, degraded_view, is_val
    from raydseg.train.engine import lr_scheduler, make_optimizer
    from raydseg.train.precision import use_bf16
    from raydseg.train.teacher import encoder_weights, model_cfg_from

    cfg = load_config(args.config, overrides=args.set)
    t = cfg.teacher
    proposals = {k: float(v) if "." in v else int(v)
                 for k, v in (kv.split("=") for kv in args.proposals.split(",") if kv)}
    rows = load_rows(args.run, proposals, extras)
    painted = painted_classes(cfg.model_copy(update={"proposals": cfg.proposals.model_copy(update=proposals)}))
    n_cls = (t.n_cls or painted) if args.target == "label" else 19
    if args.target != "gt":
        rows = [r for r in rows if not is_val(r["frame_id"], t.val_fraction)]
    labelled = np.stack([r[args.target] for r in rows])
    syn = cfg.synthetic.model_copy(update=dict(eval_images_per_condition=args.eval_images))
    sets = {c: [(rgb, sem) for *_, rgb, sem in render_eval_images(c, syn, args.seed)] for c in ("day", "night", "fog")}

    torch.set_num_threads(max(1, t.torch_threads))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_segmenter({**model_cfg_from(cfg), "n_cls": n_cls}, encoder_weights(cfg))
    opt = make_optimizer(model, t.model_dump())
    sched = lr_scheduler(opt, t.steps, t.schedule, t.warmup_steps)
    bf16 = use_bf16(t.amp, "cpu")
    losses, t0 = [], time.time()
    model.train()
    for _ in range(t.steps):
        views = [augment_example(rows[i]["image"], rows[i][args.target], None, rng, t.crop_size,
                                 (t.scale_min, t.scale_max), t.flip, t.jitter)
                 for i in rng.integers(0, len(rows), t.batch_size)]
        x = normalize(torch.from_numpy(np.stack([degraded_view(v[0], rng, t.degrade, t.lowlight) for v in views])))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the teacher stage's precision
            loss = ce_loss(model(x), torch.from_numpy(np.stack([v[1] for v in views])), balance=t.class_balance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_s = time.time() - t0
    model.eval()
    confs = {}
    for name, ims in sets.items():
        confs[name] = sum(confusion_matrix(predict_image(model, rgb), sem, n_cls, 19) for rgb, sem in ims)
    out: dict = {"target": args.target, "oracle_extras": args.oracle_extras, "proposals": args.proposals,
                 "overrides": " ".join(args.set),
                 "steps": t.steps, "autocast_bf16": bf16, "train_s": train_s, "loss_first5": float(np.mean(losses[:5])),
                 "loss_last5": float(np.mean(losses[-5:])),
                 **target_quality(rows, args.target, n_cls), "label_coverage": float((labelled != 255).mean()),
                 "ground_share_of_labelled": float((labelled == 0).sum() / max((labelled != 255).sum(), 1))}
    out.update(recipe_scores(confs))
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
