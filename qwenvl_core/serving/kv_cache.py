"""The serving engine's key/value cache: preallocated per-row slots, written in place, never regrown.

Every attention layer gets two tensors ``[slots, kv_heads, capacity, head_dim]``, views of one storage allocated
once (``[2, layers, slots, ...]``), on the engine's device and in the model's dtype. A running request owns one
slot (one row); its keys and values fill the slot's columns ``0 .. length - 1`` in order (no padding columns: a
left-padded prefill is stored shifted to column 0, its padding rotated past the row's length, where nothing reads
it).
The running rows occupy slots ``0 .. n - 1``, so the rows a decode step attends to are a *view* of the storage,
not a copy; a row that leaves is replaced by the last row (one row's columns copied, every layer's in one copy),
and new rows are appended
after the last. Nothing grows per step: the old design concatenated every layer's cache every step (a full
copy and twice the memory at the peak).

The model sees the cache through the two calls both model implementations make once per layer and forward:
``update(key, value, layer_idx) -> (keys, values)`` (transformers' ``Cache`` protocol; v1's attention calls it
too) and ``get_seq_length()``. Before each forward the engine says what the forward is with ``for_prefill`` or
``for_decode`` (or ``for_chunk``: one chunk of a long prompt into its slot); the attention mask is the engine's
(``decode_mask`` / ``prefill_mask`` / ``chunk_mask``: 4-D), so no model derives positions or masks from the cache.
The masks are additive, in the cache's dtype (0: attend, -inf: not; what SDPA turns a boolean mask into, at every
layer, so made once a forward instead), their rows' storage padded to ``MASK_ALIGN`` columns (SDPA's
memory-efficient CUDA kernel copies a mask whose strides are not multiples of its alignment, at every layer).

No mask where plain causal attention is exact (the mask methods return None): a prefill whose rows are all one
length (no left padding; a single-row prefill always), a prompt's first chunk, a decode step whose rows all hold
as many tokens (no row attends to columns that are not its own). Then the attention runs SDPA's fused causal
kernel (``is_causal``; one query: no mask at all): v1's attention decides so itself, the transformers families
through ``create_causal_mask``, which sizes its mask from ``get_query_offset`` / ``get_mask_sizes`` and skips it
for SDPA. ``force_masks`` (tests) passes the explicit mask every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwenvl_core.devices import host_to_device
from qwenvl_core.errors import QwenVLError


@dataclass(frozen=True)
class CacheShape:
    """What one slot stores per layer: ``kv_heads`` x ``head_dim`` per token, ``layers`` layers."""

    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of keys + values of one token in all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


def cache_shape_of(config: object) -> CacheShape:
    """The cache shape of a model's (text) config: v1 (``num_attention_heads``, ``kv_channels``) or the
    transformers families (``text_config`` with ``num_key_value_heads``, ``head_dim`` or hidden / heads)."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "kv_channels", None) or text.hidden_size // heads
    return CacheShape(layers=text.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim)


