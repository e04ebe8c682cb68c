"""What the tests of load-time forward replacements (``fused_norms``, ``fused_rotary``) share: an image + text
prompt through a family's processor, and one forward and backward of a model, keeping what to compare."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


def image_prompt(processor, dtype: torch.dtype) -> dict:
    """The processor's inputs of one image (60 x 90 px) and a question, pixels in ``dtype``."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def logits_and_grads(model: torch.nn.Module, inputs: dict, watch: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The logits and, after a backward of their mean square, the gradients of the parameters ``watch`` names."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    watched = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None and watch(name)}
    return {"logits": logits.detach(), **watched}
