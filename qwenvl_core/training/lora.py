"""Building the trainable model of a job: the base model (optionally Q-LoRA 4-bit) plus a peft LoRA adapter.

Owns LoRA target resolution (the family's presets, ``family.lora_target_preset``, and custom suffixes resolved to
full module names of the **language model only**; a custom name that would also hit the vision tower is
refused), which parts train, and Q-LoRA. Parts, by ``LoraSpec`` switch, all decided from ``family.component_of``
(no per-family names here):

- LoRA on the language model (``targets``; none with ``freeze_language_model``);
- ``vision_lora``: LoRA on every linear layer of the ``vision`` component (the encoder's blocks, never the adapter);
- ``train_adapter``: the ``adapter`` component trained fully as peft ``modules_to_save`` (the largest modules all
  of whose parameters are adapter parameters: v1 ``attn_pool``, ``ln_post``; Qwen2/2.5-VL ``model.visual.merger``;
  Qwen3-VL also each DeepStack merger), so it is saved with the adapter and restored by ``PeftModel``;
- ``modules_to_save``: what the user lists.

peft needs at least one LoRA layer: when only the adapter trains (``freeze_language_model`` + ``train_adapter``,
no ``vision_lora``), the first language-model attention projection carries a frozen LoRA whose B is zero (the
identity: the language model's outputs are unchanged, and the adapter directory stays a plain peft one).

Q-LoRA: every LM linear layer except ``lm_head`` becomes a bitsandbytes ``Linear4bit`` (NF4, double
quantisation); the vision tower, the adapter and the LoRA weights stay unquantised. Merging a Q-LoRA adapter uses
the unquantised base; serving can use either the NF4 base (``EngineConfig.quantization="4bit"`` calls
``quantize_language_model``) or the unquantised one (see ``docs/architecture.md``, "Training" and "Serving").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.registry import ModelFamily
from qwenvl_core.specs import LoraSpec, Precision, Quantization, TargetPreset


class LoraTargetError(QwenVLError):
    """``lora.targets`` / ``lora.modules_to_save`` name modules that do not exist or are not allowed."""


def torch_dtype(precision: Precision) -> torch.dtype:
    return torch.bfloat16 if precision is Precision.BF16 else torch.float32


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _linear_names(model: torch.nn.Module) -> list[str]:
    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        kinds = (torch.nn.Linear, bnb.nn.Linear4bit)
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency; Q-LoRA needs it
        pass
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def resolve_targets(model: torch.nn.Module, family: ModelFamily, targets: TargetPreset | list[str]) -> list[str]:
    """Full names of the LM linear layers that LoRA wraps; ``LoraTargetError`` names ``lora.targets``."""
    linears = [n for n in _linear_names(model) if n != "lm_head"]
    language = [n for n in linears if family.component_of(n + ".weight") == "language"]
    if isinstance(targets, TargetPreset):
        suffixes = family.lora_target_preset(targets.value)
        return [n for n in language if any(_matches(n, s) for s in suffixes)]
    resolved: list[str] = []
    for suffix in targets:
        outside = [n for n in linears if _matches(n, suffix) and n not in language]
        if outside:
            raise LoraTargetError(f"lora.targets: {suffix!r} also matches non-language modules such as "
                                  f"{outside[0]!r}; LoRA targets must name language-model layers only")
        hits = [n for n in language if _matches(n, suffix)]
        if not hits:
            raise LoraTargetError(f"lora.targets: {suffix!r} matches no language-model linear layer")
        resolved.extend(h for h in hits if h not in resolved)
    return resolved


def quantize_language_model(model: torch.nn.Module, family: ModelFamily, compute_dtype: torch.dtype) -> int:
    """Replace LM linears (not ``lm_head``) with NF4 double-quantised ``Linear4bit`` in place; returns the count."""
    import bitsandbytes as bnb

    names = [n for n in _linear_names(model)
             if n != "lm_head" and family.component_of(n + ".weight") == "language"]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old: torch.nn.Linear = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data.float(), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data.clone(), requires_grad=False)
        setattr(parent, child, new.to(old.weight.device))
    return len(names)


def vision_targets(model: torch.nn.Module, family: ModelFamily) -> list[str]:
    """Full names of the vision encoder's linear layers (``vision`` component: not the adapter) for ``vision_lora``."""
    names = [n for n in _linear_names(model) if family.component_of(n + ".weight") == "vision"]
    if not names:
        raise LoraTargetError("lora.vision_lora: the vision encoder of this model has no linear layers")
    return names


