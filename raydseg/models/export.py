"""A trained Segmenter out of PyTorch: ONNX (run by onnxruntime) and TorchScript files, both with a dynamic batch
and image size, and loaders that make either a drop-in for the PyTorch model in `raydseg.models.infer`.

Both files map normalised float images (B, 3, H, W) to logits (B, n_cls, H, W), as `Segmenter.forward` does; the
model config (n_cls, mean, std, ...) travels inside the file (ONNX metadata, TorchScript extra file), so inference
normalises the same way.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}
CONFIG_KEY = "model_config"  # ONNX metadata key
TS_CONFIG_FILE = "model_config.json"  # TorchScript extra file
OPSET = 18
# the traced example; any other size runs too (the ViT's position embeddings are resampled to the patch grid)
EXAMPLE_HW = (96, 160)


def export_model(model: nn.Module, fmt: str, out: str) -> str:
    """Write `model` (a Segmenter with `model_cfg`) to `out` as `fmt` ("onnx" | "torchscript"); returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown '{fmt}' (one of {', '.join(FORMATS)})")
    model = model.eval().float().cpu()
    cfg = json.dumps(getattr(model, "model_cfg", {}))
    example = torch.zeros(2, 3, *EXAMPLE_HW)  # batch 2: a size-1 example would fix the batch at 1
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, out, _extra_files={TS_CONFIG_FILE: cfg})
        else:
            import onnx

            dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=16),
                    3: torch.export.Dim("width", min=16)}
            torch.onnx.export(model, (example,), out, input_names=["images"], output_names=["logits"],
                              dynamic_shapes=(dims,), opset_version=OPSET, dynamo=True,
                              external_data=False, verbose=False)
            proto = onnx.load(out)
            onnx.helper.set_model_props(proto, {CONFIG_KEY: cfg})
            onnx.save(proto, out)
    return out


class OnnxSegmenter(nn.Module):
    """An exported ONNX Segmenter run by onnxruntime (CPU, or CUDA when the build has it), called like the PyTorch
    model: normalised float (B, 3, H, W) tensor -> logits (B, n_cls, H, W) tensor on the input's device."""

    def __init__(self, path: str, providers: list[str] | None = None):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=providers or ort.get_available_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.model_cfg: dict[str, Any] = json.loads(meta.get(CONFIG_KEY, "{}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(["logits"], {"images": x.detach().float().cpu().numpy()})
        return torch.from_numpy(np.asarray(logits)).to(x.device)


def load_exported(path: str) -> nn.Module:
    """The model of an exported file, by its extension (.onnx: OnnxSegmenter; .torchscript: torch.jit)."""
    if path.endswith(".onnx"):
        return OnnxSegmenter(path).eval()
    extra = {TS_CONFIG_FILE: ""}
    model = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    model.model_cfg = json.loads(extra[TS_CONFIG_FILE] or "{}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """`raydseg export --model M --format onnx|torchscript --out F`."""
    import argparse

    from raydseg.errors import InputError
    from raydseg.models.io import load_model

    p = argparse.ArgumentParser(prog="raydseg export", description="Export a trained model with a dynamic input size.")
    p.add_argument("--model", required=True, help="model dir (local or s3://) or MLflow run (runs:/<id>)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--out", required=True, help=f"output file ({', '.join(FORMATS.values())})")
    args = p.parse_args(argv)
    if not args.out.endswith(FORMATS[args.format]):
        raise InputError(f"--out: {args.out} does not end with {FORMATS[args.format]} (format {args.format})")
    export_model(load_model(args.model), args.format, args.out)
    print(f"wrote {args.out}")
    return 0
