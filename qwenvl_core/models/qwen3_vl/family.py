"""The qwen3-vl ``ModelFamily`` (dense models): its ``FamilySpec`` on the shared ``HFVisionLanguageFamily``."""

from __future__ import annotations

from qwenvl_core.models.hf_vl.family import HFVisionLanguageFamily
from qwenvl_core.models.hf_vl.spec import QWEN2_VL_SPECIAL_TOKENS, FamilySpec, SpecialToken
from qwenvl_core.models.qwen2_5_vl.family import QWEN2_5_EXTRA_TOKENS
from qwenvl_core.models.qwen2_vl.family import LM_LORA_TARGETS
from qwenvl_core.models.qwen3_vl.chat_template import QWEN3_VL_CHAT_TEMPLATE
from qwenvl_core.models.qwen3_vl.presets import PRESETS
from qwenvl_core.models.registry import FamilyName

# The Qwen3 tokenizer's additions after Qwen2.5's (ids 151665..151668 officially), not "special".
QWEN3_EXTRA_TOKENS: tuple[SpecialToken, ...] = tuple(
    SpecialToken(text, special=False) for text in ("<tool_response>", "</tool_response>", "<think>", "</think>")
)

_NORMALISE = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16,
              "temporal_patch_size": 2, "merge_size": 2, "processor_class": "Qwen3VLProcessor"}

SPEC = FamilySpec(
    name=FamilyName.QWEN3_VL,
    model_type="qwen3_vl",
    model_class="Qwen3VLForConditionalGeneration",
    config_class="Qwen3VLConfig",
    processor_class="Qwen3VLProcessor",
    presets=PRESETS,
    special_tokens=QWEN2_VL_SPECIAL_TOKENS + QWEN2_5_EXTRA_TOKENS + QWEN3_EXTRA_TOKENS,
    chat_template=QWEN3_VL_CHAT_TEMPLATE,
    # preprocessor_config.json / video_preprocessor_config.json of Qwen/Qwen3-VL-*-Instruct: 16 px patches merged
    # 2x2 (one token per 32x32 px), 256x256 .. 16777216 pixels per image; video frames sampled at 2 fps, 4..768.
    image_processor={"size": {"longest_edge": 16777216, "shortest_edge": 65536}, **_NORMALISE,
                     "image_processor_type": "Qwen2VLImageProcessorFast"},
    video_processor={"size": {"longest_edge": 25165824, "shortest_edge": 4096}, **_NORMALISE, "fps": 2,
                     "min_frames": 4, "max_frames": 768, "do_sample_frames": True,
                     "video_processor_type": "Qwen3VLVideoProcessor"},
    model_max_length=262144,
    lora_targets=LM_LORA_TARGETS,
    # The merger and the DeepStack mergers both map ViT features into the LM (ms-swift's "aligner" for qwen3_vl).
    adapter_prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    # The template adds no system turn and renders images of user (and tool) messages only.
    default_system_prompt=None,
    image_roles=("user",),
)


class Qwen3VLFamily(HFVisionLanguageFamily):
    """Qwen3-VL-2B/4B/8B(-Instruct) on transformers' ``Qwen3VLForConditionalGeneration``."""

    spec = SPEC
