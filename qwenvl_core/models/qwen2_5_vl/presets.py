"""Qwen2.5-VL presets: the 3B and 7B instruct checkpoints' ``config.json`` values, and a tiny one for CPU tests.

Sources (the full-size fields are the official ``config.json`` of the Hugging Face repositories):
- qwen2.5-vl-3b: Qwen/Qwen2.5-VL-3B-Instruct ``config.json`` (reproduced as "Selected Json config from
  Qwen2.5VL-3B" in a public JSON-parser test and in a "Qwen/Qwen2.5-VL-3B-Instruct / model config" note: hidden
  2048, intermediate 11008, 36 layers, 16 heads, 2 kv heads, vocab 151936, tied; ViT 1280 x 32 layers, SiLU MLP
  3420, window 112, full attention in blocks 7/15/23/31, out_hidden_size 2048). Published total: 3.75B (the model
  page; shared/reference/qwen-vl-family.md).
- qwen2.5-vl-7b: Qwen/Qwen2.5-VL-7B-Instruct ``config.json`` (its text_config as re-saved by transformers 4.54 in a
  public repository: hidden 3584, 28 layers, 28 heads, 4 kv heads, vocab 152064, untied, max_position_embeddings
  128000; ViT as above with out_hidden_size 3584; module print in acproject/duorou docs/qwen2.5vl_graph.md).
  Published total: 8.29B (the model page; qwen-vl-family.md).
Our counts (meta device, tied weights once): 3,754,622,976 and 8,292,166,656.
"""

from __future__ import annotations

from qwenvl_core.autotune import RANDOM_TINY
from qwenvl_core.models.hf_vl.spec import Preset, config_token_ids, tiny_pretraining_presets
from qwenvl_core.models.hf_vl.tokenizer import TINY_ORDINARY_TOKENS
from qwenvl_core.models.qwen2_vl.presets import OFFICIAL_ORDINARY_TOKENS


def _vision(out_hidden_size: int, **overrides: object) -> dict:
    return {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "in_chans": 3, "out_hidden_size": out_hidden_size, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2, "temporal_patch_size": 2, **overrides}


def _official(**fields: object) -> dict:
    return {
        "attention_dropout": 0.0,
        **config_token_ids(OFFICIAL_ORDINARY_TOKENS),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 128000,
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
    "qwen2.5-vl-3b": Preset(
        "Qwen2.5-VL-3B-Instruct, full size (3.75B: window-attention ViT 669M incl. merger + Qwen2.5-3B LM, tied)",
        _official(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, max_window_layers=70, tie_word_embeddings=True, vocab_size=151936,
                  vision_config=_vision(2048)),
        published_params=3.75e9,
        source="Qwen/Qwen2.5-VL-3B-Instruct config.json; 3.75B: the model page",
    ),
    "qwen2.5-vl-7b": Preset(
        "Qwen2.5-VL-7B-Instruct, full size (8.29B: window-attention ViT 677M incl. merger + Qwen2.5-7B LM)",
        _official(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_window_layers=28, tie_word_embeddings=False, vocab_size=152064,
                  vision_config=_vision(3584)),
        published_params=8.29e9,
        source="Qwen/Qwen2.5-VL-7B-Instruct config.json; 8.29B: the model page",
    ),
    "qwen2.5-vl-small": Preset(
        "small random Qwen2.5-VL for benchmarks (~62M): LM hidden 640 x 12 layers, ViT 256 x 8 layers",
        {
            **config_token_ids(TINY_ORDINARY_TOKENS),
            "hidden_size": 640,
            "intermediate_size": 1792,
            "num_hidden_layers": 12,
            "num_attention_heads": 10,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "max_window_layers": 12,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            # head_dim 64: the official [16, 24, 24] of head_dim 128, halved.
            "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
            "tie_word_embeddings": True,
            "vocab_size": 1152,
            "vision_config": _vision(640, depth=8, hidden_size=256, intermediate_size=704, num_heads=4,
                                     fullatt_block_indexes=[3, 7]),
        },
        image_processor={"min_pixels": 56 * 56, "max_pixels": 1024 * 28 * 28},
    ),
    "qwen2.5-vl-tiny": Preset(
        "tiny random Qwen2.5-VL for CPU tests: LM hidden 64 x 2 layers, window-attention ViT 32 x 4 layers",
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
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": True,
            "vocab_size": 1152,
            # 56 px windows (2x2 merged tokens), full attention in blocks 1 and 3 (as 7/15/23/31 of 32).
            "vision_config": _vision(64, depth=4, hidden_size=32, intermediate_size=64, num_heads=4,
                                     window_size=56, fullatt_block_indexes=[1, 3]),
        },
        image_processor={"min_pixels": 56 * 56, "max_pixels": 256 * 28 * 28},
        training=RANDOM_TINY,  # qwen-vl-tiny's measured defaults: a random LM of the same size
    ),
}


# The tiny pretraining recipe's presets (qwenvl_core/pretrain/families.py): qwen2.5-vl-tiny-v2, its starting point, and
# qwen2.5-vl-tiny-seeing, the shipped result (the local stack's qwen2.5-vl base).
PRESETS.update(tiny_pretraining_presets("qwen2.5-vl", PRESETS["qwen2.5-vl-tiny"]))
