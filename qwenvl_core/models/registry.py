"""The model-family registry: how callers find the code for a base model without branching on names.

A *family* (Qwen-VL v1; transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL) bundles everything that differs
between model generations: presets, loading and saving weights, the processor (tokenizer + images + chat
format), default LoRA targets and stop tokens. Callers (training, serving, the CLI) ask the registry for a
family by name, by preset, or by inspecting a model directory, and then only use the ``ModelFamily``
protocol. Adding a family means one module implementing the protocol and one entry in ``_FAMILY_LOADERS``.
"""

from __future__ import annotations

import importlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from qwenvl_core.errors import ConfigError, ModelLoadError, PresetError
from qwenvl_core.models.processing import FamilyProcessor, ProcessorOptions


class FamilyName(StrEnum):
    """The closed set of supported model families."""

    QWEN_VL = "qwen-vl"
    QWEN2_VL = "qwen2-vl"
    QWEN2_5_VL = "qwen2.5-vl"
    QWEN3_VL = "qwen3-vl"


@runtime_checkable
class ModelFamily(Protocol):
    """What every model family provides. Implementations live in ``qwenvl_core.models.<family>.family``."""

    name: FamilyName
    default_lora_targets: tuple[str, ...]

    def preset_names(self) -> list[str]:
        """The presets this family can build (e.g. ``qwen-vl-chat``, ``qwen-vl-tiny``)."""
        ...

    def build_config(self, preset: str) -> Any:
        """The model config of a preset (a transformers ``PretrainedConfig``)."""
        ...

    def load_config(self, model_dir: str | Path) -> Any:
        """The validated config of a local model directory (errors name its ``config.json``)."""
        ...

    def build_model(self, config: Any) -> torch.nn.Module:
        """A randomly initialised model for ``config`` (call under ``torch.device("meta")`` for free)."""
        ...

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether a model directory's ``config.json`` (as a dict) belongs to this family."""
        ...

    def load_model(
        self, model_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.nn.Module:
        """Load weights strictly from a local model directory."""
        ...

    def save_model(self, model: torch.nn.Module, out_dir: str | Path) -> None:
        """Write config and sharded safetensors weights."""
        ...

    def load_processor(self, model_dir: str | Path, options: ProcessorOptions | None = None) -> FamilyProcessor:
        """The processor (tokenizer, image preprocessing, chat format) of a model directory: the
        ``FamilyProcessor`` protocol (``qwenvl_core.models.processing``) that data, training and serving use.
        ``options``: a job's processor settings (``min_pixels`` / ``max_pixels``); a family that cannot honour a
        set option raises ``PixelOptionsError`` naming it."""
        ...

    def stop_token_ids(self, processor: Any) -> list[int]:
        """Token ids that end an assistant turn during generation."""
        ...

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision encoder including its adapter (merger) in ``model`` (plain or wrapped by peft). v1: maps
        ``pixel_values`` [N, 3, S, S] to features [N, Q, D]; Qwen2/2.5/3-VL: ``model.visual`` maps flattened
        patches and ``grid_thw`` to merged features (plus DeepStack features for Qwen3-VL)."""
        ...

    def component_of(self, param_name: str) -> str:
        """Which component a parameter belongs to: ``vision``, ``adapter`` or ``language``."""
        ...

    def lora_target_preset(self, preset: str) -> tuple[str, ...]:
        """Module-name suffixes of the language model's linear layers that the LoRA preset ``preset``
        (``official``, ``attention``, ``all-linear``: ``specs.TargetPreset``) targets in this family; training
        resolves them to language-model modules only (``training.lora.resolve_targets``)."""
        ...

    def lora_siblings(self) -> tuple[tuple[str, ...], ...]:
        """Groups of language-model linear layers (module-name suffixes under one parent) that every forward calls
        on the same input, one after the other: the serving engine computes their LoRA ``x · Aᵀ`` in one matmul
        (``decode_graphs``)."""
        ...

    def forward_contract(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (as ``load_model`` returns it) with its forward following the platform's forward contract
        (``docs/architecture.md``: ``loss_only``, contract positions, ``segment_ids``), which training, evaluation and
        ``generation.generate`` call; v1's model follows it natively and is returned unchanged."""
        ...

    def rope_positions(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary positions of a prefill of ``input_ids`` ``[B, T]`` (left padded: ``attention_mask``) with
        the vision tensors ``vision`` (``VisionInputs.as_kwargs()``, maybe empty), as the forward contract's
        ``position_ids`` takes them (v1: ``[B, T]``; M-RoPE families: ``[3, B, T]``, transformers'
        ``get_rope_index``), and each row's offset ``[B]``: a later token at text position ``p`` (``p`` counts
        the row's real tokens before it) has position ``step_positions(p, offset)``. The serving engine keeps
        the offsets per row, so rows that join and leave the batch at different steps keep their own."""
        ...

    def step_positions(self, text_positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Positions of cached steps from text positions ``[B, T]`` and the rows' offsets ``[B]``."""
        ...

    def packing_refusal(self) -> str | None:
        """None when the family trains on packed rows (``segment_ids``); otherwise why not (the trainer refuses
        ``hyperparameters.packing`` with this message)."""
        ...

    def materialize(
        self, preset: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Path:
        """Write a complete model directory with random weights, deterministically from ``seed``, drawn on ``device``
        (a GPU draws a full-size preset in seconds; a preset with shipped weights copies them wherever it runs)."""
        ...


# Family implementations are imported only when asked for (no work at import time).
_FAMILY_LOADERS: dict[FamilyName, str] = {
    FamilyName.QWEN_VL: "qwenvl_core.models.qwen_vl.family:QwenVLFamily",
    FamilyName.QWEN2_VL: "qwenvl_core.models.qwen2_vl.family:Qwen2VLFamily",
    FamilyName.QWEN2_5_VL: "qwenvl_core.models.qwen2_5_vl.family:Qwen2_5_VLFamily",
    FamilyName.QWEN3_VL: "qwenvl_core.models.qwen3_vl.family:Qwen3VLFamily",
}


def get_family(name: FamilyName | str) -> ModelFamily:
    """The family called ``name``; an unknown name raises ``ConfigError`` listing the known ones."""
    try:
        key = FamilyName(name)
    except ValueError:
        known = ", ".join(f.value for f in FamilyName)
        raise ConfigError(f"unknown model family {name!r}; known families: {known}") from None
    module_name, class_name = _FAMILY_LOADERS[key].split(":")
    family_cls = getattr(importlib.import_module(module_name), class_name)
    return family_cls()


def families() -> list[ModelFamily]:
    """Every registered family."""
    return [get_family(name) for name in FamilyName]


def family_for_preset(preset: str) -> ModelFamily:
    """The family that owns ``preset``; an unknown preset raises ``PresetError`` listing all presets."""
    known: list[str] = []
    for family in families():
        names = family.preset_names()
        if preset in names:
            return family
        known.extend(names)
    raise PresetError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(known))}")


def parameter_counts(family: ModelFamily, model: torch.nn.Module) -> dict[str, int]:
    """Parameters of ``model`` per component (``vision``, ``adapter``, ``language``) and ``total``.

    A tied weight (an LM head sharing the token embedding) is one parameter and is counted once.
    """
    counts = {"vision": 0, "adapter": 0, "language": 0}
    for name, param in model.named_parameters():  # named_parameters() lists a shared parameter once
        counts[family.component_of(name)] += param.numel()
    return {**counts, "total": sum(counts.values())}


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """A model directory's ``config.json`` as a dict, with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory")
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing config.json; is this a model directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def detect_family(model_dir: str | Path) -> ModelFamily:
    """The family of a local model directory, decided from its ``config.json``."""
    config = read_config_json(model_dir)
    for family in families():
        if family.matches(config):
            return family
    model_type = config.get("model_type")
    raise ConfigError(
        f"{Path(model_dir) / 'config.json'}: model_type {model_type!r} is not a supported family "
        f"(supported: {', '.join(f.value for f in FamilyName)})"
    )
