"""Masked autoencoder (He et al. 2021, facebookresearch/mae `MaskedAutoencoderViT`) on a timm ViT backbone.

The encoder (the backbone, unchanged: its checkpoint is a plain timm ViT) sees [CLS] and a random 1 - mask_ratio of
the patches; a light decoder (its own width and depth; fixed 2D sine-cosine positions) fills in mask tokens and
predicts every masked patch's pixels. The loss is the mean squared error on the masked patches only; with
`norm_pix` each target patch is standardised by its own mean and variance (the paper's better representations).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(h * w, dim) fixed 2D sine-cosine position embedding, rows then columns (dim divisible by 4)."""
    def one(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d / 2))
        out = pos.reshape(-1, 1).float() * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([one(dim // 2, gy), one(dim // 2, gx)], 1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H / p) * (W / p), p * p * C), patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)


class MaskedAutoencoder(nn.Module):
    """timm ViT encoder on the visible patches + [CLS], light decoder to the masked patches' pixels.

    forward(x: (B, 3, H, W) normalised, H and W patch multiples) -> (loss, mask (B, N) with 1 = masked).
    `backbone`: a timm VisionTransformer built with `dynamic_img_size=True` (raydseg.features.backbone).
    """

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.backbone, self.mask_ratio, self.norm_pix = backbone, mask_ratio, norm_pix
        self.patch = backbone.patch_embed.patch_size[0]
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.backbone
        t = m.patch_embed(x)  # (B, gh, gw, D) with dynamic_img_size
        gh, gw = t.shape[1:3]
        t = m._pos_embed(t)  # (B, prefix + N, D), positions resampled to the grid
        b, n, pre = t.shape[0], gh * gw, m.num_prefix_tokens
        keep = max(1, round(n * (1 - self.mask_ratio)))
        visible = torch.rand(b, n, device=x.device).argsort(1)[:, :keep]  # (B, keep) patch indices
        tokens = torch.cat([t[:, :pre], t[:, pre:].gather(1, visible[..., None].expand(-1, -1, t.shape[-1]))], 1)
        z = self.decoder_embed(m.norm(m.blocks(m.norm_pre(tokens))))
        full = self.mask_token.to(z.dtype).expand(b, n, -1).clone()  # z is bf16 under autocast
        full = full.scatter(1, visible[..., None].expand(-1, -1, z.shape[-1]), z[:, pre:])
        full = full + sincos_2d(z.shape[-1], gh, gw).to(full)[None]
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(torch.cat([z[:, :pre], full], 1))))[:, pre:]
        target = patchify(x, self.patch)
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        mask = torch.ones(b, n, device=x.device).scatter(1, visible, 0.0)
        loss = (((pred.float() - target.float()) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, mask
