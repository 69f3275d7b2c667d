"""Evaluation-set readers for the published directory layouts, and the `NAME:FORMAT:PATH,...` set spec.

Layouts (PATH is the dataset root as published):
- cityscapes:   leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png, gtFine/<split>/<city>/<stem>_gtFine_labelIds.png
                (falls back to <stem>_gtFine_labelTrainIds.png when no labelIds file exists, e.g. converted sets)
- acdc:         rgb_anon/<condition>/<split>/<seq>/<stem>_rgb_anon.png,
                gt/<condition>/<split>/<seq>/<stem>_gt_labelIds.png
                (condition fog|night|rain|snow taken from the set name when it contains one, else all four)
- darkzurich:   rgb_anon/<split>/night/<seq>/<stem>_rgb_anon.png, gt/<split>/night/<seq>/<stem>_gt_labelIds.png
- nightdriving: leftImg8bit/test/night/<stem>_leftImg8bit.png,
                gtCoarse_daytime_trainvaltest/test/night/<stem>_gtCoarse_labelIds.png
Label ids map to the 19 Cityscapes trainIds with the official table of `cityscapesscripts.helpers.labels`
(255 = void), or to PiCIE's 27 classes (labelIds 7..33 -> 0..26) for the `cityscapes27` protocol.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raydseg import storage
from raydseg.config import Config
from raydseg.eval.metrics import IGNORE_INDEX

FORMATS = ("cityscapes", "cityscapes27", "acdc", "darkzurich", "nightdriving")
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # set names become folder names: no separators, no '..'


def labelid_to_trainid_lut() -> np.ndarray:
    """(256,) uint8 look-up table labelId -> trainId (0..18, 255 void) from cityscapesscripts' label table."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < 255:
            lut[label.id] = label.trainId
    return lut


def labelid_to_27_lut() -> np.ndarray:
    """(256,) uint8 look-up table labelId -> PiCIE's 27 classes (labelIds 7..33 -> 0..26, others 255)."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in labels:
        if 7 <= label.id <= 33:
            lut[label.id] = label.id - 7
    return lut


def class_names(n_classes: int) -> list[str]:
    """Names of the 19 trainIds or the 27 PiCIE classes, from cityscapesscripts."""
    from cityscapesscripts.helpers.labels import labels, trainId2label

    if n_classes == 19:
        return [trainId2label[i].name for i in range(19)]
    if n_classes == 27:
        by_id = {label.id: label.name for label in labels}
        return [by_id[i + 7] for i in range(27)]
    raise ValueError(f"no class names for {n_classes} classes")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: `name` (used in metric names), `format` (one of FORMATS), `root` (local or s3://)."""

    name: str
    format: str
    root: str

    @property
    def n_classes(self) -> int:
        return 27 if self.format == "cityscapes27" else 19


@dataclass(frozen=True)
class EvalSample:
    """One image and its label file; `label_kind` is labelIds | trainIds."""

    sample_id: str
    image_path: str
    label_path: str
    label_kind: str


def parse_eval_sets(spec: str) -> list[EvalSet]:
    """Parse `NAME:FORMAT:PATH,...` (PATH may contain ':' as in s3://). Raises ValueError on a bad entry."""
    sets: list[EvalSet] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"eval set '{item}' is not NAME:FORMAT:PATH")
        name, fmt, root = parts
        if not SAFE_NAME.fullmatch(name):
            raise ValueError(f"eval set name '{name}' must be letters, digits, '.', '_' or '-' (it names folders)")
        if fmt not in FORMATS:
            raise ValueError(f"eval set '{name}': unknown format '{fmt}' (known: {', '.join(FORMATS)})")
        if name in {s.name for s in sets}:
            raise ValueError(f"eval set name '{name}' given twice")
        sets.append(EvalSet(name, fmt, root))
    return sets


def eval_sets(cfg: Config, ingest_dir: str) -> list[EvalSet]:
    """`eval.sets`, or the synthetic source's splits `synthetic_<cond>` from `<ingest_dir>/eval/<cond>` when empty."""
    if cfg.eval.sets.strip():
        return parse_eval_sets(cfg.eval.sets)
    return [EvalSet(f"synthetic_{c}", "cityscapes", storage.join(ingest_dir, "eval", c))
            for c in cfg.synthetic.eval_conditions]


