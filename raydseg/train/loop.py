"""The Ray Train loop shared by the teacher and student stages (`train_loop_per_worker(config)`).

Per step: `accum` micro-batches per worker (global batch = micro x workers x accum stays fixed when the worker count
changes), DDP gradient all-reduce on the last micro-batch only, optimiser + LR schedule step, EMA update (student).
Every `checkpoint_every` steps and at the end rank 0 attaches a checkpoint (model, optimiser, scheduler, step, RNG,
EMA) to `ray.train.report`, called the same number of times on every rank (it is a barrier). A restarted attempt
(FailureConfig) or a rerun with the same RunConfig resumes from `ray.train.get_checkpoint()`. Rank 0 logs to MLflow.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydseg.models.ema import EMA
from raydseg.models.losses import ce_loss, soft_target_loss
from raydseg.models.segmenter import build_segmenter, normalize, resolve_model_cfg
from raydseg.refine import refine_with_segments

STATE = "state.pt"


def make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                               weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"unknown optimizer '{cfg['optimizer']}' (sgd | adamw)")


def lr_factor(step: int, steps: int, schedule: str, warmup: int, power: float = 0.9) -> float:
    """Multiplier of the base LR at `step`: linear warmup, then poly(power) or cosine decay to 0 at `steps`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(max(step - warmup, 0) / max(steps - warmup, 1), 1.0)
    if schedule == "poly":
        return (1 - t) ** power
    if schedule == "cosine":
        return 0.5 * (1 + np.cos(np.pi * t))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule '{schedule}' (poly | cosine | constant)")


def save_train_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                     ema: EMA | None = None) -> None:
    """Everything a resume needs, loadable with torch.load(weights_only=True)."""
    model = getattr(model, "module", model)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": int(step), "rng_torch": torch.get_rng_state(),
             "rng_numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if ema is not None:
        state["ema"] = ema.state_dict()
    torch.save(state, path)


def load_train_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     ema: EMA | None = None) -> int:
    """Restore what `save_train_state` wrote; returns the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    getattr(model, "module", model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if ema is not None:
        if "ema" not in state:
            raise KeyError(f"{path} holds no EMA state but the run uses EMA")
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def weights_digest(model: nn.Module) -> str:
    """sha256 of all parameters (bytes): equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for _, p in sorted(getattr(model, "module", model).state_dict().items()):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def confusion(pred: np.ndarray, label: np.ndarray, n: int, ignore: int = 255) -> np.ndarray:
    """(n, n) confusion of pseudo-labels (rows) vs predictions (cols) over labelled pixels."""
    m = label != ignore
    return np.bincount(label[m].astype(np.int64) * n + np.clip(pred[m], 0, n - 1), minlength=n * n).reshape(n, n)


def miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes present in the labels or predictions."""
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0


class _MlflowLogger:
    """Rank-0 MLflow client writing into an existing run (the stage's child run); no-op without a run id."""

    def __init__(self, uri: str, run_id: str, prefix: str):
        self.run_id, self.prefix = run_id, prefix
        self.client = None
        if run_id:
            import mlflow

            self.client = mlflow.MlflowClient(tracking_uri=uri or None)

    def params(self, params: dict[str, Any]) -> None:
        if not self.client:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{self.prefix}{k}", float(v), ts, step)
                                                    for k, v in metrics.items()])

    def artifacts(self, local_dir: str, path: str) -> None:
        if self.client:
            self.client.log_artifacts(self.run_id, local_dir, path)


def _batches(shard: Any, micro: int, device: torch.device):
    """Endless micro-batches from this worker's dataset shard (a new epoch when one ends)."""
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=micro, drop_last=True, device=device):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"the training shard yields no batch of {micro} images: too few training images")


