"""QWenVLConfig: the Qwen-VL v1 config with the official config.json field names, plus validation.

Our only extensions live inside the ``visual`` block: ``n_queries`` (adapter queries per image, default 256)
and ``pos_grid_size`` (native side of the ViT learned positional-embedding grid, default 16). Official
config.json files without them load with those defaults.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from qwenvl_core.errors import ConfigError

VISUAL_DEFAULTS: dict[str, Any] = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
    "n_queries": 256,
    "pos_grid_size": 16,
}

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_channels",
    "intermediate_size",
    "seq_length",
    "max_position_embeddings",
)
_VISUAL_INT_FIELDS = (
    "heads",
    "image_size",
    "layers",
    "output_dim",
    "patch_size",
    "width",
    "n_queries",
    "pos_grid_size",
)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_square(value: int) -> bool:
    return math.isqrt(value) ** 2 == value


class QWenVLConfig(PretrainedConfig):
    """Config of QWenLMHeadModel (model_type "qwen"); defaults are the official Qwen-VL values."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        kv_channels: int = 128,
        intermediate_size: int = 22016,
        rotary_emb_base: float = 10000.0,
        rotary_pct: float = 1.0,
        layer_norm_epsilon: float = 1e-6,
        seq_length: int = 2048,
        max_position_embeddings: int = 8192,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        no_bias: bool = True,
        tie_word_embeddings: bool = False,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        lm_head_init_std: float | None = None,
        scale_attn_weights: bool = True,
        use_flash_attn: bool | str = False,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        visual: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.intermediate_size = intermediate_size
        self.rotary_emb_base = rotary_emb_base
        self.rotary_pct = rotary_pct
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seq_length = seq_length
        self.max_position_embeddings = max_position_embeddings
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.no_bias = no_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.initializer_range = initializer_range
        self.lm_head_init_std = lm_head_init_std
        self.scale_attn_weights = scale_attn_weights
        self.use_flash_attn = use_flash_attn
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.visual = {**VISUAL_DEFAULTS, **(visual or {})}
        kwargs.setdefault("architectures", ["QWenLMHeadModel"])
        super().__init__(**kwargs)
        self.tie_word_embeddings = tie_word_embeddings
        self.check_fields()

    # ----- derived values -------------------------------------------------------------------------------
    @property
    def image_start_id(self) -> int:
        """Id of ``<img>`` (``visual.image_start_id``)."""
        return int(self.visual["image_start_id"])

    @property
    def image_end_id(self) -> int:
        """Id of ``</img>`` (image_start_id + 1)."""
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        """Id of ``<imgpad>`` (image_start_id + 2)."""
        return self.image_start_id + 2

    @property
    def n_queries(self) -> int:
        """Image features (and ``<imgpad>`` tokens) per image."""
        return int(self.visual["n_queries"])

    @property
    def rotary_dim(self) -> int:
        """Number of head dims that get rotary (kv_channels * rotary_pct)."""
        return int(self.kv_channels * self.rotary_pct)

    # ----- validation -----------------------------------------------------------------------------------
    def check_fields(self) -> None:
        """Raise ConfigError naming the first invalid or inconsistent field."""
        self._check_lm_fields()
        self._check_visual_fields()

    def _check_lm_fields(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.intermediate_size % 2:
            raise ConfigError(f"config field 'intermediate_size' must be even, got {self.intermediate_size}")
        if not 0.0 < float(self.rotary_pct) <= 1.0:
            raise ConfigError(f"config field 'rotary_pct' must be in (0, 1], got {self.rotary_pct!r}")
        if self.rotary_dim < 4 or self.rotary_dim % 2:
            raise ConfigError(
                f"config fields 'kv_channels' * 'rotary_pct' must give an even rotary dim >= 4, got {self.rotary_dim}"
            )
        if float(self.rotary_emb_base) <= 0 or float(self.layer_norm_epsilon) <= 0:
            raise ConfigError("config fields 'rotary_emb_base' and 'layer_norm_epsilon' must be positive")
        for name in ("emb_dropout_prob", "attn_dropout_prob"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ConfigError(f"config field {name!r} must be in [0, 1), got {getattr(self, name)!r}")
        if self.tie_word_embeddings:
            raise ConfigError(
                "config field 'tie_word_embeddings' must be false for Qwen-VL (lm_head is untied)"
            )

    def _check_visual_fields(self) -> None:
        visual = self.visual
        for name in (*_VISUAL_INT_FIELDS, "image_start_id"):
            if not _is_positive_int(visual.get(name)):
                raise ConfigError(
                    f"config field 'visual.{name}' must be a positive integer, got {visual.get(name)!r}"
                )
        if not float(visual["mlp_ratio"]) > 0:
            raise ConfigError(
                f"config field 'visual.mlp_ratio' must be positive, got {visual['mlp_ratio']!r}"
            )
        if visual["image_size"] % visual["patch_size"]:
            raise ConfigError(
                f"config field 'visual.image_size' ({visual['image_size']}) must be divisible by "
                f"'visual.patch_size' ({visual['patch_size']})"
            )
        if visual["width"] % visual["heads"]:
            raise ConfigError(
                f"config field 'visual.width' ({visual['width']}) must be divisible by 'visual.heads' ({visual['heads']})"
            )
        if not _is_square(visual["n_queries"]):
            raise ConfigError(
                f"config field 'visual.n_queries' must be a perfect square, got {visual['n_queries']}"
            )
        if visual["output_dim"] != self.hidden_size:
            raise ConfigError(
                f"config field 'visual.output_dim' ({visual['output_dim']}) must equal 'hidden_size' ({self.hidden_size})"
            )
        if visual["output_dim"] % 4:
            raise ConfigError(
                f"config field 'visual.output_dim' must be a multiple of 4 (2-D sin-cos), got {visual['output_dim']}"
            )
        if self.image_pad_id >= self.vocab_size:
            raise ConfigError(
                f"config field 'visual.image_start_id' ({self.image_start_id}) + 2 must be below 'vocab_size' ({self.vocab_size})"
            )
