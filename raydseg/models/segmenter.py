"""Segmenter (Strudel et al. 2021): a timm ViT encoder + a mask-transformer decoder, or a linear decoder.

`Segmenter(encoder, decoder, n_cls)` composition as in the official code; any input size (the encoder runs with
`dynamic_img_size=True`, so its position embedding is interpolated to the patch grid; inputs are padded to a
multiple of the patch size and the output cropped back). Built from a plain dict (`model_cfg`) that is saved
next to every checkpoint (`model_config.json`), so a model is rebuilt without the pipeline config.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

DEFAULT_MODEL_CFG: dict[str, Any] = {
    "arch": "segmenter",
    "backbone": "vit_tiny_patch16_224",  # paper: DINO ViT-S/16 (vit_small_patch16_224.dino)
    "n_cls": 31,  # paper: 31 (ground + k=30)
    "decoder": "mask",  # mask (mask transformer, paper) | linear
    "n_layers": 1,  # mask-transformer layers (released config: 1)
    "d_model": 0,  # decoder width (0 = encoder width)
    "n_heads": 0,  # decoder heads (0 = encoder width // 64, at least 1)
    "dropout": 0.1,  # decoder dropout (released config: 0.1)
    "drop_path": 0.1,  # encoder stochastic depth (released config: 0.1)
    "mean": list(IMAGENET_DEFAULT_MEAN),
    "std": list(IMAGENET_DEFAULT_STD),
    "input_norm": "dataset",  # dataset (mean/std above only) | image (then each image standardised: standardize_image)
}


def resolve_model_cfg(model_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """DEFAULT_MODEL_CFG updated with `model_cfg`; unknown keys are an error (never swallowed)."""
    cfg = dict(DEFAULT_MODEL_CFG)
    unknown = set(model_cfg or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)} (known: {sorted(cfg)})")
    cfg.update(model_cfg or {})
    return cfg


def create_encoder(name: str, weights: str = "", drop_path: float = 0.0) -> nn.Module:
    """A timm ViT with `dynamic_img_size=True` and no head, initialised like the features stage's backbone.

    `weights`: "" or "random" = random init, "hub" = timm's pretrained tag, else a local file or s3:// URL; loaded by
    `raydseg.features.backbone.create_backbone` (the features stage's loader).
    """
    from raydseg.features.backbone import create_backbone

    return create_backbone(name, weights, dynamic_img_size=True, num_classes=0, drop_path_rate=drop_path).train()


class LinearDecoder(nn.Module):
    """Patch tokens (B, N, D) -> per-patch class logits (B, n_cls, h, w)."""

    def __init__(self, d_encoder: int, n_cls: int):
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(d_encoder, n_cls)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        return self.head(x).transpose(1, 2).reshape(x.shape[0], self.n_cls, h, w)


class MaskTransformer(nn.Module):
    """Mask transformer: n_cls learned class embeddings attend jointly with the patch tokens through `n_layers`
    transformer blocks; masks are the (scaled) dot products of L2-normalised patch and class embeddings."""

    def __init__(self, d_encoder: int, n_cls: int, n_layers: int = 1, d_model: int = 0, n_heads: int = 0,
                 dropout: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        d_model = d_model or d_encoder
        n_heads = n_heads or max(1, d_model // 64)
        self.n_cls = n_cls
        self.scale = d_model ** -0.5
        self.proj_dec = nn.Linear(d_encoder, d_model)
        dpr = [x.item() for x in torch.linspace(0, drop_path, max(n_layers, 1))]
        self.blocks = nn.ModuleList([Block(d_model, n_heads, qkv_bias=True, proj_drop=dropout, drop_path=dpr[i])
                                     for i in range(n_layers)])
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model) * 0.02)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: (B, N=h*w, D_enc) patch tokens -> (B, n_cls, h, w) mask logits."""
        h, w = grid
        x = self.proj_dec(x)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches, cls_seg = x[:, :-self.n_cls], x[:, -self.n_cls:]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        cls_seg = F.normalize(cls_seg @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ cls_seg.transpose(1, 2))  # (B, N, n_cls)
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, h, w)