def _targets(cfg: dict[str, Any], teacher: nn.Module, x: torch.Tensor, batch: dict[str, torch.Tensor], n_cls: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student targets from the (EMA) teacher on the same view: (hard labels (B,H,W), soft probs or None)."""
    with torch.no_grad():
        logits = teacher(x).float()
        hard = logits.argmax(1)
        probs = F.softmax(logits / cfg["temperature"], dim=1) if cfg["soft_targets"] else None
        if cfg["refine"] and "segments" in batch:
            segs = batch["segments"].long()
            refined = refine_with_segments(hard, segs, n_cls)
            if probs is not None:  # LiDAR segments act as hard constraints: one-hot of the segment's majority class
                inside = (segs > 0).unsqueeze(1)
                probs = torch.where(inside, F.one_hot(refined, n_cls).permute(0, 3, 1, 2).float(), probs)
            hard = refined
    return hard, probs


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function for both stages (`config["mode"]`: teacher | student)."""
    import ray.train
    import ray.train.torch

    from raydseg import storage
    from raydseg.models.io import save_model
    from raydseg.models.infer import predict_image
    from raydseg.train.data import load_val_rows

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    device = ray.train.torch.get_device()
    student = config["mode"] == "student"
    steps = int(config["steps"])
    micro = int(config["micro_batch_size"]) or max(1, config["batch_size"] // world)
    accum = max(1, config["batch_size"] // (micro * world))
    torch.manual_seed(config["seed"])  # same init on every rank (DDP broadcasts rank 0's anyway)

    model_cfg = resolve_model_cfg(config["model_cfg"])
    model = build_segmenter(model_cfg, weights=config.get("encoder_weights", ""))
    if config.get("init_model"):
        from raydseg.models.io import load_model

        model.load_state_dict(load_model(config["init_model"]).state_dict())
    teacher: nn.Module | None = None
    ema: EMA | None = None
    if student:
        ema = EMA(model)  # EMA on: updated from the student; off: a frozen copy of the initial teacher
        teacher = ema.module.to(device)
    model = ray.train.torch.prepare_model(model)
    raw = getattr(model, "module", model)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, config["schedule"], config["warmup_steps"]))

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            start = load_train_state(os.path.join(d, STATE), model, optimizer, scheduler, ema)
        if teacher is not None:
            teacher.to(device)
    torch.manual_seed(config["seed"] * 1_000_003 + rank * 7919 + start)  # per-rank stream, continues after resume

    log = _MlflowLogger(config.get("tracking_uri", ""), config.get("mlflow_run_id", ""), config.get("prefix", "")) \
        if rank == 0 else _MlflowLogger("", "", "")
    if rank == 0:
        log.params({**config.get("params", {}), "world_size": world, "micro_batch_size": micro,
                    "grad_accum": accum})
    hooks = config.get("hooks") or {}
    use_amp = bool(config.get("amp")) and device.type == "cuda"
    shard = ray.train.get_dataset_shard("train")
    batches = _batches(shard, micro, device)
    mean, std = model_cfg.get("mean"), model_cfg.get("std")
    n_cls = raw.n_cls
    val_rows = load_val_rows(config["pl_dir"], config["val_fraction"], config["val_images"]) \
        if rank == 0 and config["val_every"] >= 0 else []
    last_loss = float("nan")
    t_last, imgs = time.time(), 0
    model.train()
    for step in range(start, steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(accum):
            batch = next(batches)
            x = normalize(batch["image"], mean, std)
            sync = k == accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
                if student:
                    hard, probs = _targets(config, teacher, x, batch, n_cls)
                    loss = soft_target_loss(logits, probs, config["temperature"]) if probs is not None \
                        else ce_loss(logits, hard)
                else:
                    loss = ce_loss(logits, batch["label"], balance=config.get("class_balance", 0.0))
                (loss / accum).backward()
            total += float(loss.detach()) / accum
            imgs += x.shape[0]
        if not np.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {step}")  # raise so Ray's failure handling sees it
        optimizer.step()
        scheduler.step()
        if ema is not None and config["ema"]:
            ema.update(raw, config["ema_momentum"])
        done = step + 1
        last_loss = total
        if hooks.get("digest_dir") and done == 1:
            os.makedirs(hooks["digest_dir"], exist_ok=True)
            with open(os.path.join(hooks["digest_dir"], f"rank{rank}.txt"), "w") as f:
                f.write(weights_digest(model))
        metrics = {"step": done, "loss": total, "lr": scheduler.get_last_lr()[0], "start_step": start}
        if done % config["log_every"] == 0 or done == steps:
            dt = time.time() - t_last
            metrics["images_per_s"] = imgs * world / max(dt, 1e-9)
            t_last, imgs = time.time(), 0
            if device.type == "cuda":
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            every = config["val_every"]
            if val_rows and ((every > 0 and done % every == 0) or done == steps):
                model.eval()
                conf = sum(confusion(predict_image(raw, r["image"]), r["label"], n_cls) for r in val_rows)
                metrics["val_miou"] = miou(conf)
                model.train()
            log.metrics({k: v for k, v in metrics.items() if k not in ("step", "start_step")}, step=done)
        if hooks.get("fail_at_step") == done and rank == hooks.get("fail_rank", 0) \
                and not os.path.exists(hooks["marker"]):
            with open(hooks["marker"], "w") as f:
                f.write(str(rank))
            raise RuntimeError(f"injected failure at step {done} on rank {rank}")
        if done % config["checkpoint_every"] == 0 or done == steps:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_train_state(os.path.join(tmp, STATE), model, optimizer, scheduler, done, ema)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
    if rank != 0:
        return
    # final model(s), in-training predictions of the held-out images, overlays and the MLflow artifact
    out_dir = config["out_dir"]
    export = ema.module if (student and ema is not None and config["ema"] and config["export"] == "ema") else raw
    save_model(export, model_cfg, storage.join(out_dir, "model"))
    export = export.cpu().eval()
    from raydseg.data.schema import encode_png
    from raydseg.predict import overlay

    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(val_rows[:config["n_overlays"]]):
            pred = predict_image(export, r["image"])
            name = f"{i:03d}"
            storage.write_bytes(storage.join(out_dir, "val_images", name + ".png"), encode_png(r["image"]))
            storage.write_bytes(storage.join(out_dir, "val_predictions", name + ".png"),
                                encode_png(pred.astype(np.uint8)))
            with open(os.path.join(tmp, name + ".png"), "wb") as f:
                f.write(encode_png(overlay(r["image"], pred)))
        if val_rows:
            log.artifacts(tmp, "overlays")
    if log.client:
        from raydseg.models.io import log_model_artifact

        log_model_artifact(storage.join(out_dir, "model"), log.run_id, log.client)
        log.metrics({"final_loss": last_loss}, step=steps)
