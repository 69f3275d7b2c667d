"""Tasks of the segmentation stages for the shared loop (raydseg.train.loop.fit): the teacher (Segmenter on the
sparse pseudo-labels) and the student (EMA teacher, soft targets, LiDAR-segment refinement), their validation
(mIoU against held-out pseudo-labels) and their export (`<out_dir>/model/`, overlays, the MLflow model artifact).

`teacher_loop_per_worker` / `student_loop_per_worker` are the Ray Train worker functions.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from raydseg.models.ema import EMA
from raydseg.models.segmenter import build_segmenter, resolve_model_cfg
from raydseg.train.engine import Task, lr_scheduler, make_optimizer, validate_segmenter
from raydseg.train.steps import DistillationStep, SegmentationStep


def _segmenter(config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    model_cfg = resolve_model_cfg(config["model_cfg"])
    model = build_segmenter(model_cfg, weights=config.get("encoder_weights", ""))
    if config.get("init_model"):
        from raydseg.models.io import load_model

        model.load_state_dict(load_model(config["init_model"]).state_dict())
    if config.get("init_encoder_from"):  # fine-tuning: a trained model's encoder under a new decoder / classes
        from raydseg.models.io import load_model

        model.encoder.load_state_dict(load_model(config["init_encoder_from"]).encoder.state_dict())
    return model, model_cfg


def _val_rows(config: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    if rank != 0 or config["val_every"] < 0:
        return []
    from raydseg.train.data import load_val_rows

    return load_val_rows(config["pl_dir"], config["val_fraction"], config["val_images"])


def _validator(config: dict[str, Any], model: nn.Module, rows: list[dict[str, Any]]):
    every = config["val_every"]

    def validate(done: int, final: bool) -> dict[str, float]:
        if rows and ((every > 0 and done % every == 0) or final):
            return validate_segmenter(model, rows, model.n_cls)
        return {}
    return validate


def _exporter(config: dict[str, Any], model_cfg: dict[str, Any], export_model: nn.Module,
              rows: list[dict[str, Any]]):
    """Final model, in-training predictions of the held-out images, overlays and the MLflow artifact (rank 0)."""

    def export(log: Any, last_loss: float) -> None:
        from raydseg import storage
        from raydseg.data.schema import encode_png
        from raydseg.models.infer import predict_image
        from raydseg.models.io import log_model_artifact, save_model
        from raydseg.predict import overlay

        out_dir = config["out_dir"]
        save_model(export_model, model_cfg, storage.join(out_dir, "model"))
        model = export_model.cpu().eval()
        with tempfile.TemporaryDirectory() as tmp:
            for i, r in enumerate(rows[:config["n_overlays"]]):
                pred = predict_image(model, r["image"])
                name = f"{i:03d}"
                storage.write_bytes(storage.join(out_dir, "val_images", name + ".png"), encode_png(r["image"]))
                storage.write_bytes(storage.join(out_dir, "val_predictions", name + ".png"),
                                    encode_png(pred.astype(np.uint8)))
                with open(os.path.join(tmp, name + ".png"), "wb") as f:
                    f.write(encode_png(overlay(r["image"], pred)))
            if rows:
                log.log_artifacts(tmp, "overlays")
        run = log.active_run()
        if run is not None:
            log_model_artifact(storage.join(out_dir, "model"), run.info.run_id)
            log.log_metric(f"{config['prefix']}final_loss", last_loss, step=config["steps"])
    return export


def _scheduler(config: dict[str, Any]):
    return lambda opt: lr_scheduler(opt, int(config["steps"]), config["schedule"], config["warmup_steps"])


def teacher_task(config: dict[str, Any], device: torch.device, rank: int) -> Task:
    """CE of a Segmenter on the sparse pseudo-labels; exports the trained model."""
    model, model_cfg = _segmenter(config)
    rows = _val_rows(config, rank)
    step_fn = SegmentationStep(model_cfg["mean"], model_cfg["std"], config.get("class_balance", 0.0))
    return Task(model=model, step_fn=step_fn,
                make_optimizer=lambda m: make_optimizer(m, config), make_scheduler=_scheduler(config),
                validate=_validator(config, model, rows), export=_exporter(config, model_cfg, model, rows))


def student_task(config: dict[str, Any], device: torch.device, rank: int) -> Task:
    """The student initialised from the teacher-stage model; its EMA (on) or a frozen copy (off) gives the targets.
    Exports the EMA teacher (`export: ema`, with EMA on) or the student."""
    model, model_cfg = _segmenter(config)
    ema = EMA(model)  # EMA on: updated from the student; off: a frozen copy of the initial teacher
    teacher = ema.module.to(device)
    rows = _val_rows(config, rank)
    use_ema = bool(config["ema"])
    momentum = float(config["ema_momentum"])
    exported = ema.module if (use_ema and config["export"] == "ema") else model
    return Task(model=model,
                step_fn=DistillationStep(teacher, model.n_cls, config, model_cfg["mean"], model_cfg["std"]),
                make_optimizer=lambda m: make_optimizer(m, config), make_scheduler=_scheduler(config), ema=ema,
                ema_momentum=(lambda step: momentum) if use_ema else None,
                validate=_validator(config, model, rows), export=_exporter(config, model_cfg, exported, rows))


def teacher_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function of the teacher stage."""
    from raydseg.train.loop import fit

    fit(config, teacher_task)


def student_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function of the student stage."""
    from raydseg.train.loop import fit

    fit(config, student_task)
