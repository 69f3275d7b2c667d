"""Stage `pretrain`: DINO self-distillation or a masked autoencoder (`pretrain.objective`) of the ViT (Ray Train DDP)
on the ingest stage's camera images, or (`pretrain.inputs: segment_crops`) on the masked crops of their LiDAR
segments, written first to `pretrain/segment_crops/` part by part (Ray tasks; a rerun resumes)
-> `pretrain/backbone.safetensors` (timm layout; use it with --set features.weights=PATH teacher.weights=PATH).

Off in the default stage list (pretrain.enabled, or name it in run.stages).
"""
from __future__ import annotations

import functools

from raydseg import storage
from raydseg.parts import map_parts
from raydseg.pipeline import StageContext, StageResult

NAME = "pretrain"
INPUTS: tuple[str, ...] = ("ingest",)
CONFIG_SECTIONS = ("pretrain", "proposals")  # proposals: the LiDAR segments of the k-NN probe


def run(ctx: StageContext) -> StageResult:
    from raydseg.train.pretrain import CHECKPOINT, SEGMENT_CROPS, segment_crop_part, train

    p, frames = ctx.cfg.pretrain, storage.join(ctx.stage_dir("ingest"), "frames")
    counts: dict[str, int] = {}
    rejects: list[dict] = []
    if p.inputs == "segment_crops":  # written once; a rerun resumes by part (raydseg.parts)
        fn = functools.partial(segment_crop_part, proposals=ctx.cfg.to_dict()["proposals"], size=p.global_crop_size,
                               min_pixels=p.segment_min_pixels, seed=ctx.cfg.run.seed)
        res = map_parts(frames, ctx.out_dir, fn, num_cpus=1)
        counts["segment_crops"] = res.counts.get(f"rows_out_{SEGMENT_CROPS}", 0)
        if not counts["segment_crops"]:
            raise RuntimeError(f"pretrain.inputs segment_crops: no segment of >= {p.segment_min_pixels} pixels in "
                               f"{frames} ({len(res.rejects)} rejects)")
        rejects = res.rejects
    result, before = train(ctx.cfg, frames, ctx.out_dir, crops_dir=storage.join(ctx.out_dir, SEGMENT_CROPS),
                           tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id,
                           name=f"{ctx.cfg.run.name}-pretrain")
    m = result.metrics or {}
    metrics = {k: float(m[k]) for k in ("loss", "teacher_entropy", "knn_acc", "knn_mean_class_acc", "images_per_s")
               if k in m}
    metrics.update({f"{k}_init": float(v) for k, v in before.items() if k in ("knn_acc", "knn_mean_class_acc")})
    path = storage.join(ctx.out_dir, CHECKPOINT)
    print(f"[pretrain] backbone checkpoint: {path}\n"
          f"[pretrain] use it with --set features.weights={path} --set teacher.weights={path}")
    return StageResult(counts={"steps": int(m.get("step", 0)), **counts}, metrics=metrics, rejects=rejects)
