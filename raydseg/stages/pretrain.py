"""Stage `pretrain`: DINO self-distillation or a masked autoencoder (`pretrain.objective`) of the ViT on the ingest
stage's camera images (Ray Train DDP)
-> `pretrain/backbone.safetensors` (timm layout; use it with --set features.weights=PATH teacher.weights=PATH).

Off in the default stage list (pretrain.enabled, or name it in run.stages).
"""
from __future__ import annotations

from raydseg import storage
from raydseg.pipeline import StageContext, StageResult

NAME = "pretrain"
INPUTS: tuple[str, ...] = ("ingest",)
CONFIG_SECTIONS = ("pretrain", "proposals")  # proposals: the LiDAR segments of the k-NN probe


def run(ctx: StageContext) -> StageResult:
    from raydseg.train.pretrain import CHECKPOINT, train

    result, before = train(ctx.cfg, storage.join(ctx.stage_dir("ingest"), "frames"), ctx.out_dir,
                           tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id,
                           name=f"{ctx.cfg.run.name}-pretrain")
    m = result.metrics or {}
    metrics = {k: float(m[k]) for k in ("loss", "teacher_entropy", "knn_acc", "knn_mean_class_acc", "images_per_s")
               if k in m}
    metrics.update({f"{k}_init": float(v) for k, v in before.items() if k in ("knn_acc", "knn_mean_class_acc")})
    path = storage.join(ctx.out_dir, CHECKPOINT)
    print(f"[pretrain] backbone checkpoint: {path}\n"
          f"[pretrain] use it with --set features.weights={path} --set teacher.weights={path}")
    return StageResult(counts={"steps": int(m.get("step", 0))}, metrics=metrics)
