"""LiDAR geometric refinement: inside every projected LiDAR segment the teacher's prediction is replaced by one
for the whole segment (the segment is one object, so it gets one pseudo-class): its majority class (the paper), or
the mean of the teacher's probabilities over its pixels (a soft vote that keeps the teacher's uncertainty); other
pixels are unchanged."""
from __future__ import annotations

import numpy as np
import torch


def batch_segment_keys(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, H, W) int64 per-image segment ids -> ((B, H, W) ids unique over the batch, their count): image b's
    segment s becomes b * n + s, n = the largest id + 1."""
    B = segments.shape[0]
    n_seg = int(segments.max().item()) + 1 if segments.numel() else 1
    return torch.arange(B, device=segments.device).view(B, 1, 1) * n_seg + segments, B * n_seg


def refine_with_segments(labels: torch.Tensor, segments: torch.Tensor, n_cls: int) -> torch.Tensor:
    """Majority vote of `labels` inside each segment.

    labels: (B, H, W) int pseudo-classes in [0, n_cls); segments: (B, H, W) int segment ids, 0 = no segment
    (ids are per image). Returns (B, H, W) int64: pixels of segment s get the most frequent class of s (ties ->
    the smaller class id); pixels with segment 0 keep their label.
    """
    labels = labels.long()
    segments = segments.long()
    key, n_keys = batch_segment_keys(segments)
    votes = torch.zeros(n_keys * n_cls, dtype=torch.long, device=labels.device)
    votes.scatter_add_(0, (key * n_cls + labels).reshape(-1), torch.ones(labels.numel(), dtype=torch.long,
                                                                          device=labels.device))
    majority = votes.view(n_keys, n_cls).argmax(1)  # first max -> smallest class id on ties
    refined = majority[key]
    return torch.where(segments > 0, refined, labels)


def segment_mean(probs: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Mean of `probs` inside each segment.

    probs: (B, C, H, W) float per-pixel class probabilities; segments: (B, H, W) int segment ids, 0 = no segment
    (ids are per image). Returns (B, C, H, W): pixels of segment s get the mean of probs over s's pixels; pixels
    with segment 0 keep theirs.
    """
    B, C = probs.shape[:2]
    segments = segments.long()
    key, n_keys = batch_segment_keys(segments)
    key = key.reshape(-1)  # (B*H*W,)
    flat = probs.reshape(B, C, -1).permute(1, 0, 2).reshape(C, -1)  # (C, B*H*W)
    sums = torch.zeros(C, n_keys, dtype=probs.dtype, device=probs.device)
    sums.index_add_(1, key, flat)
    counts = torch.bincount(key, minlength=n_keys).clamp_min(1).to(probs.dtype)
    mean = (sums / counts)[:, key].reshape(C, B, -1).permute(1, 0, 2).reshape(probs.shape)
    return torch.where((segments > 0).unsqueeze(1), mean, probs)


def refine_numpy(labels: np.ndarray, segments: np.ndarray, n_cls: int) -> np.ndarray:
    """(H, W) numpy version of `refine_with_segments`."""
    return refine_with_segments(torch.from_numpy(labels[None].astype(np.int64)),
                                torch.from_numpy(segments[None].astype(np.int64)), n_cls)[0].numpy()