def _walk(root: str) -> list[str]:
    """All file paths under `root` (relative, '/'-separated), sorted; [] when root does not exist."""
    if not storage.exists(root):
        return []
    if "://" not in root:
        base = Path(root)
        return sorted(str(p.relative_to(base)).replace("\\", "/") for p in base.rglob("*") if p.is_file())
    out: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        for name in storage.listdir(storage.join(root, rel) if rel else root):
            child = f"{rel}/{name}" if rel else name
            if storage.isdir(storage.join(root, child)):
                stack.append(child)
            else:
                out.append(child)
    return sorted(out)


def _pairs(root: str, img_dir: str, img_suffix: str, gt_dir: str,
           gt_suffixes: list[tuple[str, str]]) -> list[EvalSample]:
    gt_files = set(_walk(storage.join(root, gt_dir)))
    samples = []
    for rel in _walk(storage.join(root, img_dir)):
        if not rel.endswith(img_suffix):
            continue
        stem_rel = rel[: -len(img_suffix)]
        for suffix, kind in gt_suffixes:
            if stem_rel + suffix in gt_files:
                samples.append(EvalSample(stem_rel.split("/")[-1], storage.join(root, img_dir, rel),
                                          storage.join(root, gt_dir, stem_rel + suffix), kind))
                break
    return samples


def list_samples(eval_set: EvalSet, split: str = "val") -> list[EvalSample]:
    """Image / label pairs of a set in its published layout, sorted by path. Images without a label are skipped."""
    fmt, root = eval_set.format, eval_set.root
    if fmt in ("cityscapes", "cityscapes27"):
        return _pairs(root, f"leftImg8bit/{split}", "_leftImg8bit.png", f"gtFine/{split}",
                      [("_gtFine_labelIds.png", "labelIds"), ("_gtFine_labelTrainIds.png", "trainIds")])
    if fmt == "acdc":
        conds = [c for c in ACDC_CONDITIONS if c in eval_set.name.lower()] or list(ACDC_CONDITIONS)
        out: list[EvalSample] = []
        for cond in conds:
            out += _pairs(root, f"rgb_anon/{cond}/{split}", "_rgb_anon.png", f"gt/{cond}/{split}",
                          [("_gt_labelIds.png", "labelIds"), ("_gt_labelTrainIds.png", "trainIds")])
        return out
    if fmt == "darkzurich":
        return _pairs(root, f"rgb_anon/{split}/night", "_rgb_anon.png", f"gt/{split}/night",
                      [("_gt_labelIds.png", "labelIds"), ("_gt_labelTrainIds.png", "trainIds")])
    if fmt == "nightdriving":
        return _pairs(root, "leftImg8bit/test/night", "_leftImg8bit.png", "gtCoarse_daytime_trainvaltest/test/night",
                      [("_gtCoarse_labelIds.png", "labelIds"), ("_gtCoarse_labelTrainIds.png", "trainIds")])
    raise ValueError(f"unknown eval set format {fmt!r}")


def eval_samples(sets: list[EvalSet], max_images: int = 0) -> tuple[dict[str, list[EvalSample]], list[dict]]:
    """({set name: its first `max_images` (0: all) image/label pairs}, rejects): a set without any is a reject."""
    samples, rejects = {}, []
    for s in sets:
        found = list_samples(s)[: max_images or None]
        if not found:
            rejects.append({"id": f"set:{s.name}", "reason": f"no image/label pairs in {s.format} layout at {s.root}"})
        samples[s.name] = found
    return samples, rejects


def _read_png(path: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
        return np.array(im)


def load_image(sample: EvalSample) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(storage.read_bytes(sample.image_path))) as im:
        return np.array(im.convert("RGB"))


def load_label(sample: EvalSample, n_classes: int = 19) -> np.ndarray:
    """(H, W) uint8 classes (19 trainIds or 27 PiCIE classes), 255 = void."""
    raw = _read_png(sample.label_path)
    if raw.ndim == 3:
        raise ValueError(f"{sample.label_path}: expected a single-channel label image, got shape {raw.shape}")
    if sample.label_kind == "labelIds":
        lut = labelid_to_trainid_lut() if n_classes == 19 else labelid_to_27_lut()
        return lut[raw.astype(np.int64).clip(0, 255)]
    if n_classes != 19:
        raise ValueError(f"{sample.label_path}: the {n_classes}-class protocol needs labelIds, not trainIds")
    out = raw.astype(np.uint8)
    out[raw >= 19] = IGNORE_INDEX
    return out


def read_prediction(pred_root: str, set_name: str, sample_id: str) -> np.ndarray:
    """(H, W) int64 pseudo-classes stored by the evaluate stage at `pred_root/<set_name>/<sample_id>.png`."""
    return _read_png(storage.join(pred_root, set_name, f"{sample_id}.png")).astype(np.int64)
