"""The masked autoencoder's step function (raydseg.train.engine) for the `pretrain` stage (`objective: mae`).

No Ray here (torch + timm only), so the same code runs on a machine with torch and timm only.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from raydseg.models.segmenter import normalize


class MaeStep:
    """batch {global_0, global_1, ...: (B, 3, s, s) uint8} -> the reconstruction loss of the first `views` global
    crops as one batch of views x B images (local crops, if any, are not read). Metric: mask_ratio (the share
    actually hidden)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 views: int = 2):
        self.mean, self.std, self.views = list(mean), list(std), views

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        x = normalize(torch.cat([batch[f"global_{i}"] for i in range(self.views)]), self.mean, self.std)
        loss, mask = model(x)
        return loss, {"mask_ratio": float(mask.mean())}
