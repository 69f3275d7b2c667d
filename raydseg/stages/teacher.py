"""Stage `teacher`: Segmenter trained with Ray Train on the sparse pseudo-labels -> `teacher/model/`."""
from __future__ import annotations

from raydseg import storage
from raydseg.pipeline import StageContext, StageResult

NAME = "teacher"
INPUTS: tuple[str, ...] = ("cluster",)
CONFIG_SECTIONS = ("teacher", "features", "cluster")


def run(ctx: StageContext) -> StageResult:
    from raydseg.train.teacher import train

    result = train(ctx.cfg, storage.join(ctx.stage_dir("cluster"), "pseudolabels"), ctx.out_dir,
                   tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id,
                   name=f"{ctx.cfg.run.name}-teacher")
    m = result.metrics or {}
    metrics = {k: float(m[k]) for k in ("loss", "val_miou", "images_per_s") if k in m}
    return StageResult(counts={"steps": int(m.get("step", 0))}, metrics=metrics)
