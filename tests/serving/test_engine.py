"""The batching engine on the tiny model: mixed-adapter batches equal each adapter alone (against peft),
continuous batching, cache rotation and byte budget, eviction frees memory, deletion, in-flight requests,
stop strings, seeds and streaming deltas."""

from __future__ import annotations

import asyncio
import gc
import itertools
import pickle
import shutil
import time
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.generation import SamplingParams, generate
from qwenvl_core.models.registry import get_family
from qwenvl_core.serving.engine import EngineRequest, ServingEngine, ground_boxes, join_events, safe_text_end
from qwenvl_core.serving.lora_batch import AdapterError
from qwenvl_core.serving.preparation import RequestError
from tests.serving.conftest import eventually

TOKENS = 10


def _messages(i: int, image: bool = False) -> list[Message]:
    parts: list = [TextPart(f"say something about item {i}")]
    if image:
        parts.insert(0, ImagePart(Image.new("RGB", (40, 30), (10 * i, 200, 30))))
    return [Message(role="user", parts=parts)]


def _request(i: int, adapter: Path | None, tokens: int = TOKENS, image: bool = False) -> EngineRequest:
    return EngineRequest(_messages(i, image), SamplingParams(max_new_tokens=tokens),
                         adapter_id=adapter.name if adapter else None,
                         adapter_locator=str(adapter) if adapter else None)


