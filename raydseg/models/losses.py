"""Segmentation losses: cross-entropy on sparse pseudo-labels (255 ignored) and soft-target distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raydseg.eval.metrics import IGNORE_INDEX


def class_weights(target: torch.Tensor, n_cls: int, power: float, valid: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights (B, H, W) float: a valid pixel of class c weighs n_c^-power (n_c: the valid pixels of c in
    this batch), normalised to average 1 over the valid pixels; invalid pixels weigh 0. power 0 = every valid pixel
    1, 1 = every class present weighs the same, so a frequent class such as the ground no longer dominates."""
    counts = torch.bincount(target[valid], minlength=n_cls).float()
    w = torch.where(valid, (counts.clamp(min=1) ** -power)[target.clamp(0, n_cls - 1)], 0.0)
    return w * (valid.sum() / w.sum().clamp(min=1e-12))


def ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
            balance: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels. logits (B, C, H, W), target (B, H, W) int (ignore_index skipped).

    balance: class-balancing power p >= 0 (`class_weights`): 0 = plain cross-entropy, 1 = every class present in
    the batch weighs the same, 0.5 in between. All pixels ignored -> 0 with zero gradient (not NaN as
    `F.cross_entropy` gives).
    """
    target = target.long()
    valid = target != ignore_index
    n = valid.sum().clamp(min=1)
    if balance <= 0:
        total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        return total / n
    per_px = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    return (per_px * class_weights(target, logits.shape[1], balance, valid)).sum() / n


def soft_target_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0,
                     valid: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student's tempered softmax against the teacher's soft targets, x T^2 (Hinton).

    student_logits (B, C, H, W); teacher_probs (B, C, H, W) summing to 1 over C (e.g. softmax(teacher / T));
    valid (B, H, W) bool, pixels to count (None = all); weight (B, H, W) float per-pixel weights averaging 1 over
    the valid pixels (`class_weights`; None = 1). Equals `ce_loss` when the teacher is one-hot and T = 1.
    The KL divergence differs from this only by the teacher's entropy, a constant for the student.
    """
    logp = F.log_softmax(student_logits.float() / temperature, dim=1)
    per_px = -(teacher_probs.float() * logp).sum(dim=1)  # (B, H, W)
    if valid is None:
        valid = torch.ones_like(per_px, dtype=torch.bool)
    if weight is not None:
        per_px = per_px * weight
    n = valid.sum().clamp(min=1)
    return (per_px * valid).sum() / n * temperature ** 2