class SlotKVCache:
    """Preallocated keys and values of ``slots`` rows of up to ``capacity`` tokens each (module docstring)."""

    def __init__(self, shape: CacheShape, slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, spare_slot: bool = False) -> None:
        if slots < 1 or capacity < 1:
            raise QwenVLError(f"a KV cache needs at least one slot and one token per slot (got {slots}, {capacity})")
        self.shape, self.slots, self.capacity, self.dtype = shape, slots, capacity, dtype
        self.device = torch.device(device)
        # ``spare_slot``: one more slot, ``slots``, that no request owns: the padding rows of a static decode
        # (``for_static_decode``) write their keys there
        stored = slots + 1 if spare_slot else slots
        self.spare_slot = slots if spare_slot else None
        # keys and values of every layer in one storage, so that moving a row is one copy, not two per layer
        self._storage = torch.zeros(2, shape.layers, stored, shape.kv_heads, capacity, shape.head_dim, dtype=dtype,
                                    device=self.device)
        self.keys = list(self._storage[0].unbind(0))
        self.values = list(self._storage[1].unbind(0))
        self.lengths: list[int] = [0] * stored  # tokens stored per slot (host side: no device sync to read)
        self._mode: tuple = ("idle",)
        self._attended: tuple | None = None  # the planned decode's views per layer (``_attended_views``)
        self.force_masks = False  # True: an explicit mask for every forward, also where causal is exact (tests)

    @property
    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

    # ----- what the next forward is ---------------------------------------------------------------------------
    def for_prefill(self, first_slot: int, prompt_lengths: Sequence[int]) -> None:
        """The next forward prefills ``len(prompt_lengths)`` new rows, left padded to a common width, into slots
        ``first_slot ..``; each row is stored from column 0 without its padding."""
        end = first_slot + len(prompt_lengths)
        if end > self.slots:
            raise QwenVLError(f"KV cache: {end} rows do not fit {self.slots} slots")
        width = max(prompt_lengths)
        if width > self.capacity:
            raise QwenVLError(f"KV cache: a prompt of {width} tokens exceeds the slot capacity {self.capacity}")
        # Each row rotated left past its padding (column c takes the forward's column c + padding, modulo the
        # width): all rows in one gather and one write per layer, the padding landing beyond the row's length
        # (never attended, overwritten by its next tokens). None: no row is padded, the forward's columns as they are.
        shift = None
        if min(prompt_lengths) < width:
            shift = host_to_device([[(c + width - length) % width for c in range(width)] for length in prompt_lengths],
                                   self.device, torch.long)[:, None, :, None]
        self._mode = ("prefill", first_slot, list(prompt_lengths), shift)

    def for_decode(self, first_slot: int, end_slot: int) -> None:
        """The next forward appends one token to each row of slots ``first_slot .. end_slot - 1``."""
        full = [s for s in range(first_slot, end_slot) if self.lengths[s] >= self.capacity]
        if full:
            raise QwenVLError(f"KV cache: slot {full[0]} is full ({self.capacity} tokens)")
        rows = torch.arange(first_slot, end_slot, device=self.device)
        columns = host_to_device(self.lengths[first_slot:end_slot], self.device, torch.long)
        attend = max(self.lengths[first_slot:end_slot]) + 1
        self._mode = self._decode_mode(first_slot, end_slot, rows, columns, attend, end_slot)  # (every row is real)

    def for_static_decode(self, rows: int, width: int, attend: int, index: torch.Tensor) -> None:
        """The next forward appends one token to each of slots ``0 .. rows - 1`` in a batch padded to ``width``
        rows, attending to ``attend`` columns whatever the rows' lengths: the shapes of a decode step that a CUDA
        graph replays (``decode_graphs``). Fills the caller's fixed buffer ``index [2, width]`` in place (one copy):
        row 0 the slot of each row (padding rows: the spare slot), row 1 the column its token goes to (padding: 0).
        The step's attention mask follows from row 1 on the device (``static_decode_mask``)."""
        if self.spare_slot is None:
            raise QwenVLError("KV cache: a static decode needs the spare slot (spare_slot=True)")
        if not 0 < rows <= width <= self.slots:
            raise QwenVLError(f"KV cache: {rows} rows padded to {width} do not fit {self.slots} slots")
        lengths = self.lengths[:rows]
        if max(lengths) >= min(attend, self.capacity):
            raise QwenVLError(f"KV cache: a row of {max(lengths)} tokens does not fit a step attending to {attend}")
        pad = width - rows
        index.copy_(torch.tensor([list(range(rows)) + [self.spare_slot] * pad, lengths + [0] * pad]), non_blocking=True)
        slot_index, columns = index.unbind(0)
        self._mode = self._decode_mode(0, width, slot_index, columns, attend, rows)  # slots 0 .. rows - 1 are real

    def _decode_mode(self, first: int, end: int, rows: torch.Tensor, columns: torch.Tensor, attend: int,
                     real_end: int) -> tuple:
        """A decode's plan: its slots ``first .. end - 1`` (those before ``real_end`` real), where each row's token
        goes (``rows``, ``columns``), and how many columns it attends to (the views of them: ``_attended``)."""
        self._attended = None
        return ("decode", first, end, rows, columns, attend, real_end)

    def _attended_views(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """What every layer of the planned decode attends to: each layer's keys and values of its slots cut at its
        columns, made at the first layer's ``update`` for all layers (a few ops a forward instead of four a layer;
        none when a captured graph replays the step)."""
        if self._attended is None:
            _, first, end, _, _, attend, _ = self._mode
            keys, values = self._storage[:, :, first:end, :, :attend].unbind(0)
            self._attended = keys.unbind(0), values.unbind(0)
        return self._attended

    def for_chunk(self, slot: int, start: int, length: int) -> None:
        """The next forward prefills ``length`` tokens of one prompt into ``slot`` from column ``start`` (a chunked
        prefill: the slot holds the prompt's first ``start`` tokens)."""
        if start + length > self.capacity:
            raise QwenVLError(f"KV cache: a prompt of {start + length} tokens exceeds the slot capacity {self.capacity}")
        self._mode = ("chunk", slot, start, length)

    def chunk_mask(self) -> torch.Tensor | None:
        """``[1, 1, length, start + length]`` for the planned chunk: causal over the prompt so far; None for the
        first chunk (plain causal)."""
        _, _, start, length = self._mode
        if start == 0 and not self.force_masks:
            return None
        q_pos = torch.arange(start, start + length, device=self.device)
        k_pos = torch.arange(start + length, device=self.device)
        return additive_mask((k_pos[None, :] <= q_pos[:, None])[None, None], self.dtype)

    def commit(self) -> None:
        """The forward succeeded: the rows it wrote now hold their new tokens."""
        mode = self._mode
        if mode[0] == "chunk":
            self.lengths[mode[1]] = mode[2] + mode[3]
        elif mode[0] == "prefill":
            for i, length in enumerate(mode[2]):
                self.lengths[mode[1] + i] = length
        elif mode[0] == "decode":  # the real rows (a static decode's padding rows store nothing that is kept)
            for slot in range(mode[1], mode[6]):
                self.lengths[slot] += 1
        self._mode = ("idle",)

    def abandon(self) -> None:
        """The forward failed: whatever it wrote lies beyond the rows' lengths and is overwritten later."""
        self._mode = ("idle",)

    # ----- masks the engine passes to the forward -------------------------------------------------------------
    def decode_mask(self) -> torch.Tensor | None:
        """``[rows, 1, 1, attend]`` for the planned decode: each row attends to its own stored tokens and the new one;
        None when every row holds ``attend - 1`` tokens (each attends to all the columns)."""
        _, first, end, _, columns, attend, _ = self._mode
        if not self.force_masks and min(self.lengths[first:end]) == attend - 1:
            return None
        k_pos = torch.arange(attend, device=self.device)
        return additive_mask((k_pos[None, :] <= columns[:, None])[:, None, None, :], self.dtype)

    def prefill_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """``[B, 1, T, T]`` causal attention among the planned left-padded prefill's own tokens, padding masked (a
        padding query sees itself, so its row stays finite); None when no row is padded (from the planned prompt
        lengths: no device sync)."""
        if not self.force_masks and min(self._mode[2]) == attention_mask.shape[1]:
            return None
        width = attention_mask.shape[1]
        pos = torch.arange(width, device=attention_mask.device)
        causal = pos[None, :] <= pos[:, None]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        return additive_mask(mask | torch.eye(width, dtype=torch.bool, device=attention_mask.device)[None, None],
                             self.dtype)

    # ----- the model's side (transformers' Cache protocol) ----------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys / values ``[rows, kv_heads, q, head_dim]`` of layer ``layer_idx``; return
        what its queries attend to."""
        keys, values, mode = self.keys[layer_idx], self.values[layer_idx], self._mode
        if mode[0] == "prefill":
            _, first, lengths, shift = mode
            rows, width = slice(first, first + len(lengths)), key_states.shape[2]
            if shift is None:
                keys[rows, :, :width] = key_states
                values[rows, :, :width] = value_states
            else:
                index = shift.expand(-1, key_states.shape[1], -1, key_states.shape[3])
                keys[rows, :, :width] = key_states.gather(2, index)
                values[rows, :, :width] = value_states.gather(2, index)
            return key_states, value_states
        if mode[0] == "chunk":
            _, slot, start, length = mode
            keys[slot, :, start : start + length] = key_states[0]
            values[slot, :, start : start + length] = value_states[0]
            return keys[slot : slot + 1, :, : start + length], values[slot : slot + 1, :, : start + length]
        if mode[0] == "decode":
            rows, columns, (attended_keys, attended_values) = mode[3], mode[4], self._attended_views()
            keys[rows, :, columns] = key_states[:, :, 0]
            values[rows, :, columns] = value_states[:, :, 0]
            return attended_keys[layer_idx], attended_values[layer_idx]
        raise QwenVLError("KV cache used by a forward the engine did not plan")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already stored for the planned forward's rows (0 at a prefill)."""
        mode = self._mode
        return {"decode": lambda: mode[5] - 1, "chunk": lambda: mode[2]}.get(mode[0], lambda: 0)()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Position of the forward's first query among the keys it attends to (transformers' mask sizing)."""
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(keys attended, offset of the first)`` of the planned forward (transformers' ``create_causal_mask``;
        only asked when the engine passes no mask)."""
        return self.get_seq_length(layer_idx) + query_length, 0

    # ----- rows leaving -----------------------------------------------------------------------------------------
    def move(self, source: int, target: int) -> None:
        """Slot ``source``'s tokens into slot ``target`` (the last row filling a leaver's place)."""
        if source == target:
            return
        length = self.lengths[source]
        self._storage[:, :, target, :, :length] = self._storage[:, :, source, :, :length]
        self.lengths[target], self.lengths[source] = length, 0

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


