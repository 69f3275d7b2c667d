"""Exponential moving average of a model's weights (the student stage's EMA teacher, DINO's teacher): timm's
`ModelEmaV3`, kept in fp32 (also under AMP), with the momentum given at every update.

Create it from the *unwrapped* model before `prepare_model`/DDP, update it from `model.module` on every rank:
ranks stay identical because DDP all-reduces the gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3


class EMA(ModelEmaV3):
    """`teacher <- m * teacher + (1 - m) * student` for every floating parameter and buffer (others copied), with
    `m` per call (a constant, or DINO's cosine schedule). `state_dict()` is the averaged module's own, so
    checkpoints hold the same keys as the model."""

    def __init__(self, model: nn.Module):
        try:
            super().__init__(model, dtype=torch.float32)
        except TypeError:  # timm < 1.0.9 has no dtype argument: the copy keeps the model's (fp32) parameters
            super().__init__(model)
            self.module.float()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:  # type: ignore[override]
        self.decay = float(momentum)
        super().update(model)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state, strict=strict, assign=assign)
