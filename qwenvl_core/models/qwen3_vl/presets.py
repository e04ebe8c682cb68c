"""Qwen3-VL presets: the 2B, 4B and 8B instruct checkpoints' ``config.json`` values, and a tiny one for CPU tests.

Sources of the full-size fields (the official ``config.json`` of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct):
- qwen3-vl-2b and qwen3-vl-8b: pytorch/torchtitan ``torchtitan/experiments/qwen3_vl/__init__.py`` ("2B": dim 2048,
  28 layers, FFN 6144, 16 / 8 heads, head_dim 128, tied, rope theta 5e6, ViT 1024 x 24 layers FFN 4096,
  out 2048, 2304 position embeddings, DeepStack [5, 11, 17], mrope_section [24, 20, 20]; "8B": dim 4096,
  36 layers, FFN 12288, 32 / 8 heads, untied, ViT 1152 x 27 layers FFN 4304, out 4096, DeepStack [8, 16, 24]).
- qwen3-vl-4b: the Qwen3-VL-4B-Instruct ``config.json`` vendored verbatim in a public repository (a Krea 2 text
  encoder, ``QWEN3_VL_4B_INSTRUCT_CONFIG``: text 2560 x 36 layers, FFN 9728, 32 / 8 heads, tied,
  max_position_embeddings 262144, mrope_interleaved; ViT as the 2B's with out_hidden_size 2560).
Published totals:
- 2B: 2.128B (ViT 407.0M, LM 1.721B), "calculated from the tensors stored in the upstream checkpoint":
  https://huggingface.co/OpenExplorer/Qwen3-VL-2B-Instruct (several papers round it to 2.1B / 2.13B).
- 4B: 4.44B (https://codersera.com/blog/qwen3-vl-4b-instruct-vs-qwen3-vl-4b-thinking-complete-2025-guide); the
  4.83B quoted elsewhere (aisight.pl) is the same model with the tied embedding counted twice: our state-dict
  count, 4,826,771,968.
- 8B: 8.77B (https://aisight.pl/?p=9918; 8.8B on haimaker.ai's model page).
Our counts (meta device, tied weights once): 2,127,532,032, 4,437,815,808 and 8,767,123,696.
"""

from __future__ import annotations

from qwenvl_core.autotune import RANDOM_TINY
from qwenvl_core.models.hf_vl.spec import Preset, config_token_ids, tiny_pretraining_presets
from qwenvl_core.models.hf_vl.tokenizer import TINY_ORDINARY_TOKENS
from qwenvl_core.models.qwen2_vl.presets import OFFICIAL_ORDINARY_TOKENS

_VISION_KEYS = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")


def _config(n_ordinary: int, text: dict, vision: dict, *, tied: bool) -> dict:
    """A Qwen3-VL config.json: token ids at the top, bos / eos in text_config, as the official files."""
    ids = config_token_ids(n_ordinary)
    return {
        **{key: ids[key] for key in _VISION_KEYS},
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["bos_token_id"],
            "eos_token_id": ids["eos_token_id"],
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": tied,
            "use_cache": True,
            **text,
        },
        "tie_word_embeddings": tied,
        "vision_config": {
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "initializer_range": 0.02,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **vision,
        },
    }


def _official(text: dict, vision: dict, *, tied: bool) -> dict:
    text = {"dtype": "bfloat16", "head_dim": 128, "max_position_embeddings": 262144, "vocab_size": 151936, **text}
    vision = {"num_heads": 16, "num_position_embeddings": 2304, **vision}
    return _config(OFFICIAL_ORDINARY_TOKENS, text, vision, tied=tied)


_SMALL_VIT = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "deepstack_visual_indexes": [5, 11, 17]}

PRESETS: dict[str, Preset] = {
    "qwen3-vl-2b": Preset(
        "Qwen3-VL-2B-Instruct, full size (2.13B: ViT 407M incl. mergers + Qwen3-1.7B LM, tied), bf16",
        _official({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8},
                  {**_SMALL_VIT, "out_hidden_size": 2048}, tied=True),
        published_params=2.128e9,
        source="Qwen/Qwen3-VL-2B-Instruct config.json (as in pytorch/torchtitan experiments/qwen3_vl); 2.128B: "
        "huggingface.co/OpenExplorer/Qwen3-VL-2B-Instruct",
    ),
    "qwen3-vl-4b": Preset(
        "Qwen3-VL-4B-Instruct, full size (4.44B: ViT 415M incl. mergers + Qwen3-4B LM, tied), bf16",
        _official({"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
                  {**_SMALL_VIT, "out_hidden_size": 2560}, tied=True),
        published_params=4.44e9,
        source="Qwen/Qwen3-VL-4B-Instruct config.json (vendored in a public Krea 2 text encoder); 4.44B: codersera",
    ),
    "qwen3-vl-8b": Preset(
        "Qwen3-VL-8B-Instruct, full size (8.77B: ViT 576M incl. mergers + Qwen3-8B LM), bf16",
        _official({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
                  {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096,
                   "deepstack_visual_indexes": [8, 16, 24]}, tied=False),
        published_params=8.77e9,
        source="Qwen/Qwen3-VL-8B-Instruct config.json (as in pytorch/torchtitan experiments/qwen3_vl); 8.77B: "
        "aisight.pl",
    ),
    "qwen3-vl-tiny": Preset(
        "tiny random Qwen3-VL for CPU tests: LM hidden 64 x 3 layers, ViT 32 x 3 layers, patch 16, DeepStack",
        _config(
            TINY_ORDINARY_TOKENS,
            {
                "head_dim": 16,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 4096,
                # head_dim 16: interleaved M-RoPE needs 3 x (height, width) <= 8, so T 4, H 2, W 2.
                "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
                "vocab_size": 1152,
            },
            # DeepStack from ViT layers 0 and 1 into LM layers 0 and 1 (as [5, 11, 17] of 24 into 0..2).
            {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
             "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]},
            tied=True,
        ),
        image_processor={"size": {"longest_edge": 256 * 32 * 32, "shortest_edge": 64 * 64}},
        training=RANDOM_TINY,  # qwen-vl-tiny's measured defaults: a random LM of the same size
    ),
}


# The tiny pretraining recipe's presets (qwenvl_core/pretrain/families.py): qwen3-vl-tiny-v2, its starting point, and
# qwen3-vl-tiny-seeing, the shipped result (docs/pretraining.md section 7).
PRESETS.update(tiny_pretraining_presets("qwen3-vl", PRESETS["qwen3-vl-tiny"], lm_config="text_config"))
