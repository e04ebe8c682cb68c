"""Q-LoRA adapters served as configured: on the 4-bit NF4 base they were trained on (same greedy tokens as peft
on that quantized base, in a mixed batch) and on an unquantized base (same as peft there; bf16 logits close)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from qwenvl_core.conversation import text_message
from qwenvl_core.generation import SamplingParams, generate
from qwenvl_core.models.registry import get_family
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.lora_batch import build_plan, load_lora_weights
from qwenvl_core.specs import Precision, Quantization, TargetPreset
from qwenvl_core.training.lora import load_base_model, quantize_language_model, resolve_targets
from tests.serving.conftest import save_random_lora

TOKENS = 8
PROMPTS = ["describe the first picture", "what is in the box?", "count to three"]


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Q-LoRA adapter as training makes one: peft LoRA on the NF4 base of ``load_base_model`` (random B)."""
    family = get_family("qwen-vl")
    base = load_base_model(tiny_model_dir, family, Quantization.NF4, Precision.FP32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    return save_random_lora(base, resolve_targets(base, family, TargetPreset.OFFICIAL), out, seed=5)


def _base(model_dir: Path, quantized: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    family = get_family("qwen-vl")
    model = family.load_model(model_dir, dtype=dtype)
    if quantized:
        quantize_language_model(model, family, dtype)
    return model.eval()


def _peft_tokens(model_dir: Path, adapter: Path | None, quantized: bool) -> list[list[int]]:
    """Reference: peft's LoRA on a freshly built base, one prompt at a time, greedy."""
    from peft import PeftModel

    family = get_family("qwen-vl")
    processor = family.load_processor(model_dir)
    model = _base(model_dir, quantized)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    params = SamplingParams(max_new_tokens=TOKENS, stop_token_ids=tuple(family.stop_token_ids(processor)))
    return [generate(model, [processor.encode_chat([text_message("user", p)]).input_ids],
                     pad_token_id=processor.tokenizer.eod_id, params=params)[0].token_ids for p in PROMPTS]


def _engine_tokens(engine: ServingEngine, rows: list[Path | None]) -> list[list[int]]:
    """All rows concurrently (one mixed batch), row i on ``rows[i]`` with prompt ``PROMPTS[i % 3]``."""
    async def run() -> list:
        return await asyncio.gather(*(engine.generate(EngineRequest(
            [text_message("user", PROMPTS[i % len(PROMPTS)])], SamplingParams(max_new_tokens=TOKENS),
            adapter_id=a.name if a else None, adapter_locator=str(a) if a else None)) for i, a in enumerate(rows)))

    return [r.token_ids for r in asyncio.run(run())]


def test_qlora_adapter_on_the_4bit_base_matches_peft(tiny_model_dir, qlora_adapter, adapter_dirs):
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(quantization="4bit"))
    try:
        layers = [m for n, m in engine.model.named_modules() if n.startswith("transformer.h.")]
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in layers)
        assert not isinstance(engine.model.lm_head, bnb.nn.Linear4bit)
        # one batch: the Q-LoRA adapter on every prompt, the base model, and a plain LoRA adapter
        rows = [qlora_adapter] * 3 + [None, adapter_dirs[0], None]
        served = _engine_tokens(engine, rows)
        assert engine.stats.max_adapters_in_forward >= 2
    finally:
        engine.close()
    expected = _peft_tokens(tiny_model_dir, qlora_adapter, quantized=True)
    assert served[:3] == expected
    base = _peft_tokens(tiny_model_dir, None, quantized=True)
    assert served[3] == base[0] and served[5] == base[2]
    assert served[:3] != base  # the adapter really changes the outputs


def test_qlora_adapter_on_an_unquantized_base(tiny_model_dir, qlora_adapter):
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig())
    try:
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in engine.model.modules())
        served = _engine_tokens(engine, [qlora_adapter] * 3)
    finally:
        engine.close()
    assert served == _peft_tokens(tiny_model_dir, qlora_adapter, quantized=False)


def test_qlora_adapter_on_a_bf16_base_is_close_to_peft(tiny_model_dir, qlora_adapter):
    """GroupedLora's logits on a bf16 base are close to peft's on that base, and on the fp32 4-bit base equal
    peft's there: the hook adds the LoRA delta to the layer's output, whatever the base weight format."""
    from peft import PeftModel

    from qwenvl_core.serving.lora_batch import GroupedLora

    ids = torch.tensor([get_family("qwen-vl").load_processor(tiny_model_dir).encode_chat(
        [text_message("user", PROMPTS[0])]).input_ids])
    for dtype, quantized in ((torch.bfloat16, False), (torch.float32, True)):
        model = _base(tiny_model_dir, quantized, dtype)
        lora = GroupedLora(model)
        plan = build_plan([load_lora_weights(qlora_adapter, "q", model, get_family("qwen-vl"))])
        with torch.no_grad(), lora.activate(plan):
            grouped = model(input_ids=ids).logits.float()
        lora.remove_hooks()
        with torch.no_grad():
            base_logits = model(input_ids=ids).logits.float()
            reference = PeftModel.from_pretrained(model, qlora_adapter).eval()(input_ids=ids).logits.float()
        effect = (reference - base_logits).norm()
        if dtype is torch.float32:
            scale = float(reference.abs().max())  # summation order; the tolerance follows the logits' range
            torch.testing.assert_close(grouped, reference, atol=2e-3 * scale, rtol=1e-3)
        else:  # bf16 rounding (peft keeps its LoRA weights in fp32) differs; small next to the adapter's effect
            assert (grouped - reference).norm() < 0.05 * effect
            agree = (grouped.argmax(-1) == reference.argmax(-1)).float().mean()
            assert agree >= 0.9, agree
