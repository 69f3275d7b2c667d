"""One self-contained HTML evaluation report per run: images embedded as data URIs so the single file renders in
MLflow's artifact view (and anywhere else) without sibling files; and the evaluate stage's sections of it (summary,
per model and set: per-class IoU, confusion matrix, overlays; the descriptors' k-NN and PCA), put together by
`evaluation_report`."""
from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from raydseg.config import EvalConfig


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list]  # cells: str, int, float (floats in [0, 1] shown as %, NaN as "–")
    percent: bool = True


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _cell(value, percent: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return html.escape(str(value))


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c, t.percent)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    cap = html.escape(f.caption or f.title)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(f.title)}">'
            f"<figcaption>{cap}</figcaption></figure>")


CSS = """body{font-family:sans-serif;margin:16px;color:#222}table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #bbb;padding:2px 6px;font-size:12px;text-align:right}th{background:#eee}
td:first-child{text-align:left}figure{display:inline-block;margin:6px;vertical-align:top}
img{max-width:1100px;border:1px solid #ccc}figcaption{font-size:12px}h2{border-bottom:2px solid #444}"""


def render_report(title: str, meta: dict[str, str], sections: list[Section]) -> str:
    """HTML text of the report: a metadata list, then each section's tables and figures."""
    meta_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>{meta_html}</ul>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [_table(t) for t in s.tables]
        parts += [_figure(f) for f in s.figures]
    parts.append("<p style='font-size:11px'>IoU / accuracy in %. Unmatched pseudo-classes count as errors.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def model_set_section(model: str, eval_set, samples: list, detail: dict, confusion: np.ndarray, mapping: np.ndarray,
                      fit_name: str, headline: str, pred_root: str, n_overlays: int,
                      save_png: Callable[[str, bytes], None]) -> Section:
    """Per-class IoU under both mappings, the confusion matrix (n_pred, n_gt) mapped by `mapping` and the first
    `n_overlays` overlays (image | mapped prediction | ground truth) of `model` on one eval set; each PNG also goes to
    `save_png(rel, png)`."""
    from raydseg.eval import plots
    from raydseg.eval.matching import map_prediction, other_method
    from raydseg.eval.metrics import apply_mapping
    from raydseg.eval.sets import class_names, load_image, load_label, read_prediction

    names = class_names(eval_set.n_classes)
    other = other_method(headline)
    table = Table("per-class IoU", ["class", f"IoU ({headline})", f"IoU ({other})"],
                  [[names[c], float(detail[headline]["iou"][c]), float(detail[other]["iou"][c])]
                   for c in range(eval_set.n_classes)])
    title = f"{model} on {eval_set.name} ({headline} mapping fitted on {fit_name})"
    cm_png = plots.confusion_plot(apply_mapping(confusion, mapping), names + ["ignore (unmatched)"], names, title=title)
    save_png(f"{model}/{eval_set.name}/confusion.png", cm_png)
    figs = [Figure("confusion matrix", cm_png, "rows: mapped prediction, columns: ground truth")]
    for x in samples[:n_overlays]:
        pred = map_prediction(read_prediction(pred_root, eval_set.name, x.sample_id), mapping)
        png = plots.png_bytes(plots.shrink(plots.overlay(load_image(x), pred, load_label(x, eval_set.n_classes),
                                                         eval_set.n_classes)))
        save_png(f"{model}/{eval_set.name}/overlay_{x.sample_id}.png", png)
        figs.append(Figure(x.sample_id, png, f"{x.sample_id}: image | prediction | ground truth"))
    return Section(f"{model} / {eval_set.name}", tables=[table], figures=figs)


def knn_section(metrics: dict[str, float], k: int, pca_png: bytes | None,
                save_png: Callable[[str, bytes], None]) -> Section:
    """The segment descriptors' k-NN metrics and PCA plot."""
    figs = []
    if pca_png is not None:
        save_png("features/pca.png", pca_png)
        figs.append(Figure("PCA", pca_png))
    return Section("Segment descriptors", tables=[Table(
        f"k-NN (k={k}) vs majority gt class of segments", ["metric", "value"],
        [[name, v] for name, v in metrics.items() if name != "knn_n_segments"])], figures=figs)


def summary_row(model: str, eval_set, fit_name: str, n_images: int, detail: dict, headline: str) -> list:
    """The summary table's row of `model` on one eval set; `detail` {method: scores} as score_model gives it."""
    from raydseg.eval.matching import other_method

    other = other_method(headline)
    return [model, eval_set.name, fit_name, n_images, detail[headline]["miou"], detail[headline]["pixel_acc"],
            detail[other]["miou"], detail[other]["pixel_acc"]]


def summary_section(rows: list[list], headline: str) -> Section:
    """One row per (model, set): model, set, fit set, images, mIoU and pixel accuracy under both mappings."""
    from raydseg.eval.matching import other_method

    other = other_method(headline)
    return Section("Metrics", tables=[Table(f"summary (headline mapping: {headline})",
                                            ["model", "set", "mapping fitted on", "images", "mIoU", "pixel acc",
                                             f"mIoU ({other})", f"pixel acc ({other})"], rows)])


def evaluation_report(run_name: str, run_root: str, sets: list, cfg: EvalConfig, summary_rows: list[list],
                      model_sections: list[Section], knn_metrics: dict[str, float], pca_png: bytes | None,
                      save_png: Callable[[str, bytes], None]) -> str:
    """HTML text of the evaluate stage's report: the summary, the descriptors' k-NN and PCA (when measured), then one
    section per model and set, under a header naming the run root, the sets and the inference settings."""
    sections = [summary_section(summary_rows, cfg.matching)] + \
        ([knn_section(knn_metrics, cfg.knn_k, pca_png, save_png)] if knn_metrics else []) + model_sections
    return render_report(f"raydseg evaluation: {run_name}",
                         {"run root": run_root, "sets": ", ".join(f"{s.name} ({s.format})" for s in sets),
                          "inference": f"size={cfg.size} window={cfg.window} stride={cfg.stride}",
                          "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, sections)
