"""Mixed-adapter LoRA in one forward pass: a grouped per-row LoRA computation on the shared base model.

This module owns
- ``LoraWeights``: one PEFT LoRA adapter read from its directory (``adapter_config.json`` +
  ``adapter_model.safetensors``), as ``(A [r, in], B·scaling [out, r])`` per target module of the base model;
  the scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``)
  is folded into ``B`` once, at load time;
- ``GroupedLora``: forward hooks on the base model's target ``Linear`` layers. A ``LoraPlan`` built for a batch
  (one adapter, or ``None`` for the base model, per row) stacks the *distinct* adapters' ``A`` / ``B`` of each
  module once; in every forward each hooked layer adds, for each adapter of the batch, ``x[rows]·Aᵀ·Bᵀ`` to its
  rows' output (a segmented LoRA: one pair of matmuls per adapter; base rows get no delta). Ranks are
  zero-padded to the largest rank in the plan, which changes nothing numerically.

The base weights are never modified, so any number of adapters share one copy of the model; an adapter's
tensors live as long as someone (the cache, or a plan of requests in flight) holds its ``LoraWeights``.
Limits (checked at load, ``AdapterError``): LoRA only (no DoRA, no ``modules_to_save``, no LoRA bias), targets
must be ``Linear`` layers of the language model (the vision tower's batch is images, not rows), rank at most
``max_rank``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.registry import ModelFamily

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(QwenVLError):
    """An adapter that cannot be served: missing files, unsupported options, shapes that do not fit."""


@dataclass
class LoraWeights:
    """One adapter's weights per target module: ``A [r, in]`` and ``B·scaling [out, r]``."""

    adapter_id: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, checked for options this server cannot apply."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: missing; an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for option in ("use_dora", "lora_bias"):
        if config.get(option):
            raise AdapterError(f"{path}: {option}=true is not supported by the serving engine")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save is not supported by the serving engine")
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _group_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": ..., "B": ...}}`` from PEFT's saved keys."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight", key)
        if match is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        grouped.setdefault(match["module"], {})[match["ab"]] = tensor
    return grouped


def load_lora_weights(
    adapter_dir: str | Path,
    adapter_id: str,
    model: nn.Module,
    family: ModelFamily,
    *,
    max_rank: int = 64,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LoraWeights:
    """Read and validate an adapter for ``model`` of ``family`` (which says which layers are the language
    model's); tensors in the model's dtype and on its device unless ``dtype`` / ``device`` say otherwise (the
    serving engine keeps them on the CPU, its host tier, pinned when the model is on a GPU)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path}: missing adapter weights")
    param = model.get_input_embeddings().weight  # the LM's compute dtype (a 4-bit base keeps it in embeddings)
    dtype = dtype or param.dtype
    device = torch.device(device) if device is not None else param.device
    pin = device.type == "cpu" and param.device.type == "cuda"
    linears = dict(model.named_modules())
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, pair in _group_tensors(load_file(str(path)), path).items():
        layer = linears.get(name)
        language = family.component_of(name + ".weight") == "language"
        if not language or layer is None or not hasattr(layer, "in_features"):
            raise AdapterError(f"{path}: target {name!r} is not a Linear layer of the language model")
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: module {name!r} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if a.shape != (rank, layer.in_features) or b.shape != (layer.out_features, rank):
            raise AdapterError(
                f"{path}: {name} has A {tuple(a.shape)} / B {tuple(b.shape)}, which do not fit "
                f"in={layer.in_features} out={layer.out_features}"
            )
        if rank > max_rank:
            raise AdapterError(f"{path}: rank {rank} of {name} exceeds the server's max rank {max_rank}")
        scaled_b = b.float() * _module_scaling(config, name, rank)
        a, b = a.to(device, dtype).contiguous(), scaled_b.to(device, dtype).contiguous()
        modules[name] = (a.pin_memory(), b.pin_memory()) if pin else (a, b)
    if not modules:
        raise AdapterError(f"{path}: no LoRA weights")
    return LoraWeights(adapter_id=adapter_id, modules=modules, rank=max(a.shape[0] for a, _ in modules.values()))


@dataclass
class LoraPlan:
    """Stacked weights of the distinct adapters of one batch, and each row's slot (0 = base, no delta)."""

    rows: torch.Tensor  # [B] long, slot per row
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [K+1, r, in], B [K+1, out, r])
    adapters: tuple[LoraWeights, ...]  # the plan keeps them alive
    # (slot, its rows' indices on the device, or None when every row uses that slot), base rows left out: each
    # hooked layer runs one pair of matmuls per adapter of the batch on that adapter's rows (a segmented LoRA), not
    # a per-row gather of the adapters' weights
    groups: tuple[tuple[int, torch.Tensor | None], ...] = ()

    @property
    def batch_size(self) -> int:
        return int(self.rows.numel())


