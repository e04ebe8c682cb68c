"""Qwen-VL vision tower (official ``VisionTransformer``): modified OpenCLIP ViT + adapter + ln_post + proj.

pixel_values [N, 3, S, S] -> conv1 patches -> + interpolated learned positions -> ln_pre -> resblocks ->
attn_pool (Resampler) -> ln_post -> @ proj -> [N, n_queries, output_dim].
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from qwenvl_core.models.qwen_vl.config import QWenVLConfig
from qwenvl_core.models.qwen_vl.resampler import Resampler, get_abs_pos

LN_EPS = 1e-6


class VisualAttention(nn.Module):
    """Self-attention with the official fused ``in_proj`` layout: per head [q | k | v] (heads x 3 x head_dim)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, W] -> [B, L, W]."""
        batch, length, width = x.shape
        mixed = self.in_proj(x).view(batch, length, self.heads, 3 * self.head_dim)  # [B, L, H, 3*hd]
        q, k, v = mixed.transpose(1, 2).split(self.head_dim, dim=-1)  # each [B, H, L, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, hd]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))  # [B, L, W]


class VisualAttentionBlock(GradientCheckpointingLayer):
    """Pre-LN ViT block: x + attn(ln_1(x)); x + mlp(ln_2(x)), with exact GELU MLP c_fc -> c_proj."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, W] -> [B, L, W]."""
        x = x + self.attn(self.ln_1(x))  # [B, L, W]
        return x + self.mlp(self.ln_2(x))  # [B, L, W]


class VisualTransformer(nn.Module):
    """The stack of ViT blocks (``transformer.resblocks.{i}``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, W] -> [B, L, W]."""
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """ViT + position-aware adapter producing n_queries LM-sized features per image."""

    def __init__(self, config: QWenVLConfig) -> None:
        super().__init__()
        visual = config.visual
        width, patch = visual["width"], visual["patch_size"]
        self.image_size = visual["image_size"]
        self.patch_size = patch
        self.output_dim = visual["output_dim"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(
            width**-0.5 * torch.randn(visual["pos_grid_size"] ** 2, width)
        )
        self.ln_pre = nn.LayerNorm(width, eps=LN_EPS)
        self.transformer = VisualTransformer(
            width, visual["layers"], visual["heads"], float(visual["mlp_ratio"])
        )
        self.attn_pool = Resampler(visual["n_queries"], self.output_dim, kv_dim=width, eps=LN_EPS)
        self.ln_post = nn.LayerNorm(self.output_dim, eps=LN_EPS)
        self.proj = nn.Parameter(self.output_dim**-0.5 * torch.randn(self.output_dim, self.output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image features [N, n_queries, output_dim]."""
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, W]
        x = x + get_abs_pos(self.positional_embedding, x.size(1)).to(x.dtype)  # [N, g*g, W]
        x = self.transformer(self.ln_pre(x))  # [N, g*g, W]
        x = self.ln_post(self.attn_pool(x))  # [N, Q, D]
        return x @ self.proj  # [N, Q, D]
