"""``HFVisionLanguageFamily``: the ``ModelFamily`` of a transformers-native Qwen VL family, given its spec.

A family sub-package subclasses it with one line (``spec = ...``); ``name`` and ``default_lora_targets`` come from
the spec. The model is transformers' own ``*ForConditionalGeneration`` (never remote code); its parameters are
``model.visual.*`` (vision encoder; ``model.visual.merger.*`` and Qwen3-VL's ``model.visual.deepstack_merger_list.*``
are the vision-language merger, the "adapter"), ``model.language_model.*`` and ``lm_head.*`` (language).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qwenvl_core.models.hf_vl.spec import FamilySpec

if TYPE_CHECKING:
    from qwenvl_core.models.hf_vl.processor import HFVLProcessor
    from qwenvl_core.models.pixel_budget import ProcessorOptions

_PEFT_PREFIX = "base_model.model."
# The ``attention`` LoRA preset: the LM's attention projections (``official`` / ``all-linear``: spec.lora_targets).
ATTENTION_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class HFVisionLanguageFamily:
    """Shared implementation of the ``ModelFamily`` protocol; subclasses set ``spec``."""

    spec: ClassVar[FamilySpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.spec.name
        cls.default_lora_targets = cls.spec.lora_targets

    def preset_names(self) -> list[str]:
        return list(self.spec.presets)

    def build_config(self, preset: str) -> Any:
        from qwenvl_core.models.hf_vl.config import build_config

        return build_config(self.spec, preset)

    def load_config(self, model_dir: str | Path) -> Any:
        from qwenvl_core.models.hf_vl.config import load_config

        return load_config(self.spec, model_dir)

    def build_model(self, config: Any) -> torch.nn.Module:
        return self.spec.transformers_class("model_class")(config)

    def matches(self, config: dict[str, Any]) -> bool:
        model_type = config.get("model_type")
        if model_type is not None:
            return model_type == self.spec.model_type
        architectures = config.get("architectures")
        return isinstance(architectures, list) and self.spec.model_class in architectures

    def load_model(
        self, model_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.nn.Module:
        from qwenvl_core.models.hf_vl.weights import load_model

        return load_model(self.spec, model_dir, self.load_config(model_dir), dtype=dtype, device=device)

    def save_model(self, model: torch.nn.Module, out_dir: str | Path) -> None:
        from qwenvl_core.models.hf_vl.weights import save_model

        save_model(model, out_dir)

    def load_processor(self, model_dir: str | Path, options: ProcessorOptions | None = None) -> HFVLProcessor:
        from qwenvl_core.models.hf_vl.processor import load_processor

        return load_processor(self.spec, model_dir, options)

    def stop_token_ids(self, processor: Any) -> list[int]:
        tokenizer = processor.tokenizer
        return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>")]

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.model.visual

    def component_of(self, param_name: str) -> str:
        name = param_name.removeprefix(_PEFT_PREFIX)
        if not name.startswith(self.spec.vision_prefix):
            return "language"
        if name.startswith(self.spec.adapter_prefixes):
            return "adapter"
        return "vision"

    def lora_target_preset(self, preset: str) -> tuple[str, ...]:
        # official = all-linear: every projection of the LM (LLaMA-Factory's / ms-swift's default with the ViT
        # frozen); the training code resolves the suffixes to language-model modules only.
        return {"attention": ATTENTION_LORA_TARGETS}.get(preset, self.spec.lora_targets)

    def lora_siblings(self) -> tuple[tuple[str, ...], ...]:
        # Qwen2/2.5/3-VL's text attention and MLP: q_proj / k_proj / v_proj(hidden), gate_proj / up_proj(x)
        return (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))

    def forward_contract(self, model: torch.nn.Module) -> torch.nn.Module:
        from qwenvl_core.models.hf_vl.forward import install_forward_contract

        return install_forward_contract(model)

    def rope_positions(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from qwenvl_core.models.hf_vl.forward import prefill_positions, token_types

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        positions, deltas = prefill_positions(base.model, input_ids, text, token_types(input_ids, base.config),
                                              attention_mask, vision)
        return positions, deltas.reshape(-1)

    def step_positions(self, text_positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        from qwenvl_core.models.hf_vl.forward import step_positions

        return step_positions(text_positions, offsets[:, None])

    def packing_refusal(self) -> str | None:
        from qwenvl_core.models.hf_vl.forward import PACKING_REFUSAL

        return PACKING_REFUSAL

    def materialize(
        self, preset: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Path:
        from qwenvl_core.models.hf_vl.materialize import write_random_model

        found = self.spec.presets.get(preset)
        if found is not None and found.weights is not None:  # a pretrained preset: its shipped files
            from qwenvl_core.models.shipped import copy_shipped

            return copy_shipped(found.weights, out_dir, seed=seed, dtype=dtype)
        return write_random_model(self.spec, preset, out_dir, seed=seed, dtype=dtype, device=device)
