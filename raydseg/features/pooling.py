"""Segment descriptors from a ViT: the paper's masked-crop [CLS] and the faster patch features pooled under the mask.

Both return L2-normalised (S, D) float32 descriptors for the segments of one image. Images are (H, W, 3) uint8,
segment-id images (H, W) integer (0 = no segment); normalisation uses the backbone's mean / std (`input_stats`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydseg.features.backbone import input_stats
from raydseg.features.ground import patch_grid_size


def normalize_image(image: np.ndarray, model: nn.Module | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, (x / 255 - mean) / std with the model's statistics (`input_stats`)."""
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in input_stats(model))
    x = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1).float() / 255.0  # a copy: inputs may be read-only
    return (x - mean) / std


def _bbox(mask: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    h, w = mask.shape
    return (max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, h), max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, w))


def masked_crops(x: torch.Tensor, segment_ids: np.ndarray, ids: np.ndarray, crop_size: int = 224,
                 pad: int = 0) -> torch.Tensor:
    """Tight crops around each segment of the normalised image x (3, H, W): pixels outside the segment's mask are
    zeroed (after normalisation, as the paper), each crop bilinearly resized to crop_size x crop_size.
    segment_ids (H, W), ids (S,) -> (S, 3, crop_size, crop_size)."""
    crops = []
    for sid in ids:
        mask = segment_ids == sid
        if not mask.any():
            raise ValueError(f"segment {sid} has no pixel in the segment-id image")
        r0, r1, c0, c1 = _bbox(mask, pad)
        m = torch.from_numpy(mask[r0:r1, c0:c1]).to(x.dtype)
        crop = x[:, r0:r1, c0:c1] * m
        crops.append(F.interpolate(crop[None], size=(crop_size, crop_size), mode="bilinear", align_corners=False)[0])
    return torch.stack(crops) if crops else x.new_zeros((0, 3, crop_size, crop_size))


CROP_DESCRIPTORS = {"crop_cls": "cls", "crop_mean": "mean"}  # masked-crop descriptors: descriptor -> token pooling


@torch.no_grad()
def crop_cls_descriptors(model: nn.Module, image: np.ndarray, segment_ids: np.ndarray, ids: np.ndarray, *,
                         crop_size: int = 224, batch_size: int = 32, device: str = "cpu",
                         dtype: torch.dtype | None = None, pad: int = 0, pool: str = "cls") -> np.ndarray:
    """Paper descriptor: the [CLS] token (after the final norm) of every masked tight crop; `pool="mean"`: the mean
    of the crop's patch tokens instead (for backbones whose [CLS] no loss trained, e.g. a masked autoencoder's).
    image (H, W, 3) uint8, segment_ids (H, W), ids (S,) -> (S, D) float32, L2-normalised."""
    x = normalize_image(image, model)
    crops = masked_crops(x, segment_ids, np.asarray(ids), crop_size, pad)
    out = []
    for s in range(0, len(crops), batch_size):
        b = crops[s:s + batch_size].to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            tokens = model.forward_features(b)  # (B, prefix + patches, D)
        out.append((tokens[:, 0] if pool == "cls" else tokens[:, model.num_prefix_tokens:].mean(1)).float().cpu())
    if not out:
        return np.zeros((0, model.num_features), np.float32)
    return F.normalize(torch.cat(out), dim=1).numpy().astype(np.float32)


def mask_weights(segment_ids: np.ndarray, ids: np.ndarray, grid: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """Fraction of every patch cell covered by each segment: segment_ids (H, W), ids (S,) -> (S, gh, gw) float32;
    every non-empty segment has a positive total (area-averaged masks, `chunk` segments at a time)."""
    out = [torch.zeros((0,) + tuple(grid))]
    for s in range(0, len(ids), chunk):
        masks = torch.from_numpy(np.stack([segment_ids == i for i in ids[s:s + chunk]]).astype(np.float32))
        out.append(F.adaptive_avg_pool2d(masks[None], grid)[0])
    return torch.cat(out)


@torch.no_grad()
def patch_tokens(model: nn.Module, image: np.ndarray, size: int = 0, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """One ViT pass over the whole image (H, W, 3) uint8, its shorter side at `size` px (0 = native), both sides
    rounded to patch multiples: the patch tokens (gh*gw, D) float32 on the CPU, row-major, and the grid (gh, gw)."""
    h, w = image.shape[:2]
    patch = model.patch_embed.patch_size[0]
    ih, iw = patch_grid_size(h, w, patch, size)
    x = F.interpolate(normalize_image(image, model)[None], size=(ih, iw), mode="bilinear", align_corners=False)
    with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        tokens = model.forward_features(x.to(device))  # (1, prefix + gh*gw, D)
    return tokens[0, model.num_prefix_tokens:].float().cpu(), (ih // patch, iw // patch)


def mask_pool_descriptors(model: nn.Module, image: np.ndarray, segment_ids: np.ndarray, ids: np.ndarray, *,
                          size: int = 0, device: str = "cpu", dtype: torch.dtype | None = None) -> np.ndarray:
    """Fast descriptor: one ViT pass over the whole image, patch tokens averaged with each segment's per-patch
    coverage as weights. image (H, W, 3) uint8, segment_ids (H, W), ids (S,) -> (S, D) float32, L2-normalised.
    `size`: shorter input side in px (0 = native), rounded to patch multiples."""
    feats, grid = patch_tokens(model, image, size, device, dtype)
    wts = mask_weights(segment_ids, np.asarray(ids), grid).reshape(len(ids), -1)  # (S, gh*gw)
    if len(ids) == 0:
        return np.zeros((0, feats.shape[1]), np.float32)
    pooled = (wts @ feats) / wts.sum(1, keepdim=True).clamp_min(1e-12)
    return F.normalize(pooled, dim=1).numpy().astype(np.float32)


def ground_descriptors(model: nn.Module, image: np.ndarray, cells: np.ndarray, ids: np.ndarray, *, size: int = 0,
                       device: str = "cpu", dtype: torch.dtype | None = None) -> np.ndarray:
    """The ground patches' descriptors: the patch token of each cell (`raydseg.features.ground.ground_cells` on the
    same `size`). image (H, W, 3) uint8, cells (H, W), ids (G,) 1-based cells -> (G, D) float32, L2-normalised."""
    if len(ids) == 0:
        return np.zeros((0, model.num_features), np.float32)
    feats, _ = patch_tokens(model, image, size, device, dtype)
    return F.normalize(feats[torch.as_tensor(np.asarray(ids, np.int64) - 1)], dim=1).numpy().astype(np.float32)


def segment_descriptors(model: nn.Module, image: np.ndarray, segment_ids: np.ndarray, ids: np.ndarray,
                        descriptor: str = "crop_cls", **kw: object) -> np.ndarray:
    """Dispatch on `descriptor`: crop_cls (paper) | crop_mean | mask_pool. Returns (S, D) float32 L2-normalised."""
    if descriptor in CROP_DESCRIPTORS:
        return crop_cls_descriptors(model, image, segment_ids, ids, pool=CROP_DESCRIPTORS[descriptor],
                                    **kw)  # type: ignore[arg-type]
    if descriptor == "mask_pool":
        return mask_pool_descriptors(model, image, segment_ids, ids, **kw)  # type: ignore[arg-type]
    raise ValueError(f"unknown descriptor '{descriptor}' (crop_cls | crop_mean | mask_pool)")
