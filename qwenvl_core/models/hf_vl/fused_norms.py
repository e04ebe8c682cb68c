"""The transformers families' RMSNorm layers computed by ``F.rms_norm``: two kernels on CUDA (the fused norm, the
scale) where their own forward launches eight in bf16 (cast to float32, square, mean, add, rsqrt, multiply, cast
back, scale), with the same values.

Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's text RMSNorm (and Qwen2.5-VL's vision RMSNorm) all compute
``weight · (x.float() · rsqrt(mean(x.float()²) + eps)).to(x.dtype)``. ``F.rms_norm(x)`` computes the same in
float32 whatever x's dtype and returns x's dtype: on the CPU it decomposes into exactly those ops (bit for bit,
forward and gradients: ``tests/core/families/test_fused_norms.py``); on CUDA it is one kernel, whose backward
needs only the per-row scale, not the float32 copies of the activations (memory not measured: no device).
Qwen3-VL normalises q and k per head as well, so its layers have four norms. The layers are left in place (their
class, weight and name: checkpoints, PEFT and the state dict see no difference); only their ``forward`` is
replaced, on the loaded instances.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F

# the transformers classes whose forward is the formula above (transformers 5.24)
RMS_NORM_CLASSES = frozenset({"Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm", "Qwen3VLTextRMSNorm"})


def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The fused forward of one of ``RMS_NORM_CLASSES`` (named ``forward``: a pickled model's layer unpickles to
    its class's own forward, the same values)."""
    return self.weight * F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=self.variance_epsilon)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm layer of ``model`` of ``RMS_NORM_CLASSES`` the fused forward; returns how many."""
    fused = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORM_CLASSES:
            module.forward = MethodType(forward, module)
            fused += 1
    return fused
