"""``SlotKVCache`` storage on its own: a left-padded prefill stores each row from column 0 without its padding
(all rows in one write per layer), a row moved into another slot keeps its tokens in every layer, and every
layer's keys and values are views of one storage; a static decode (``decode_graphs``) pads into the spare slot."""

from __future__ import annotations

import math

import pytest
import torch

from qwenvl_core.errors import QwenVLError
from qwenvl_core.serving.kv_cache import (
    MASK_ALIGN,
    CacheShape,
    SlotKVCache,
    additive_mask,
    mask_buffer,
    static_decode_mask,
)
from tests.devices import DEVICES


def test_padded_prefill_rows_are_stored_from_column_0_and_a_moved_row_keeps_them() -> None:
    cache = SlotKVCache(CacheShape(layers=2, kv_heads=2, head_dim=3), slots=4, capacity=8, dtype=torch.float32,
                        device="cpu")
    lengths, width = [3, 5, 1], 5
    states = {(layer, kind): torch.randn(3, 2, width, 3) for layer in range(2) for kind in ("k", "v")}
    cache.for_prefill(1, lengths)
    for layer in range(2):
        cache.update(states[layer, "k"], states[layer, "v"], layer)
    cache.commit()
    assert cache.lengths == [0, 3, 5, 1]
    for layer in range(2):
        for row, length in enumerate(lengths):  # the row's own tokens, the last `length` columns of the forward
            assert torch.equal(cache.keys[layer][1 + row, :, :length], states[layer, "k"][row, :, width - length:])
            assert torch.equal(cache.values[layer][1 + row, :, :length], states[layer, "v"][row, :, width - length:])
    cache.for_prefill(0, [2])  # one unpadded row: written as it is
    cache.update(states[0, "k"][:1, :, :2], states[0, "v"][:1, :, :2], 0)
    cache.update(states[1, "k"][:1, :, :2], states[1, "v"][:1, :, :2], 1)
    cache.commit()
    assert torch.equal(cache.keys[1][0, :, :2], states[1, "k"][0, :, :2])
    cache.move(2, 0)  # the 5-token row into slot 0
    assert cache.lengths == [5, 3, 0, 1]
    for layer in range(2):
        assert torch.equal(cache.keys[layer][0, :, :5], states[layer, "k"][1])
        assert torch.equal(cache.values[layer][0, :, :5], states[layer, "v"][1])
    storage = cache.keys[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in (*cache.keys, *cache.values))
    assert cache.nbytes == 2 * 2 * 4 * 2 * 8 * 3 * 4


def test_a_static_decode_pads_into_the_spare_slot_and_advances_only_the_real_rows() -> None:
    """Rows 0..1 of 4 slots, padded to 3 rows, attending to 8 columns: the padding row writes the spare slot (4),
    the mask gives each row its own tokens and the new one (padding: column 0), and the commit counts 2 rows."""
    shape = CacheShape(layers=1, kv_heads=1, head_dim=2)
    cache = SlotKVCache(shape, slots=4, capacity=8, dtype=torch.float32, device="cpu", spare_slot=True)
    cache.lengths[:2] = [3, 1]
    index = torch.zeros(2, 3, dtype=torch.long)
    cache.for_static_decode(2, 3, 8, index)
    assert index.tolist() == [[0, 1, 4], [3, 1, 0]]  # each row's slot, and the column its token goes to
    buffer = mask_buffer((3, 1, 1, 8), torch.bfloat16, "cpu")
    mask = static_decode_mask(torch.arange(8), index[1].view(3, 1, 1, 1), buffer)
    assert mask.data_ptr() == buffer.data_ptr() and mask.dtype == torch.bfloat16  # in place, additive
    assert mask[:, 0, 0].tolist() == [[0.0 if c <= column else -math.inf for c in range(8)] for column in (3, 1, 0)]
    states = torch.arange(6, dtype=torch.float32).view(3, 1, 1, 2) + 1
    keys, _ = cache.update(states, -states, 0)
    assert keys.shape == (3, 1, 8, 2)  # slots 0..2, all 8 columns (masked where not a row's own)
    assert torch.equal(cache.keys[0][0, 0, 3], states[0, 0, 0]) and torch.equal(cache.keys[0][4, 0, 0], states[2, 0, 0])
    assert not cache.keys[0][2].any()  # slot 2, read by the padding row, never written
    cache.commit()
    assert cache.lengths == [4, 2, 0, 0, 0]
    with pytest.raises(QwenVLError, match="spare slot"):
        SlotKVCache(shape, 4, 8, torch.float32, "cpu").for_static_decode(2, 3, 8, index)
    with pytest.raises(QwenVLError, match="does not fit a step attending to 4"):
        cache.for_static_decode(2, 2, 4, index[:, :2])


def test_masks_are_additive_in_the_caches_dtype_with_aligned_rows() -> None:
    """What SDPA would turn a boolean mask into at every layer (0: attend, -inf: not, in the query's dtype), made
    once a forward; each row's storage padded to a multiple of ``MASK_ALIGN`` columns, so that no stride of it needs
    SDPA's memory-efficient kernel to copy it (at every layer) on CUDA."""
    shape = CacheShape(layers=1, kv_heads=1, head_dim=2)
    cache = SlotKVCache(shape, slots=3, capacity=40, dtype=torch.bfloat16, device="cpu")
    cache.for_prefill(0, [2, 3])
    prefill = cache.prefill_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    cache.commit()
    cache.for_decode(0, 2)
    decode = cache.decode_mask()  # rows of 2 and 3 tokens, their new ones at columns 2 and 3: row 0 must not see 3
    for mask in (prefill, decode):
        assert mask.dtype == torch.bfloat16 and set(mask.unique().tolist()) == {0.0, -math.inf}
        assert all(mask.stride(d) % MASK_ALIGN == 0 for d in range(mask.dim() - 1)) and mask.stride(-1) == 1
    assert decode[:, 0, 0].tolist() == [[0.0, 0.0, 0.0, -math.inf], [0.0, 0.0, 0.0, 0.0]]
    assert prefill[0, 0].tolist()[0] == [0.0, -math.inf, -math.inf]  # a padding query sees itself only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_gives_the_same_bits_with_the_additive_mask_as_with_the_boolean_one(device, dtype) -> None:
    """A decode step's and a prefill's shapes (attending to a number of keys not a multiple of 16)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    for queries, keys in ((1, 37), (9, 9)):
        q, k, v = (torch.randn(4, 8, n, 64, generator=gen).to(device, dtype) for n in (queries, keys, keys))
        allowed = torch.rand(4, 1, queries, keys, generator=gen).to(device) > 0.3
        allowed[..., 0] = True  # every query attends to something
        boolean = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        additive = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(allowed, dtype))
        assert torch.equal(boolean, additive), (queries, keys)
