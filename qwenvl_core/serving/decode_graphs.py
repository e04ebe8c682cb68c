"""Decode steps of fixed shapes, replayed from CUDA graphs: a decode step's launches paid once, at capture.

On a GPU a decode step of a 7-10B model costs what it launches, not what it computes (docs/benchmarks.md: 34 ms
a step on an H200 where reading the weights takes ~4 ms); a CUDA graph replays all of a step's kernels with one
launch. A graph fixes every shape and every address it reads, so a step is made to have few shapes:
- rows padded to a bucket (1, 2, 4, 8, ... up to the cache's slots); the padding rows write their keys into the KV
  cache's spare slot (``SlotKVCache.for_static_decode``) and their logits are dropped;
- the keys attended to, every row's, cut at the rows' longest length rounded up to ``attend_step`` columns, the
  rest masked (the mask computed in the step from the rows' cache columns: part of the graph);
- adapters: every device slot, cut to a rank bucket (the batch's largest adapter rank rounded up to a power of two,
  at most the slots' ``max_rank``: a step reads no more of the stacks than the batch's ranks need), each row's slot
  kept by the rank mask (the dense LoRA decode of ``lora_batch``, over all slots, so that a plan never changes a
  graph's shapes or the addresses it reads: the slots' stacks are written in place when an adapter comes in);
  sibling targets, which the model calls on one input (``ModelFamily.lora_siblings``: v1's ``w1`` / ``w2``, the
  newer families' q / k / v and gate / up), get their ``x · Aᵀ`` from one batched matmul and one mask for the
  group; only the layers the batch's adapters target get LoRA (not every layer an adapter may target: ``lm_head``
  among them), so a step with no adapter at all has graphs without LoRA.
So a graph is keyed by (rows bucket, attended columns, LoRA targets, rank bucket), captured the first time a step
needs it (the adapters a deployment serves share their targets and rank, trained with one preset: one set, or a
few), and its inputs (ids, positions, prompt lengths, the rows' cache slots and columns, rank mask) are buffers
filled before each replay (the slots and columns in one copy from the host); the rank mask only when rows join or
leave.

Every family: a decode step with the engine's prepared mask and positions reads nothing back from the device
(Qwen-VL v1 while attending within ``seq_length``: longer steps, beyond which its dynamic NTK reads the rows'
prompt lengths, run as usual; Qwen2/2.5/3-VL take their M-RoPE positions ``[3, rows, 1]`` as given, and a 4-D mask
as it is). ``capture=False`` runs the same fixed-shape step without a graph (the CPU, and the tests: it must give
what the usual step gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenvl_core.errors import QwenVLError
from qwenvl_core.serving.adapter_slots import AdapterSlots
from qwenvl_core.serving.kv_cache import SlotKVCache, mask_buffer, static_decode_mask
from qwenvl_core.serving.lora_batch import (
    GroupedLora,
    LoraPlan,
    RowLayout,
    dense_window,
    rank_mask,
    sibling_views,
)


class GraphCaptureError(QwenVLError):
    """A decode step could not be captured as a CUDA graph (the engine then decodes without graphs)."""


@dataclass(frozen=True)
class StepShape:
    """What a graph is keyed by: rows (padded), keys attended to, the layers with LoRA (sorted; none: no adapter) and
    the rank the slots' stacks are cut to (0: no LoRA)."""

    rows: int
    attend: int
    lora: tuple[str, ...]
    rank: int = 0


