"""Batch inference of the models over the evaluation sets in one pass, with a pool of Ray actors (the models are
loaded once per actor, each image is read once for all of them): each model's predicted pseudo-class PNG is written
under `pred_roots[model]/<set>/<sample_id>.png` and its (n_pred, n_gt) confusion matrix streams back to the
driver, which sums them (no image is held in memory)."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from raydseg import stage_requests, storage
from raydseg.config import Config
from raydseg.eval import plots
from raydseg.eval.metrics import ConfusionAccumulator, confusion_matrix
from raydseg.eval.sets import EvalSample, EvalSet, load_image, load_label


def inference_device(num_gpus: float) -> str:
    """"cuda" when the actor was given a GPU (`num_gpus` > 0) and CUDA is available, else "cpu"."""
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class Predictor:
    """Inference actor: loads the models once onto its device, then per row predicts with each, writes the PNGs and
    returns the confusions.

    `models`: {name: model dir}; `pred_roots`: {name: folder of that model's PNGs}. The models are moved to `device`
    in `__init__` (as in Ray's batch-inference examples): "cuda" when the actor has a GPU (`num_gpus` > 0) and CUDA
    is available, else "cpu"; `torch_threads` (> 0) sets its intra-op threads. On CUDA the forwards run under bf16
    autocast; on CPU they run in full precision (`amp=True` forces bf16 autocast on CPU too: the tests' way to
    exercise the GPU path's dtypes without a GPU).
    `loader(model_dir) -> model` / `predictor(model, image, size=, window=, stride=[, autocast_dtype=]) -> (H, W)
    int` default to raydseg.models' load_model / predict_image.
    """

    def __init__(self, models: dict[str, str], pred_roots: dict[str, str], loader: Callable | None = None,
                 predictor: Callable | None = None, size: int = 0, window: int = 0, stride: int = 0,
                 num_gpus: float = 0.0, device: str | None = None, amp: bool | None = None,
                 torch_threads: int = 0) -> None:
        import torch

        from raydseg.models.infer import predict_image
        from raydseg.models.io import load_model

        if torch_threads:
            torch.set_num_threads(torch_threads)  # Ray starts the actor with OMP_NUM_THREADS = its CPUs
        self.device = device or inference_device(num_gpus)
        self.models = {name: (loader or load_model)(d).to(self.device) for name, d in models.items()}
        self.predict = predictor or predict_image
        self.pred_roots = pred_roots
        self.kwargs: dict[str, Any] = dict(size=size or None, window=window or None,
                                           stride=(stride or window // 2) or None)
        if self.device.startswith("cuda") if amp is None else amp:
            self.kwargs["autocast_dtype"] = torch.bfloat16  # only passed when used: the CPU call is unchanged

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {f"{k}/{name}": [] for name in self.models for k in ("conf", "n_pred", "predict_s")}
        for i in range(len(batch["sample_id"])):
            sample = EvalSample(str(batch["sample_id"][i]), str(batch["image_path"][i]),
                                str(batch["label_path"][i]), str(batch["label_kind"][i]))
            n_gt = int(batch["n_classes"][i])
            image, gt = load_image(sample), load_label(sample, n_gt)
            for name, model in self.models.items():
                t0 = time.perf_counter()
                pred = np.asarray(self.predict(model, image, **self.kwargs))
                out[f"predict_s/{name}"].append(time.perf_counter() - t0)
                if pred.shape != gt.shape:
                    raise ValueError(f"{sample.sample_id}: prediction {pred.shape} vs label {gt.shape}")
                n_pred = int(pred.max()) + 1
                out[f"conf/{name}"].append(confusion_matrix(pred, gt, n_pred, n_gt).tobytes())
                out[f"n_pred/{name}"].append(n_pred)
                dtype = np.uint8 if n_pred <= 256 else np.uint16
                path = storage.join(self.pred_roots[name], str(batch["set"][i]), f"{sample.sample_id}.png")
                storage.write_bytes(path, plots.png_bytes(pred.astype(dtype)))
        return {"set": batch["set"], "sample_id": batch["sample_id"],
                **{k: np.array(v, dtype=object if k.startswith("conf/") else None) for k, v in out.items()}}


def infer_models(cfg: Config, models: dict[str, str], samples: dict[str, list[EvalSample]], sets: list[EvalSet],
                 pred_roots: dict[str, str], loader: Callable | None = None, predictor: Callable | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Stream the confusion matrices of every model ({name: model dir}) over all sets, in one pass; returns
    {name: {"confusion": {set: ConfusionAccumulator}, "images_per_s": images / that model's forward seconds,
    "predict_s_per_image": ...}}."""
    from raydseg.ray_map import map_actors

    n_cls = {s.name: s.n_classes for s in sets}
    items = [{"set": name, "sample_id": x.sample_id, "image_path": x.image_path, "label_path": x.label_path,
              "label_kind": x.label_kind, "n_classes": n_cls[name]} for name, xs in samples.items() for x in xs]
    acc = {m: {s.name: ConfusionAccumulator(n_gt=s.n_classes) for s in sets} for m in models}
    predict_s = {m: 0.0 for m in models}
    n = 0
    bs = max(cfg.eval.batch_size, 1)
    batches = [({k: np.array([x[k] for x in items[i:i + bs]]) for k in items[0]},)
               for i in range(0, len(items) if models else 0, bs)]
    kwargs = dict(models=models, pred_roots=pred_roots, loader=loader, predictor=predictor, size=cfg.eval.size,
                  window=cfg.eval.window, stride=cfg.eval.stride, num_gpus=cfg.eval.num_gpus,
                  torch_threads=cfg.eval.torch_threads)
    for batch in map_actors(Predictor, kwargs, Predictor.__call__, batches, stage_requests.evaluate(cfg).ray_options(),
                            (1, max(1, cfg.eval.num_actors))):
        for j, name in enumerate(batch["set"]):
            for m in models:
                a = acc[m][str(name)]
                conf = np.frombuffer(batch[f"conf/{m}"][j], dtype=np.int64)
                a.add(conf.reshape(int(batch[f"n_pred/{m}"][j]), a.n_gt))
                predict_s[m] += float(batch[f"predict_s/{m}"][j])
            n += 1
    nan = float("nan")
    return {m: {"confusion": acc[m], "images_per_s": n / predict_s[m] if predict_s[m] else nan,
                "predict_s_per_image": predict_s[m] / n if n else nan} for m in models}
