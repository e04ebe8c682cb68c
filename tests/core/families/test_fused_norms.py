"""The transformers families' RMSNorm layers, given ``F.rms_norm`` at load (``hf_vl.fused_norms``), compute what
their own forward does, bit for bit: logits of an image + text prompt and the gradients of every norm weight and of
the first layer's projections, in float32 and bfloat16, for each family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_core.models.hf_vl.fused_norms import RMS_NORM_CLASSES
from qwenvl_core.models.registry import get_family
from tests.core.families.conftest import HF_FAMILIES


def _inputs(processor) -> dict:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[prompt], images=[image], return_tensors="pt"))


def _run(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    watched = {name: p.grad.clone() for name, p in model.named_parameters()
               if p.grad is not None and ("norm" in name or ".layers.0." in name)}
    return {"logits": logits.detach(), **watched}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", HF_FAMILIES)
def test_fused_rms_norms_are_the_layers_own_forward_bit_for_bit(tiny_dirs, name, dtype):
    family = get_family(name)
    model = family.load_model(tiny_dirs[name], dtype=dtype)
    model.requires_grad_(True)
    norms = [m for m in model.modules() if type(m).__name__ in RMS_NORM_CLASSES]
    assert norms and all("forward" in vars(m) for m in norms)  # every one of them fused at load
    inputs = _inputs(family.load_processor(tiny_dirs[name]).hf)
    if dtype != torch.float32:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    fused = _run(model, inputs)
    for module in norms:
        del module.forward  # the class's own forward again
    own = _run(model, inputs)
    assert fused.keys() == own.keys() and any("norm" in k for k in fused)
    assert all(torch.equal(fused[k], own[k]) for k in fused), [k for k in fused if not torch.equal(fused[k], own[k])]
