"""The transformers families' rotary position embedding of q and k in fewer kernels, with the same values.

transformers' ``apply_rotary_pos_emb`` (Qwen2-VL, Qwen2.5-VL and Qwen3-VL's text attention; their M-RoPE sections
are merged into ``cos`` / ``sin`` before it) computes ``x · cos + rotate_half(x) · sin`` for q and for k, where
``rotate_half([x1, x2]) = [-x2, x1]``: a multiply, a negation, a concatenation, a multiply and an add each, ten
kernels a layer, which a decode step on a GPU pays in launches (docs/benchmarks.md). ``apply_rotary_pos_emb`` here
computes ``x · cos + roll(x, D/2) · [-sin1, sin2]``: bit for bit the same values ((-a)·b == a·(-b) in IEEE
arithmetic; the gradients too), the sign-folded ``sin`` made once per forward (every layer gets the same ``sin``
tensor), so four kernels a tensor. Where q and k are adjacent heads of one tensor (the serving engine's q / k / v
as one matmul: ``serving.fused_siblings``) and no gradient is wanted, they are rotated as one tensor: four kernels a
layer. v1's attention does the same (``qwen_vl.lm.apply_rotary``).

``install_fused_rotary`` puts it in place of the function in a family's modeling module (its attention ``forward``
looks it up there at each call), once, when a model of the family is loaded: a process-wide change, which changes
no value (tested against transformers' function on every path:
``tests/core/families/test_fused_rotary.py``).
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable

import torch

# the modules whose ``apply_rotary_pos_emb`` is the formula above (transformers 5.24)
ROTARY_MODULES = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
)
# module name -> transformers' own function, as found before ``install_fused_rotary`` (tests compare with it)
ORIGINALS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}

# the last forward's sin and its sign-folded copy (one entry: the layers of a forward share one sin tensor)
_signed: tuple[weakref.ref[torch.Tensor], torch.Tensor] | None = None


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (q [B, Hq, T, D], k [B, Hk, T, D], cos / sin [B, T, D] unsqueezed at
    ``unsqueeze_dim``), the same values in fewer kernels (module docstring)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), _sign_folded(sin).unsqueeze(unsqueeze_dim)
    both = _adjacent_heads(q, k) if unsqueeze_dim == 1 else None
    if both is not None:
        rotated = _rotate(both, cos, sin)
        return rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x · cos + rotate_half(x) · sin`` as ``x · cos + roll(x, D/2) · [-sin1, sin2]``: the same bits."""
    return (x * cos) + (x.roll(x.shape[-1] // 2, dims=-1) * signed_sin)


def _sign_folded(sin: torch.Tensor) -> torch.Tensor:
    """``[-sin1, sin2]`` (the halves of the last dim), made once for all the layers of a forward."""
    global _signed
    cached = _signed
    if cached is not None and cached[0]() is sin:
        return cached[1]
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    _signed = (weakref.ref(sin), signed)
    return signed


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k as one tensor ``[B, Hq + Hk, T, D]`` (a view) where k's heads follow q's in one storage with the same
    strides (the columns of one matmul's output) and no gradient is wanted (the view is made from q, so autograd
    would not take k's part back); None otherwise."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return None
    if q.dtype != k.dtype or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return None
    # the heads' stride, and the others' where the size is over 1 (a view gives a dim of size 1, such as a decode
    # step's one token, any stride)
    if any(q.stride(d) != k.stride(d) for d in range(q.dim()) if d == 1 or q.shape[d] > 1):
        return None
    if q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    if k.storage_offset() != q.storage_offset() + q.shape[1] * q.stride(1):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], *q.shape[2:]), q.stride(), q.storage_offset())


def install_fused_rotary(module_name: str) -> bool:
    """Put ``apply_rotary_pos_emb`` in place of transformers' in the modeling module ``module_name`` (that of a
    loaded model's class) if it is one of ``ROTARY_MODULES``; idempotent. Whether it is in place there."""
    if module_name not in ROTARY_MODULES:
        return False
    module = importlib.import_module(module_name)
    if module.apply_rotary_pos_emb is not apply_rotary_pos_emb:
        ORIGINALS.setdefault(module_name, module.apply_rotary_pos_emb)
        module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True
