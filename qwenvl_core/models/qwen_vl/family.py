"""The Qwen-VL v1 model family: the ``ModelFamily`` implementation the registry hands out for ``qwen-vl``.

It only wires together the modules of this package; it holds no model logic of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qwenvl_core.models.pixel_budget import ProcessorOptions
from qwenvl_core.models.registry import FamilyName

# Official LoRA targets of finetune.py: LM attention (fused QKV, output) and both MLP input projections.
QWEN_VL_LORA_TARGETS: tuple[str, ...] = ("c_attn", "attn.c_proj", "w1", "w2")
# LoRA presets (``specs.TargetPreset``): LM suffixes; ``mlp.c_proj`` is the MLP's down projection.
QWEN_VL_LORA_PRESETS: dict[str, tuple[str, ...]] = {
    "official": QWEN_VL_LORA_TARGETS,
    "attention": ("c_attn", "attn.c_proj"),
    "all-linear": (*QWEN_VL_LORA_TARGETS, "mlp.c_proj"),
}

_VISION_PREFIX = "transformer.visual."
_ADAPTER_PREFIXES = (
    "transformer.visual.attn_pool.",
    "transformer.visual.ln_post.",
    "transformer.visual.proj",
)


class QwenVLFamily:
    """Qwen-VL / Qwen-VL-Chat (v1): our own implementation, loading the official checkpoints."""

    name = FamilyName.QWEN_VL
    default_lora_targets = QWEN_VL_LORA_TARGETS

    def preset_names(self) -> list[str]:
        from qwenvl_core.models.qwen_vl.presets import PRESETS

        return list(PRESETS)

    def build_config(self, preset: str) -> Any:
        from qwenvl_core.models.qwen_vl.presets import build_config

        return build_config(preset)

    def load_config(self, model_dir: str | Path) -> Any:
        from qwenvl_core.models.qwen_vl.weights import read_config

        return read_config(model_dir)

    def build_model(self, config: Any) -> torch.nn.Module:
        from qwenvl_core.models.qwen_vl.modeling import QWenLMHeadModel

        return QWenLMHeadModel(config)

    def matches(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "qwen" and isinstance(config.get("visual"), dict)

    def load_model(
        self, model_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.nn.Module:
        from qwenvl_core.models.qwen_vl.weights import load_model

        return load_model(model_dir, dtype=dtype, device=device)

    def save_model(self, model: torch.nn.Module, out_dir: str | Path) -> None:
        from qwenvl_core.models.qwen_vl.weights import save_model

        save_model(model, out_dir)

    def load_processor(self, model_dir: str | Path, options: ProcessorOptions | None = None) -> Any:
        """v1's processor; any set ``options`` is refused (``PixelOptionsError``: v1 resizes every image to its
        fixed size)."""
        from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor

        return QwenVLProcessor.from_dir(model_dir, options=options)

    def stop_token_ids(self, processor: Any) -> list[int]:
        tok = processor.tokenizer
        return [tok.im_end_id, tok.im_start_id, tok.eod_id]

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.transformer.visual

    def component_of(self, param_name: str) -> str:
        if param_name.startswith(_ADAPTER_PREFIXES):
            return "adapter"
        if param_name.startswith(_VISION_PREFIX):
            return "vision"
        return "language"

    def lora_target_preset(self, preset: str) -> tuple[str, ...]:
        return QWEN_VL_LORA_PRESETS[preset]

    def lora_siblings(self) -> tuple[tuple[str, ...], ...]:
        return (("mlp.w1", "mlp.w2"),)  # QWenMLP: w1(x) * silu(w2(x)); c_attn is q, k and v in one layer already

    def forward_contract(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # QWenLMHeadModel.forward is the contract

    def rope_positions(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # 1-D rotary: images are ordinary positions
        return positions, torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    def step_positions(self, text_positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return text_positions

    def packing_refusal(self) -> str | None:
        return None  # segment_ids: block-diagonal attention, positions restart per segment

    def materialize(
        self, preset: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Path:
        from qwenvl_core.models.qwen_vl.materialize import write_random_model
        from qwenvl_core.models.qwen_vl.presets import shipped_weights

        if (shipped := shipped_weights(preset)) is not None:  # a pretrained preset: its shipped files
            from qwenvl_core.models.shipped import copy_shipped

            return copy_shipped(shipped, out_dir, seed=seed, dtype=dtype)
        return write_random_model(out_dir, preset=preset, seed=seed, dtype=dtype, device=device)
