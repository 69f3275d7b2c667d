"""DINO projection head and multi-crop wrapper (Caron et al. 2021, facebookresearch/dino `DINOHead`,
`MultiCropWrapper`), on a timm ViT backbone.

Head: a 3-layer MLP (GELU; hidden 2048, bottleneck 256 in the paper), L2-normalisation of the bottleneck, and a
weight-normalised linear last layer without bias to `out_dim` prototypes (65536 in the paper). With
`norm_last_layer` the weight-norm magnitude g is fixed to 1 (not trained): every prototype has unit norm, which
the paper finds stabilises training (ViT-B); its code defaults to it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """(B, in_dim) backbone features -> (B, out_dim) prototype logits (before the temperature softmax).

    Args:
        in_dim: backbone feature width (ViT-Tiny 192, ViT-S 384).
        out_dim: number of prototypes K (paper: 65536).
        hidden_dim: MLP width (paper: 2048).
        bottleneck_dim: width of the L2-normalised bottleneck (paper: 256).
        n_layers: MLP layers before the bottleneck output (paper: 3).
        norm_last_layer: fix the weight-norm magnitude of the last layer to 1.
        use_bn: BatchNorm1d after each hidden layer (the official `--use_bn_in_head`): the hidden units are
            normalised over the batch, so the head's output depends on the image even when the backbone's barely
            does (a random-init ViT), which keeps centering from flattening the teacher to uniform.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        n_layers = max(n_layers, 1)
        if n_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            def hidden(n_in: int) -> list[nn.Module]:
                return [nn.Linear(n_in, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]

            layers: list[nn.Module] = hidden(in_dim)
            for _ in range(n_layers - 2):
                layers += hidden(hidden_dim)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_trunc_normal_init)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)  # g: per-prototype magnitude
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of several resolutions: consecutive crops of the same size go through
    the backbone in one batch, the head runs once on all of them.

    forward(crops: list of (B, 3, h_i, w_i)) -> (sum_i B, out_dim), in the order of the list.
    `backbone` maps (B, 3, h, w) -> (B, D) (a timm ViT with num_classes=0: the final-norm [CLS] token).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(feats))


def build_dino_model(backbone: str, *, weights: str = "", drop_path: float = 0.1, out_dim: int = 65536,
                     hidden_dim: int = 2048, bottleneck_dim: int = 256, norm_last_layer: bool = True,
                     use_bn: bool = False, **backbone_kw: Any) -> MultiCropWrapper:
    """A timm ViT (no classifier, `dynamic_img_size=True`, weights as `create_backbone`) with a DINO head.
    `backbone_kw` go to timm's factory (e.g. depth=2 for tests)."""
    from raydseg.features.backbone import create_backbone

    net = create_backbone(backbone, weights, dynamic_img_size=True, num_classes=0, drop_path_rate=drop_path,
                          **backbone_kw).train()
    head = DINOHead(net.num_features, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                    norm_last_layer=norm_last_layer, use_bn=use_bn)
    return MultiCropWrapper(net, head)