class Segmenter(nn.Module):
    """ViT encoder + decoder; `forward(images (B,3,H,W) normalised float) -> logits (B, n_cls, H, W)`."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, n_cls: int, input_norm: str = "dataset"):
        super().__init__()
        if input_norm not in ("dataset", "image"):
            raise ValueError(f"unknown input_norm '{input_norm}' (dataset | image)")
        self.per_image = input_norm == "image"
        self.encoder = encoder
        self.decoder = decoder
        self.n_cls = n_cls
        ps = encoder.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.num_prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 1))

    def forward_features(self, im: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Padded images -> patch tokens (B, h*w, D) without prefix tokens, and the patch grid (h, w)."""
        tokens = self.encoder.forward_features(im)
        grid = (im.shape[2] // self.patch_size, im.shape[3] // self.patch_size)
        return tokens[:, self.num_prefix_tokens:], grid

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        H, W = im.shape[2:]
        if self.per_image:
            im = standardize_image(im)
        p = self.patch_size
        im = F.pad(im, (0, (-W) % p, 0, (-H) % p))  # unconditional (a no-op at a patch multiple): exports trace it
        tokens, grid = self.forward_features(im)
        masks = self.decoder(tokens, grid)
        masks = F.interpolate(masks, size=im.shape[2:], mode="bilinear", align_corners=False)
        return masks[:, :, :H, :W]


def build_segmenter(model_cfg: dict[str, Any] | None = None, weights: str = "") -> Segmenter:
    """Segmenter from a model config dict (see DEFAULT_MODEL_CFG); `weights` initialises the encoder only."""
    cfg = resolve_model_cfg(model_cfg)
    if cfg["arch"] != "segmenter":
        raise ValueError(f"unknown arch '{cfg['arch']}'")
    encoder = create_encoder(cfg["backbone"], weights, cfg["drop_path"])
    d_enc = int(encoder.embed_dim)
    if cfg["decoder"] == "mask":
        decoder: nn.Module = MaskTransformer(d_enc, cfg["n_cls"], cfg["n_layers"], cfg["d_model"], cfg["n_heads"],
                                             cfg["dropout"], cfg["drop_path"])
    elif cfg["decoder"] == "linear":
        decoder = LinearDecoder(d_enc, cfg["n_cls"])
    else:
        raise ValueError(f"unknown decoder '{cfg['decoder']}' (mask | linear)")
    return Segmenter(encoder, decoder, cfg["n_cls"], cfg["input_norm"])


def normalize(images: torch.Tensor, mean: list[float] | tuple = IMAGENET_DEFAULT_MEAN,
              std: list[float] | tuple = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float (B, 3, H, W) normalised with mean/std (0..1 scale)."""
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    x = images.float() / 255.0
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def standardize_image(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(B, 3, H, W) float -> each image with zero mean per channel and unit std over all its values: a dark or hazy
    image's contrast scaled up to a clear one's, its colour cast removed; the relative colours of its pixels kept."""
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / (x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + eps)


def count_flops_per_image(model: Segmenter, h: int, w: int) -> float:
    """Approximate forward FLOPs of one image (2 x multiply-adds of the linear layers and attention)."""
    n = math.ceil(h / model.patch_size) * math.ceil(w / model.patch_size)
    flops = 0.0
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            flops += 2.0 * mod.in_features * mod.out_features * (n + model.n_cls)
    enc = model.encoder
    d = int(enc.embed_dim)
    flops += len(enc.blocks) * 4.0 * (n + model.num_prefix_tokens) ** 2 * d  # QK^T and AV
    pe = enc.patch_embed.proj
    flops += 2.0 * pe.in_channels * pe.out_channels * pe.kernel_size[0] * pe.kernel_size[1] * n
    return flops
