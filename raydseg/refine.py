"""LiDAR geometric refinement: inside every projected LiDAR segment the teacher's prediction is replaced by one
for the whole segment (the segment is one object, so it gets one pseudo-class): its majority class (the paper), or
the mean of the teacher's probabilities over its pixels (a soft vote that keeps the teacher's uncertainty); other
pixels are unchanged."""
from __future__ import annotations

import numpy as np
import torch


def refine_with_segments(labels: torch.Tensor, segments: torch.Tensor, n_cls: int) -> torch.Tensor:
    """Majority vote of `labels` inside each segment.

    labels: (B, H, W) int pseudo-classes in [0, n_cls); segments: (B, H, W) int segment ids, 0 = no segment
    (ids are per image). Returns (B, H, W) int64: pixels of segment s get the most frequent class of s (ties ->
    the smaller class id); pixels with segment 0 keep their label.
    """
    labels = labels.long()
    segments = segments.long()
    B = labels.shape[0]
    n_seg = int(segments.max().item()) + 1 if segments.numel() else 1
    key = (torch.arange(B, device=labels.device).view(B, 1, 1) * n_seg + segments)  # (B, H, W)
    votes = torch.zeros(B * n_seg * n_cls, dtype=torch.long, device=labels.device)
    votes.scatter_add_(0, (key * n_cls + labels).reshape(-1), torch.ones(labels.numel(), dtype=torch.long,
                                                                          device=labels.device))
    majority = votes.view(B * n_seg, n_cls).argmax(1)  # first max -> smallest class id on ties
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
    n_seg = int(segments.max().item()) + 1 if segments.numel() else 1
    key = (torch.arange(B, device=probs.device).view(B, 1, 1) * n_seg + segments).reshape(B, 1, -1)  # (B, 1, HW)
    flat = probs.reshape(B, C, -1).permute(1, 0, 2).reshape(C, -1)  # (C, B*HW)
    sums = torch.zeros(C, B * n_seg, dtype=probs.dtype, device=probs.device)
    sums.index_add_(1, key.reshape(-1), flat)
    counts = torch.bincount(key.reshape(-1), minlength=B * n_seg).clamp_min(1).to(probs.dtype)
    mean = (sums / counts)[:, key.reshape(-1)].reshape(C, B, -1).permute(1, 0, 2).reshape(probs.shape)
    return torch.where((segments > 0).unsqueeze(1), mean, probs)


def refine_numpy(labels: np.ndarray, segments: np.ndarray, n_cls: int) -> np.ndarray:
    """(H, W) numpy version of `refine_with_segments`."""
    return refine_with_segments(torch.from_numpy(labels[None].astype(np.int64)),
                                torch.from_numpy(segments[None].astype(np.int64)), n_cls)[0].numpy()
