"""Position-aware VL adapter (official ``Resampler``): learnable queries cross-attend to ViT patch features.

Also owns the 2-D sin-cos table (MAE style) and ``get_abs_pos``, the bicubic interpolation of a square
positional table to another square grid that the ViT shares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def get_abs_pos(abs_pos: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """Interpolate a [src*src, D] table bicubically (float32, align_corners False) to [tgt*tgt, D]."""
    src_size = math.isqrt(abs_pos.size(0))
    tgt_size = math.isqrt(tgt_len)
    if src_size == tgt_size:
        return abs_pos
    grid = abs_pos.float().reshape(1, src_size, src_size, -1).permute(0, 3, 1, 2)  # [1, D, src, src]
    out = F.interpolate(
        grid, size=(tgt_size, tgt_size), mode="bicubic", align_corners=False
    )  # [1, D, tgt, tgt]
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)  # [tgt*tgt, D]


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding: pos [M] -> [M, embed_dim] = concat(sin, cos)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [embed_dim / 2]
    out = pos.reshape(-1).double()[:, None] * omega[None, :]  # [M, embed_dim / 2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, embed_dim]


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """MAE 2-D sin-cos table [grid_size**2, embed_dim] (float32); meshgrid(w, h), emb_h from grid[0]."""
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)  # [G]
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=0)  # [2, G, G]
    emb_h = _sincos_1d(embed_dim // 2, grid[0])  # [G*G, D/2]
    emb_w = _sincos_1d(embed_dim // 2, grid[1])  # [G*G, D/2]
    return torch.cat([emb_h, emb_w], dim=1).float()  # [G*G, D]


def adapter_num_heads(embed_dim: int) -> int:
    """Heads of the adapter attention: embed_dim // 128 as official when that divides, else 1 (tiny models)."""
    if embed_dim >= 128 and embed_dim % 128 == 0:
        return embed_dim // 128
    return 1


class Resampler(nn.Module):
    """Single cross-attention layer: n_queries learnable queries over the ViT patch sequence."""

    def __init__(self, n_queries: int, embed_dim: int, kv_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.n_queries = n_queries
        self.grid_size = math.isqrt(n_queries)
        self.embed_dim = embed_dim
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, self.grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.empty(n_queries, embed_dim))  # [Q, D]
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, adapter_num_heads(embed_dim), batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def sincos_table(self) -> torch.Tensor:
        """The fixed table this module's ``pos_embed`` holds (used by weight init)."""
        return get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, device=self.pos_embed.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, kv_dim] (L a square patch grid) -> [B, n_queries, D]."""
        pos_k = get_abs_pos(self.pos_embed, x.size(1)).to(x.dtype)  # [L, D]
        kv = self.ln_kv(self.kv_proj(x))  # [B, L, D]
        q = self.ln_q(self.query) + self.pos_embed.to(kv.dtype)  # [Q, D]
        q = q.unsqueeze(0).expand(x.size(0), -1, -1)  # [B, Q, D]
        out, _ = self.attn(q, kv + pos_k.unsqueeze(0), kv, need_weights=False)  # [B, Q, D]
        return out
