"""Teacher training: Segmenter on the sparse pseudo-labels with Ray Train (`TorchTrainer`, DDP: gloo / NCCL).

`train(cfg, pl_dir, out_dir, ...)` builds the training feed (raydseg.train.data.train_feed), the trainer
(ScalingConfig, RunConfig under `<out_dir>/ray_train`, FailureConfig) and runs `teacher_loop_per_worker`
(raydseg.train.segmentation: the shared loop raydseg.train.loop.fit with the teacher's step function). Rerunning
with the same `out_dir` resumes from the last checkpoint. `run_trainer` is shared by every training stage.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from raydseg import storage
from raydseg.config import Config
from raydseg.stage_requests import train_worker_for

TRAIN_KEYS = ("steps", "batch_size", "micro_batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
              "warmup_steps", "amp", "deterministic", "checkpoint_every", "log_every", "val_fraction", "val_images",
              "val_every", "n_overlays", "torch_threads")


def n_pseudo_classes(cfg: Config) -> int:
    from raydseg.config import painted_classes

    return cfg.teacher.n_cls or painted_classes(cfg)


def model_cfg_from(cfg: Config) -> dict[str, Any]:
    """The teacher's Segmenter config; an encoder from a weights file or the hub normalises with the mean / std its
    weights were trained with."""
    from raydseg.features.backbone import weights_input_stats  # torch: not at this module's import

    t = cfg.teacher
    return {"backbone": t.backbone, "n_cls": n_pseudo_classes(cfg), "decoder": t.decoder, "n_layers": t.n_layers,
            "dropout": t.dropout, "drop_path": t.drop_path, "input_norm": t.input_norm,
            **weights_input_stats(encoder_weights(cfg), t.backbone)}


def encoder_weights(cfg: Config) -> str:
    if cfg.teacher.weights:
        return cfg.teacher.weights
    return cfg.features.weights if cfg.features.backbone == cfg.teacher.backbone else ""


def loop_config(section: Any, *, stage: str, model_cfg: dict, pl_dir: str, out_dir: str, seed: int,
                tracking_uri: str = "", mlflow_run_id: str = "", params: dict | None = None,
                callbacks: list | None = None, extra: dict | None = None) -> dict[str, Any]:
    """The plain dict handed to every worker (no Config object crosses the process boundary)."""
    c = {k: getattr(section, k) for k in TRAIN_KEYS}
    c.update(model_cfg=model_cfg, pl_dir=pl_dir, out_dir=out_dir, seed=seed, tracking_uri=tracking_uri,
             mlflow_run_id=mlflow_run_id, params=params or {}, callbacks=callbacks or [], prefix=f"{stage}/")
    c.update(extra or {})
    return c


def run_trainer(section: Any, config: dict[str, Any], out_dir: str, name: str,
                timeout_s: int = 1800, loop: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Fit a TorchTrainer running `loop` (default: the teacher's worker function) on `section`'s scaling
    (num_workers, use_gpu, cpus_per_worker, max_failures); returns the ray.train.Result (raises when training failed
    beyond max_failures)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = storage.filesystem(storage.join(out_dir, "ray_train"))
    if not storage.is_s3(out_dir):
        os.makedirs(path, exist_ok=True)
    run_config = ray.train.RunConfig(
        name=name, storage_path=path, storage_filesystem=fs if storage.is_s3(out_dir) else None,
        failure_config=ray.train.FailureConfig(max_failures=section.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    # PACK: workers share a multi-GPU node where they fit (NCCL over NVLink / PCIe), spill to others when not
    scaling = ray.train.ScalingConfig(num_workers=section.num_workers, use_gpu=section.use_gpu,
                                      resources_per_worker={k: v for k, v in train_worker_for(
                                          section, config["prefix"].rstrip("/")).resources.items() if k != "GPU"},
                                      placement_strategy="PACK")
    if loop is None:
        from raydseg.train.segmentation import teacher_loop_per_worker as loop
    trainer = TorchTrainer(loop, train_loop_config=config, scaling_config=scaling,
                           run_config=run_config,
                           torch_config=TorchConfig(backend="nccl" if section.use_gpu else "gloo",
                                                    timeout_s=timeout_s))
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def train(cfg: Config, pl_dir: str, out_dir: str, *, tracking_uri: str = "", mlflow_run_id: str = "",
          name: str = "teacher", callbacks: list | None = None, timeout_s: int = 1800) -> Any:
    """Train the teacher on `pl_dir` (cluster/pseudolabels); writes `<out_dir>/model/`; returns the Result."""
    from raydseg.train.data import train_feed

    t = cfg.teacher
    model_cfg = model_cfg_from(cfg)
    params = {f"teacher.{k}": v for k, v in t.model_dump().items()}
    params["teacher.n_cls_resolved"] = model_cfg["n_cls"]
    config = loop_config(t, stage="teacher", model_cfg=model_cfg, pl_dir=pl_dir, out_dir=out_dir, seed=cfg.run.seed,
                         tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id, params=params, callbacks=callbacks,
                         extra={"encoder_weights": encoder_weights(cfg), "class_balance": t.class_balance,
                                "feed": train_feed(pl_dir, t)})
    return run_trainer(t, config, out_dir, name, timeout_s)
