"""Benchmark: one training view (`raydseg.train.data.augment_example`, torchvision v2 ops on tv_tensors) against the
hand-written PIL / numpy augmentation it replaced (issue 20), on the same images, crop boxes and draws.

`python jobs/benchmarks/augment.py --out augment.json [--n 300]`

Images are the embedded default's size (320 x 160, uint8 RGB, with uint8 labels and int32 segment ids), crop 192,
scale (0.3, 1), flip, jitter 0.2, one torch thread. Baseline: `pil_numpy`, the former implementation (PIL resize of
the crop box, numpy flip and jitter), kept here only as the baseline. Keys: `<variant>_ms_per_view` (best of 3
passes over --n views, with and without segment ids), `tv_tensors_over_pil_numpy` (time ratio, < 1 is faster).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def pil_numpy_view(image: np.ndarray, label: np.ndarray, segments: np.ndarray | None, rng: np.random.Generator,
                   crop: int, scale: tuple[float, float], flip: bool, jitter: float) -> tuple:
    """The former `augment_example`: PIL bilinear / nearest resize of the crop box, numpy flip and jitter."""
    from PIL import Image

    from raydseg.train.data import random_resized_crop_box

    def resize(a: np.ndarray, nearest: bool) -> np.ndarray:
        im = Image.fromarray(a.astype(np.int32), mode="I") if a.dtype == np.int32 else Image.fromarray(a)
        out = np.asarray(im.resize((crop, crop), Image.NEAREST if nearest else Image.BILINEAR))
        return out.astype(a.dtype)

    h, w = label.shape
    y0, x0, ch, cw = random_resized_crop_box(h, w, rng, scale)
    image = resize(image[y0:y0 + ch, x0:x0 + cw], False)
    label = resize(label[y0:y0 + ch, x0:x0 + cw], True)
    segments = None if segments is None else resize(segments[y0:y0 + ch, x0:x0 + cw], True)
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
        segments = None if segments is None else segments[:, ::-1]
    x = image.astype(np.float32) * rng.uniform(1 - jitter, 1 + jitter)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - jitter, 1 + jitter) + mean
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * rng.uniform(1 - jitter, 1 + jitter) + gray
    return np.clip(x, 0, 255).astype(np.uint8), np.ascontiguousarray(label), segments


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()

    import torch

    from raydseg.procstats import write_figures
    from raydseg.train.data import augment_example

    torch.set_num_threads(1)
    src = np.random.default_rng(0)
    image = src.integers(0, 256, (160, 320, 3), dtype=np.uint8)
    label = src.integers(0, 13, (160, 320)).astype(np.uint8)
    segments = src.integers(0, 500, (160, 320)).astype(np.int32)
    variants = {"pil_numpy": pil_numpy_view, "tv_tensors": augment_example}
    for fn in variants.values():  # warm-up: imports and torchvision's kernel registration
        fn(image, label, segments, np.random.default_rng(0), 192, (0.3, 1.0), True, 0.2)
    out: dict[str, float] = {}
    for with_segments in (False, True):
        tag = "_segments" if with_segments else ""
        for name, fn in variants.items():
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for i in range(a.n):
                    fn(image, label, segments if with_segments else None, np.random.default_rng(i), 192, (0.3, 1.0),
                       True, 0.2)
                best = min(best, (time.perf_counter() - t) / a.n)
            out[f"{name}{tag}_ms_per_view"] = 1e3 * best
        ratio = out[f"tv_tensors{tag}_ms_per_view"] / out[f"pil_numpy{tag}_ms_per_view"]
        out[f"tv_tensors_over_pil_numpy{tag}"] = ratio
    write_figures(out, a.out)


if __name__ == "__main__":
    main()
