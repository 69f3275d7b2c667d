"""Student training (cross-modal distillation): student initialised from the teacher-stage model, EMA teacher
(`m * teacher + (1 - m) * student` after every step, on every rank), soft targets with temperature or hard argmax
targets, LiDAR-segment refinement of the teacher's predictions. Each ingredient is a StudentConfig switch
(ema, soft_targets, refine), logged as MLflow params. Same Ray Train machinery as the teacher."""
from __future__ import annotations

from typing import Any

from raydseg import storage
from raydseg.config import Config
from raydseg.train.teacher import loop_config, run_trainer

STUDENT_KEYS = ("ema", "ema_momentum", "soft_targets", "temperature", "refine", "refine_vote", "mix", "class_balance",
                "export")


def train(cfg: Config, pl_dir: str, teacher_model_dir: str, out_dir: str, *, tracking_uri: str = "",
          mlflow_run_id: str = "", name: str = "student", callbacks: list | None = None, timeout_s: int = 1800) -> Any:
    """Distil the teacher at `teacher_model_dir` into a student on the images of `pl_dir`; writes `<out_dir>/model/`."""
    from raydseg.train.data import train_feed

    s = cfg.student
    model_cfg = storage.read_json(storage.join(teacher_model_dir, "model_config.json"))
    params = {f"student.{k}": v for k, v in s.model_dump().items()}
    config = loop_config(s, stage="student", model_cfg=model_cfg, pl_dir=pl_dir, out_dir=out_dir, seed=cfg.run.seed,
                         tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id, params=params, callbacks=callbacks,
                         extra={**{k: getattr(s, k) for k in STUDENT_KEYS}, "init_model": teacher_model_dir,
                                "feed": train_feed(pl_dir, s, with_segments=s.refine)})
    from raydseg.train.segmentation import student_loop_per_worker

    return run_trainer(s, config, out_dir, name, timeout_s, loop=student_loop_per_worker)