def _peft_alone(model_dir: Path, adapter: Path | None, request: EngineRequest) -> list[int]:
    """Reference: peft's own LoRA on a fresh base model, this request alone, greedy."""
    from peft import PeftModel

    family = get_family("qwen-vl")
    processor = family.load_processor(model_dir)
    model = family.load_model(model_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    enc = processor.encode_chat(request.messages)
    params = SamplingParams(max_new_tokens=request.params.max_new_tokens,
                            stop_token_ids=tuple(family.stop_token_ids(processor)))
    return generate(model, [enc.input_ids], pad_token_id=processor.pad_token_id, params=params,
                    vision=enc.vision)[0].token_ids


@pytest.mark.parametrize(("lora_decode", "max_lora_rank", "fuse_siblings"),
                         [("grouped", 64, "off"), ("dense", 64, "off"), ("dense", 8, "off"), ("dense", 8, "on")],
                         ids=["grouped", "dense", "dense-full-rank", "dense-full-rank-fused"])
def test_mixed_adapter_batch_equals_each_adapter_alone(engine_factory, tiny_model_dir, adapter_dirs, lora_decode,
                                                       max_lora_rank, fuse_siblings):
    """Either way of applying several adapters in a decode step (``EngineConfig.lora_decode``: grouped is the
    CPU's, dense a GPU's) gives each row its own adapter's tokens; dense with v1's ``w1`` / ``w2`` sharing one
    product, below the slots' full rank and at it (the largest adapter rank is ``max_lora_rank``); and with the
    base's ``w1`` / ``w2`` as one matmul (``fuse_siblings``, a GPU's default), the LoRA products added into their
    columns."""
    engine: ServingEngine = engine_factory(lora_decode=lora_decode, max_lora_rank=max_lora_rank,
                                           fuse_siblings=fuse_siblings)
    choice = [adapter_dirs[0], adapter_dirs[1], None, adapter_dirs[9], adapter_dirs[0], adapter_dirs[2]]
    requests = [_request(i, a, image=i % 2 == 0) for i, a in enumerate(choice)]

    async def run() -> list:
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    results = asyncio.run(run())
    assert engine.stats.max_adapters_in_forward >= 3  # they really shared forwards
    shared = any(siblings for _, dense, siblings in engine.adapter_slots._views.values() if dense)
    assert shared == (lora_decode == "dense")
    expected = [_peft_alone(tiny_model_dir, a, r) for a, r in zip(choice, requests, strict=True)]
    assert [r.token_ids for r in results] == expected
    assert len({tuple(e) for e in expected}) >= 5  # adapters change the output, so the check has teeth
    for result in results:
        assert result.completion_tokens == len(result.token_ids) + (result.finish_reason == "stop")
        assert result.prompt_tokens > 0


def test_per_module_ranks_alphas_and_rslora_are_scaled_as_peft_scales_them(engine_factory, tiny_model_dir, tmp_path):
    """An adapter saved with peft's ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` (``alpha / sqrt(r)``),
    e.g. one trained elsewhere: each module's scaling comes from its own rank and alpha, so the engine's greedy
    tokens equal peft's, next to a plain adapter's rows."""
    from peft import LoraConfig, get_peft_model

    family = get_family("qwen-vl")
    torch.manual_seed(11)
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"c_attn": 4, "w2": 2},
                        alpha_pattern={"w2": 64, "attn.c_proj": 3}, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=list(family.default_lora_targets), task_type="CAUSAL_LM")
    peft_model = get_peft_model(family.load_model(tiny_model_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(8.0)
    adapter = tmp_path / "patterned"
    peft_model.save_pretrained(adapter)
    engine: ServingEngine = engine_factory()
    requests = [_request(i, adapter, image=i == 1) for i in range(3)]

    async def run() -> list:
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    results = asyncio.run(run())
    expected = [_peft_alone(tiny_model_dir, adapter, r) for r in requests]
    assert [r.token_ids for r in results] == expected
    assert expected != [_peft_alone(tiny_model_dir, None, r) for r in requests]


def test_requests_joining_a_running_batch_get_the_same_tokens(engine_factory, adapter_dirs):
    engine: ServingEngine = engine_factory()
    long_req = _request(0, adapter_dirs[3], tokens=30)
    late = [_request(i, adapter_dirs[i], tokens=6, image=True) for i in (4, 5)]

    async def alone() -> list:
        return [await engine.generate(r) for r in [long_req, *late]]

    async def staggered() -> list:
        first = asyncio.ensure_future(engine.generate(long_req))
        while engine.stats.forwards < 3:
            await asyncio.sleep(0.001)
        rest = await asyncio.gather(*(engine.generate(r) for r in late))
        return [await first, *rest]

    reference = asyncio.run(alone())
    forwards_before = engine.stats.forwards
    joined = asyncio.run(staggered())
    assert [r.token_ids for r in joined] == [r.token_ids for r in reference]
    assert engine.stats.forwards - forwards_before < 30 + 2 * 6  # late requests decoded inside the batch


def test_more_adapters_than_slots_rotate_and_count_evictions(engine_factory, adapter_dirs):
    engine: ServingEngine = engine_factory(max_adapters=3)

    async def sweep() -> list[list[int]]:
        return [(await engine.generate(_request(1, a, tokens=4))).token_ids for a in adapter_dirs]

    first = asyncio.run(sweep())
    second = asyncio.run(sweep())
    assert first == second
    assert engine.cache.stats.loads == 20 and engine.cache.stats.evictions == 17
    assert engine.cache.ids() == [a.name for a in adapter_dirs[-3:]]
    text = engine.metrics.exposition().decode()
    assert 'qwenvl_serving_adapter_evictions_total{adapter="a0"} 2.0' in text
    assert 'qwenvl_serving_adapter_cache_misses_total{adapter="a9"} 2.0' in text
    assert len(engine.cache._key_locks) == 0  # one per load in progress, not one per adapter ever seen


def _adapters_in(exposition: bytes) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["adapter"] for family in text_string_to_metric_families(exposition.decode())
            for sample in family.samples if "adapter" in sample.labels}


def test_metrics_keep_the_series_of_the_most_recently_active_adapters_and_drop_a_deleted_ones(engine_factory,
                                                                                            adapter_dirs):
    """A replica serves thousands of adapters over its life: the series of the 4 most recently active are kept (the
    bound is ``ServingMetrics.max_adapter_series``), the base model's always, and a deleted adapter's go at once."""
    engine: ServingEngine = engine_factory(max_adapters=2)
    engine.metrics.max_adapter_series = 4
    asyncio.run(engine.generate(_request(0, None, tokens=2)))
    for adapter in adapter_dirs[:7]:
        asyncio.run(engine.generate(_request(1, adapter, tokens=2)))
    assert _adapters_in(engine.metrics.exposition()) == {"__base__", "a4", "a5", "a6"}  # 4 with the base
    asyncio.run(engine.generate(_request(1, adapter_dirs[4], tokens=2)))  # a4 active again: a5 is now the oldest
    asyncio.run(engine.generate(_request(1, adapter_dirs[7], tokens=2)))
    assert _adapters_in(engine.metrics.exposition()) == {"__base__", "a4", "a6", "a7"}
    text = engine.metrics.exposition().decode()
    assert 'qwenvl_serving_requests_total{adapter="a4",outcome="ok"} 2.0' in text  # kept while active
    engine.evict_adapter("a6")  # deleted through the API
    assert _adapters_in(engine.metrics.exposition()) == {"__base__", "a4", "a7"}


def test_an_adapter_file_that_is_not_safetensors_is_an_adapter_error(engine_factory, adapter_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs[0], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    engine: ServingEngine = engine_factory()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not a readable safetensors file"):
        engine.cache.get("broken", str(broken))


def test_loading_adapters_again_and_again_keeps_no_memory(engine_factory, adapter_dirs):
    """safetensors' ``load_file`` kept ~1 KiB per load of the tiny adapter (16 tensors): a replica reloading
    adapters under LRU churn for weeks grew without bound. Python allocations after 300 loads, against 300 KiB."""
    import tracemalloc

    from qwenvl_core.serving.lora_batch import load_lora_weights

    engine: ServingEngine = engine_factory()
    load = lambda: load_lora_weights(adapter_dirs[0], "a0", engine.model, engine.family, device="cpu")  # noqa: E731
    for _ in range(20):
        load()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(300):
            load()
        gc.collect()
        grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename") if d.size_diff > 0)
    finally:
        tracemalloc.stop()
    assert grown < 32 * 1024, f"{grown} bytes kept by 300 loads"


def test_byte_budget_bounds_the_cache(engine_factory, adapter_dirs):
    probe: ServingEngine = engine_factory()
    asyncio.run(probe.generate(_request(0, adapter_dirs[0], tokens=1)))
    one = probe.cache.nbytes
    assert one == probe.cache.get("a0", str(adapter_dirs[0])).nbytes  # header size == loaded size
    engine: ServingEngine = engine_factory(max_adapters=8, max_adapter_bytes=int(2.5 * one))

    async def sweep() -> None:
        for a in adapter_dirs[:5]:
            await engine.generate(_request(0, a, tokens=1))

    asyncio.run(sweep())
    assert engine.cache.ids() == ["a3", "a4"] and engine.cache.nbytes <= 2.5 * one


def test_eviction_frees_the_adapter_and_concurrent_misses_load_once(engine_factory, adapter_dirs):
    engine: ServingEngine = engine_factory()

    async def burst() -> list:
        return await asyncio.gather(*(engine.generate(_request(i, adapter_dirs[6], tokens=2)) for i in range(6)))

    asyncio.run(burst())
    assert engine.cache.stats.loads == 1 and engine.cache.stats.hits == 5
    weights = engine.cache.get("a6", str(adapter_dirs[6]))
    ref = weakref.ref(next(iter(weights.modules.values()))[0])
    del weights
    assert engine.evict_adapter("a6")
    # the model thread may still be finishing the burst's last step, whose frame holds the rows' weights
    assert eventually(lambda: gc.collect() >= 0 and ref() is None)


def test_deleted_adapter_in_flight_finishes_on_its_weights(engine_factory, adapter_dirs, tmp_path):
    engine: ServingEngine = engine_factory()
    adapter = Path(shutil.copytree(adapter_dirs[7], tmp_path / "doomed"))
    request = _request(3, adapter, tokens=24)
    reference = asyncio.run(engine.generate(request)).token_ids
    engine.evict_adapter("doomed")

    async def delete_midway() -> list[int]:
        ids: list[int] = []
        async for event in engine.stream(request):
            ids.extend(event.token_ids)
            if len(ids) >= 2 and adapter.exists():
                engine.evict_adapter("doomed")
                shutil.rmtree(adapter)
        return ids

    assert asyncio.run(delete_midway()) == reference
    assert not adapter.exists() and "doomed" not in engine.cache
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        asyncio.run(engine.generate(request))


def test_stop_strings_seeds_and_stream_deltas(engine_factory, adapter_dirs):
    engine: ServingEngine = engine_factory()
    free = asyncio.run(engine.generate(_request(2, adapter_dirs[0], tokens=16)))
    stop = free.text[5:8]
    assert len(stop) == 3
    request = _request(2, adapter_dirs[0], tokens=16)
    request.params = SamplingParams(max_new_tokens=16, stop_strings=(stop,))

    async def collect(req: EngineRequest) -> list:
        return [e async for e in engine.stream(req)]

    events = asyncio.run(collect(request))
    streamed = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop" and stop not in streamed
    assert streamed == free.text[: free.text.index(stop)]
    sampled = [EngineRequest(_messages(1), SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.5,
                                                          top_k=50, top_p=0.95, seed=s)) for s in (7, 7, 8)]
    outs = [asyncio.run(engine.generate(r)).token_ids for r in sampled]
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_a_batch_of_64_on_a_gpus_paths_gives_each_request_what_a_batch_of_4_gives(engine_factory, adapter_dirs):
    """The GPU's default batch (64 rows: ``BATCH_GPU``) on the paths a GPU takes (every slot's LoRA at once, the
    base's sibling layers fused, fixed-shape steps as CUDA graphs replay them), with 10 adapters of two ranks and
    the base mixed and requests of different lengths, greedy: each request's tokens equal those of 4-row batches
    on the CPU's paths. (All requests queued before the first step, the steps run here: the batch fills, less
    the few that stop early.)"""
    from qwenvl_core.serving.engine import BATCH_GPU

    def run(engine: ServingEngine) -> list[list[int]]:
        chosen = [*adapter_dirs, None]
        seqs = [engine._prepare(_request(i, chosen[i % len(chosen)], tokens=8 + i % 7), time.perf_counter())
                for i in range(BATCH_GPU)]
        engine._waiting.extend(seqs)
        while engine._batch is not None or engine._waiting or engine._chunking is not None:
            engine._step(engine._take_new())
        assert all(seq.state.done for seq in seqs)
        return [seq.state.tokens for seq in seqs]

    small = engine_factory(max_batch_size=4, max_adapters=12, adapter_slots=12, max_total_tokens=128)
    large = engine_factory(max_batch_size=BATCH_GPU, max_adapters=12, adapter_slots=12, max_total_tokens=128,
                           lora_decode="dense", fuse_siblings="on", decode_graphs="static")
    expected, got = run(small), run(large)
    assert large.stats.max_rows > BATCH_GPU // 2 and large.stats.max_adapters_in_forward == len(adapter_dirs)
    assert large._graphs.steps > 0 and got == expected


def test_a_lagging_consumer_gets_the_ready_events_as_one_with_nothing_lost(engine_factory):
    """``coalesce=0``: a consumer that asks for the next event only after the engine finished gets everything after
    its first event as one event: the same text, ids and logprobs as the events one by one, the final fields set.
    Without it, the same consumer gets one event a step."""
    engine: ServingEngine = engine_factory()
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(-1,), logprobs=2)  # no stop: 12 tokens, 12 steps

    async def lagging(coalesce: float | None) -> list:
        events = engine.stream(EngineRequest(_messages(4), params), coalesce=coalesce)
        first = await anext(events)
        while engine._batch is not None or engine._waiting:  # the model thread finishes the request meanwhile
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # its last events reach this loop
        return [first] + [e async for e in events]

    apart, joined = asyncio.run(lagging(None)), asyncio.run(lagging(0))
    # (apart: an event a step, but a token whose text ends in a partial character is held back for the next)
    assert len(joined) <= 2 < len(apart) and joined[-1].finish_reason == "length", (len(apart), len(joined))
    whole, whole_joined = join_events(apart), join_events(joined)  # greedy: the same tokens
    assert whole.completion_tokens == whole_joined.completion_tokens == len(whole.token_ids) == 12
    assert whole_joined.token_ids == whole.token_ids and whole_joined.text == whole.text
    assert whole.token_ids == [i for e in apart for i in e.token_ids] and whole.text == "".join(e.text for e in apart)
    assert [r.token for r in whole_joined.logprobs] == [r.token for e in apart for r in e.logprobs]
    assert len(whole.logprobs) == 12 and whole.prompt_tokens == whole_joined.prompt_tokens > 0


