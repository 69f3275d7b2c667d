"""Stage `evaluate`: Ray Data batch inference of the teacher and student models on the evaluation sets.

Per model, one actor pool (the model is loaded once per actor) predicts every image of every set, writes the
predicted pseudo-class PNG to `evaluate/predictions/<model>/<set>/<sample_id>.png` and returns that image's
(n_pred, n_gt) confusion matrix; the driver sums them as they stream in (no image is held in memory). The
pseudo-class -> class mapping (Hungarian and majority) is fitted per model on one set per class protocol
(`eval.fit_set`, default the first set: synthetic_day / Cityscapes val, as in the paper) and applied unchanged to
all other sets. Metrics `eval/<model>/<set>/{miou,pixel_acc,iou_<class>}` (headline mapping `eval.matching`) and
`eval/<model>/<set>/<other>_{miou,pixel_acc}` go to MLflow (stage run and parent run), with plots and one
self-contained `report.html`.
"""
from __future__ import annotations

import importlib
import io
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np

from raydseg import stage_requests, storage
from raydseg.config import Config
from raydseg.eval import plots
from raydseg.eval.matching import METHODS, fit_mapping, map_prediction
from raydseg.eval.metrics import ConfusionAccumulator, apply_mapping, confusion_matrix, scores
from raydseg.eval.report import Figure, Section, Table, render_report
from raydseg.eval.sets import EvalSample, EvalSet, class_names, list_samples, load_image, load_label, parse_eval_sets
from raydseg.parts import part_names, single_operator_pipeline
from raydseg.pipeline import StageContext, StageResult

NAME = "evaluate"
INPUTS: tuple[str, ...] = ("ingest", "teacher", "student")
CONFIG_SECTIONS = ("eval",)
LOADER = "raydseg.models.io:load_model"
PREDICTOR = "raydseg.models.infer:predict_image"


