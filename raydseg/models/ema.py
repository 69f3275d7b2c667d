"""Exponential moving average of a model's weights (the EMA teacher of the student stage).

Create it from the *unwrapped* model before `prepare_model`/DDP, update it from `model.module` on every rank:
ranks stay identical because DDP all-reduces the gradients. EMA weights are kept in fp32 under AMP.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """`teacher <- m * teacher + (1 - m) * student` for every floating parameter and buffer (others copied)."""

    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        src = dict(model.state_dict())
        for name, t in self.module.state_dict().items():
            s = src[name].detach()
            if t.dtype.is_floating_point:
                t.copy_(momentum * t + (1.0 - momentum) * s.to(t.dtype))
            else:
                t.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