def test_a_spaced_stream_sends_an_event_at_most_every_interval_with_nothing_lost(engine_factory):
    """``coalesce=interval``: the first event at once, then at most one an interval, each joining the events made
    meanwhile (what a Serve replica sends: ``stream_interval_s``); the final one without waiting for the interval."""
    engine: ServingEngine = engine_factory()
    params = SamplingParams(max_new_tokens=24, stop_token_ids=(-1,))
    interval = 0.03

    async def timed(coalesce: float | None) -> list:
        loop = asyncio.get_running_loop()
        return [(loop.time(), event) async for event in engine.stream(EngineRequest(_messages(5), params),
                                                                         coalesce=coalesce)]

    apart, spaced = asyncio.run(timed(None)), asyncio.run(timed(interval))
    whole, whole_spaced = join_events([e for _, e in apart]), join_events([e for _, e in spaced])
    assert (whole_spaced.token_ids, whole_spaced.text) == (whole.token_ids, whole.text) and len(whole.token_ids) == 24
    assert spaced[-1][1].finish_reason == "length" and all(e.finish_reason is None for _, e in spaced[:-1])
    sent = [t for t, _ in spaced[:-1]]  # (the last goes when it is made)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(gap >= interval * 0.9 for gap in gaps), gaps


def test_an_error_behind_ready_events_comes_after_them():
    """What a coalescing stream takes from its queue: the ready events up to an error as one, then the error; up to
    the final event, never past it."""
    from qwenvl_core.serving.engine import EngineEvent, EngineTimeout, _ready_behind

    async def drain(items: list) -> tuple:
        queue: asyncio.Queue = asyncio.Queue()
        for item in items[1:]:
            queue.put_nowait(item)
        return (*_ready_behind(items[0], queue), queue.qsize())

    a, b, c = EngineEvent("a", [1]), EngineEvent("b", [2]), EngineEvent("c", [3], finish_reason="stop")
    error = EngineTimeout("too slow")
    event, raised, left = asyncio.run(drain([a, b, error, c]))
    assert (event.text, event.token_ids, event.finish_reason, raised, left) == ("ab", [1, 2], None, error, 1)
    event, raised, left = asyncio.run(drain([a, c, b]))
    assert (event.text, event.token_ids, event.finish_reason, raised, left) == ("ac", [1, 3], "stop", None, 1)
    assert asyncio.run(drain([c, a]))[0] is c


