"""Mixed-adapter LoRA in one forward pass: a grouped per-row LoRA computation on the shared base model.

This module owns
- ``LoraWeights``: one PEFT LoRA adapter read from its directory (``adapter_config.json`` +
  ``adapter_model.safetensors``), as ``(A [r, in], (B·scaling)ᵀ [r, out])`` per target module of the base model
  (contiguous, the layout of the device slots); the scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA,
  per-module ``rank_pattern`` / ``alpha_pattern``) is folded into ``B`` once, at load time;
- ``GroupedLora``: forward hooks on the base model's target ``Linear`` layers. A ``LoraPlan`` built for a batch
  (one adapter, or ``None`` for the base model, per row) holds, per module, views of the adapter slot stacks, kept
  rank-major as ``A [R, slots, in]`` and ``(B·s)ᵀ [R, slots, out]`` (so that every cut below is a view that
  ``torch.bmm`` / ``torch.mm`` take without copying), cut to ``r``, the largest rank in the plan (ranks are
  zero-padded to it, which changes nothing numerically), and a ``RowLayout`` (index tensors built once per plan on
  the device).
  - A prefill forward of several adapters (where a dense plan's product would be large, ``dense_pays``; every
    prefill of a plan not made dense): each hooked layer gathers the rows into one padded block per slot of
    the plan's window (``Aᵀ [G, in, r]``, ``(B·s)ᵀ [G, r, out]``), runs one batched pair of matmuls for all of
    them (``torch.bmm``), takes each adapter row's result back and adds it (base rows get no delta, the padding's
    results are never read).
  - A decode forward (one token a row) of several adapters, and a prefill whose product stays small
    (``DENSE_MAX_ENTRIES``), in plans made ``dense`` (the serving engine's choice on a GPU):
    ``x · [Aᵀ of every slot] [in, r·slots]``, each row's ranks of the slots it does not use zeroed
    (``LoraPlan.mask``), ``· [(B·s)ᵀ of every slot] [r·slots, out]`` accumulated into the layer's output (one
    ``addmm``): three kernels a target and no gathers. Sibling targets that the model calls on one input
    (``ModelFamily.lora_siblings``) take their masked ``x · Aᵀ`` from one product for the group
    (``LoraPlan.siblings``; their A stacks are views of one storage, so at any rank): one batched matmul and one
    mask per group, then one ``addmm`` per target.
    A decode step on a GPU costs what it launches; the slots-fold multiply-adds of one token a row are little
    beside that there, and the weights are read either way. On a CPU those multiply-adds are the cost, so plans
    there are grouped as for a prefill.
  - One adapter on every row: ``x · Aᵀ``, then ``· (B·s)ᵀ`` accumulated into the output (one ``addmm``), on the
    rows as they are: two kernels a target; siblings share one ``x · Aᵀ`` here too.

The base weights are never modified, so any number of adapters share one copy of the model; an adapter's
tensors live as long as someone (the cache, or a plan of requests in flight) holds its ``LoraWeights``.
Limits (checked at load, ``AdapterError``): LoRA only (no DoRA, no LoRA bias), targets must be ``Linear`` layers
of the language model, rank at most ``max_rank``. The vision tower's weights (LoRA on its encoder, full weights of
its modules: ``modules_to_save``) are taken out at load and applied per image by ``vision_adapters`` (the tower's
batch is images, not rows).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import nn

from qwenvl_core.devices import host_to_device, queued_copy
from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.registry import ModelFamily
from qwenvl_core.serving.servable import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS, config_refusal

if TYPE_CHECKING:
    from qwenvl_core.serving.vision_adapters import VisionWeights


class AdapterError(QwenVLError):
    """An adapter that cannot be served: missing files, unsupported options, shapes that do not fit."""


@dataclass
class LoraWeights:
    """One adapter's weights per target module: ``A [r, in]`` and ``(B·scaling)ᵀ [r, out]`` (language model; rank 0
    when it has none), each contiguous in the layout of the device slots it is copied into (``adapter_slots``), and
    its vision tower's weights, applied per image (``vision_adapters``)."""

    adapter_id: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    vision: VisionWeights | None = None

    @property
    def nbytes(self) -> int:
        own = sum(a.numel() * a.element_size() + bt.numel() * bt.element_size() for a, bt in self.modules.values())
        return own + (self.vision.nbytes if self.vision is not None else 0)


