"""The engine passes no attention mask where plain causal attention is exact (a prefill without left padding, a
prompt's first chunk, a decode step whose rows hold as many tokens), so SDPA's fused causal kernel runs; its outputs
equal the explicit-mask path's (``SlotKVCache.force_masks``) for v1 and a transformers family, and the mask stays
where it is needed (padded rows, a later chunk, rows of different lengths)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.generation import SamplingParams
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.kv_cache import CacheShape, SlotKVCache


def _request(i: int, tokens: int, adapter: Path | None = None, image: bool = False) -> EngineRequest:
    parts: list = [TextPart("tell me about item " + "and its colour " * (3 * i) + str(i))]
    if image:
        parts.insert(0, ImagePart(Image.new("RGB", (56, 56), (40 * i % 255, 90, 160))))
    return EngineRequest([Message(role="user", parts=parts)], SamplingParams(max_new_tokens=tokens),
                         adapter_id=adapter.name if adapter else None,
                         adapter_locator=str(adapter) if adapter else None)


class MaskLog:
    """The ``attention_mask`` of every forward of an engine's model, with the forward's query length."""

    def __init__(self, engine: ServingEngine) -> None:
        self.calls: list[tuple[int, torch.Tensor | None]] = []
        self._handle = engine.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        self.calls.append((kwargs["input_ids"].shape[1], kwargs.get("attention_mask")))

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[ServingEngine]]:
    built: list[ServingEngine] = []
    yield built
    for engine in built:
        engine.close()


def _run(engine: ServingEngine, requests: list[EngineRequest]) -> list[list[int]]:
    async def together() -> list:
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    return [r.token_ids for r in asyncio.run(together())]


def test_a_single_row_prefill_and_its_decode_pass_no_mask(tiny_model_dir: Path, engines) -> None:
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_total_tokens=256))
    engines.append(engine)
    log = MaskLog(engine)
    (tokens,) = _run(engine, [_request(1, 4)])
    assert len(tokens) >= 2
    prefill, *decodes = log.calls
    assert prefill[0] > 1 and prefill[1] is None  # the fused causal kernel, not a [1, 1, T, T] boolean mask
    assert decodes and all(q == 1 and mask is None for q, mask in decodes)

    engine.kv.force_masks = True  # the switch the equality tests compare against really passes masks
    log.calls.clear()
    _run(engine, [_request(1, 2)])
    assert all(mask is not None and mask.dim() == 4 for _, mask in log.calls)
    log.remove()


def test_the_mask_stays_where_rows_differ() -> None:
    """Left-padded rows, a later chunk and rows of different lengths keep their mask; equal rows drop it."""
    cache = SlotKVCache(CacheShape(layers=1, kv_heads=1, head_dim=4), slots=3, capacity=16, dtype=torch.float32,
                        device="cpu")
    cache.for_prefill(0, [3, 5])
    padded = cache.prefill_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert padded is not None and padded.shape == (2, 1, 5, 5) and padded[0, 0, 4, 0] == float("-inf")  # padding
    cache.commit()
    cache.for_decode(0, 2)
    assert cache.decode_mask() is not None  # row 0 holds 3 tokens, row 1 five: row 0 must not see columns 3, 4
    cache.abandon()
    cache.for_prefill(2, [4])
    assert cache.prefill_mask(torch.ones(1, 4, dtype=torch.long)) is None
    cache.commit()
    cache.for_chunk(2, 4, 3)
    assert cache.chunk_mask() is not None and cache.get_mask_sizes(3) == (7, 0) and cache.get_query_offset() == 4
    cache.abandon()
    cache.for_chunk(2, 0, 3)
    assert cache.chunk_mask() is None
    cache.abandon()
    cache.lengths[:2] = [5, 5]
    cache.for_decode(0, 2)
    assert cache.decode_mask() is None and cache.get_mask_sizes(1) == (6, 0)
    cache.force_masks = True
    assert cache.decode_mask() is not None


def _outputs(model_dir: Path, requests: list[EngineRequest], force: bool) -> tuple[list[list[int]], int]:
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=4, max_total_tokens=512,
                                                                  prefill_chunk_tokens=24))
    engine.kv.force_masks = force
    log = MaskLog(engine)
    try:
        alone = [_run(engine, [r])[0] for r in requests]  # single rows, and the long one in chunks
        batched = _run(engine, requests)  # padded prefills and mixed-length decodes
    finally:
        engine.close()
    return alone + batched, sum(1 for q, mask in log.calls if q > 1 and mask is None)


@pytest.mark.parametrize("family_name", ["qwen-vl", "qwen2.5-vl"])
def test_maskless_outputs_equal_the_masked_path(family_name: str, tiny_model_dir: Path, tiny_dirs,
                                                tmp_path: Path) -> None:
    from tests.serving.conftest import make_adapter
    from tests.serving.conftest import make_family_adapter as _adapter

    if family_name == "qwen-vl":
        model_dir, image = tiny_model_dir, False
        adapter = make_adapter(model_dir, tmp_path / "adapter", seed=3)
    else:
        model_dir, image = tiny_dirs[family_name], True
        adapter = _adapter(family_name, model_dir, tmp_path / "adapter", seed=3)
    requests = [_request(0, 6, adapter, image), _request(1, 5), _request(6, 4, adapter)]  # the last is chunked
    maskless, causal_forwards = _outputs(model_dir, requests, force=False)
    masked, forced_causal = _outputs(model_dir, requests, force=True)
    assert maskless == masked
    assert causal_forwards >= len(requests) and forced_causal == 0  # the two runs really took different paths
    assert len({tuple(t) for t in masked}) >= 3  # the outputs differ, so the comparison has teeth
