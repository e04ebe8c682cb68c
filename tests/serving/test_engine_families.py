"""The serving engine on every transformers-native family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): greedy output of a
continuously batched engine (text-only and image prompts of different lengths, mixed adapters, rows joining a
running batch and leaving it at different steps) equals transformers' own ``generate`` of each request alone,
with peft's LoRA: the M-RoPE offsets are kept per row, the KV cache slots hold each row's own tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.generation import SamplingParams
from qwenvl_core.models.registry import get_family
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.fused_siblings import FUSED
from tests.conftest import HF_FAMILIES


def _request(i: int, adapter: Path | None, tokens: int, image: tuple[int, int] | None) -> EngineRequest:
    parts: list = [TextPart("describe item " + "and more " * i + str(i))]
    if image is not None:
        parts.insert(0, ImagePart(Image.new("RGB", image, (30 * i % 255, 120, 200))))
    return EngineRequest([Message(role="user", parts=parts)], SamplingParams(max_new_tokens=tokens),
                         adapter_id=adapter.name if adapter else None,
                         adapter_locator=str(adapter) if adapter else None)


def _transformers_alone(family_name: str, model_dir: Path, adapter: Path | None, request: EngineRequest) -> list[int]:
    """Reference: transformers' own model class and ``generate`` (greedy), peft's LoRA, this request alone."""
    from peft import PeftModel

    from qwenvl_core.models.hf_vl.forward import token_types

    family = get_family(family_name)
    processor = family.load_processor(model_dir)
    model = family.spec.transformers_class("model_class").from_pretrained(model_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    encoded = processor.encode_chat(request.messages)
    ids = torch.tensor([encoded.input_ids])
    vision = encoded.vision.as_kwargs() if encoded.vision is not None else {}
    stop = family.stop_token_ids(processor)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         mm_token_type_ids=token_types(ids, model.config), **vision,
                         max_new_tokens=request.params.max_new_tokens, do_sample=False, eos_token_id=stop,
                         pad_token_id=processor.pad_token_id,
                         suppress_tokens=list(processor.image_token_ids))
    new = out[0, ids.shape[1]:].tolist()
    return new[: next((k for k, t in enumerate(new) if t in stop), len(new))]


@pytest.mark.parametrize("fuse_siblings", ["off", "on"])  # (on: q / k / v and gate / up as one matmul each)
@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_engine_greedy_equals_transformers_generate_for_mixed_joining_rows(family_name, fuse_siblings, tiny_dirs,
                                                                          family_adapter_dirs):
    model_dir = tiny_dirs[family_name]
    adapters = family_adapter_dirs[family_name]
    first_wave = [_request(0, adapters[0], 12, (56, 84)), _request(3, None, 5, None),
                  _request(1, adapters[1], 9, None)]
    late = [_request(2, adapters[1], 7, (112, 56)), _request(5, adapters[0], 6, (28, 28))]
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=4, max_total_tokens=512,
                                                                  fuse_siblings=fuse_siblings))
    assert any(hasattr(m, FUSED) for m in engine.model.modules()) == (fuse_siblings == "on")
    try:
        async def staggered() -> list:
            running = [asyncio.ensure_future(engine.generate(r)) for r in first_wave]
            while engine.stats.forwards < 3:  # the first rows are decoding when the late ones arrive
                await asyncio.sleep(0.001)
            rest = await asyncio.gather(*(engine.generate(r) for r in late))
            return [*(await asyncio.gather(*running)), *rest]

        results = asyncio.run(staggered())
    finally:
        engine.close()
    choice = [adapters[0], None, adapters[1], adapters[1], adapters[0]]
    expected = [_transformers_alone(family_name, model_dir, a, r)
                for a, r in zip(choice, first_wave + late, strict=True)]
    assert [r.token_ids for r in results] == expected
    assert engine.stats.max_rows >= 3 and engine.stats.max_adapters_in_forward >= 2  # really batched and mixed
    assert len({tuple(e) for e in expected}) >= 4  # the outputs differ, so the comparison has teeth
    assert sum(len(e) for e in expected) >= 15