def read_adapter_config(adapter_dir: str | Path, family: str | None = None,
                        max_rank: int | None = None) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, checked for what this server cannot apply on a base of ``family`` with
    adapter slots of rank ``max_rank`` (``servable.config_refusal``: the rule ``GET /v1/models`` and the chat route
    apply too)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: missing; an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads(path.read_text(encoding="utf-8"))
    meta_path = Path(adapter_dir) / ADAPTER_META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    trained = meta.get("family") if isinstance(meta, dict) else None
    reason = config_refusal(config, family, trained if isinstance(trained, str) else None, max_rank)
    if reason:
        raise AdapterError(f"{path}: {reason}")
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


# A PEFT LoRA key: ``[base_model.model.]<module>.lora_A|lora_B[.<adapter name>].weight``.
LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight")


def _group_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": ..., "B": ...}}`` from PEFT's saved keys."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        grouped.setdefault(match["module"], {})[match["ab"]] = tensor
    return grouped


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read whole first: safetensors' ``load_file`` (0.8) keeps ~65 bytes a tensor
    per call, which a replica loading adapters for weeks would accumulate; adapters are small enough to read at once."""
    try:
        return load(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from exc


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
    config = read_adapter_config(adapter_dir, str(family.name), max_rank)
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path}: missing adapter weights")
    param = model.get_input_embeddings().weight  # the LM's compute dtype (a 4-bit base keeps it in embeddings)
    dtype = dtype or param.dtype
    device = torch.device(device) if device is not None else param.device
    pin = device.type == "cpu" and param.device.type == "cuda"
    from qwenvl_core.serving.vision_adapters import take_vision_weights  # (it imports this module)

    tensors = _read_tensors(path)
    vision = take_vision_weights(tensors, config, path, adapter_id, model, family, max_rank=max_rank, device=device,
                                 pin=pin)
    targets = lora_targets(model, family)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, pair in _group_tensors(tensors, path).items():
        layer = targets.get(name)
        if layer is None:
            raise AdapterError(f"{path}: target {name!r} is not a Linear layer of the language model")
        modules[name] = lora_pair(name, pair, layer, config, path, max_rank=max_rank, dtype=dtype, device=device,
                                  pin=pin)
    if not modules and vision is None:
        raise AdapterError(f"{path}: no LoRA weights")
    return LoraWeights(adapter_id=adapter_id, modules=modules, vision=vision,
                       rank=max((a.shape[0] for a, _ in modules.values()), default=0))


def lora_targets(model: nn.Module, family: ModelFamily) -> dict[str, nn.Module]:
    """The layers a served adapter may target, by module name: the language model's linear layers (``nn.Linear``,
    or a quantized one such as bitsandbytes' ``Linear4bit``: anything with ``in_features`` / ``out_features``)."""
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features")
            and family.component_of(name + ".weight") == "language"}


