"""The objective-independent parts of training, in the shape of timm's train.py: one optimiser step
(`train_one_step`), validation (`validate_segmenter`), and the checkpoint contents (`save_train_state` /
`load_train_state`). No Ray here (torch + numpy only): the Ray Train wiring is raydseg.train.loop, and a training
objective is a *step function* (raydseg.train.steps for the teacher and student stages, raydseg.train.dino for
DINO pretraining) plugged into a `Task`.

A step function maps one micro-batch to a loss:

    step_fn(model, batch, step) -> (loss (scalar tensor, differentiable), {name: float} extra metrics)

where `model` is the trained module (DDP-wrapped on Ray Train), `batch` a dict of tensors on the device and `step` the
0-based optimiser step.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from raydseg.models.ema import EMA

StepFn = Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Task:
    """What one training stage plugs into the shared loop (raydseg.train.loop.fit).

    model: the module that is optimised (unwrapped; the loop wraps it for DDP).
    step_fn: the objective (see the module docstring).
    make_optimizer: model -> optimiser (its param groups' lr are the peak lrs that the schedule multiplies).
    make_scheduler: optimiser -> its torch LR scheduler, stepped once per step (saved in the checkpoint).
    ema: an EMA copy of `model` made before DDP (student teacher, DINO teacher), updated after every step with
        `ema_momentum(step)` when that is given; saved in the checkpoint.
    before_update: (model, optimiser, step) -> metrics, called between backward and optimiser.step (gradient
        clipping, frozen layers, weight-decay schedule).
    validate: (step, final) -> metrics, on rank 0 at every log point (the task decides when it has work to do).
    export: (mlflow, last_loss) -> None, on rank 0 after the last step (final model files, MLflow artifacts):
        `mlflow` is the module from Ray's setup_mlflow, or the no-op `loop.NO_MLFLOW` without a run.
    extra_state / load_extra_state: further tensors of the objective for the checkpoint (DINO's center).
    """

    model: nn.Module
    step_fn: StepFn
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    make_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
    ema: EMA | None = None
    ema_momentum: Callable[[int], float] | None = None
    before_update: Callable[[nn.Module, torch.optim.Optimizer, int], dict[str, float]] | None = None
    validate: Callable[[int, bool], dict[str, float]] | None = None
    export: Callable[[Any, float], None] | None = None
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None
    load_extra_state: Callable[[dict[str, torch.Tensor]], None] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # extra MLflow params of the task


def make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over all parameters with one weight decay (`cfg`: optimizer, lr, momentum,
    weight_decay)."""
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                               weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"unknown optimizer '{cfg['optimizer']}' (sgd | adamw)")


def lr_scheduler(optimizer: torch.optim.Optimizer, steps: int, schedule: str, warmup: int,
                 power: float = 0.9) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers, stepped once per optimiser step: linear warmup from lr / warmup to lr over `warmup`
    steps (`LinearLR`), then poly(power) (`PolynomialLR`) or cosine (`CosineAnnealingLR`) decay to 0 at `steps`, or
    constant. Factor at step s < warmup: (s + 1) / warmup; after: (1 - t)^power or (1 + cos(pi t)) / 2 with
    t = (s - warmup) / (steps - warmup)."""
    from torch.optim import lr_scheduler as sched

    decay = max(steps - warmup, 1)
    if schedule == "poly":
        main = sched.PolynomialLR(optimizer, total_iters=decay, power=power)
    elif schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=decay, eta_min=0.0)
    elif schedule == "constant":
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ValueError(f"unknown schedule '{schedule}' (poly | cosine | constant)")
    if warmup <= 0:
        return main
    warm = sched.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return sched.SequentialLR(optimizer, [warm, main], milestones=[warmup])


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[dict[str, torch.Tensor]],
                   step_fn: StepFn, step: int, *, accum: int = 1, amp: bool = False,
                   device_type: str = "cpu",
                   before_update: Callable[[nn.Module, torch.optim.Optimizer, int], dict[str, float]] | None = None
                   ) -> dict[str, float]:
    """One optimiser step over `accum` micro-batches (DDP all-reduce on the last one only; bf16 autocast when
    `amp`). Returns {loss, images, <step_fn metrics averaged over micro-batches>, <before_update metrics>}.
    Raises FloatingPointError on a non-finite loss (so that Ray's failure handling sees it)."""
    optimizer.zero_grad(set_to_none=True)
    out: dict[str, float] = {"loss": 0.0, "images": 0.0}
    for k in range(accum):
        batch = next(batches)
        sync = k == accum - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), \
                torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            loss, extra = step_fn(model, batch, step)
            (loss / accum).backward()
        out["loss"] += float(loss.detach()) / accum
        out["images"] += len(next(iter(batch.values())))
        for name, v in extra.items():
            out[name] = out.get(name, 0.0) + float(v) / accum
    if not np.isfinite(out["loss"]):
        raise FloatingPointError(f"loss is {out['loss']} at step {step}")
    if before_update is not None:
        out.update(before_update(model, optimizer, step))
    optimizer.step()
    return out


def validate_segmenter(model: nn.Module, rows: list[dict[str, Any]], n_cls: int) -> dict[str, float]:
    """mIoU of a Segmenter's whole-image predictions against held-out pseudo-labels (`rows`: image, label), over
    the classes present in either (raydseg.eval.metrics; 0 when nothing is labelled)."""
    from raydseg.eval.metrics import confusion_matrix, scores
    from raydseg.models.infer import predict_image

    was_training = model.training
    model.eval()
    conf = sum(confusion_matrix(predict_image(model, r["image"]), r["label"], n_cls, n_cls) for r in rows)
    model.train(was_training)
    miou = scores(conf)["miou"]
    return {"val_miou": 0.0 if np.isnan(miou) else miou}


def step_seed(seed: int, rank: int, step: int) -> int:
    """torch's seed for optimiser step `step` on `rank`: a function of the step, not of the history, so that a
    resumed run draws what an uninterrupted one draws (no RNG state needs saving)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def save_train_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                     ema: EMA | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Everything a resume needs, loadable with torch.load(weights_only=True): model, optimizer, scheduler, step
    [, ema] [, extra (the objective's own tensors)]. No RNG state: every draw is seeded by the step (`step_seed`,
    raydseg.train.feed)."""
    model = getattr(model, "module", model)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": int(step)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if extra:
        state["extra"] = extra
    torch.save(state, path)


def load_train_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     ema: EMA | None = None) -> int:
    """Restore what `save_train_state` wrote (not `extra`: see `read_extra_state`); returns the step to continue
    from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    getattr(model, "module", model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if "ema" not in state:
            raise KeyError(f"{path} holds no EMA state but the run uses EMA")
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def read_extra_state(path: str) -> dict[str, torch.Tensor]:
    """The objective's own tensors of a checkpoint written by `save_train_state` ({} when none)."""
    return dict(torch.load(path, map_location="cpu", weights_only=True).get("extra", {}))


def weights_digest(model: nn.Module) -> str:
    """sha256 of all parameters (bytes): equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for _, p in sorted(getattr(model, "module", model).state_dict().items()):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
