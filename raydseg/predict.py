"""`raydseg predict --model RUN_OR_PATH --images DIR --out DIR`: label PNGs and colour overlays for a folder.

RUN_OR_PATH: a model dir (`<run>/teacher/model`, local or s3://) or an MLflow run (`runs:/<run_id>` or the bare id,
artifact `model/`). Writes `<out>/labels/<name>.png` (uint8 pseudo-classes) and `<out>/overlays/<name>.png`.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from raydseg.errors import InputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 distinct colours (a fixed pseudo-random palette; class 255 = black)."""
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, size=(n, 3)).astype(np.uint8)
    pal[255 % n] = 0
    return pal


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-coded (H, W) labels over the uint8 (H, W, 3) image."""
    colours = palette()[np.clip(labels, 0, 255).astype(np.int64)]
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydseg predict", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model dir (local or s3://) or MLflow run (runs:/<id>)")
    p.add_argument("--images", required=True, help="folder of .png/.jpg images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=0, help="resize the shorter side before inference (paper: 1024)")
    p.add_argument("--window", type=int, default=0, help="sliding-window size in px (paper: 512; 0 = whole image)")
    p.add_argument("--stride", type=int, default=0, help="sliding-window stride in px (paper: 128)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = p.parse_args(argv)

    from raydseg.data.schema import as_rgb, decode_image, encode_png
    from raydseg.models.infer import predict_image
    from raydseg.models.io import load_model

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.images) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise InputError(f"--images: no images (*.png, *.jpg) under {args.images}")
    model = load_model(args.model).to(args.device)
    for path in files:
        with open(path, "rb") as f:
            image = decode_image(f.read())
        image = as_rgb(image)
        pred = predict_image(model, image, size=args.size or None, window=args.window or None,
                             stride=args.stride or None)
        rel = os.path.splitext(os.path.relpath(path, args.images))[0] + ".png"
        outputs = (("labels", encode_png(pred.astype(np.uint8))), ("overlays", encode_png(overlay(image, pred))))
        for sub, data in outputs:
            target = os.path.join(args.out, sub, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
    print(f"wrote {len(files)} label images and overlays to {args.out}")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
