"""Qwen2-VL presets: the 2B and 7B instruct checkpoints' ``config.json`` values, and a tiny one for CPU tests.

Sources (the full-size fields are the official ``config.json`` of the Hugging Face repositories):
- qwen2-vl-2b: Qwen/Qwen2-VL-2B-Instruct ``config.json``; the same values are the defaults of mllm's
  ``configuration_qwen2vl.hpp`` (UbiquitousLearning/mllm: hidden 1536, intermediate 8960, 12 heads, 2 kv heads,
  28 layers, vocab 151936, vision embed_dim 1280 x 32 layers, mrope_section [16, 24, 24], tied embeddings).
  Published total: 2.21B (the model page's parameter count; shared/reference/qwen-vl-family.md).
- qwen2-vl-7b: Qwen/Qwen2-VL-7B-Instruct ``config.json``, reproduced field by field in VARGPT's Qwen2-VL loader
  and matching the module print in zhenhua32/Qwen2-VL ``READ.md`` (Embedding(152064, 3584), 28 layers, k/v 512,
  MLP 18944, merger 5120 -> 3584). Published total: 8.29B (the model page; qwen-vl-family.md).
Our counts (meta device, tied weights once): 2,208,985,600 and 8,291,375,616.
"""

from __future__ import annotations

from qwenvl_core.autotune import RANDOM_TINY
from qwenvl_core.models.hf_vl.spec import Preset, config_token_ids, tiny_pretraining_presets
from qwenvl_core.models.hf_vl.tokenizer import TINY_ORDINARY_TOKENS

OFFICIAL_ORDINARY_TOKENS = 151643


def _vision(hidden_size: int, **overrides: object) -> dict:
    return {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
            "hidden_size": hidden_size, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "temporal_patch_size": 2, **overrides}


def _official(**fields: object) -> dict:
    return {
        "attention_dropout": 0.0,
        **config_token_ids(OFFICIAL_ORDINARY_TOKENS),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "num_hidden_layers": 28,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        **fields,
    }


PRESETS: dict[str, Preset] = {
    "qwen2-vl-2b": Preset(
        "Qwen2-VL-2B-Instruct, full size (2.21B: ViT 675M incl. merger + Qwen2-1.5B LM, tied embeddings), bf16",
        _official(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                  tie_word_embeddings=True, vocab_size=151936, vision_config=_vision(1536)),
        published_params=2.21e9,
        source="Qwen/Qwen2-VL-2B-Instruct config.json (as in UbiquitousLearning/mllm configuration_qwen2vl.hpp); "
        "2.21B: the model page",
    ),
    "qwen2-vl-7b": Preset(
        "Qwen2-VL-7B-Instruct, full size (8.29B: ViT 676M incl. merger + Qwen2-7B LM), bf16",
        _official(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  tie_word_embeddings=False, vocab_size=152064, vision_config=_vision(3584)),
        published_params=8.29e9,
        source="Qwen/Qwen2-VL-7B-Instruct config.json (as in VARGPT's Qwen2-VL loader); 8.29B: the model page",
    ),
    "qwen2-vl-tiny": Preset(
        "tiny random Qwen2-VL for CPU tests: LM hidden 64 x 2 layers, ViT 32 x 2 layers, patch 14, merge 2",
        {
            **config_token_ids(TINY_ORDINARY_TOKENS),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "max_window_layers": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            # head_dim 16: the official [16, 24, 24] of head_dim 128, scaled to add up to 8.
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": True,
            "vocab_size": 1152,
            "vision_config": _vision(64, depth=2, embed_dim=32, mlp_ratio=2, num_heads=4),
        },
        image_processor={"min_pixels": 56 * 56, "max_pixels": 256 * 28 * 28},
        training=RANDOM_TINY,  # qwen-vl-tiny's measured defaults: a random LM of the same size
    ),
}


# The tiny pretraining recipe's presets (qwenvl_core/pretrain/families.py): qwen2-vl-tiny-v2, its starting point, and
# qwen2-vl-tiny-seeing, the shipped result (the local stack's qwen2-vl base).
PRESETS.update(tiny_pretraining_presets("qwen2-vl", PRESETS["qwen2-vl-tiny"]))