def _resolve(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def eval_sets(cfg: Config, run_root: str) -> list[EvalSet]:
    """`eval.sets`, or the synthetic source's splits `synthetic_<cond>` from `ingest/eval/<cond>` when empty."""
    if cfg.eval.sets.strip():
        return parse_eval_sets(cfg.eval.sets)
    return [EvalSet(f"synthetic_{c}", "cityscapes", storage.join(run_root, "ingest", "eval", c))
            for c in cfg.synthetic.eval_conditions]


def fit_sets(sets: list[EvalSet], fit_set: str = "") -> dict[int, str]:
    """Per class protocol (19 / 27 classes): the name of the set the mapping is fitted on."""
    out: dict[int, str] = {}
    for s in sets:
        out.setdefault(s.n_classes, s.name)
    if fit_set:
        chosen = [s for s in sets if s.name == fit_set]
        if not chosen:
            raise ValueError(f"eval.fit_set '{fit_set}' is not one of the sets {[s.name for s in sets]}")
        out[chosen[0].n_classes] = fit_set
    return out


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
    exercise the GPU path's dtypes without a GPU).
    """

    def __init__(self, model_dir: str, pred_root: str, loader: str = LOADER, predictor: str = PREDICTOR,
                 size: int = 0, window: int = 0, stride: int = 0, num_gpus: float = 0.0,
                 device: str | None = None, amp: bool | None = None) -> None:
        import torch

        self.device = device or inference_device(num_gpus)
        self.model = _resolve(loader)(model_dir).to(self.device)
        self.predict = _resolve(predictor)
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
                pred_root: str, loader: str = LOADER, predictor: str = PREDICTOR) -> dict[str, Any]:
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


def _metric_name(text: str) -> str:
    return text.replace(" ", "_")


def score_model(confusions: dict[str, ConfusionAccumulator], sets: list[EvalSet], fit: dict[int, str],
                headline: str) -> tuple[dict[str, float], dict[str, dict], dict[str, np.ndarray]]:
    """Fit both mappings on each protocol's fit set, apply to every set.

    Returns (flat metrics `<set>/<metric>`, {set: {method: scores}}, {f"{protocol}/{method}": mapping}).
    """
    if headline not in METHODS:
        raise ValueError(f"eval.matching must be one of {METHODS}, got {headline!r}")
    mappings = {f"{p}/{m}": fit_mapping(confusions[name].matrix, m) for p, name in fit.items() for m in METHODS}
    flat: dict[str, float] = {}
    detail: dict[str, dict] = {}
    for s in sets:
        names = class_names(s.n_classes)
        detail[s.name] = {}
        for m in METHODS:
            sc = scores(apply_mapping(confusions[s.name].matrix, mappings[f"{s.n_classes}/{m}"]))
            detail[s.name][m] = sc
            prefix = "" if m == headline else f"{m}_"
            flat[f"{s.name}/{prefix}miou"] = sc["miou"]
            flat[f"{s.name}/{prefix}pixel_acc"] = sc["pixel_acc"]
            if m == headline:
                for c, v in enumerate(sc["iou"]):
                    if not np.isnan(v):
                        flat[f"{s.name}/iou_{_metric_name(names[c])}"] = float(v)
    return flat, detail, mappings


def knn_analysis(run_root: str, k: int, max_segments: int = 20000) -> tuple[dict[str, float], bytes | None]:
    """k-NN accuracy of segment descriptors (train/test split by frame) vs the segments' majority gt class, and a
    PCA plot; ({}, None) when the features / pseudo-label outputs or their ground truth are missing."""
    from raydseg.data.schema import decode_image
    from raydseg.eval.knn import frame_split, knn_accuracy, segment_majority_class

    feat_dir, pl_dir = storage.join(run_root, "features"), storage.join(run_root, "cluster", "pseudolabels")
    if k <= 0 or not storage.exists(feat_dir) or not storage.exists(pl_dir):
        return {}, None
    majority: dict[tuple[str, str, int], int] = {}
    for name in part_names(pl_dir):
        t = storage.read_table(storage.join(pl_dir, name), columns=["frame_id", "camera", "segment_ids", "gt_semantic"])
        for fid, cam, seg, gt in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            if seg is not None and gt is not None:
                for sid, c in segment_majority_class(decode_image(seg), decode_image(gt)).items():
                    majority[(fid, cam, sid)] = c
    xs, ys, frames = [], [], []
    for name in part_names(feat_dir):
        t = storage.read_table(storage.join(feat_dir, name), columns=["frame_id", "camera", "segment_id", "descriptor"])
        for fid, cam, sid, d in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            c = majority.get((fid, cam, int(sid)))
            if c is not None and len(xs) < max_segments:
                xs.append(np.asarray(d, dtype=np.float32))
                ys.append(c)
                frames.append(fid)
    if len(set(frames)) < 2:
        return {}, None
    x, y = np.stack(xs), np.array(ys)
    is_test = frame_split(frames)
    metrics = knn_accuracy(x[~is_test], y[~is_test], x[is_test], y[is_test], k)
    metrics["knn_n_segments"] = float(len(y))
    png = plots.pca_plot(x, y, class_names(19), title=f"PCA of {len(y)} segment descriptors (majority gt class)")
    return metrics, png


def _read_pred(pred_root: str, set_name: str, sample_id: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(storage.join(pred_root, set_name, f"{sample_id}.png")))) as im:
        return np.array(im).astype(np.int64)


def _small(strip: np.ndarray, max_width: int = 960) -> np.ndarray:
    from PIL import Image

    if strip.shape[1] <= max_width:
        return strip
    h = max(1, round(strip.shape[0] * max_width / strip.shape[1]))
    return np.array(Image.fromarray(strip).resize((max_width, h), Image.NEAREST))


def run_evaluation(ctx: StageContext, loader: str = LOADER, predictor: str = PREDICTOR) -> StageResult:
    """The stage body with injectable model loader / predictor references ("module:function")."""
    import mlflow

    cfg = ctx.cfg
    sets = eval_sets(cfg, ctx.run_root)
    rejects: list[dict] = []
    samples: dict[str, list[EvalSample]] = {}
    for s in sets:
        found = list_samples(s)
        if cfg.eval.max_images > 0:
            found = found[: cfg.eval.max_images]
        if not found:
            rejects.append({"id": f"set:{s.name}", "reason": f"no image/label pairs in {s.format} layout at {s.root}"})
        samples[s.name] = found
    sets = [s for s in sets if samples[s.name]]
    if not sets:
        raise RuntimeError(f"no evaluation set has images ({rejects}); set eval.sets=NAME:FORMAT:PATH,... "
                           f"(formats: cityscapes, cityscapes27, acdc, darkzurich, nightdriving)")
    fit = fit_sets(sets, cfg.eval.fit_set)
    headline = cfg.eval.matching
    all_metrics: dict[str, float] = {}
    counts: dict[str, int] = {f"images_{s.name}": len(samples[s.name]) for s in sets}
    summary_rows: list[list] = []
    sections: list[Section] = []
    tmp = tempfile.mkdtemp(prefix="raydseg_eval_")
    artifacts: list[tuple[str, str]] = []  # (local file, artifact dir)

    def save_png(rel: str, data: bytes) -> None:
        storage.write_bytes(storage.join(ctx.out_dir, "plots", rel), data)
        local = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)
        artifacts.append((local, os.path.dirname(f"evaluate/plots/{rel}")))

    for model in cfg.eval.models:
        model_dir = storage.join(ctx.run_root, model, "model")
        if not storage.exists(model_dir):
            rejects.append({"id": f"model:{model}", "reason": f"no model at {model_dir}"})
            continue
        pred_root = storage.join(ctx.out_dir, "predictions", model)
        inf = infer_model(cfg, model_dir, {s.name: samples[s.name] for s in sets}, sets, pred_root, loader, predictor)
        conf = inf["confusion"]
        flat, detail, mappings = score_model(conf, sets, fit, headline)
        flat["images_per_s"] = inf["images_per_s"]
        all_metrics.update({f"eval/{model}/{k}": v for k, v in flat.items()})
        for s in sets:
            np.save(buf := io.BytesIO(), conf[s.name].matrix)
            storage.write_bytes(storage.join(ctx.out_dir, "confusion", model, f"{s.name}.npy"), buf.getvalue())
        storage.write_json(storage.join(ctx.out_dir, "mappings", f"{model}.json"),
                           {"fit_sets": {str(k): v for k, v in fit.items()},
                            **{k: v.tolist() for k, v in mappings.items()}})
        other = [m for m in METHODS if m != headline][0]
        for s in sets:
            names = class_names(s.n_classes)
            d = detail[s.name]
            summary_rows.append([model, s.name, fit[s.n_classes], len(samples[s.name]), d[headline]["miou"],
                                 d[headline]["pixel_acc"], d[other]["miou"], d[other]["pixel_acc"]])
            table = Table("per-class IoU", ["class", f"IoU ({headline})", f"IoU ({other})"],
                          [[names[c], float(d[headline]["iou"][c]), float(d[other]["iou"][c])]
                           for c in range(s.n_classes)])
            mapped = apply_mapping(conf[s.name].matrix, mappings[f"{s.n_classes}/{headline}"])
            title = f"{model} on {s.name} ({headline} mapping fitted on {fit[s.n_classes]})"
            cm_png = plots.confusion_plot(mapped, names + ["ignore (unmatched)"], names, title=title)
            save_png(f"{model}/{s.name}/confusion.png", cm_png)
            figs = [Figure("confusion matrix", cm_png, "rows: mapped prediction, columns: ground truth")]
            for x in samples[s.name][: cfg.eval.n_overlays]:
                pred = map_prediction(_read_pred(pred_root, s.name, x.sample_id), mappings[f"{s.n_classes}/{headline}"])
                strip = _small(plots.overlay(load_image(x), pred, load_label(x, s.n_classes), s.n_classes))
                png = plots.png_bytes(strip)
                save_png(f"{model}/{s.name}/overlay_{x.sample_id}.png", png)
                figs.append(Figure(x.sample_id, png, f"{x.sample_id}: image | prediction | ground truth"))
            sections.append(Section(f"{model} / {s.name}", tables=[table], figures=figs))

    knn_metrics, pca_png = knn_analysis(ctx.run_root, cfg.eval.knn_k)
    all_metrics.update({f"eval/features/{k}": v for k, v in knn_metrics.items()})
    if knn_metrics:
        figs = []
        if pca_png is not None:
            save_png("features/pca.png", pca_png)
            figs.append(Figure("PCA", pca_png))
        sections.insert(0, Section("Segment descriptors", tables=[Table(
            f"k-NN (k={cfg.eval.knn_k}) vs majority gt class of segments", ["metric", "value"],
            [[k, v] for k, v in knn_metrics.items() if k != "knn_n_segments"])], figures=figs))
    other = [m for m in METHODS if m != headline][0]
    summary = Table(f"summary (headline mapping: {headline})",
                    ["model", "set", "mapping fitted on", "images", "mIoU", "pixel acc", f"mIoU ({other})",
                     f"pixel acc ({other})"], summary_rows)
    sections.insert(0, Section("Metrics", tables=[summary]))
    html_text = render_report(f"raydseg evaluation: {cfg.run.name}",
                              {"run root": ctx.run_root, "sets": ", ".join(f"{s.name} ({s.format})" for s in sets),
                               "inference": f"size={cfg.eval.size} window={cfg.eval.window} stride={cfg.eval.stride}",
                               "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, sections)
    storage.write_bytes(storage.join(ctx.out_dir, "report.html"), html_text.encode())
    storage.write_json(storage.join(ctx.out_dir, "metrics.json"), all_metrics)
    report_local = os.path.join(tmp, "report.html")
    with open(report_local, "w") as f:
        f.write(html_text)
    finite = {k: float(v) for k, v in all_metrics.items() if np.isfinite(v)}
    if mlflow.active_run() is not None:
        mlflow.log_metrics(finite)
        mlflow.log_artifact(report_local, "evaluate")
        for local, rel in artifacts:
            mlflow.log_artifact(local, rel)
        if ctx.parent_run_id:  # the parent run carries the config params: compare_runs reads metrics there
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            items = [Metric(k, v, now, 0) for k, v in finite.items()]
            for i in range(0, len(items), 500):
                MlflowClient().log_batch(ctx.parent_run_id, metrics=items[i:i + 500])
    headline_metrics = {k.replace("/", "_"): v for k, v in finite.items() if k.endswith("/miou")}
    return StageResult(counts=counts, metrics=headline_metrics, rejects=rejects)


def run(ctx: StageContext) -> StageResult:
    return run_evaluation(ctx)
