"""Stage `evaluate`: batch inference of the teacher and student models on the evaluation sets on a Ray actor pool
(wiring of raydseg.eval: sets, inference, scoring, knn, report).

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
from typing import Callable

import numpy as np

from raydseg import storage
from raydseg.eval.inference import infer_models
from raydseg.eval.knn import knn_analysis
from raydseg.eval.report import Section, evaluation_report, model_set_section, summary_row
from raydseg.eval.scoring import fit_sets, score_model
from raydseg.eval.sets import eval_samples, eval_sets
from raydseg.pipeline import StageContext, StageResult
from raydseg.tracking import log_with_parent

NAME = "evaluate"
INPUTS: tuple[str, ...] = ("ingest", "teacher", "student")
CONFIG_SECTIONS = ("eval",)
OUTPUT_VERSION = 1  # 1: the descriptors' k-NN splits by scene, not by frame (raydseg.eval.knn.scene_split)


def run_evaluation(ctx: StageContext, loader: Callable | None = None, predictor: Callable | None = None
                   ) -> StageResult:
    """The stage body; `loader` / `predictor` as raydseg.eval.inference.Predictor takes them (default: the real
    model loader and predictor)."""
    cfg, headline = ctx.cfg, ctx.cfg.eval.matching
    sets = eval_sets(cfg, ctx.stage_dir("ingest"))
    samples, rejects = eval_samples(sets, cfg.eval.max_images)
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
            summary_rows.append(summary_row(model, s, fit[s.n_classes], len(samples[s.name]), detail[s.name], headline))
            sections.append(model_set_section(model, s, samples[s.name], detail[s.name], conf[s.name].matrix,
                                              mappings[f"{s.n_classes}/{headline}"], fit[s.n_classes], headline,
                                              pred_root, cfg.eval.n_overlays, save_png))

    pl_dir = storage.join(ctx.stage_dir("cluster"), "pseudolabels")
    knn_metrics, pca_png = knn_analysis(ctx.stage_dir("features"), pl_dir, cfg.eval.knn_k,
                                        frames_dir=storage.join(ctx.stage_dir("ingest"), "frames"))
    all_metrics.update({f"eval/features/{k}": v for k, v in knn_metrics.items()})
    html_text = evaluation_report(cfg.run.name, ctx.run_root, sets, cfg.eval, summary_rows, sections, knn_metrics,
                                  pca_png, save_png)
    storage.write_bytes(storage.join(ctx.out_dir, "report.html"), html_text.encode())
    storage.write_json(storage.join(ctx.out_dir, "metrics.json"), all_metrics)
    with open(os.path.join(tmp, "report.html"), "w") as f:
        f.write(html_text)
    finite = {k: float(v) for k, v in all_metrics.items() if np.isfinite(v)}
    log_with_parent(finite, [(os.path.join(tmp, "report.html"), "evaluate")] + files, ctx.parent_run_id)
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
