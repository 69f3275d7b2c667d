"""Stage `student`: EMA teacher-student distillation (soft targets, LiDAR-segment refinement) -> `student/model/`."""
from __future__ import annotations

from raydseg import storage
from raydseg.pipeline import StageContext, StageResult

NAME = "student"
INPUTS: tuple[str, ...] = ("cluster", "teacher")
CONFIG_SECTIONS = ("student",)


def run(ctx: StageContext) -> StageResult:
    from raydseg.train.student import train

    result = train(ctx.cfg, storage.join(ctx.stage_dir("cluster"), "pseudolabels"),
                   storage.join(ctx.stage_dir("teacher"), "model"), ctx.out_dir,
                   tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id,
                   name=f"{ctx.cfg.run.name}-student")
    m = result.metrics or {}
    metrics = {k: float(m[k]) for k in ("loss", "val_miou", "images_per_s") if k in m}
    return StageResult(counts={"steps": int(m.get("step", 0))}, metrics=metrics)
