"""Qwen-VL's rotary embedding: ``apply_rotary`` with the sign-folded table of ``QWenRotary`` gives, bit for bit, the
official ``x * cos + rotate_half(x) * sin`` (it takes fewer ops per layer; docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from qwenvl_core.models.qwen_vl.lm import QWenRotary, apply_rotary


def _official(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The official ``apply_rotary_pos_emb`` (no flash-attn rotary kernel): rotary on the first dims, in float32."""
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, 1, T, rot]
    cos, sin = emb.cos(), emb.sin()
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:].float()
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([x_rot, x_pass], dim=-1).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rotary_dim", "head_dim"), [(128, 128), (64, 128), (16, 16)])
def test_rotary_is_bit_for_bit_the_official_rotate_half(dtype, rotary_dim, head_dim):
    torch.manual_seed(0)
    rotary = QWenRotary(rotary_dim, 10000.0)
    positions = torch.randint(0, 9000, (3, 17))
    for alphas in (1.0, [1.0, 3.0, 7.0]):  # one NTK alpha, or one per row
        per_row = [alphas] * 3 if isinstance(alphas, float) else alphas
        freqs = torch.stack([positions[i].float()[:, None] * rotary.compute_inv_freq(a)
                             for i, a in enumerate(per_row)])[:, None]  # [B, 1, T, rot/2]
        x = (torch.randn(3, 4, 17, head_dim) * 5).to(dtype)
        ours = apply_rotary(x, *rotary(positions, alphas))
        assert ours.dtype == dtype and torch.equal(ours, _official(x, freqs))
