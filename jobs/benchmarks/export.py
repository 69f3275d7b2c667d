"""Exported models against the PyTorch model they came from: label agreement and CPU speed per image.

`python jobs/benchmarks/export.py --model MODEL_DIR --eval-dir DIR --out FILE.json [--images N --threads T]`
DIR: a Cityscapes-layout split (e.g. `<run>/ingest/eval/day` of the embedded default). Exports the model to ONNX and
TorchScript (`raydseg.models.export`), then predicts each image whole with the PyTorch model (the baseline),
onnxruntime and TorchScript through the same `predict_image`, and reports per format: ms per image, the ratio of its
speed to PyTorch's, the share of pixels whose label equals PyTorch's, the export seconds and the file size.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from raydseg.eval.sets import EvalSet, list_samples, load_image
    from raydseg.models.export import FORMATS, export_model
    from raydseg.models.infer import predict_image
    from raydseg.models.io import load_model

    torch.set_num_threads(args.threads)  # PyTorch and TorchScript; onnxruntime keeps its default (one per core)
    images = [load_image(s) for s in list_samples(EvalSet("bench", "cityscapes", args.eval_dir))[: args.images]]
    tmp = tempfile.mkdtemp(prefix="raydseg-export-")
    models = {"pytorch": load_model(args.model)}
    results: dict = {"images": len(images), "height_px": int(images[0].shape[0]), "width_px": int(images[0].shape[1]),
                     "threads": args.threads, "model": args.model}
    for fmt, ext in FORMATS.items():
        path = os.path.join(tmp, "model" + ext)
        t0 = time.perf_counter()
        export_model(load_model(args.model), fmt, path)
        results[f"{fmt}_export_s"] = time.perf_counter() - t0
        results[f"{fmt}_file_mb"] = os.path.getsize(path) / 1e6
        models[fmt] = load_model(path)
    labels = {}
    for name, model in models.items():
        predict_image(model, images[0])  # warm-up
        t0 = time.perf_counter()
        labels[name] = [predict_image(model, im) for im in images]
        results[f"{name}_ms_per_image"] = 1e3 * (time.perf_counter() - t0) / len(images)
    for fmt in FORMATS:
        agree = np.mean([(a == b).mean() for a, b in zip(labels[fmt], labels["pytorch"])])
        results[f"{fmt}_label_agreement"] = float(agree)
        results[f"{fmt}_min_image_agreement"] = float(min((a == b).mean() for a, b in zip(labels[fmt],
                                                                                             labels["pytorch"])))
        results[f"{fmt}_speed_ratio_vs_pytorch"] = results["pytorch_ms_per_image"] / results[f"{fmt}_ms_per_image"]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
