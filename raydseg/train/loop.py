"""The Ray Train loop shared by every training stage: `fit(config, build_task)`.

A stage's worker function (raydseg.train.segmentation: teacher / student, raydseg.train.pretrain: DINO) is
`lambda config: fit(config, build_task)`, where `build_task(config, device, rank)` returns the stage's
`raydseg.train.engine.Task` (model, step function, EMA, export...). `fit` does the rest, the same for every stage:

- DDP (`prepare_model`), the optimiser and its LR scheduler;
- determinism: each rank's data is `config["feed"]` (a raydseg.train.feed.Feed) on the seeded schedule of
  raydseg.train.feed, and torch's RNG is reseeded from (seed, rank, step) before every step, so the same seed gives
  the same weights and a resumed run continues exactly where the checkpoint left it;
- `accum` micro-batches per worker per step (global batch = micro x workers x accum, exactly: feed.batch_split)
  through `engine.train_one_step`; the EMA update after every step;
- every `log_every` steps (and the last) the task's validation on rank 0 and a row of MLflow metrics
  `<prefix><name>` (loss, lr, images_per_s, gpu_mem_gb, the step function's metrics), logged through Ray's
  `setup_mlflow` on rank 0 into the stage's child run;
- every `checkpoint_every` steps (and the last) rank 0 attaches a checkpoint (engine.save_train_state) to
  `ray.train.report`, called the same number of times on every rank (it is a barrier). A restarted attempt
  (FailureConfig) or a rerun with the same RunConfig resumes from `ray.train.get_checkpoint()`;
- the task's export on rank 0 after the last step.
Ray is imported inside the functions only: the engine, step functions and models import without it.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable

import torch

from raydseg.train.engine import (Task, load_train_state, read_extra_state, save_train_state, step_seed,
                                  train_one_step)
from raydseg.train.feed import batch_split, rank_batches
from raydseg.train.precision import use_bf16

STATE = "state.pt"


class _NoMlflow:
    """The mlflow module of a rank that does not log (not rank 0, or no run to log into): every call is a no-op."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


NO_MLFLOW: Any = _NoMlflow()


def worker_mlflow(config: dict[str, Any], rank: int, params: dict[str, Any]) -> Any:
    """Rank 0: Ray's `setup_mlflow` logging into the stage's existing child run (`mlflow_run_id`, resumed through
    MLFLOW_RUN_ID) with `params`; the other ranks, or no run id: NO_MLFLOW."""
    run_id = config.get("mlflow_run_id", "")
    if not run_id or rank != 0:
        return NO_MLFLOW
    import mlflow
    from ray.air.integrations.mlflow import setup_mlflow

    uri = config.get("tracking_uri") or None
    experiment_id = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    os.environ["MLFLOW_RUN_ID"] = run_id
    return setup_mlflow({k: str(v)[:6000] for k, v in params.items()}, tracking_uri=uri,
                        experiment_id=experiment_id, rank_zero_only=True)


def use_deterministic_kernels() -> None:
    """Bit-identical GPU runs: deterministic kernels only (an op without one raises), cuBLAS's fixed workspace, no
    cuDNN autotuning. On CPU the runs are bit-identical without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def fit(config: dict[str, Any], build_task: Callable[[dict[str, Any], torch.device, int], Task]) -> None:
    """Ray Train worker body. `config` (plain dict, see raydseg.train.teacher.loop_config): steps, batch_size,
    micro_batch_size, seed, torch_threads, amp, log_every, checkpoint_every, prefix, tracking_uri, mlflow_run_id,
    params, feed, callbacks, + whatever `build_task` reads. `callbacks`: picklable callables (step, rank, model)
    run on every rank after each step's logging, before its checkpoint (monitoring, or the tests' fault
    injection); none in stage runs."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    if config.get("deterministic"):
        use_deterministic_kernels()
    device = ray.train.torch.get_device()
    steps = int(config["steps"])
    micro, accum = batch_split(int(config["batch_size"]), int(config["micro_batch_size"]), world)
    torch.manual_seed(config["seed"])  # same init on every rank (DDP broadcasts rank 0's anyway)

    task = build_task(config, device, rank)
    ema = task.ema
    model = ray.train.torch.prepare_model(task.model)
    optimizer = task.make_optimizer(model)
    scheduler = task.make_scheduler(optimizer)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            start = load_train_state(os.path.join(d, STATE), model, optimizer, scheduler, ema)
            if task.load_extra_state is not None:
                task.load_extra_state({k: v.to(device) for k, v in read_extra_state(os.path.join(d, STATE)).items()})
        if ema is not None:
            ema.module.to(device)

    from raydseg.stage_requests import AUGMENT_TASK_CPUS  # imports the config (pydantic): not at module level

    prefix = config.get("prefix", "")
    use_amp = use_bf16(config["amp"], device.type)
    log = worker_mlflow(config, rank, {**config.get("params", {}), **task.params, "world_size": world,
                                       "micro_batch_size": micro, "grad_accum": accum, "autocast_bf16": use_amp})
    callbacks = config.get("callbacks") or []
    batches = rank_batches(config["feed"], seed=config["seed"], start=start, steps=steps, micro=micro, world=world,
                           accum=accum, rank=rank, device=device, task_cpus=AUGMENT_TASK_CPUS)
    raw = getattr(model, "module", model)
    last_loss = float("nan")
    t_last, imgs = time.time(), 0.0
    model.train()
    for step in range(start, steps):
        torch.manual_seed(step_seed(config["seed"], rank, step))  # dropout etc.: the same draws after a resume
        out = train_one_step(model, optimizer, batches, task.step_fn, step, accum=accum, amp=use_amp,
                             device_type=device.type, before_update=task.before_update)
        scheduler.step()
        if ema is not None and task.ema_momentum is not None:
            ema.update(raw, task.ema_momentum(step))
        done = step + 1
        last_loss = out["loss"]
        imgs += out.pop("images")
        metrics = {"step": done, **out, "lr": scheduler.get_last_lr()[0], "start_step": start}
        if done % config["log_every"] == 0 or done == steps:
            dt = time.time() - t_last
            metrics["images_per_s"] = imgs * world / max(dt, 1e-9)
            t_last, imgs = time.time(), 0.0
            if device.type == "cuda":
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if rank == 0 and task.validate is not None:
                metrics.update(task.validate(done, done == steps))
            log.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items() if k not in ("step", "start_step")},
                            step=done)
        for callback in callbacks:
            callback(done, rank, model)
        if done % config["checkpoint_every"] == 0 or done == steps:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    extra = task.extra_state() if task.extra_state is not None else None
                    save_train_state(os.path.join(tmp, STATE), model, optimizer, scheduler, done, ema, extra)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
    if rank == 0 and task.export is not None:
        task.export(log, last_loss)