MASK_ALIGN = 16  # columns a mask row's storage is padded to a multiple of (module docstring)


def mask_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised additive mask of ``shape`` (last dim: keys) whose rows' storage is padded to ``MASK_ALIGN``
    columns (a view of it)."""
    *rows, width = shape
    storage = torch.empty(*rows, -(-width // MASK_ALIGN) * MASK_ALIGN, dtype=dtype, device=device)
    return storage[..., :width]


def write_additive(out: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``out`` (in place) as the additive form of the boolean mask ``allowed`` (True: attend): 0 where allowed,
    -inf elsewhere (module docstring)."""
    return out.fill_(float("-inf")).masked_fill_(allowed, 0.0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` as an additive mask in ``dtype``, in a new ``mask_buffer``."""
    return write_additive(mask_buffer(allowed.shape, dtype, allowed.device), allowed)


def static_decode_mask(key_columns: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The additive attention mask of a static decode (``SlotKVCache.for_static_decode``) into ``out [width, 1, 1,
    attend]`` (a ``mask_buffer``), from ``key_columns`` (``arange(attend)``) and ``columns [width, 1, 1, 1]`` (where
    each row's token goes, on the device): each row attends to its own tokens and the new one (a padding row, at
    column 0: column 0). Three kernels, no host copy: a CUDA graph captures them with the step."""
    return write_additive(out, torch.le(key_columns, columns))
