"""peft works on our PreTrainedModel unchanged: official LoRA targets hit only the LM; save/load; merge."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.models.registry import get_family


@pytest.fixture(scope="module")
def family():
    return get_family("qwen-vl")


def _batch(processor):
    from PIL import Image

    msg = Message(role="user", parts=[ImagePart(Image.new("RGB", (20, 20), (0, 200, 0))), TextPart("colour?")])
    enc = processor.encode_chat([msg])
    ids = torch.tensor([enc.input_ids])
    return {"input_ids": ids, "labels": ids, "pixel_values": enc.pixel_values}


def _lora(model, family):
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(family.default_lora_targets),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def test_official_targets_wrap_only_language_model_linears(family, tiny_model_dir):
    peft_model = _lora(family.load_model(tiny_model_dir), family)
    wrapped = {n.removesuffix(".lora_A.default") for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")}
    suffixes = sorted({n.split("transformer.h.")[1].split(".", 1)[1] for n in wrapped})
    assert suffixes == ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"]
    assert len(wrapped) == 4 * peft_model.config.num_hidden_layers
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_trains_saves_loads_and_merges(family, tiny_model_dir, tmp_path):
    processor = family.load_processor(tiny_model_dir)
    batch = _batch(processor)
    torch.manual_seed(0)
    peft_model = _lora(family.load_model(tiny_model_dir), family)
    peft_model.train()
    peft_model.activation_checkpointing_enable()  # forwarded to our PreTrainedModel; checkpoints the LoRA blocks
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(family.load_model(tiny_model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_prepare_inputs_for_generation_feeds_the_last_token_after_prefill(family, tiny_model_dir):
    model = family.load_model(tiny_model_dir)
    processor = family.load_processor(tiny_model_dir)
    batch = _batch(processor)
    ids, mask = batch["input_ids"], torch.ones_like(batch["input_ids"])
    first = model.prepare_inputs_for_generation(ids, attention_mask=mask, pixel_values=batch["pixel_values"])
    assert first["input_ids"] is ids and first["pixel_values"] is batch["pixel_values"]
    with torch.no_grad():
        out = model(**first)
    grown = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
    step = model.prepare_inputs_for_generation(grown, past_key_values=out.cache, attention_mask=torch.ones_like(grown))
    assert step["input_ids"].tolist() == grown[:, -1:].tolist()
    assert step["position_ids"].tolist() == [[grown.shape[1] - 1]] and step["pixel_values"] is None
    with torch.no_grad():
        cached = model(**step).logits[:, -1]
        full = model(input_ids=grown, pixel_values=batch["pixel_values"]).logits[:, -1]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