def adapter_modules(model: torch.nn.Module, family: ModelFamily) -> list[str]:
    """The largest modules all of whose parameters belong to the ``adapter`` component (containers such as a
    ``ModuleList`` give their elements: peft's ``modules_to_save`` wraps modules that are called)."""
    params = {n: family.component_of(n) for n, _ in model.named_parameters()}

    def adapter_only(prefix: str) -> bool:
        own = [c for n, c in params.items() if n.startswith(prefix + ".")]
        return bool(own) and all(c == "adapter" for c in own)

    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        if adapter_only(name) and not isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict):
            chosen.append(name)
    if not chosen:
        raise LoraTargetError("lora.train_adapter: this model has no vision-language adapter module to train")
    return chosen


def load_base_model(model_dir: str | Path, family: ModelFamily, quantization: Quantization,
                    precision: Precision) -> torch.nn.Module:
    """The base model in ``precision`` following the forward contract (``family.forward_contract``); with Q-LoRA
    its LM linears are 4-bit NF4 (``quantize_language_model``)."""
    dtype = torch_dtype(precision)
    model = family.forward_contract(family.load_model(model_dir, dtype=dtype))
    if quantization is Quantization.NF4:
        from peft import prepare_model_for_kbit_training

        quantize_language_model(model, family, dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _modules_to_save(model: torch.nn.Module, family: ModelFamily, spec: LoraSpec) -> list[str] | None:
    names = list(spec.modules_to_save or [])
    existing = {n for n, _ in model.named_modules()}
    for name in names:
        if not any(_matches(n, name) for n in existing):
            raise LoraTargetError(f"lora.modules_to_save: {name!r} matches no module of the model")
    if spec.train_adapter:
        names.extend(adapter_modules(model, family))
    return names or None


def lora_targets(model: torch.nn.Module, family: ModelFamily, spec: LoraSpec) -> list[str]:
    """Every module LoRA wraps: the LM's (unless frozen) and, with ``vision_lora``, the vision encoder's."""
    targets = [] if spec.freeze_language_model else resolve_targets(model, family, spec.targets)
    return targets + (vision_targets(model, family) if spec.vision_lora else [])


def apply_lora(model: torch.nn.Module, family: ModelFamily, spec: LoraSpec) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter as ``spec`` says; only LoRA (+ listed modules) stays trainable."""
    targets = lora_targets(model, family, spec)
    placeholder = [] if targets else resolve_targets(model, family, TargetPreset.ATTENTION)[:1]
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                        target_modules=targets or placeholder,
                        modules_to_save=_modules_to_save(model, family, spec), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if placeholder and "lora_" in name:
            param.requires_grad_(False)  # the identity LoRA of an adapter-only run (module docstring)
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in params)


def lora_summary(model: torch.nn.Module, spec: LoraSpec, targets: list[str]) -> dict[str, Any]:
    """What was trained, for params / meta.json: rank, alpha, dropout, resolved targets and counts."""
    trainable = [p for _, p in trainable_parameters(model)]
    return {"r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout,
            "targets": sorted({re.sub(r"^.*?\.\d+\.", "", t) for t in targets}), "target_modules": len(targets),
            "train_adapter": spec.train_adapter, "vision_lora": spec.vision_lora,
            "freeze_language_model": spec.freeze_language_model, "modules_to_save": spec.modules_to_save,
            "trainable_params": count_parameters(trainable),
            "total_params": count_parameters(model.parameters())}
