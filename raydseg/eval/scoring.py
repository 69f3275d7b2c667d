"""Scores of one model over the evaluation sets: the pseudo-class -> class mappings (Hungarian and majority) are
fitted on one set per class protocol (19 / 27 classes) and applied unchanged to every set, as in the paper."""
from __future__ import annotations

import numpy as np

from raydseg.eval.matching import METHODS, fit_mapping
from raydseg.eval.metrics import ConfusionAccumulator, apply_mapping, scores
from raydseg.eval.sets import EvalSet, class_names


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


def metric_name(text: str) -> str:
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
                        flat[f"{s.name}/iou_{metric_name(names[c])}"] = float(v)
    return flat, detail, mappings
