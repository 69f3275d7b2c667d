"""Stage `evaluate`: Ray Data batch inference of the teacher and student models on the evaluation sets (wiring of
raydseg.eval: inference, scoring, knn, report).

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

import io
import os
import tempfile
import time
from typing import Callable

import numpy as np

from raydseg import storage
from raydseg.config import Config
from raydseg.eval.inference import infer_models
from raydseg.eval.knn import knn_analysis
from raydseg.eval.matching import other_method
from raydseg.eval.metrics import apply_mapping
from raydseg.eval.report import Section, knn_section, model_set_section, render_report, summary_section
from raydseg.eval.scoring import fit_sets, score_model
from raydseg.eval.sets import EvalSample, EvalSet, list_samples, parse_eval_sets
from raydseg.pipeline import StageContext, StageResult

NAME = "evaluate"
INPUTS: tuple[str, ...] = ("ingest", "teacher", "student")
CONFIG_SECTIONS = ("eval",)


def eval_sets(cfg: Config, ingest_dir: str) -> list[EvalSet]:
    """`eval.sets`, or the synthetic source's splits `synthetic_<cond>` from `<ingest_dir>/eval/<cond>` when empty."""
    if cfg.eval.sets.strip():
        return parse_eval_sets(cfg.eval.sets)
    return [EvalSet(f"synthetic_{c}", "cityscapes", storage.join(ingest_dir, "eval", c))
            for c in cfg.synthetic.eval_conditions]


def _samples(cfg: Config, sets: list[EvalSet]) -> tuple[dict[str, list[EvalSample]], list[dict]]:
    """Each set's image/label pairs (at most eval.max_images); a set without any is a reject."""
    samples, rejects = {}, []
    for s in sets:
        found = list_samples(s)[: cfg.eval.max_images or None]
        if not found:
            rejects.append({"id": f"set:{s.name}", "reason": f"no image/label pairs in {s.format} layout at {s.root}"})
        samples[s.name] = found
    return samples, rejects


def _log_mlflow(metrics: dict[str, float], files: list[tuple[str, str]], parent_run_id: str) -> None:
    """Metrics and (local file, artifact dir) files to the stage's MLflow run; metrics also to the parent run,
    which carries the config params (compare_runs reads metrics there)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics(metrics)
    for local, rel in files:
        mlflow.log_artifact(local, rel)
    if parent_run_id:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            MlflowClient().log_batch(parent_run_id, metrics=items[i:i + 500])


def run_evaluation(ctx: StageContext, loader: Callable | None = None, predictor: Callable | None = None
                   ) -> StageResult:
    """The stage body; `loader` / `predictor` as raydseg.eval.inference.Predictor takes them (default: the real
    model loader and predictor)."""
    cfg, headline = ctx.cfg, ctx.cfg.eval.matching
    sets = eval_sets(cfg, ctx.stage_dir("ingest"))
    samples, rejects = _samples(cfg, sets)
    sets = [s for s in sets if samples[s.name]]
    if not sets:
        raise RuntimeError(f"no evaluation set has images ({rejects}); set eval.sets=NAME:FORMAT:PATH,... "
                           f"(formats: cityscapes, cityscapes27, acdc, darkzurich, nightdriving)")
    fit = fit_sets(sets, cfg.eval.fit_set)
    all_metrics: dict[str, float] = {}
    summary_rows: list[list] = []
    sections: list[Section] = []
    tmp = tempfile.mkdtemp(prefix="raydseg_eval_")
    files: list[tuple[str, str]] = []  # (local file, MLflow artifact dir)

    def save_png(rel: str, data: bytes) -> None:
        storage.write_bytes(storage.join(ctx.out_dir, "plots", rel), data)
        local = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)
        files.append((local, os.path.dirname(f"evaluate/plots/{rel}")))

    model_dirs = {}
    for model in cfg.eval.models:
        model_dirs[model] = storage.join(ctx.stage_dir(model), "model")
        if not storage.exists(model_dirs[model]):
            rejects.append({"id": f"model:{model}", "reason": f"no model at {model_dirs.pop(model)}"})
    pred_roots = {model: storage.join(ctx.out_dir, "predictions", model) for model in model_dirs}
    inferred = infer_models(cfg, model_dirs, {s.name: samples[s.name] for s in sets}, sets, pred_roots, loader,
                            predictor)
    for model, inf in inferred.items():
        pred_root = pred_roots[model]
        conf = inf["confusion"]
        flat, detail, mappings = score_model(conf, sets, fit, headline)
        all_metrics.update({f"eval/{model}/{k}": v for k, v in {**flat, "images_per_s": inf["images_per_s"]}.items()})
        storage.write_json(storage.join(ctx.out_dir, "mappings", f"{model}.json"),
                           {"fit_sets": {str(k): v for k, v in fit.items()},
                            **{k: v.tolist() for k, v in mappings.items()}})
        for s in sets:
            np.save(buf := io.BytesIO(), conf[s.name].matrix)
            storage.write_bytes(storage.join(ctx.out_dir, "confusion", model, f"{s.name}.npy"), buf.getvalue())
            d, other = detail[s.name], other_method(headline)
            summary_rows.append([model, s.name, fit[s.n_classes], len(samples[s.name]), d[headline]["miou"],
                                 d[headline]["pixel_acc"], d[other]["miou"], d[other]["pixel_acc"]])
            mapping = mappings[f"{s.n_classes}/{headline}"]
            sections.append(model_set_section(model, s, samples[s.name], d, apply_mapping(conf[s.name].matrix, mapping),
                                              mapping, fit[s.n_classes], headline, pred_root, cfg.eval.n_overlays,
                                              save_png))

    pl_dir = storage.join(ctx.stage_dir("cluster"), "pseudolabels")
    knn_metrics, pca_png = knn_analysis(ctx.stage_dir("features"), pl_dir, cfg.eval.knn_k)
    all_metrics.update({f"eval/features/{k}": v for k, v in knn_metrics.items()})
    sections = [summary_section(summary_rows, headline)] + \
        ([knn_section(knn_metrics, cfg.eval.knn_k, pca_png, save_png)] if knn_metrics else []) + sections
    html_text = render_report(f"raydseg evaluation: {cfg.run.name}",
                              {"run root": ctx.run_root, "sets": ", ".join(f"{s.name} ({s.format})" for s in sets),
                               "inference": f"size={cfg.eval.size} window={cfg.eval.window} stride={cfg.eval.stride}",
                               "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, sections)
    storage.write_bytes(storage.join(ctx.out_dir, "report.html"), html_text.encode())
    storage.write_json(storage.join(ctx.out_dir, "metrics.json"), all_metrics)
    with open(os.path.join(tmp, "report.html"), "w") as f:
        f.write(html_text)
    finite = {k: float(v) for k, v in all_metrics.items() if np.isfinite(v)}
    _log_mlflow(finite, [(os.path.join(tmp, "report.html"), "evaluate")] + files, ctx.parent_run_id)
    return StageResult(counts={f"images_{s.name}": len(samples[s.name]) for s in sets},
                       metrics={k.replace("/", "_"): v for k, v in finite.items() if k.endswith("/miou")},
                       rejects=rejects)


def run(ctx: StageContext) -> StageResult:
    return run_evaluation(ctx)


def parent_metrics(out_dir: str) -> dict[str, float]:
    """The metrics a finished evaluation logged to its parent run (`metrics.json`), for a run that reuses it."""
    path = storage.join(out_dir, "metrics.json")
    metrics = storage.read_json(path) if storage.exists(path) else {}
    return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
