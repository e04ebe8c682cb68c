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
from qwenvl_core.models.peft_warnings import quiet_peft
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
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                device="meta")  # no throwaway init: its weight and bias are replaced just below
        # bitsandbytes' CPU path repacks the NF4 weights for inference on the first eval-mode forward and never
        # back, and training forwards after that (periodic evaluation, DPO's reference pass) fail: keep one layout.
        new.support_avx512bf16_for_cpu = False
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
                    precision: Precision, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The base model in ``precision`` on ``device`` following the forward contract (``family.forward_contract``);
    with Q-LoRA its LM linears are 4-bit NF4 (``quantize_language_model``, quantized on that device)."""
    dtype = torch_dtype(precision)
    model = family.forward_contract(family.load_model(model_dir, dtype=dtype, device=device))
    if quantization is Quantization.NF4:
        prepare_qlora_base(model, family, dtype)
    return model


def prepare_qlora_base(model: torch.nn.Module, family: ModelFamily, dtype: torch.dtype) -> torch.nn.Module:
    """The base of a Q-LoRA run: its LM linears NF4 (``quantize_language_model``), every weight frozen, the others
    left in the run's ``dtype``, as LoRA leaves them.

    Not peft's ``prepare_model_for_kbit_training``, which also casts every other bf16 / fp16 weight to fp32 (the
    embeddings, ``lm_head``, the norms, the whole vision tower): for Qwen2.5-VL-7B ~1.8B parameters, ~3.5 GB more,
    and the fp32 embeddings and norms turn the residual stream and the norms' outputs fp32, so the activations kept
    for backward grow too (qwen2.5-vl-small in bf16: 465 vs 384 MiB, LoRA's 384). On an H200 that made a Q-LoRA
    step take more device memory than LoRA's (docs/benchmarks.md). The norms compute in fp32 inside either way."""
    quantize_language_model(model, family, dtype)
    model.requires_grad_(False)
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
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if placeholder and "lora_" in name:
            param.requires_grad_(False)  # the identity LoRA of an adapter-only run (module docstring)
    return peft_model


class InitAdapterError(QwenVLError):
    """``init_adapter`` (continued training) cannot be loaded into this job's LoRA model."""


def fetch_adapter(uri: str, local_dir: Path) -> Path:
    """The PEFT adapter directory at ``uri`` as a local directory: a local one as it is, one in storage (S3)
    downloaded into ``local_dir``; ``InitAdapterError`` when nothing is there (e.g. a checkpoint that was removed
    since, beyond ``checkpoint.keep``)."""
    from qwenvl_core.storage import download_dir, open_store

    local = Path(uri)
    if "://" not in uri:
        if not (local / "adapter_config.json").is_file():
            raise InitAdapterError(f"init_adapter: no PEFT adapter (adapter_config.json) at {uri}")
        return local
    store, prefix = open_store(uri)
    if not download_dir(store, prefix, local_dir) or not (local_dir / "adapter_config.json").is_file():
        raise InitAdapterError("init_adapter: the adapter to continue from is no longer stored (a checkpoint "
                               "removed beyond its job's checkpoint.keep?)")
    return local_dir


def load_adapter_weights(model: PeftModel, adapter_dir: Path) -> int:
    """Continued training: set every trainable tensor of ``model`` (LoRA A/B, ``modules_to_save``) to its value in
    the PEFT adapter ``adapter_dir`` (``adapter_model.safetensors``, as ``checkpoint.save_adapter`` writes it).
    The adapter must match exactly: no trainable tensor missing, none extra, same shapes (the same LoRA
    configuration on the same base model); otherwise ``InitAdapterError``. Returns how many tensors were set."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise InitAdapterError(f"init_adapter: cannot read {path.name} of the adapter to continue from "
                               f"({type(exc).__name__}: {exc})") from None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(model, weights)
    except KeyError as exc:  # peft maps a modules_to_save wrapper's keys without checking they are there
        raise InitAdapterError(f"init_adapter: the adapter to continue from does not match this job's LoRA "
                               f"configuration: it lacks {exc.args[0]!r}") from None
    except RuntimeError as exc:  # load_state_dict's size mismatch: another rank, targets or base model
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise InitAdapterError(f"init_adapter: the adapter to continue from does not fit this job's LoRA model "
                               f"(another LoRA configuration or base model): {first[0].strip()}") from None
    missing = sorted(trainable & set(result.missing_keys))
    if result.unexpected_keys or missing:
        what = (f"it lacks {missing[0]!r}" if missing else f"it has {result.unexpected_keys[0]!r}, which this "
                "job's model does not train")
        raise InitAdapterError(f"init_adapter: the adapter to continue from does not match this job's LoRA "
                               f"configuration: {what} ({len(missing) + len(result.unexpected_keys)} tensors differ)")
    return len(trainable)


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