def lora_pair(name: str, pair: dict[str, torch.Tensor], layer: nn.Module, config: dict[str, Any], path: Path, *,
              max_rank: int, dtype: torch.dtype, device: torch.device, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, (B·scaling)ᵀ)`` of target ``name`` checked against its ``Linear`` ``layer``, in ``dtype`` on ``device``,
    both contiguous (so that a slot write from pinned host memory is one asynchronous copy each)."""
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
    scaled_bt = (b.float() * _module_scaling(config, name, rank)).T
    a, bt = a.to(device, dtype).contiguous(), scaled_bt.to(device, dtype).contiguous()
    return (a.pin_memory(), bt.pin_memory()) if pin else (a, bt)


@dataclass(frozen=True)
class RowLayout:
    """Where each row of a batch goes in the padded ``[G, M, ...]`` block of a plan's slot window, and back.

    Window slot ``g`` (adapter slot ``first + g``) owns block positions ``g·M .. g·M + M - 1``: its rows, then
    padding (any row; its results are never read). ``gather`` is the row of each block position (None: the block
    is the batch as it is), ``take`` the block position of each adapter row in row order (None: the block is
    already in that order) and ``rows`` those rows (None: every row has an adapter)."""

    first: int
    groups: int
    gather: torch.Tensor | None
    take: torch.Tensor | None
    rows: torch.Tensor | None


def row_layout(slots: Sequence[int], device: torch.device | str) -> RowLayout | None:
    """The ``RowLayout`` of a batch whose row ``i`` uses adapter slot ``slots[i]`` (0: the base model); None when
    no row has an adapter."""
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot:
            by_slot.setdefault(slot, []).append(row)
    if not by_slot:
        return None
    first, groups = min(by_slot), max(by_slot) - min(by_slot) + 1
    width = max(len(rows) for rows in by_slot.values())
    gather: list[int] = []
    position: dict[int, int] = {}
    for slot in range(first, first + groups):
        rows = by_slot.get(slot, [])
        position.update((row, len(gather) + j) for j, row in enumerate(rows))
        gather += rows + [rows[0] if rows else 0] * (width - len(rows))
    adapter_rows = sorted(position)
    take = [position[row] for row in adapter_rows]

    def on_device(values: list[int], identity: list[int]) -> torch.Tensor | None:
        return None if values == identity else host_to_device(values, device, torch.long)

    return RowLayout(first=first, groups=groups, gather=on_device(gather, list(range(len(slots)))),
                     take=on_device(take, list(range(len(gather)))), rows=on_device(adapter_rows, list(range(len(slots)))))


@dataclass
class LoraPlan:
    """The adapters of one batch: each row's slot, the slot window's weights per module and the row layout."""

    rows: torch.Tensor  # [B] long, slot per row (0 = base, no delta)
    # module -> (Aᵀ [G, in, r], (B·s)ᵀ [G, r, out]) of adapter slots layout.first .. layout.first + G - 1; with one
    # slot (G = 1) the matrices themselves, (Aᵀ [in, r], (B·s)ᵀ [r, out]), not indexed again at every forward
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    adapters: tuple[LoraWeights, ...]  # the plan keeps them alive
    layout: RowLayout
    rank: int  # r: the largest rank among the adapters, what the views are cut to
    # dense plans with G > 1, for decode forwards and small prefills (``dense_pays``): module -> (Aᵀ [in, r·slots],
    # (B·s)ᵀ [r·slots, out]), every slot at rank r, and mask [B, r·slots]: 1 at each adapter row's own slot's
    # ranks (over each of its tokens), 0 elsewhere
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    mask: torch.Tensor | None = None
    # mask over a prefill's tokens, [B·T, r·slots] (each row's repeated T times: within ``DENSE_MAX_ENTRIES``),
    # made by the forward's first dense target for all
    token_mask: torch.Tensor | None = None
    # plans on the rows as they are (dense, or one slot on every row): sibling targets
    # (``ModelFamily.lora_siblings``), module -> (its group's Aᵀ, every member's at rank r: [members, in, r·slots]
    # (dense) or [members, in, r] (the one slot), and its index in the group); the first member called computes the
    # group's product, the others take their part of it
    siblings: dict[str, tuple[torch.Tensor, int]] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.rows.numel())


def window(a_stack: torch.Tensor, bt_stack: torch.Tensor, layout: RowLayout,
           rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``LoraPlan.stacks`` entry: views of slot stacks ``A [R, slots, in]`` and ``(B·s)ᵀ [R, slots, out]`` cut to the
    layout's window of slots and to ``rank``: ``(Aᵀ [G, in, r], (B·s)ᵀ [G, r, out])``, or with one slot in the window
    ``(Aᵀ [in, r], (B·s)ᵀ [r, out])``."""
    if layout.groups == 1:
        return a_stack[:rank, layout.first].T, bt_stack[:rank, layout.first]
    cut = slice(layout.first, layout.first + layout.groups)
    return a_stack[:rank, cut].permute(1, 2, 0), bt_stack[:rank, cut].transpose(0, 1)