def test_a_request_that_cannot_be_sampled_fails_alone_and_its_batch_goes_on(engine_factory):
    """A row whose distribution is empty (every token suppressed) fails its request with a clear error; the
    request decoding next to it in the same step finishes, and the engine keeps serving."""
    from qwenvl_core.serving.engine import EngineFault

    engine: ServingEngine = engine_factory()
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    empty = EngineRequest(_messages(1), SamplingParams(max_new_tokens=4, do_sample=True, seed=1,
                                                       suppress_token_ids=tuple(range(vocab))))
    fine = EngineRequest(_messages(2), SamplingParams(max_new_tokens=TOKENS, do_sample=True, seed=2))

    async def both() -> list:
        return await asyncio.gather(engine.generate(fine), engine.generate(empty), return_exceptions=True)

    done, failed = asyncio.run(both())
    assert isinstance(failed, EngineFault) and "no token can be sampled" in str(failed)
    assert len(done.token_ids) > 0 and engine.alive
    assert asyncio.run(engine.generate(_request(3, None))).token_ids


def test_bad_input_fails_the_request_not_the_engine(engine_factory, adapter_dirs):
    engine: ServingEngine = engine_factory(max_total_tokens=64)
    with pytest.raises(ValueError, match="exceeds the limit"):
        asyncio.run(engine.generate(_request(0, None, tokens=60)))
    bad_image = EngineRequest([Message("user", [ImagePart(b"not an image"), TextPart("x")])],
                              SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="image"):
        asyncio.run(engine.generate(bad_image))
    assert asyncio.run(engine.generate(EngineRequest([text_message("user", "hi")], SamplingParams(max_new_tokens=2))))
    assert engine.alive


