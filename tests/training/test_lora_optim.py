"""LoRA target resolution (LM only, vision refused), trainable parts, Q-LoRA layers, schedules, DeepSpeed configs."""

from __future__ import annotations

import pytest
import torch

from qwenvl_core.models.registry import get_family
from qwenvl_core.specs import (
    FineTuneJobSpec,
    Hyperparameters,
    LoraSpec,
    Precision,
    Quantization,
    TargetPreset,
)
from qwenvl_core.training.evaluate import iou
from qwenvl_core.training.lora import LoraTargetError, apply_lora, load_base_model, resolve_targets
from qwenvl_core.training.optim import lr_factor, warmup_steps
from qwenvl_core.training.strategies import deepspeed_config


@pytest.fixture(scope="module")
def family():
    return get_family("qwen-vl")


def test_presets_resolve_to_language_model_layers_only(family, tiny_model_dir):
    model = family.load_model(tiny_model_dir)
    official = resolve_targets(model, family, TargetPreset.OFFICIAL)
    assert len(official) == 4 * model.config.num_hidden_layers
    assert all(n.startswith("transformer.h.") for n in official)
    everything = resolve_targets(model, family, TargetPreset.ALL_LINEAR)
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in everything} >= {"mlp.c_proj"}
    assert all("visual" not in n for n in everything)  # mlp.c_proj also exists in the ViT blocks


@pytest.mark.parametrize("bad, match", [("c_fc", "non-language"), ("mlp.c_proj", "non-language"),
                                         ("nonexistent", "matches no")])
def test_custom_targets_refuse_vision_and_unknown_names(family, tiny_model_dir, bad, match):
    model = family.load_model(tiny_model_dir)
    with pytest.raises(LoraTargetError, match=f"lora.targets: '{bad}'.*{match}"):
        resolve_targets(model, family, [bad])


def test_trainable_parts_follow_the_spec(family, tiny_model_dir):
    spec = LoraSpec(r=4, targets=["c_attn"], train_adapter=True, modules_to_save=["lm_head"])
    model = apply_lora(family.load_model(tiny_model_dir), family, spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("attn_pool" in n and "modules_to_save" in n for n in trainable)
    assert any("lm_head" in n and "modules_to_save" in n for n in trainable)
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".attn.c_attn." in n for n in lora)
    assert not any("visual.transformer" in n for n in trainable)


def test_qlora_quantises_language_linears_only(family, tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(tiny_model_dir, family, Quantization.NF4, Precision.FP32)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["transformer.h.0.attn.c_attn"] is bnb.nn.Linear4bit
    assert kinds["transformer.h.0.attn.c_attn"] is bnb.nn.Linear4bit
    weight = model.get_submodule("transformer.h.0.mlp.w1").weight
    assert weight.quant_type == "nf4" and weight.compress_statistics  # double quantisation
    assert kinds["lm_head"] is torch.nn.Linear
    assert kinds["transformer.visual.transformer.resblocks.0.mlp.c_fc"] is torch.nn.Linear


@pytest.mark.parametrize("name", ["qwen-vl", "qwen2.5-vl"])
def test_qlora_keeps_every_unquantised_weight_frozen_in_the_run_dtype(name, tiny_model_dir, tiny_dirs):
    """As LoRA keeps them: peft's k-bit preparation cast them to fp32 (embeddings, lm_head, norms, the vision tower),
    which made a bf16 Q-LoRA step hold more device memory than LoRA's."""
    import bitsandbytes as bnb

    model_dir = tiny_model_dir if name == "qwen-vl" else tiny_dirs[name]
    model = load_base_model(model_dir, get_family(name), Quantization.NF4, Precision.BF16)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    floats = {n: p.dtype for n, p in model.named_parameters() if p.dtype.is_floating_point}
    assert any("visual" in n for n in floats) and model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert set(floats.values()) == {torch.bfloat16}, {n: d for n, d in floats.items() if d != torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_cosine_schedule_with_warmup():
    hp = Hyperparameters(warmup_ratio=0.1)
    total = 20
    warm = warmup_steps(hp, total)
    factors = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert warm == 2 and factors[0] < factors[1] < factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False)) and factors[-1] < 0.02
    assert [lr_factor(s, total, 0, "constant") for s in (0, 19)] == [1.0, 1.0]
    assert lr_factor(10, 20, 0, "linear") == pytest.approx(0.5)


def test_deepspeed_configs_carry_the_official_values(tmp_path):
    spec = FineTuneJobSpec(job_id="j", base_model="m", train_file="t.json", output_uri=str(tmp_path),
                           hyperparameters={"batch_size": 8, "micro_batch_size": 2, "precision": "bf16"},
                           compute={"num_workers": 2, "strategy": "zero3"})
    cfg = deepspeed_config(spec, hidden_size=64)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_max_live_parameters"] == 1e9 and zero["sub_group_size"] == 1e9
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True and zero["reduce_bucket_size"] == 64 * 64
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_batch_size"] == 16 and cfg["bf16"]["enabled"]
    assert cfg["zero_allow_untested_optimizer"] is True
    two = deepspeed_config(spec.model_copy(update={"compute": spec.compute.model_copy(update={"strategy": "zero2"})}),
                           64)["zero_optimization"]
    assert two["stage"] == 2 and two["allgather_bucket_size"] == 2e8 and two["overlap_comm"]


def test_iou():
    assert iou((0, 0, 100, 100), (0, 0, 100, 100)) == 1.0
    assert iou((0, 0, 100, 100), (50, 0, 150, 100)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (500, 500, 510, 510)) == 0.0
