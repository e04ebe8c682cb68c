"""QWen (Qwen-7B) language-model pieces: RMSNorm, rotary (+ dynamic NTK, logn), attention, MLP, block.

Names follow the official ``modeling_qwen.py`` so state-dict keys match: ``ln_1``/``ln_2`` RMSNorm, ``attn.c_attn``
(fused QKV, always with bias), ``attn.c_proj``, ``mlp.w1``/``mlp.w2``/``mlp.c_proj`` (w2 is the SiLU gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from qwenvl_core.models.qwen_vl.config import QWenVLConfig

KVPair = tuple[torch.Tensor, torch.Tensor]
# One layer of a cache object (``SlotKVCache.update`` bound to the layer): stores (k, v), returns what to attend to.
LayerCache = Callable[[torch.Tensor, torch.Tensor], KVPair]


class RMSNorm(nn.Module):
    """RMSNorm with a weight only; normalises in float32 and casts back to the input dtype, then scales (the
    official order). ``F.rms_norm`` computes ``x · rsqrt(mean(x²) + eps)`` in float32 whatever x's dtype and returns
    x's dtype: on the CPU it decomposes into exactly the official ops (bit for bit, forward and gradients, in fp32,
    bf16 and fp16: ``tests/core/test_rms_norm.py``); on CUDA it is two kernels (the fused norm, the scale) instead
    of eight launches in bf16 (the casts included), as the official code's CUDA path uses flash-attn's fused
    ``rms_norm``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim]."""
        # in x's dtype, computed in float32 inside (as official: normalised in float32, then cast)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight  # [..., dim]


def ntk_alpha_for(total_len: int, seq_length: int) -> float:
    """Official dynamic-NTK alpha: 2**ceil(log2(len/seq_length)+1) - 1, at least 1 (exactly 1 up to seq_length).

    The official model computes it from the length of the prefill (the prompt) and keeps it while decoding with
    the KV cache (``QWenModel.ntk_alphas``).
    """
    if total_len <= seq_length:
        return 1.0
    context_value = math.log(total_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1.0)


class QWenRotary(nn.Module):
    """GPT-NeoX rotary frequencies; ``inv_freq`` is a non-persistent float32 buffer (never in the state dict)."""

    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(
        self, ntk_alpha: float = 1.0, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """inv_freq [dim/2] = 1 / base'**(arange(0, dim, 2)/dim), base' = base * alpha**(dim/(dim-2))."""
        base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim  # [dim/2]
        return 1.0 / (base**exponents)

    def reset_inv_freq(self, device: torch.device | str) -> None:
        """Rebuild the buffer on ``device`` (needed after building the model on the meta device)."""
        self.inv_freq = self.compute_inv_freq(device=device)

    def forward(
        self, position_ids: torch.Tensor, ntk_alpha: float | Sequence[float] = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin) each [B, 1, T, dim], float32, the rotate-half sign folded into sin:
        ``cos = [cos f, cos f]``, ``sin = [-sin f, sin f]`` (what ``apply_rotary`` takes).

        ``ntk_alpha``: one alpha for every row, or one per row (rows of a batch fixed their alphas at their own
        prefill); each alpha's frequencies are computed exactly as for a single one.
        """
        alphas = [float(ntk_alpha)] if isinstance(ntk_alpha, (int, float)) else [float(a) for a in ntk_alpha]
        if len(set(alphas)) == 1:
            inv_freq = self._inv_freq_for(alphas[0], position_ids.device)[None, None]  # [1, 1, dim/2]
        else:
            table = {a: self._inv_freq_for(a, position_ids.device) for a in set(alphas)}
            inv_freq = torch.stack([table[a] for a in alphas])[:, None]  # [B, 1, dim/2]
        freqs = (position_ids.float()[..., None] * inv_freq)[:, None]  # [B, 1, T, dim/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # each [B, 1, T, dim]

    def _inv_freq_for(self, ntk_alpha: float, device: torch.device) -> torch.Tensor:
        """[dim/2] float32 on ``device``: the buffer for alpha 1, else recomputed for ``ntk_alpha``."""
        inv_freq = self.inv_freq
        if ntk_alpha != 1.0 or inv_freq.dtype != torch.float32 or inv_freq.is_meta:
            return self.compute_inv_freq(ntk_alpha, device=device)
        return inv_freq.to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., B, H, T, D] (cos / sin [B | 1, 1, T, rot] broadcast over the leading dims); rotary on the first
    cos.shape[-1] dims (float32), rest passed through; ``sin`` with the rotate-half sign folded in (``QWenRotary``).

    The official ``x * cos + rotate_half(x) * sin``, where ``rotate_half([x1, x2]) = [-x2, x1]``, as
    ``x * cos + roll(x, rot/2) * [-sin, sin]``: bit for bit the same values ((-a)·b == a·(-b) in IEEE arithmetic),
    in 6 ops instead of 10 (a decode step is bound by its op count on a GPU; docs/benchmarks.md)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:  # the whole head (Qwen-VL's rotary_pct is 1): no slices, no concatenation
        xf = x.float()
        return (xf * cos + xf.roll(rot // 2, dims=-1) * sin).type_as(x)
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    out = (x_rot * cos + x_rot.roll(rot // 2, dims=-1) * sin).type_as(x)  # [B, H, T, rot]
    return torch.cat([out, x_pass], dim=-1)


def logn_scale(position_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Per-token query scale [B, 1, T, 1]: log(pos+1)/log(seq_length) beyond seq_length, else exactly 1."""
    pos1 = (position_ids + 1).double()  # [B, T]
    scale = torch.where(pos1 > seq_length, torch.log(pos1) / math.log(seq_length), torch.ones_like(pos1))
    return scale.float()[:, None, :, None]


class QWenAttention(nn.Module):
    """Causal multi-head attention with fused c_attn, rotary and an optional (key, value) cache."""

    def __init__(self, config: QWenVLConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        projection = self.heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection, bias=True)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.dropout = float(config.attn_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        query_scale: torch.Tensor | None = None,
        layer_past: KVPair | LayerCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVPair | None]:
        """hidden [B, T, hidden] -> ([B, T, hidden], present (k, v) [B, H, T_past+T, hd] or None)."""
        batch, length = hidden_states.shape[:2]
        qkv = self.c_attn(hidden_states).view(batch, length, 3, self.heads, self.head_dim)  # [B, T, 3, H, hd]
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd], a view
        cos, sin = rotary  # [B | 1, 1, T, rot]: broadcast over q and k too
        # q and k rotated together: one set of elementwise ops instead of two (a decode step's launches)
        qk = apply_rotary(qkv[:2], cos, sin)  # [2, B, H, T, hd]
        q, k, v = qk[0], qk[1], qkv[2]  # each [B, H, T, hd]
        if query_scale is not None:
            q = (q * query_scale).type_as(k)  # [B, H, T, hd]
        if callable(layer_past):  # a cache object's layer (the serving engine's): it stores and returns (k, v)
            k, v = layer_past(k, v)  # [B, H, Tk, hd]
            present = None
        else:
            if layer_past is not None:
                k = torch.cat([layer_past[0], k], dim=2)  # [B, H, Tk, hd]
                v = torch.cat([layer_past[1], v], dim=2)  # [B, H, Tk, hd]
            present = (k, v) if use_cache else None
        # no mask and no past keys (none, or a cache object at a prefill, which returns just these): causal
        is_causal = attn_mask is None and q.size(2) > 1 and (layer_past is None or k.size(2) == q.size(2))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
        )  # [B, H, T, hd]
        out = out.transpose(1, 2).reshape(hidden_states.size(0), hidden_states.size(1), -1)  # [B, T, H*hd]
        return self.c_proj(out), present


class QWenMLP(nn.Module):
    """SwiGLU MLP: c_proj(w1(x) * silu(w2(x))), each branch intermediate_size // 2 wide."""

    def __init__(self, config: QWenVLConfig) -> None:
        super().__init__()
        ff_dim = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff_dim, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]."""
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    """Pre-norm decoder block; checkpointed by transformers when gradient checkpointing is on."""

    def __init__(self, config: QWenVLConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        query_scale: torch.Tensor | None = None,
        layer_past: KVPair | LayerCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVPair | None]:
        """hidden [B, T, hidden] -> (hidden [B, T, hidden], present or None)."""
        attn_out, present = self.attn(
            self.ln_1(hidden_states),
            rotary,
            attn_mask=attn_mask,
            query_scale=query_scale,
            layer_past=layer_past,
            use_cache=use_cache,
        )
        hidden_states = hidden_states + attn_out  # [B, T, hidden]
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))  # [B, T, hidden]
        return hidden_states, present
