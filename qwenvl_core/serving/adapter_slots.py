"""Adapter weights resident on the engine's device: a fixed number of slots, pinned while rows use them.

The tiers of an adapter (S-LoRA / vLLM style): its files (local disk, or S3 downloaded once: ``AdapterFetcher``),
its ``LoraWeights`` in host memory (``AdapterCache``, an LRU bounded by count and bytes), and a *device slot* here.
For every layer an adapter may target (``lora_batch.lora_targets``: the language model's linear layers) the slots
form two stacks allocated when the engine starts, before its KV cache is sized from the free device memory, so
that the cache never takes the memory the first adapters need: ``A [max_rank, slots + 1, in]`` and ``(B·s)ᵀ
[max_rank, slots + 1, out]``, rank-major (``lora_batch``; slot 0 stays zero: the base model's rows; ``nbytes`` says
what they hold in all, about ``(slots + 1) · max_rank · Σ(in + out) · itemsize``; the A stacks of sibling targets,
``ModelFamily.lora_siblings``, are the rows of one tensor, so that a decode step multiplies by all of them at once).
An adapter is copied into a slot when a request using it joins the batch and it is not resident yet; nothing is
allocated then. A slot is pinned (reference counted) while a
running row uses it and is never reused then; an unpinned slot keeps its adapter for the next request and is
reclaimed least recently used first. When every slot is pinned, ``acquire`` answers None and the request waits
(in the engine's bounded queue). Rows name their slot in a device index tensor the engine keeps; a batch's plan
is views of the stacks cut to the largest rank in use (``lora_batch.plan_of``), so joining and leaving re-stacks
nothing.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Sequence

import torch

from qwenvl_core.serving.lora_batch import (
    AdapterError,
    LoraPlan,
    LoraWeights,
    PlanViews,
    plan_of,
    plan_views,
    row_layout,
)

VIEW_CACHE_ENTRIES = 256  # windows x ranks x module sets whose plan views are kept (cleared beyond)


class AdapterSlots:
    """``slots`` device slots of LoRA weights up to rank ``max_rank`` (module docstring); ``dense_decode``: plans
    run decode steps of several adapters dense (``lora_batch``)."""

    def __init__(self, slots: int, max_rank: int, targets: dict[str, torch.nn.Module], device: torch.device,
                 dtype: torch.dtype, dense_decode: bool = False, siblings: Sequence[Sequence[str]] = ()) -> None:
        if slots < 1:
            raise AdapterError(f"adapter slots must be >= 1, got {slots}")
        self.slots, self.max_rank, self.device, self.dtype = slots, max_rank, device, dtype
        self.dense_decode = dense_decode
        # sibling targets (``ModelFamily.lora_siblings``) share one A storage [members, max_rank, slots + 1, in]
        self._siblings: list[tuple[tuple[str, ...], torch.Tensor]] = []
        shared = {}
        for members in sibling_groups(targets, siblings):
            storage = torch.zeros(len(members), max_rank, slots + 1, targets[members[0]].in_features, device=device,
                                  dtype=dtype)
            self._siblings.append((members, storage))
            shared.update((name, storage[m]) for m, name in enumerate(members))
        # target layer name -> (A [max_rank, slots + 1, in], (B·s)ᵀ [max_rank, slots + 1, out])
        self._stacks = {name: (shared[name] if name in shared else
                               torch.zeros(max_rank, slots + 1, layer.in_features, device=device, dtype=dtype),
                               torch.zeros(max_rank, slots + 1, layer.out_features, device=device, dtype=dtype))
                        for name, layer in targets.items()}
        # which adapter each slot holds, weakly: an adapter evicted from the host cache and used by no request is
        # freed (its slot is then simply never matched again and is reclaimed first). Index 0 unused (base rows).
        self._resident: list[weakref.ref[LoraWeights] | None] = [None] * (slots + 1)
        self._pins = [0] * (slots + 1)
        self._last_used = [0] * (slots + 1)
        self._clock = itertools.count(1)
        self.loads = 0
        # plan_views by (window, rank, modules): a batch's plan changes with every row that joins or leaves, its
        # views of the stacks only with the window of slots; views cost no memory but a few ops each to make
        self._views: dict[tuple, PlanViews] = {}

    def stacks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Target layer -> its slot stacks ``(A [max_rank, slots + 1, in], (B·s)ᵀ [max_rank, slots + 1, out])``,
        allocated once and written in place (fixed addresses: ``decode_graphs`` reads them)."""
        return dict(self._stacks)

    def siblings(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """Each group of sibling targets with its members' A stacks as one tensor ``[members, max_rank, slots + 1,
        in]`` (each member's ``stacks()`` A is its row of it)."""
        return list(self._siblings)

    @property
    def nbytes(self) -> int:
        """Bytes the slot stacks hold on the device (all allocated at construction)."""
        return sum(t.numel() * t.element_size() for pair in self._stacks.values() for t in pair)

    @property
    def in_use(self) -> int:
        """Slots pinned by running rows."""
        return sum(1 for pins in self._pins[1:] if pins)

    @property
    def resident(self) -> int:
        """Slots holding an adapter (pinned or kept for later)."""
        return sum(1 for ref in self._resident[1:] if ref is not None and ref() is not None)

    def resident_ids(self) -> list[str]:
        """Ids of the adapters the slots hold."""
        return [w.adapter_id for w in map(self._holds, range(1, self.slots + 1)) if w is not None]

    def acquire(self, weights: LoraWeights) -> int | None:
        """The slot holding ``weights``, pinned once more; copied into a free slot if not resident. None when
        every slot is pinned (the caller waits)."""
        slot = next((s for s in range(1, self.slots + 1) if self._holds(s) is weights), None)
        if slot is None:
            free = [s for s in range(1, self.slots + 1) if not self._pins[s]]
            if not free:
                return None
            # empty or freed slots first, then the least recently used
            slot = min(free, key=lambda s: (self._holds(s) is not None, self._last_used[s]))
            self._write(slot, weights)
        self._pins[slot] += 1
        self._last_used[slot] = next(self._clock)
        return slot

    def _holds(self, slot: int) -> LoraWeights | None:
        ref = self._resident[slot]
        return None if ref is None else ref()

    def release(self, slot: int) -> None:
        """A row using ``slot`` left the batch."""
        if slot:
            self._pins[slot] -= 1

    def plan(self, rows: torch.Tensor, slots: Sequence[int], adapters: Iterable[LoraWeights | None]) -> LoraPlan | None:
        """The LoRA plan of rows whose slots are ``rows`` (a device tensor; ``slots`` the same numbers on the host)
        and adapters ``adapters`` (None: base): views of the stacks cut to the largest rank among them. None when no
        row has an adapter."""
        distinct = tuple({id(a): a for a in adapters if a is not None}.values())
        layout = row_layout(slots, self.device)
        if not distinct or layout is None:
            return None
        used = tuple(sorted(set().union(*(adapter.modules for adapter in distinct))))
        rank = max(a.rank for a in distinct)
        key = (layout.first, layout.groups, rank, used)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= VIEW_CACHE_ENTRIES:
                self._views.clear()
            views = self._views[key] = plan_views({name: self._stacks[name] for name in used}, layout, rank,
                                                  self.dense_decode, self._siblings)
        return plan_of(rows, slots, views, distinct, layout, rank)

    def _write(self, slot: int, weights: LoraWeights) -> None:
        if weights.rank > self.max_rank:
            raise AdapterError(f"adapter {weights.adapter_id}: rank {weights.rank} exceeds max_lora_rank "
                               f"{self.max_rank}")
        unknown = sorted(set(weights.modules) - set(self._stacks))
        if unknown:
            raise AdapterError(f"adapter {weights.adapter_id}: {unknown[0]!r} is not a layer adapters may target")
        self._resident[slot] = None  # a write that fails midway leaves a slot that holds nothing, never half of one
        for name, (a_stack, bt_stack) in self._stacks.items():
            a_stack[:, slot].zero_()
            bt_stack[:, slot].zero_()
            if name in weights.modules:
                a, bt = weights.modules[name]  # contiguous (pinned on a GPU): asynchronous copies
                a_stack[: a.shape[0], slot].copy_(a, non_blocking=True)
                bt_stack[: bt.shape[0], slot].copy_(bt, non_blocking=True)
        self._resident[slot] = weakref.ref(weights)
        self.loads += 1


def sibling_groups(targets: dict[str, torch.nn.Module], siblings: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    """The target names that form sibling groups: for each suffix group of ``siblings`` (``ModelFamily.lora_siblings``)
    and each parent module holding all of its layers as targets, with one input width, their full names in order."""
    groups = []
    for suffixes in siblings:
        first = suffixes[0]
        for name in targets:
            if not name.endswith("." + first):
                continue
            parent = name[: -len(first)]
            members = tuple(parent + suffix for suffix in suffixes)
            if all(m in targets for m in members) and len({targets[m].in_features for m in members}) == 1:
                groups.append(members)
    return groups