def dense_window(a_stack: torch.Tensor, bt_stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``LoraPlan.dense`` entry: slot stacks ``A [R, slots, in]`` and ``(B·s)ᵀ [R, slots, out]`` (contiguous) cut to
    ``rank``, every slot: ``(Aᵀ [in, rank·slots], (B·s)ᵀ [rank·slots, out])``, views."""
    return a_stack[:rank].flatten(0, 1).T, bt_stack[:rank].flatten(0, 1)


def rank_mask(slots: Sequence[int], rank: int, width: int, device: torch.device | str,
              dtype: torch.dtype) -> torch.Tensor:
    """``LoraPlan.mask`` of rows on ``slots`` (0: base) in stacks of ``width`` slots: ``[B, rank·width]``, row ``i``
    1 at the ``rank`` ranks of slot ``slots[i]`` (rank-major: ``k·width + slot``), 0 elsewhere (a base row: all 0);
    copied to ``device`` once per plan."""
    mask = torch.zeros(len(slots), rank, width, dtype=dtype)
    for row, slot in enumerate(slots):
        if slot:
            mask[row, :, slot] = 1
    return queued_copy(mask.view(len(slots), rank * width), device)


# Sibling groups of slot stacks: (member names, the members' A stacks as one tensor [members, R, slots, in])
SiblingStorage = Sequence[tuple[tuple[str, ...], torch.Tensor]]
PlanViews = tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                  dict[str, tuple[torch.Tensor, int]] | None]


def sibling_views(groups: SiblingStorage, modules: Iterable[str], rank: int,
                  slot: int | None = None) -> dict[str, tuple[torch.Tensor, int]] | None:
    """``LoraPlan.siblings`` of a plan at ``rank`` on ``modules``: for each group all of whose members are among
    them, member -> (the group's ``Aᵀ`` cut to ``rank``, a view: ``[members, in, rank·slots]`` for a dense plan,
    ``[members, in, rank]`` for one ``slot``; and its index in the group); None if no group is whole."""
    names, views = set(modules), {}
    for members, storage in groups:
        if set(members) <= names:
            cut = storage[:, :rank]  # [members, rank, slots, in]
            # one object for the group: its first member called computes the product
            group_a = (cut.flatten(1, 2) if slot is None else cut[:, :, slot]).transpose(1, 2)
            views.update((name, (group_a, index)) for index, name in enumerate(members))
    return views or None


def plan_views(whole: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: RowLayout, rank: int,
               dense: bool, siblings: SiblingStorage = ()) -> PlanViews:
    """A plan's weights: ``LoraPlan.stacks``, and (``dense`` and several slots) ``LoraPlan.dense``, and where the
    plan multiplies the rows as they are (one slot, or dense) ``LoraPlan.siblings`` of the groups ``siblings``:
    views of slot stacks ``whole`` (module -> ``A [R, slots, in]``, ``(B·s)ᵀ [R, slots, out]``) for ``layout``'s
    window and ``rank``. They depend on nothing else, so a caller may keep them for the next plan of the same
    window."""
    stacks = {name: window(a, bt, layout, rank) for name, (a, bt) in whole.items()}
    if layout.groups == 1:
        return stacks, None, sibling_views(siblings, whole, rank, layout.first)
    if not dense or not whole:  # (none: adapters of the vision tower only)
        return stacks, None, None
    return (stacks, {name: dense_window(a, bt, rank) for name, (a, bt) in whole.items()},
            sibling_views(siblings, whole, rank))


def plan_of(rows: torch.Tensor, slots: Sequence[int], views: PlanViews, adapters: tuple[LoraWeights, ...],
            layout: RowLayout, rank: int) -> LoraPlan:
    """The plan of rows on slots ``slots`` (and ``rows``, the same on the device), laid out by ``layout``, with
    ``plan_views`` ``views`` at ``rank`` (the largest among ``adapters``); dense views get their row mask."""
    stacks, dense, siblings = views
    if dense is None:
        return LoraPlan(rows=rows, stacks=stacks, adapters=adapters, layout=layout, rank=rank, siblings=siblings)
    a_all = next(iter(dense.values()))[0]  # Aᵀ [in, rank · slots]
    return LoraPlan(rows=rows, stacks=stacks, adapters=adapters, layout=layout, rank=rank, dense=dense,
                    mask=rank_mask(slots, rank, a_all.shape[1] // rank, a_all.device, a_all.dtype), siblings=siblings)


def build_plan(row_adapters: Sequence[LoraWeights | None], device: torch.device | str = "cpu",
               dense: bool = False) -> LoraPlan | None:
    """A plan for a batch whose row ``i`` uses ``row_adapters[i]`` (``None`` = the base model); None when no row
    has an adapter. (The engine's plans are views of its ``AdapterSlots``; this one stacks the adapters itself.)"""
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
    layout = row_layout(rows, device)
    if layout is None:
        return None
    module_names = sorted({name for adapter in distinct for name in adapter.modules})
    rank = max(adapter.rank for adapter in distinct)
    views = plan_views({name: _stack_module(name, distinct, rank) for name in module_names}, layout, rank, dense)
    return plan_of(host_to_device(rows, device, torch.long), rows, views, tuple(distinct), layout, rank)


def _stack_module(name: str, adapters: Sequence[LoraWeights], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [rank, K+1, in], (B·s)ᵀ [rank, K+1, out])`` with zeros for slot 0 and for adapters that skip ``name``."""
    a_ref, bt_ref = next(adapter.modules[name] for adapter in adapters if name in adapter.modules)
    a_stack = a_ref.new_zeros(rank, len(adapters) + 1, a_ref.shape[1])
    bt_stack = bt_ref.new_zeros(rank, len(adapters) + 1, bt_ref.shape[1])
    for slot, adapter in enumerate(adapters, start=1):
        if name in adapter.modules:
            a, bt = adapter.modules[name]
            a_stack[: a.shape[0], slot] = a
            bt_stack[: bt.shape[0], slot] = bt
    return a_stack, bt_stack


class GroupedLora:
    """Per-row LoRA deltas on a base model's Linear layers, through forward hooks (the model is unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._hooked: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._active: LoraPlan | None = None
        # the sibling group whose product was made last: (its Aᵀ, the input, each member's part of the product)
        self._shared: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]] | None = None

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
            self._active, self._shared = previous, None

    def _make_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._active
            if plan is None or name not in plan.stacks:
                return None
            x = args[0]  # [B, T, in]
            if x.shape[0] != plan.batch_size:
                raise QwenVLError(f"LoRA plan is for {plan.batch_size} rows, the batch has {x.shape[0]}")
            a_t, b_t = plan.stacks[name]
            layout = plan.layout
            block = x if x.dtype == a_t.dtype else x.to(a_t.dtype)
            sibling = plan.siblings.get(name) if plan.siblings else None
            # the two paths on the rows as they are (one matrix [B·T, in]: a view), then the paths that gather them
            a_all, b_all = plan.dense[name] if plan.dense is not None else (None, None)
            if a_all is not None and dense_pays(x, a_all):  # several adapters, every slot at once
                if sibling is not None:
                    return _add_product(output, self._sibling_product(sibling, x, block, plan), b_all)
                return _add_product(output, _masked(torch.mm(_rows(block), a_all), plan, x), b_all)
            if layout.gather is None and layout.groups == 1:  # one adapter on every row
                if sibling is not None:
                    return _add_product(output, self._sibling_product(sibling, x, block), b_t)
                return _add_product(output, torch.mm(_rows(block), a_t), b_t)
            if layout.gather is not None:
                block = block.index_select(0, layout.gather)  # [G·M, T, in]: each slot's rows, padded
            if layout.groups == 1:  # one adapter on some rows
                change = (block @ a_t) @ b_t
            else:  # every adapter of the batch in one pair of batched matmuls: [G, M·T, in] · Aᵀ · (B·s)ᵀ
                change = torch.bmm(torch.bmm(block.reshape(layout.groups, -1, block.shape[-1]), a_t), b_t)
                change = change.view(*block.shape[:-1], b_t.shape[-1])
            if change.dtype != output.dtype:
                change = change.to(output.dtype)
            if layout.take is not None:
                change = change.index_select(0, layout.take)  # the adapter rows' results, in row order
            # in place: the layer's output is a new tensor of this forward, used by nothing else yet
            return output.add_(change) if layout.rows is None else output.index_add_(0, layout.rows, change)

        return hook

    def _sibling_product(self, sibling: tuple[torch.Tensor, int], x: torch.Tensor, block: torch.Tensor,
                         dense: LoraPlan | None = None) -> torch.Tensor:
        """A sibling target's ``x · Aᵀ`` ``[B·T, width]`` (a view; masked by a ``dense`` plan's mask): its part of
        the group's product, which the first member called on this input computes for all: one batched matmul of the
        rows, the same for every member (an expanded view: nothing copied), by the members' ``Aᵀ`` (views of one
        storage at any rank: ``[members, in, width]``), and one mask, for the group."""
        group_a, index = sibling
        shared = self._shared
        if shared is None or shared[0] is not group_a or shared[1] is not x:  # the group's first member
            product = torch.bmm(_rows(block).expand(group_a.shape[0], -1, -1), group_a)  # [members, B·T, width]
            if dense is not None:  # over every member's
                _masked(product, dense, x)
            # each member's part as a view, in one op (a view per member would dispatch one each)
            shared = self._shared = (group_a, x, product.unbind(0))
        return shared[2][index]


