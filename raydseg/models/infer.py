"""Inference of a Segmenter on one image: optional resize, optional sliding window, argmax pseudo-classes."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from raydseg.models.segmenter import normalize


def _windows(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of `window` px every `stride` px (last one flush)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, window: int | None = None,
                   stride: int | None = None) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> logits (B, C, H, W); sliding windows (averaged softmax) when `window`."""
    if not window or (x.shape[2] <= window and x.shape[3] <= window):
        return model(x).float()
    stride = stride or max(window // 2, 1)
    B, _, H, W = x.shape
    acc = None
    count = torch.zeros((1, 1, H, W), device=x.device)
    for y in _windows(H, window, stride):
        for xo in _windows(W, window, stride):
            out = model(x[:, :, y:y + window, xo:xo + window]).float().softmax(1)
            if acc is None:
                acc = torch.zeros((B, out.shape[1], H, W), device=x.device)
            acc[:, :, y:y + out.shape[2], xo:xo + out.shape[3]] += out
            count[:, :, y:y + out.shape[2], xo:xo + out.shape[3]] += 1
    return (acc / count).log()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any, e.g. an onnxruntime session)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def model_inputs(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> normalised float (B, 3, H, W) on the model's device, with the mean / std of its
    `model_cfg` (ImageNet's by default)."""
    cfg = getattr(model, "model_cfg", {}) or {}
    return normalize(torch.from_numpy(images).to(model_device(model)), cfg.get("mean", IMAGENET_DEFAULT_MEAN),
                     cfg.get("std", IMAGENET_DEFAULT_STD))


@torch.no_grad()
def predict_image(model: nn.Module, image: np.ndarray, *, size: int | None = None, window: int | None = None,
                  stride: int | None = None, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """uint8 (H, W, 3) image -> (H, W) int64 pseudo-classes, on the device of the model's parameters.

    size: resize so the shorter side is `size` px before inference (None/0 = native); window/stride: sliding-window
    inference in px of the (resized) image (None/0 = whole image; stride default window // 2). Logits are resized
    back to (H, W) before the argmax. autocast_dtype: run the model's forwards under `torch.autocast` with this
    dtype (e.g. torch.bfloat16 on GPU); None = full precision. Window averaging and the argmax stay in float32.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape}")
    model.eval()
    device = model_device(model)
    x = model_inputs(model, np.array(image, copy=True)[None])
    H, W = image.shape[:2]
    if size:
        scale = size / min(H, W)
        x = F.interpolate(x, size=(max(1, round(H * scale)), max(1, round(W * scale))), mode="bilinear",
                          align_corners=False)
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = predict_logits(model, x, window or None, stride or None)
    if logits.shape[2:] != (H, W):
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).cpu().numpy().astype(np.int64)
