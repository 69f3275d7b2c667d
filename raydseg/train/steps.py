"""Step functions of the segmentation stages (see raydseg.train.engine): a new objective is a new step function.

- `SegmentationStep` (teacher stage): cross-entropy of the Segmenter on the sparse pseudo-labels (of the degraded
  view when the batch has one).
- `DistillationStep` (student stage): targets from the (EMA) teacher on the clean view: soft probabilities with a
  temperature or hard argmax labels, optionally refined with the LiDAR segments. The student sees the same view, or
  its degraded copy (batch["degraded"], the `degrade` option): it must then predict in poor conditions what the
  teacher sees in good ones. With `mix: classmix` the pixels of half of the teacher's classes in each image are
  pasted onto the next image of the batch, in the student's view and in the targets (ClassMix, Olsson et al. 2021).
No Ray here (torch only).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raydseg.models.losses import ce_loss, class_weights, soft_target_loss
from raydseg.models.segmenter import normalize
from raydseg.refine import refine_with_segments, segment_mean


class SegmentationStep:
    """Teacher objective: batch {image (B,H,W,3) uint8, label (B,H,W) uint8 (255 = ignore)[, degraded (B,H,W,3)
    uint8]} -> CE loss on the degraded view if present, else on image; classes weighted n_c^-class_balance by their
    pixel count in the batch (0 = plain CE)."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, class_balance: float = 0.0):
        self.mean, self.std, self.class_balance = mean, std, class_balance

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(normalize(batch.get("degraded", batch["image"]), self.mean, self.std))
        return ce_loss(logits, batch["label"], balance=self.class_balance), {}


def student_targets(teacher: nn.Module, x: torch.Tensor, batch: dict[str, torch.Tensor], n_cls: int, *,
                    soft_targets: bool, temperature: float, refine: bool, refine_vote: str
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student targets from the (EMA) teacher on the same view x (B,3,H,W): (hard labels (B,H,W), soft probs
    (B,n_cls,H,W) or None). With `refine` and batch["segments"] (B,H,W) each LiDAR segment gets one target:
    `refine_vote` "majority", the segment's majority class (one-hot in the soft targets), or "mean", the mean of the
    teacher's probabilities over the segment (its argmax as the hard label)."""
    with torch.no_grad():
        logits = teacher(x).float()
        hard = logits.argmax(1)
        probs = F.softmax(logits / temperature, dim=1) if soft_targets else None
        if refine and "segments" in batch:
            segs = batch["segments"].long()
            if refine_vote == "mean":
                mean = segment_mean(probs if probs is not None else F.softmax(logits / temperature, dim=1), segs)
                return mean.argmax(1), mean if probs is not None else None
            refined = refine_with_segments(hard, segs, n_cls)
            if probs is not None:
                inside = (segs > 0).unsqueeze(1)
                probs = torch.where(inside, F.one_hot(refined, n_cls).permute(0, 3, 1, 2).float(), probs)
            hard = refined
    return hard, probs


def classmix_masks(labels: torch.Tensor) -> torch.Tensor:
    """ClassMix masks (Olsson et al. 2021): hard labels (B, H, W) -> (B, H, W) bool, the pixels of a random half
    (rounded up) of the classes each image holds. Draws from torch's global generator, which the training loop
    seeds per step, so a resumed run draws the same masks."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(labels.shape[0]):
        classes = labels[b].unique()
        out[b] = torch.isin(labels[b], classes[torch.randperm(len(classes))[:(len(classes) + 1) // 2]])
    return out


def paste(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Image b's pixels under masks[b] (B, H, W) pasted on image b + 1 (cyclically): x (B, H, W) or (B, C, H, W)."""
    m = masks if x.dim() == 3 else masks.unsqueeze(1)
    return torch.where(m, x, x.roll(-1, dims=0))


class DistillationStep:
    """Student objective: the student's logits (on batch["degraded"] if present, else on the teacher's view) against
    the teacher's targets on the clean view (soft-target cross-entropy x T^2, or CE on the hard targets), each pixel
    weighted by its teacher class's batch count ^ -class_balance (`class_weights`; 0 = unweighted)."""

    def __init__(self, teacher: nn.Module, n_cls: int, cfg: dict[str, Any], mean: Sequence[float] | None,
                 std: Sequence[float] | None):
        self.teacher, self.n_cls = teacher, n_cls
        self.soft_targets, self.temperature, self.refine = cfg["soft_targets"], cfg["temperature"], cfg["refine"]
        self.refine_vote, self.mix = cfg["refine_vote"], cfg["mix"]
        self.class_balance = cfg["class_balance"]
        self.mean, self.std = mean, std

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        x = normalize(batch["image"], self.mean, self.std)
        view = normalize(batch["degraded"], self.mean, self.std) if "degraded" in batch else x
        hard, probs = student_targets(self.teacher, x, batch, self.n_cls, soft_targets=self.soft_targets,
                                      temperature=self.temperature, refine=self.refine,
                                      refine_vote=self.refine_vote)
        if self.mix == "classmix" and x.shape[0] > 1:
            masks = classmix_masks(hard)
            view, hard = paste(view, masks), paste(hard, masks)
            probs = paste(probs, masks) if probs is not None else None
        logits = model(view)
        if probs is None:
            return ce_loss(logits, hard, balance=self.class_balance), {}
        weight = (class_weights(hard, self.n_cls, self.class_balance, torch.ones_like(hard, dtype=torch.bool))
                  if self.class_balance > 0 else None)
        return soft_target_loss(logits, probs, self.temperature, weight=weight), {}