# A dense plan multiplies a forward's rows by every slot's ``Aᵀ`` (then masks) when the product has at most this many
# entries, (rows · tokens) x (rank · slots), and gathers the rows per slot beyond. A decode step is always below
# (64 rows x 576 at rank 64 over 8 slots); a prefill of 4 rows x 300 tokens at rank 16 over 8 slots too (~173k).
# At the limit a 4,096-wide layer's two dense products take ~4 GFLOP, ~7 us of an H100's bf16 matmuls at 600
# TFLOP/s (an estimate, not measured), against the gathering path's two more launches in a launch-bound eager
# forward (the rows gathered per slot and scattered back, ~16 us each: docs/benchmarks.md, "First runs on an
# H200"); and the dense path shares one product per sibling group.
DENSE_MAX_ENTRIES = 1 << 18


def dense_pays(x: torch.Tensor, a_all: torch.Tensor) -> bool:
    """Whether a dense plan's layer multiplies input ``x [B, T, in]`` by every slot (``a_all [in, rank·slots]``):
    always for a decode step (T = 1), for a prefill while the product stays within ``DENSE_MAX_ENTRIES``."""
    return x.shape[1] == 1 or x.shape[0] * x.shape[1] * a_all.shape[1] <= DENSE_MAX_ENTRIES


