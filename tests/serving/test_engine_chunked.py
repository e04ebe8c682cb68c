"""Chunked prefill: a long prompt (with images) is prefilled a chunk per engine step, never splitting an image
span; its output equals the whole-prompt prefill (v1 and a transformers family, with an adapter), and a running
stream keeps getting tokens meanwhile."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.generation import SamplingParams
from qwenvl_core.serving.engine import (
    BATCH_CPU,
    BATCH_GPU,
    PREFILL_TOKENS_CPU,
    PREFILL_TOKENS_GPU,
    EngineConfig,
    EngineRequest,
    ServingEngine,
    resolve_config,
)
from qwenvl_core.serving.preparation import chunk_plan


def test_chunks_never_split_an_image_span_and_count_their_images():
    start, pad, end = 90, 91, 92
    ids = [1, 2, 3, start, pad, pad, pad, pad, end, 4, 5, start, pad, end, 6]
    chunks = chunk_plan(ids, 4, (start, end, pad))
    assert [(a, b) for a, b, _, _ in chunks] == [(0, 9), (9, 14), (14, 15)]  # grown to the end of each span
    assert [(first, n) for _, _, first, n in chunks] == [(0, 1), (1, 1), (2, 0)]
    assert chunk_plan(ids, 0, (start, end, pad)) == [(0, 15, 0, 2)] == chunk_plan(ids, 64, (start, end, pad))


def _long(i: int, adapter, image: bool = True) -> EngineRequest:
    parts: list = [TextPart("now look at this carefully " * 6 + f"and say {i}")]
    if image:
        parts.insert(1, ImagePart(Image.new("RGB", (56, 56), (20 * i, 100, 30))))
        parts.append(TextPart(" and this one too"))
        parts.append(ImagePart(Image.new("RGB", (28, 56), (200, 20 * i, 30))))
    return EngineRequest([Message(role="user", parts=parts)], SamplingParams(max_new_tokens=6),
                         adapter_id=adapter.name if adapter else None, adapter_locator=str(adapter) if adapter else None)


async def _all(engine: ServingEngine, requests: list[EngineRequest]) -> list:
    return await asyncio.gather(*(engine.generate(r) for r in requests))


@pytest.mark.parametrize("which", ["qwen-vl", "qwen2.5-vl"])
def test_chunked_prefill_equals_whole_prefill(which, tiny_model_dir, tiny_dirs, adapter_dirs, tmp_path):
    from tests.serving.conftest import make_family_adapter as _adapter

    model_dir = tiny_model_dir if which == "qwen-vl" else tiny_dirs[which]
    adapter = adapter_dirs[1] if which == "qwen-vl" else _adapter(which, model_dir, tmp_path / "a", seed=5)
    requests = [_long(1, adapter), _long(2, None), _long(3, adapter, image=False)]
    results = {}
    for chunk in (0, 16):
        engine = ServingEngine.from_model_dir(model_dir, EngineConfig(prefill_chunk_tokens=chunk,
                                                                      max_total_tokens=1024))
        try:
            results[chunk] = [r.token_ids for r in asyncio.run(_all(engine, requests))]
            if chunk:
                seq = engine._prepare(requests[0], time.perf_counter())
                assert len(seq.chunks) >= 3  # the prompt really was chunked
        finally:
            engine.close()
    assert results[16] == results[0]


def test_running_streams_get_tokens_while_a_long_prompt_is_prefilled(engine_factory):
    """The forwards' order: between the long prompt's first and last chunk, the running row decodes every step."""
    engine: ServingEngine = engine_factory(prefill_chunk_tokens=8, max_total_tokens=1024)
    stops = tuple(engine.family.stop_token_ids(engine.processor))
    running = EngineRequest([Message(role="user", parts=[TextPart("count")])],
                            SamplingParams(max_new_tokens=300, suppress_token_ids=stops))
    long_prompt = _long(4, None)
    chunks = len(engine._prepare(long_prompt, time.perf_counter()).chunks)
    kinds: list[str] = []  # "chunk" (one row, several tokens) or "decode" (one token per row)
    handle = engine.model.register_forward_pre_hook(
        lambda _m, _a, kw: kinds.append("decode" if kw["input_ids"].shape[1] == 1 else "chunk"), with_kwargs=True)

    async def run() -> None:
        task = asyncio.ensure_future(engine.generate(running))
        while kinds.count("decode") < 3:
            await asyncio.sleep(0.001)
        await engine.generate(long_prompt)
        task.cancel()

    try:
        asyncio.run(run())
    finally:
        handle.remove()
    after = kinds[kinds.index("decode") :]  # from the running row's first decode step (its own prompt is chunked too)
    first, last = after.index("chunk"), len(after) - 1 - after[::-1].index("chunk")
    between = after[first : last + 1]
    assert chunks >= 5 and between.count("chunk") == chunks
    assert between.count("decode") >= chunks - 1  # a decode step of the running row after every chunk


def test_the_prefill_budget_and_batch_default_by_device_and_set_ones_are_kept(engine_factory):
    """None: 2048 prompt tokens a forward and 64 rows on a GPU, 512 and 16 on the CPU; what a deployment sets is
    kept (a 0 budget too), each setting apart. The engine runs on its resolved values: a prompt longer than 512
    tokens is chunked on the CPU by default."""
    cpu, gpu = resolve_config(EngineConfig(), torch.device("cpu")), resolve_config(EngineConfig(), torch.device("cuda"))
    assert (cpu.prefill_chunk_tokens, cpu.max_batch_size) == (PREFILL_TOKENS_CPU, BATCH_CPU) == (512, 16)
    assert (gpu.prefill_chunk_tokens, gpu.max_batch_size) == (PREFILL_TOKENS_GPU, BATCH_GPU) == (2048, 64)
    for chosen in (0, 96, 4096):
        config = EngineConfig(prefill_chunk_tokens=chosen, max_batch_size=chosen + 1)
        assert resolve_config(config, torch.device("cuda")) is config
    half = resolve_config(EngineConfig(max_batch_size=8), torch.device("cuda", 0))
    assert (half.prefill_chunk_tokens, half.max_batch_size) == (PREFILL_TOKENS_GPU, 8)
    engine: ServingEngine = engine_factory(max_total_tokens=1024)
    assert (engine.config.prefill_chunk_tokens, engine.config.max_batch_size) == (PREFILL_TOKENS_CPU, BATCH_CPU)
    assert engine.kv.slots == BATCH_CPU  # the CPU's cache: max_batch_size slots
    words = EngineRequest([Message(role="user", parts=[TextPart("look " * 200)])], SamplingParams(max_new_tokens=2))
    seq = engine._prepare(words, time.perf_counter())
    assert len(seq.prompt_ids) > PREFILL_TOKENS_CPU
    assert len(seq.chunks) == -(-len(seq.prompt_ids) // PREFILL_TOKENS_CPU)  # no image span to grow a chunk
    assert max(end - start for start, end, _, _ in seq.chunks) <= PREFILL_TOKENS_CPU
