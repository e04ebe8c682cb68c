"""The qwen2.5-vl ``ModelFamily``: its ``FamilySpec`` on the shared ``HFVisionLanguageFamily``."""

from __future__ import annotations

from qwenvl_core.models.hf_vl.family import HFVisionLanguageFamily
from qwenvl_core.models.hf_vl.spec import QWEN2_VL_SPECIAL_TOKENS, FamilySpec, SpecialToken
from qwenvl_core.models.qwen2_5_vl.presets import PRESETS
from qwenvl_core.models.qwen2_vl.chat_template import QWEN2_VL_CHAT_TEMPLATE
from qwenvl_core.models.qwen2_vl.family import (
    DEFAULT_SYSTEM_PROMPT,
    LM_LORA_TARGETS,
    QWEN2_VL_IMAGE_PROCESSOR,
)
from qwenvl_core.models.registry import FamilyName

# The Qwen2.5 tokenizer's additions (ids 151657..151664 officially), added but not "special" (decoded as text).
QWEN2_5_EXTRA_TOKENS: tuple[SpecialToken, ...] = tuple(
    SpecialToken(text, special=False)
    for text in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
)

SPEC = FamilySpec(
    name=FamilyName.QWEN2_5_VL,
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    config_class="Qwen2_5_VLConfig",
    processor_class="Qwen2_5_VLProcessor",
    presets=PRESETS,
    special_tokens=QWEN2_VL_SPECIAL_TOKENS + QWEN2_5_EXTRA_TOKENS,
    # chat_template.json of Qwen/Qwen2.5-VL-*-Instruct is Qwen2-VL's (see qwen2_vl/chat_template.py).
    chat_template=QWEN2_VL_CHAT_TEMPLATE,
    image_processor={**QWEN2_VL_IMAGE_PROCESSOR, "processor_class": "Qwen2_5_VLProcessor"},
    video_processor=None,
    model_max_length=131072,
    # LM suffixes; the training code resolves them to language-model modules only (the Qwen2.5-VL ViT's MLP also
    # has gate_proj / up_proj / down_proj).
    lora_targets=LM_LORA_TARGETS,
    adapter_prefixes=("model.visual.merger.",),
    # Qwen2-VL's template; the grounding convention is JSON (no markup tokens).
    default_system_prompt=DEFAULT_SYSTEM_PROMPT,
    image_roles=("system", "user", "assistant"),
)


class Qwen2_5_VLFamily(HFVisionLanguageFamily):
    """Qwen2.5-VL-3B/7B(-Instruct) on transformers' ``Qwen2_5_VLForConditionalGeneration``."""

    spec = SPEC