class _Buffers:
    """A shape's fixed inputs (and, once captured, its graph and output). Positions take the family's shape
    (``[rows, 1]``, M-RoPE ``[3, rows, 1]``: the rows on the second-to-last axis) at the first step."""

    def __init__(self, shape: StepShape, device: torch.device, slots: int, mask_dtype: torch.dtype,
                 attention_dtype: torch.dtype) -> None:
        rows = shape.rows
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions: torch.Tensor | None = None
        self.prompt_lengths = torch.ones(rows, dtype=torch.long, device=device)
        self.cache_index = torch.zeros(2, rows, dtype=torch.long, device=device)  # each row's KV slot, and column
        self.key_columns = torch.arange(shape.attend, device=device)
        self.mask = mask_buffer((rows, 1, 1, shape.attend), attention_dtype, device)  # made in the step
        self.rank_mask = torch.zeros(rows, shape.rank * slots, dtype=mask_dtype, device=device) if shape.lora else None
        self.plan: LoraPlan | None = None  # the LoRA plan reading rank_mask (DecodeGraphs sets it)
        self.mask_slots: list[int] | None = None  # the rows' adapter slots rank_mask holds
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    """Fixed-shape decode steps of ``model`` through ``cache`` (module docstring); ``capture``: as CUDA graphs."""

    def __init__(self, model: torch.nn.Module, cache: SlotKVCache, lora: GroupedLora, slots: AdapterSlots,
                 seq_length: int | None, attend_step: int = 256, capture: bool = True) -> None:
        if cache.spare_slot is None:
            raise QwenVLError("decode graphs need a KV cache with a spare slot")
        if capture and cache.device.type != "cuda":
            raise QwenVLError(f"CUDA graphs need a CUDA device, the engine is on {cache.device}")
        self.model, self.cache, self.lora, self.slots = model, cache, lora, slots
        self.attend_step, self.capture = attend_step, capture
        # beyond seq_length v1's dynamic NTK and logn read the rows' lengths: those steps are not replayed
        self.max_attend = min(cache.capacity, seq_length) if seq_length else cache.capacity
        self._buffers: dict[StepShape, _Buffers] = {}
        self._pool: tuple | None = None  # one memory pool for every graph (they never run at once)
        self.captured = 0
        self.steps = 0  # fixed-shape steps run (replayed, where captured)
        # the slots' stacks: fixed addresses, written in place by new adapters
        self._stacks = slots.stacks()

    def shape_for(self, rows: int, longest: int, targets: tuple[str, ...], rank: int) -> StepShape | None:
        """The shape of a step of ``rows`` rows whose longest holds ``longest`` tokens, its adapters targeting
        ``targets`` (sorted; none: no adapter) at ranks up to ``rank``; None: not replayable."""
        bucket = min(1 << (rows - 1).bit_length(), self.cache.slots)  # (the batch's rows fit the slots)
        attend = min(-(-(longest + 1) // self.attend_step) * self.attend_step, self.cache.capacity)
        if longest + 1 > attend or attend > self.max_attend:  # a full slot (refused by the usual step), or too long
            return None
        lora = tuple(name for name in targets if name in self._stacks)
        rank_bucket = min(1 << (max(rank, 1) - 1).bit_length(), self.slots.max_rank) if lora else 0
        return StepShape(bucket, attend, lora, rank_bucket)

    def run(self, shape: StepShape, ids: torch.Tensor, positions: torch.Tensor, prompt_lengths: torch.Tensor,
            row_slots: list[int]) -> torch.Tensor:
        """One decode step of the ``len(row_slots)`` rows in cache slots ``0 ..`` (adapter slot per row, 0: base):
        their logits ``[rows, V]``. The caller commits (or abandons) the cache afterwards."""
        rows = len(row_slots)
        buffers = self._buffers.get(shape)
        if buffers is None:
            buffers = self._buffers[shape] = _Buffers(shape, self.cache.device, self.slots.slots + 1,
                                                      self.slots.dtype, self.cache.dtype)
            buffers.plan = self._plan(shape, buffers)
        self.cache.for_static_decode(rows, shape.rows, shape.attend, buffers.cache_index)
        buffers.ids[:rows].copy_(ids)
        buffers.ids[rows:].zero_()
        if buffers.positions is None:
            size = list(positions.shape)
            size[-2] = shape.rows
            buffers.positions = positions.new_zeros(size)
        buffers.positions.narrow(-2, 0, rows).copy_(positions)
        buffers.positions.narrow(-2, rows, shape.rows - rows).zero_()
        buffers.prompt_lengths[:rows].copy_(prompt_lengths)
        buffers.prompt_lengths[rows:].fill_(1)
        if buffers.rank_mask is not None and buffers.mask_slots != row_slots:  # (rows joined or left)
            padded = row_slots + [0] * (shape.rows - rows)
            buffers.rank_mask.copy_(rank_mask(padded, shape.rank, self.slots.slots + 1,
                                              buffers.rank_mask.device, buffers.rank_mask.dtype))
            buffers.mask_slots = list(row_slots)
        self.steps += 1
        if not self.capture:
            return self._forward(buffers)[:rows]
        if buffers.graph is None:
            try:
                self._capture(buffers)
            except Exception as exc:  # an op the capture refuses, or the capture's own failure
                raise GraphCaptureError(f"capturing the decode step {shape} as a CUDA graph failed: {exc!r}") from exc
        assert buffers.graph is not None and buffers.logits is not None
        buffers.graph.replay()
        # a copy: the graph's output lives in the memory pool the other graphs share
        return buffers.logits[:rows].clone()

    def _plan(self, shape: StepShape, buffers: _Buffers) -> LoraPlan | None:
        """Dense LoRA on the shape's layers over every slot at the shape's rank, each row's slot kept by
        ``buffers.rank_mask`` (None: no LoRA); siblings share a product where the shape has the whole group."""
        if buffers.rank_mask is None:
            return None
        rows = torch.zeros(shape.rows, dtype=torch.long, device=self.cache.device)  # (its size: the batch's)
        layout = RowLayout(first=1, groups=self.slots.slots, gather=None, take=None, rows=None)
        dense = {name: dense_window(*self._stacks[name], shape.rank) for name in shape.lora}
        return LoraPlan(rows=rows, stacks=dense, adapters=(), layout=layout, rank=shape.rank, dense=dense,
                        mask=buffers.rank_mask, siblings=sibling_views(self.slots.siblings(), dense, shape.rank))

    def _forward(self, buffers: _Buffers) -> torch.Tensor:
        # the attention mask from the rows' columns, on the device (in the graph: no copy from the host per step)
        static_decode_mask(buffers.key_columns, buffers.cache_index[1].view(-1, 1, 1, 1), buffers.mask)
        with self.lora.activate(buffers.plan):
            out = self.model(input_ids=buffers.ids, attention_mask=buffers.mask, position_ids=buffers.positions,
                             cache=self.cache, use_cache=True, prompt_lengths=buffers.prompt_lengths,
                             logits_to_keep=1)
        return out.logits[:, -1, :]

    def _capture(self, buffers: _Buffers) -> None:
        """Warm the step up on a side stream (cuBLAS workspaces, lazily loaded kernels), then capture it. Each run
        writes this step's keys at the same places with the same values, so the warm-up changes nothing."""
        side = torch.cuda.Stream(self.cache.device)  # (the cache stays planned for this step until its commit)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(buffers)
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's other threads (image preprocessing, adapter loads pinning host memory) may
        # call CUDA meanwhile; only this thread's calls must be capturable
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            buffers.logits = self._forward(buffers)
        self._pool = graph.pool()
        buffers.graph = graph
        self.captured += 1
