"""Named Qwen-VL presets: full-size (qwen-vl, qwen-vl-chat), qwen-vl-small (benchmarks), qwen-vl-tiny (CPU tests),
qwen-vl-tiny-v2 (the tiny pretraining recipe's starting point) and qwen-vl-tiny-seeing (its result, shipped weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwenvl_core.autotune import RANDOM_TINY, TrainingDefaults
from qwenvl_core.errors import PresetError
from qwenvl_core.models.qwen_vl.config import QWenVLConfig


@dataclass(frozen=True)
class Preset:
    """A named config: a one-line description, the QWenVLConfig keyword arguments and, for models the official
    recipe does not fit (random tiny ones), the training defaults ``materialize`` writes next to the weights
    (``training_defaults.json``, read by ``auto`` hyperparameters: ``qwenvl_core.autotune``)."""

    description: str
    fields: dict[str, Any] = field(default_factory=dict)
    training: TrainingDefaults | None = None
    weights: str | None = None  # shipped pretrained weights (``qwenvl_core.models.shipped``): copied, not drawn


# The full-size presets are QWenVLConfig's defaults, which are the official config.json values.

PRESETS: dict[str, Preset] = {
    "qwen-vl-chat": Preset(
        "Qwen-VL-Chat, full size (9.6B: ViT-bigG 1.9B + adapter + Qwen-7B), bf16",
        {"bf16": True},
    ),
    "qwen-vl": Preset(
        "Qwen-VL base (pre-trained), full size, same shapes as qwen-vl-chat",
        {},
    ),
    "qwen-vl-small": Preset(
        "small random model (tens of millions of params) for benchmarks: hidden 512, 8 layers, 224 px",
        {
            "vocab_size": 1280,
            "hidden_size": 512,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "kv_channels": 64,
            "intermediate_size": 2816,
            "seq_length": 2048,
            "max_position_embeddings": 8192,
            "visual": {
                "heads": 4,
                "image_size": 224,
                "image_start_id": 1238,
                "layers": 4,
                "mlp_ratio": 4.0,
                "output_dim": 512,
                "patch_size": 14,
                "width": 256,
                "n_queries": 64,
                "pos_grid_size": 8,
            },
        },
    ),
    "qwen-vl-tiny": Preset(
        "tiny random model for CPU tests: hidden 64, 2 layers, 112 px images, 16 queries",
        {
            "vocab_size": 1280,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "kv_channels": 16,
            "intermediate_size": 256,
            # With hidden 64 the default 0.02 caps every logit of the frozen random head near 1.3, so no LoRA
            # fine-tune could push the loss below ~5.9 however much it learns; 0.25 gives a trained head's range.
            "lm_head_init_std": 0.25,
            "seq_length": 2048,
            "max_position_embeddings": 8192,
            "visual": {
                "heads": 4,
                "image_size": 112,
                "image_start_id": 1238,
                "layers": 2,
                "mlp_ratio": 2.0,
                "output_dim": 64,
                "patch_size": 14,
                "width": 32,
                "n_queries": 16,
                "pos_grid_size": 4,
            },
        },
        training=RANDOM_TINY,
    ),
}
# The pretrained tiny base (qwenvl_core.pretrain, docs/pretraining.md): qwen-vl-tiny's shapes, so its weights load
# wherever qwen-vl-tiny's do, with an init that can learn to see: at std 0.02 the 32-wide ViT blocks start as the
# identity (1% updates), the adapter's attention is exactly uniform, and a tower trained alone for 600 steps reaches
# shape 0.24 / place 0.20 instead of 0.61 / 0.85 at std 0.1.
PRESETS["qwen-vl-tiny-v2"] = Preset(
    "qwen-vl-tiny's shapes with init std 0.1, the starting point of the tiny pretraining recipe",
    {**PRESETS["qwen-vl-tiny"].fields, "initializer_range": 0.1},
)

# qwen-vl-tiny-v2 after the tiny pretraining recipe, shipped in qwenvl_core/assets/ (built by
# ``python -m qwenvl_core.pretrain.ship``; its training_defaults.json is autotune.PRETRAINED_TINY): the local stack's
# base model. ``materialize`` copies its files; the fields describe it (``qwenvl model info``).
PRESETS["qwen-vl-tiny-seeing"] = Preset(
    "qwen-vl-tiny-v2 pretrained on rendered image-text data (shapes, colours, places, counts, glyphs, boxes): "
    "shipped weights, the local stack's base", PRESETS["qwen-vl-tiny-v2"].fields, weights="qwen-vl-tiny-seeing",
)


def shipped_weights(name: str) -> str | None:
    """The shipped model directory preset ``name`` copies (``qwenvl_core.models.shipped``); None: random weights."""
    preset = PRESETS.get(name)
    return preset.weights if preset is not None else None


def training_defaults(name: str) -> TrainingDefaults | None:
    """The training defaults preset ``name`` writes into its model directory (None: the family's apply)."""
    preset = PRESETS.get(name)
    return preset.training if preset is not None else None


def build_config(name: str) -> QWenVLConfig:
    """Return a fresh QWenVLConfig for preset ``name``; PresetError lists the known names."""
    preset = PRESETS.get(name)
    if preset is None:
        raise PresetError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    fields = {key: dict(value) if isinstance(value, dict) else value for key, value in preset.fields.items()}
    return QWenVLConfig(**fields)