def test_safe_text_end_and_grounding_in_pixels(tiny_model_dir):
    assert safe_text_end("hello wor", ["world"]) == 6
    assert safe_text_end("abc\ufffd", []) == 3
    assert safe_text_end("abc", ["xyz"]) == 3
    processor = get_family("qwen-vl").load_processor(tiny_model_dir)
    text = "<ref>the cat</ref><box>(100,200),(500,600)</box>"
    boxes = ground_boxes(processor, text, [(1000, 500), (200, 100)])
    assert [(b.image_index, b.objects[0].ref) for b in boxes] == [(0, "the cat"), (1, "the cat")]
    torch.testing.assert_close(torch.tensor(boxes[0].objects[0].box), torch.tensor([100.0, 100.0, 500.0, 300.0]),
                               atol=1.0, rtol=0)
    assert ground_boxes(processor, "no boxes", [(10, 10)]) == []


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_the_newer_families_answers_are_grounded_in_their_own_convention(tiny_dirs, name):
    """The boxes a chat completion returns come from the family's own answer format (Qwen2-VL's box tokens,
    Qwen2.5/3-VL's JSON), not only v1's ``<box>`` markup: before, these answers returned no boxes at all."""
    from qwenvl_core.grounding import PixelObject

    processor = get_family(name).load_processor(tiny_dirs[name])
    size = (640, 480)
    answer = processor.codec.format([PixelObject("the cat", (64.0, 48.0, 320.0, 240.0))], size)
    assert "<box>" not in answer
    (boxes,) = ground_boxes(processor, answer, [size])
    assert boxes.image_index == 0 and [o.ref for o in boxes.objects] == ["the cat"]
    torch.testing.assert_close(torch.tensor(boxes.objects[0].box), torch.tensor([64.0, 48.0, 320.0, 240.0]),
                               atol=size[0] / 100, rtol=0)  # (the conventions' grids round)
    assert ground_boxes(processor, "no boxes here", [size]) == []


