"""The qwen2-vl ``ModelFamily``: its ``FamilySpec`` on the shared ``HFVisionLanguageFamily``."""

from __future__ import annotations

from qwenvl_core.grounding.qwen2_vl import QWEN2_VL_TAGS
from qwenvl_core.models.hf_vl.family import HFVisionLanguageFamily
from qwenvl_core.models.hf_vl.spec import QWEN2_VL_SPECIAL_TOKENS, FamilySpec
from qwenvl_core.models.qwen2_vl.chat_template import QWEN2_VL_CHAT_TEMPLATE
from qwenvl_core.models.qwen2_vl.presets import PRESETS
from qwenvl_core.models.registry import FamilyName

# All linear layers of the language model (LLaMA-Factory's / ms-swift's "all-linear" with the ViT frozen); the
# training code resolves these suffixes to language-model modules only.
LM_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# What the official template writes when a conversation has no system message.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# preprocessor_config.json of Qwen/Qwen2-VL-*-Instruct: 14 px patches merged 2x2, 56x56 .. 12845056 pixels.
QWEN2_VL_IMAGE_PROCESSOR: dict = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

SPEC = FamilySpec(
    name=FamilyName.QWEN2_VL,
    model_type="qwen2_vl",
    model_class="Qwen2VLForConditionalGeneration",
    config_class="Qwen2VLConfig",
    processor_class="Qwen2VLProcessor",
    presets=PRESETS,
    special_tokens=QWEN2_VL_SPECIAL_TOKENS,
    chat_template=QWEN2_VL_CHAT_TEMPLATE,
    image_processor=QWEN2_VL_IMAGE_PROCESSOR,
    # The official repositories ship no video_preprocessor_config.json (the video processor falls back to
    # preprocessor_config.json).
    video_processor=None,
    model_max_length=32768,
    lora_targets=LM_LORA_TARGETS,
    adapter_prefixes=("model.visual.merger.",),
    default_system_prompt=DEFAULT_SYSTEM_PROMPT,
    image_roles=("system", "user", "assistant"),
    markup_tokens=tuple(token for pair in (QWEN2_VL_TAGS.ref, QWEN2_VL_TAGS.box, QWEN2_VL_TAGS.quad) for token in pair),
)


class Qwen2VLFamily(HFVisionLanguageFamily):
    """Qwen2-VL-2B/7B(-Instruct) on transformers' ``Qwen2VLForConditionalGeneration``."""

    spec = SPEC
