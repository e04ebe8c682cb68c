"""The transformers families' RMSNorm layers, given ``F.rms_norm`` at load (``hf_vl.fused_norms``), compute what
their own forward does, bit for bit: logits of an image + text prompt and the gradients of every norm weight and of
the first layer's projections, in float32 and bfloat16, for each family."""

from __future__ import annotations

import pytest
import torch

from qwenvl_core.models.hf_vl.fused_norms import RMS_NORM_CLASSES
from qwenvl_core.models.registry import get_family
from tests.core.families.conftest import HF_FAMILIES
from tests.core.families.model_runs import image_prompt, logits_and_grads


def _watched(name: str) -> bool:
    return "norm" in name or ".layers.0." in name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", HF_FAMILIES)
def test_fused_rms_norms_are_the_layers_own_forward_bit_for_bit(tiny_dirs, name, dtype):
    family = get_family(name)
    model = family.load_model(tiny_dirs[name], dtype=dtype)
    model.requires_grad_(True)
    norms = [m for m in model.modules() if type(m).__name__ in RMS_NORM_CLASSES]
    assert norms and all("forward" in vars(m) for m in norms)  # every one of them fused at load
    inputs = image_prompt(family.load_processor(tiny_dirs[name]).hf, dtype)
    fused = logits_and_grads(model, inputs, _watched)
    for module in norms:
        del module.forward  # the class's own forward again
    own = logits_and_grads(model, inputs, _watched)
    assert fused.keys() == own.keys() and any("norm" in k for k in fused)
    assert all(torch.equal(fused[k], own[k]) for k in fused), [k for k in fused if not torch.equal(fused[k], own[k])]