def test_limits_are_checked_before_any_image_is_decoded(engine_factory):
    engine: ServingEngine = engine_factory(max_total_tokens=96, max_images_per_request=2, max_image_bytes=1000,
                                           max_image_bytes_total=1500)

    def refusal(parts: list, tokens: int = 2) -> RequestError:
        with pytest.raises(RequestError) as caught:
            asyncio.run(engine.generate(EngineRequest([Message("user", [*parts, TextPart("x")])],
                                                      SamplingParams(max_new_tokens=tokens))))
        return caught.value

    not_an_image = ImagePart(b"x" * 600)
    # image spans have a fixed length: the token budget is known (and refused) before the image is decoded
    too_long = refusal([not_an_image], tokens=90)
    assert (too_long.code, too_long.param) == ("context_length_exceeded", "max_tokens")
    many = refusal([ImagePart(b"x" * 10)] * 3)
    assert (many.code, many.param) == ("too_many_images", "messages[0].content[2]")
    big = refusal([ImagePart(b"x" * 1001)])
    assert (big.code, big.param) == ("image_too_large", "messages[0].content[0]")
    together = refusal([not_an_image, ImagePart("data:image/png;base64," + "A" * 1240)])  # 930 decoded bytes
    assert (together.code, together.param) == ("images_too_large", "messages[0].content[1]")
    bad = refusal([not_an_image])
    assert (bad.code, bad.param) == ("invalid_image", "messages[0].content[0]")
    copy = pickle.loads(pickle.dumps(bad))  # Ray Serve replicas send it to the ingress pickled
    assert (type(copy), str(copy), copy.code, copy.param) == (RequestError, str(bad), bad.code, bad.param)
    assert engine.alive