def _masked(product: torch.Tensor, plan: LoraPlan, x: torch.Tensor) -> torch.Tensor:
    """``product [..., B·T, width]`` of input ``x [B, T, in]``, each row's tokens multiplied in place by the dense
    ``plan``'s mask row of it: one ``mul_`` (a prefill's mask over its tokens is made once per forward)."""
    if x.shape[1] == 1:
        return product.mul_(plan.mask)
    tokens = x.shape[0] * x.shape[1]
    if plan.token_mask is None or plan.token_mask.shape[0] != tokens:
        plan.token_mask = plan.mask.unsqueeze(1).expand(-1, x.shape[1], -1).reshape(tokens, -1)
    return product.mul_(plan.token_mask)


def _rows(block: torch.Tensor) -> torch.Tensor:
    """``block [..., in]`` as one matrix ``[rows, in]`` (a view where its strides allow)."""
    return block.reshape(-1, block.shape[-1])


def _add_product(output: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``output += left · right`` in place (``left [rows, r]``: the output's rows as one matrix, ``right [r, out]``): one
    ``addmm`` (one kernel: the product accumulated into the layer's output) where the dtypes agree and the output's
    rows view as one matrix with unit-stride columns, as a ``Linear``'s output does and a fused sibling's columns of
    its group's output do (``fused_siblings``: BLAS writes a matrix with a row stride of its own); else the
    product, cast, then added. The layer's output is a new tensor of this forward, used by nothing else yet."""
    matrix = _as_matrix(output) if output.dtype == left.dtype else None
    if matrix is not None:
        matrix.addmm_(left, right)
        return output
    change = (left @ right).view(output.shape)
    return output.add_(change if change.dtype == output.dtype else change.to(output.dtype))


def _as_matrix(output: torch.Tensor) -> torch.Tensor | None:
    """``output [..., out]`` as a ``[rows, out]`` view whose columns have unit stride; None where it has none."""
    if output.stride(-1) != 1:
        return None
    try:
        return output.view(-1, output.shape[-1])
    except RuntimeError:  # rows that one stride cannot step through
        return None