def build_plan(row_adapters: Sequence[LoraWeights | None], device: torch.device | str = "cpu") -> LoraPlan:
    """A plan for a batch whose row ``i`` uses ``row_adapters[i]`` (``None`` = the base model)."""
    distinct: list[LoraWeights] = []
    slot_of: dict[int, int] = {}
    rows = []
    for adapter in row_adapters:
        if adapter is None:
            rows.append(0)
            continue
        if id(adapter) not in slot_of:
            distinct.append(adapter)
            slot_of[id(adapter)] = len(distinct)
        rows.append(slot_of[id(adapter)])
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    module_names = sorted({name for adapter in distinct for name in adapter.modules})
    for name in module_names:
        stacks[name] = _stack_module(name, distinct)
    return LoraPlan(rows=torch.tensor(rows, dtype=torch.long, device=device), stacks=stacks, adapters=tuple(distinct),
                    groups=row_groups(rows, device))


def row_groups(slots: Sequence[int], device: torch.device | str) -> tuple[tuple[int, torch.Tensor | None], ...]:
    """``LoraPlan.groups`` of a batch whose row ``i`` uses adapter slot ``slots[i]`` (0: the base model)."""
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot:
            by_slot.setdefault(slot, []).append(row)
    return tuple((slot, None if len(rows) == len(slots) else torch.tensor(rows, dtype=torch.long, device=device))
                 for slot, rows in by_slot.items())


def _stack_module(name: str, adapters: Sequence[LoraWeights]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [K+1, r, in], B [K+1, out, r])`` with zeros for slot 0 and for adapters that skip ``name``."""
    present = [adapter.modules[name] for adapter in adapters if name in adapter.modules]
    a_ref, b_ref = present[0]
    rank = max(a.shape[0] for a, _ in present)
    a_stack = a_ref.new_zeros(len(adapters) + 1, rank, a_ref.shape[1])
    b_stack = b_ref.new_zeros(len(adapters) + 1, b_ref.shape[0], rank)
    for slot, adapter in enumerate(adapters, start=1):
        if name in adapter.modules:
            a, b = adapter.modules[name]
            a_stack[slot, : a.shape[0]] = a
            b_stack[slot, :, : b.shape[1]] = b
    return a_stack, b_stack


class GroupedLora:
    """Per-row LoRA deltas on a base model's Linear layers, through forward hooks (the model is unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._hooked: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._active: LoraPlan | None = None

    def ensure_hooks(self, module_names: Sequence[str]) -> None:
        """Install a hook on every named layer that has none yet (called before a plan uses them)."""
        named = dict(self.model.named_modules())
        for name in module_names:
            if name not in self._hooked:
                self._hooked[name] = named[name].register_forward_hook(self._make_hook(name))

    def remove_hooks(self) -> None:
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()

    @contextmanager
    def activate(self, plan: LoraPlan | None) -> Iterator[None]:
        """Apply ``plan`` to every forward inside the block (``None``: base model only)."""
        if plan is not None:
            self.ensure_hooks(list(plan.stacks))
        previous, self._active = self._active, plan
        try:
            yield
        finally:
            self._active = previous

    def _make_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._active
            if plan is None or name not in plan.stacks:
                return None
            x = args[0]  # [B, T, in]
            if x.shape[0] != plan.batch_size:
                raise QwenVLError(f"LoRA plan is for {plan.batch_size} rows, the batch has {x.shape[0]}")
            a_stack, b_stack = plan.stacks[name]
            delta = None
            for slot, rows in plan.groups:  # one adapter's rows at a time: x_rows · Aᵀ · (B·s)ᵀ
                part = x if rows is None else x.index_select(0, rows)  # [b, T, in]
                change = (part.to(a_stack.dtype) @ a_stack[slot].T) @ b_stack[slot].T  # [b, T, out]
                if rows is None:
                    return output + change.to(output.dtype)
                if delta is None:
                    delta = torch.zeros_like(output)
                delta.index_copy_(0, rows, change.to(output.dtype))
            return output if delta is None else output + delta

        return hook