def test_the_engine_runs_on_its_configured_device_and_refuses_a_missing_one(tiny_model_dir):
    """``EngineConfig.device`` places the model, and the sampling generators follow the model's device (a CPU
    generator cannot sample CUDA logits); a device that is not there is a clear error, not a silent CPU run."""
    from qwenvl_core.errors import QwenVLError
    from qwenvl_core.serving.engine import EngineConfig

    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu"))
    try:
        assert {p.device.type for p in engine.model.parameters()} == {"cpu"}
        seq = engine._prepare(EngineRequest(_messages(0), SamplingParams(max_new_tokens=2, do_sample=True,
                                                                          temperature=0.7, seed=1)), 0.0)
        assert seq.state.generator is not None and seq.state.generator.device == engine.device
        assert not engine.adapter_slots.dense_decode  # lora_decode "auto": grouped on a CPU, dense on a GPU
    finally:
        engine.close()
    with pytest.raises(QwenVLError, match="lora_decode 'fast': expected 'auto', 'dense' or 'grouped'"):
        ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu", lora_decode="fast"))
    with pytest.raises(QwenVLError, match="not a device name"):
        ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(device="gpu-zero"))
    if not torch.cuda.is_available():
        with pytest.raises(QwenVLError, match="no CUDA device is visible"):
            ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cuda"))


def test_an_engine_without_a_configured_device_takes_the_visible_gpu_like_the_trainer(tiny_model_dir):
    """``EngineConfig()`` (no device) loads on ``devices.default_device``: this process's GPU when one is visible,
    else the CPU; the trainer's default is the same, so a GPU box serves on its GPU without a setting."""
    from qwenvl_core.devices import default_device
    from qwenvl_core.serving.engine import EngineConfig

    assert EngineConfig().device is None
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig())
    try:
        assert engine.device == default_device()
        assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        engine.close()


def test_a_default_output_limit_is_cut_to_the_context_left_and_an_asked_one_is_refused(tiny_model_dir):
    """``EngineRequest.default_max_tokens``: the client set no output limit, so the server's default is cut to what
    ``max_total_tokens`` leaves after the prompt (OpenAI: the output runs to the end of the context); a limit the
    client asked for that does not fit is refused naming ``max_tokens``; a prompt that fills the context is refused
    naming ``messages`` either way."""
    from qwenvl_core.serving.engine import EngineConfig

    limit = 96
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_total_tokens=limit))
    try:
        messages = [text_message("user", "tell me about these words " * 3)]
        prompt = len(engine.processor.encode_conversation(messages, add_generation_prompt=True).input_ids)
        assert 16 < prompt < limit - 16
        params = SamplingParams(max_new_tokens=256, suppress_token_ids=tuple(engine.family.stop_token_ids(
            engine.processor)))  # never stops: it runs to its limit
        out = asyncio.run(engine.generate(EngineRequest(messages, params, default_max_tokens=True)))
        assert (out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("length", prompt, limit - prompt)
        short = asyncio.run(engine.generate(EngineRequest(messages, SamplingParams(max_new_tokens=5),
                                                          default_max_tokens=True)))
        assert short.completion_tokens <= 5  # a default that fits is kept
        with pytest.raises(RequestError, match="exceeds the limit") as asked:
            asyncio.run(engine.generate(EngineRequest(messages, params)))
        assert asked.value.param == "max_tokens"
        filled = [text_message("user", "tell me about these words " * 40)]
        with pytest.raises(RequestError, match="leaves no room for output") as full:
            asyncio.run(engine.generate(EngineRequest(filled, params, default_max_tokens=True)))
        assert (full.value.param, full.value.code) == ("messages", "context_length_exceeded")
    finally:
        engine.close()
