"""Batch inference of one model over the evaluation sets with a Ray Data actor pool (the model is loaded once per
actor): each image's predicted pseudo-class PNG is written under `pred_root/<set>/<sample_id>.png` and its
(n_pred, n_gt) confusion matrix streams back to the driver, which sums them (no image is held in memory)."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from raydseg import stage_requests, storage
from raydseg.config import Config
from raydseg.eval import plots
from raydseg.eval.metrics import ConfusionAccumulator, confusion_matrix
from raydseg.eval.sets import EvalSample, EvalSet, load_image, load_label
from raydseg.parts import single_operator_pipeline


def inference_device(num_gpus: float) -> str:
    """"cuda" when the actor was given a GPU (`num_gpus` > 0) and CUDA is available, else "cpu"."""
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class Predictor:
    """Ray Data actor: loads the model once onto its device, then per row predicts, writes the PNG and returns the
    confusion.

    The model is moved to `device` in `__init__` (as in Ray's batch-inference examples): "cuda" when the actor has a
    GPU (`num_gpus` > 0) and CUDA is available, else "cpu". On CUDA the forwards run under bf16 autocast; on CPU
    they run in full precision, exactly as before (`amp=True` forces bf16 autocast on CPU too: the tests' way to
    exercise the GPU path's dtypes without a GPU). `loader(model_dir) -> model` / `predictor(model, image, size=,
    window=, stride=[, autocast_dtype=]) -> (H, W) int` default to raydseg.models' load_model / predict_image.
    """

    def __init__(self, model_dir: str, pred_root: str, loader: Callable | None = None,
                 predictor: Callable | None = None, size: int = 0, window: int = 0, stride: int = 0,
                 num_gpus: float = 0.0, device: str | None = None, amp: bool | None = None) -> None:
        import torch

        from raydseg.models.infer import predict_image
        from raydseg.models.io import load_model

        self.device = device or inference_device(num_gpus)
        self.model = (loader or load_model)(model_dir).to(self.device)
        self.predict = predictor or predict_image
        self.pred_root = pred_root
        self.kwargs: dict[str, Any] = dict(size=size or None, window=window or None,
                                           stride=(stride or window // 2) or None)
        if self.device.startswith("cuda") if amp is None else amp:
            self.kwargs["autocast_dtype"] = torch.bfloat16  # only passed when used: the CPU call is unchanged

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        confs, n_preds, seconds = [], [], []
        for i in range(len(batch["sample_id"])):
            sample = EvalSample(str(batch["sample_id"][i]), str(batch["image_path"][i]),
                                str(batch["label_path"][i]), str(batch["label_kind"][i]))
            n_gt = int(batch["n_classes"][i])
            image, gt = load_image(sample), load_label(sample, n_gt)
            t0 = time.perf_counter()
            pred = np.asarray(self.predict(self.model, image, **self.kwargs))
            seconds.append(time.perf_counter() - t0)
            if pred.shape != gt.shape:
                raise ValueError(f"{sample.sample_id}: prediction {pred.shape} vs label {gt.shape}")
            n_pred = int(pred.max()) + 1
            confs.append(confusion_matrix(pred, gt, n_pred, n_gt).tobytes())
            n_preds.append(n_pred)
            dtype = np.uint8 if n_pred <= 256 else np.uint16
            storage.write_bytes(storage.join(self.pred_root, str(batch["set"][i]), f"{sample.sample_id}.png"),
                                plots.png_bytes(pred.astype(dtype)))
        return {"set": batch["set"], "sample_id": batch["sample_id"], "n_pred": np.array(n_preds),
                "conf": np.array(confs, dtype=object), "predict_s": np.array(seconds)}


def infer_model(cfg: Config, model_dir: str, samples: dict[str, list[EvalSample]], sets: list[EvalSet],
                pred_root: str, loader: Callable | None = None, predictor: Callable | None = None) -> dict[str, Any]:
    """Stream the confusion matrices of one model over all sets; returns {set: ConfusionAccumulator, ...}."""
    import ray

    n_cls = {s.name: s.n_classes for s in sets}
    items = [{"set": name, "sample_id": x.sample_id, "image_path": x.image_path, "label_path": x.label_path,
              "label_kind": x.label_kind, "n_classes": n_cls[name]} for name, xs in samples.items() for x in xs]
    acc = {s.name: ConfusionAccumulator(n_gt=s.n_classes) for s in sets}
    if not items:
        return {"confusion": acc, "images_per_s": float("nan"), "predict_s_per_image": float("nan")}
    bs = max(cfg.eval.batch_size, 1)
    with single_operator_pipeline():
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // bs, 64)))
        ds = ds.map_batches(
            Predictor, batch_size=bs, **stage_requests.evaluate(cfg).ray_options(),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.eval.num_actors)),
            fn_constructor_kwargs=dict(model_dir=model_dir, pred_root=pred_root, loader=loader, predictor=predictor,
                                       size=cfg.eval.size, window=cfg.eval.window, stride=cfg.eval.stride,
                                       num_gpus=cfg.eval.num_gpus))
        t0, predict_s, n = time.perf_counter(), 0.0, 0
        for batch in ds.iter_batches(batch_size=bs, batch_format="numpy"):
            for name, n_pred, conf, sec in zip(batch["set"], batch["n_pred"], batch["conf"], batch["predict_s"]):
                a = acc[str(name)]
                a.add(np.frombuffer(conf, dtype=np.int64).reshape(int(n_pred), a.n_gt))
                predict_s += float(sec)
                n += 1
    wall = time.perf_counter() - t0
    return {"confusion": acc, "images_per_s": n / wall, "predict_s_per_image": predict_s / n}
