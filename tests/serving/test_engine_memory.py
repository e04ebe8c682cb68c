"""The engine's memory and queue bounds on the tiny model: the KV cache is preallocated slots sized by a budget
(rows beyond wait, nothing regrows, rows moved between slots keep their tokens), the waiting queue is bounded
(``EngineOverloaded``, HTTP 429), requests time out (``EngineTimeout``), and a client that goes away frees its
slot at once, streaming or not."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from qwenvl_core.conversation import text_message
from qwenvl_core.generation import SamplingParams
from qwenvl_core.models.registry import get_family
from qwenvl_core.serving.engine import (
    EngineConfig,
    EngineOverloaded,
    EngineRequest,
    EngineTimeout,
    ServingEngine,
)
from qwenvl_core.serving.kv_cache import cache_shape_of
from tests.serving.conftest import eventually


def _request(i: int, tokens: int, endless: bool = False, stop_ids: tuple[int, ...] = ()) -> EngineRequest:
    params = SamplingParams(max_new_tokens=tokens, suppress_token_ids=stop_ids if endless else ())
    return EngineRequest([text_message("user", f"count the things of kind {i} " + "and more " * (i % 4))], params)


def _stop_ids(engine: ServingEngine) -> tuple[int, ...]:
    return tuple(engine.family.stop_token_ids(engine.processor))


class _Gate:
    """Holds the model thread inside its next forward until ``open()`` (a forward pre-hook on the real model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.entered, self._open = threading.Event(), threading.Event()
        self._handle = model.register_forward_pre_hook(self._wait)

    def _wait(self, *_args: object) -> None:
        self.entered.set()
        self._open.wait(timeout=60)

    def open(self) -> None:
        self._open.set()
        self._handle.remove()


def test_kv_budget_bounds_the_batch_and_the_cache_never_regrows(engine_factory):
    probe = engine_factory(max_batch_size=1, max_total_tokens=96)
    per_token = cache_shape_of(probe.model.config).bytes_per_token(torch.float32)
    engine: ServingEngine = engine_factory(max_batch_size=8, max_total_tokens=96, kv_cache_bytes=3 * 96 * per_token)
    assert engine.slots == 3 and engine.stats.kv_cache_bytes == 3 * 96 * per_token
    # fixed-shape decode steps take their padding rows' spare slot out of the same budget
    graphs = engine_factory(max_batch_size=8, max_total_tokens=96, kv_cache_bytes=3 * 96 * per_token,
                            decode_graphs="static")
    assert graphs.slots == 2 and graphs.stats.kv_cache_bytes == 3 * 96 * per_token
    storage = [t.data_ptr() for t in (*engine.kv.keys, *engine.kv.values)]
    requests = [_request(i, tokens=4 + 3 * i) for i in range(7)]

    async def together() -> list:
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    async def alone() -> list:
        return [await probe.generate(r) for r in requests]

    batched, reference = asyncio.run(together()), asyncio.run(alone())
    assert [r.token_ids for r in batched] == [r.token_ids for r in reference]  # rows moved between slots intact
    assert engine.stats.max_rows == 3  # the budget, not max_batch_size, bounded the batch
    assert [t.data_ptr() for t in (*engine.kv.keys, *engine.kv.values)] == storage  # same storage throughout
    assert engine.kv.lengths == [0, 0, 0]


def test_a_budget_too_small_for_one_request_is_a_clear_error(tiny_model_dir):
    from qwenvl_core.errors import QwenVLError
    from qwenvl_core.serving.engine import EngineConfig

    with pytest.raises(QwenVLError, match="KV cache budget .* holds no request of max_total_tokens 512"):
        ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_total_tokens=512, kv_cache_bytes=1000))


def test_a_gpu_budget_is_planned_from_free_memory_after_the_vision_copies_reserve():
    """On a GPU (free memory known) the KV cache takes its fraction of what the vision-tower copies of adapters
    (``vision_adapter_bytes``) leave; a configured size wins; on the CPU (no free figure) the batch size decides."""
    from qwenvl_core.serving.engine import EngineConfig, kv_cache_budget

    gib = 1 << 30
    config = EngineConfig(vision_adapter_bytes=gib, kv_cache_memory_fraction=0.5)
    assert kv_cache_budget(config, 9 * gib) == 4 * gib
    assert kv_cache_budget(config, gib // 2) == 0  # nothing left: _allocate_cache's clear error
    assert kv_cache_budget(EngineConfig(kv_cache_bytes=123, vision_adapter_bytes=gib), 9 * gib) == 123
    assert kv_cache_budget(config, None) is None


def test_the_waiting_queue_is_bounded(engine_factory):
    engine: ServingEngine = engine_factory(max_batch_size=1, max_waiting=2)
    engine.start()
    gate = _Gate(engine.model)

    async def run() -> tuple[list, BaseException]:
        running = asyncio.ensure_future(engine.generate(_request(0, tokens=3)))
        while not gate.entered.is_set():  # request 0 holds the only slot, inside its prefill
            await asyncio.sleep(0.005)
        waiting = [asyncio.ensure_future(engine.generate(_request(i, tokens=3))) for i in (1, 2)]
        while len(engine._waiting) < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineOverloaded, match="2 requests waiting") as refused:
            await engine.generate(_request(3, tokens=3))
        gate.open()
        return await asyncio.gather(running, *waiting), refused.value

    done, refused = asyncio.run(run())
    assert len(done) == 3 and refused.retry_after_s >= 1


def test_requests_time_out_waiting_and_running(engine_factory):
    engine: ServingEngine = engine_factory(max_batch_size=1, request_timeout_s=0.3)
    engine.start()
    gate = _Gate(engine.model)

    async def run() -> list:
        tasks = [asyncio.ensure_future(engine.generate(_request(i, tokens=50))) for i in range(2)]
        while not gate.entered.is_set():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)  # both are older than the timeout: one inside its prefill, one waiting
        gate.open()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(run())
    assert all(isinstance(o, EngineTimeout) for o in outcomes), outcomes
    assert asyncio.run(engine.generate(_request(5, tokens=3))).completion_tokens >= 1  # the engine still serves
    assert eventually(lambda: engine._batch is None) and not engine._waiting  # the timed-out rows left


@pytest.mark.parametrize("streaming", [True, False])
def test_a_client_that_goes_away_frees_its_slot(engine_factory, streaming):
    engine: ServingEngine = engine_factory(max_batch_size=1)
    endless = _request(0, tokens=400, endless=True, stop_ids=_stop_ids(engine))

    async def run() -> int:
        if streaming:
            stream = engine.stream(endless)
            await stream.__anext__()
            await stream.aclose()  # the HTTP client disconnected
        else:
            task = asyncio.ensure_future(engine.generate(endless))
            while engine.stats.forwards < 3:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        forwards = engine.stats.forwards
        await engine.generate(_request(1, tokens=3))  # gets the one slot, so the abandoned row left it
        return engine.stats.forwards - forwards

    after = asyncio.run(run())
    assert engine.stats.forwards < 100 and after < 20  # the abandoned row did not run on to 400 tokens
    assert eventually(lambda: engine._batch is None)


def test_hf_family_cache_shape_follows_its_text_config(tiny_dirs):
    for name, model_dir in tiny_dirs.items():
        config = get_family(name).load_config(model_dir)
        shape = cache_shape_of(config)
        text = config.text_config
        assert (shape.layers, shape.kv_heads) == (text.num_hidden_layers, text.num_key_value_heads), name


def _adapter_request(i: int, adapter, tokens: int) -> EngineRequest:
    return EngineRequest([text_message("user", f"say something about item {i}")],
                         SamplingParams(max_new_tokens=tokens), adapter_id=adapter.name, adapter_locator=str(adapter))


def test_adapters_wait_for_a_device_slot_and_resident_ones_are_reused(engine_factory, adapter_dirs):
    """Two device slots, four adapters in flight: at most two adapters share a forward, every request gets the
    tokens it gets alone, an adapter in use is never overwritten, and a resident adapter is not copied again."""
    roomy: ServingEngine = engine_factory(adapter_slots=8)
    engine: ServingEngine = engine_factory(adapter_slots=2, max_batch_size=6)
    requests = [_adapter_request(i, adapter_dirs[i % 4], tokens=4 + 2 * i) for i in range(6)]

    async def together(e: ServingEngine) -> list:
        return await asyncio.gather(*(e.generate(r) for r in requests))

    reference = [asyncio.run(roomy.generate(r)).token_ids for r in requests]
    assert [r.token_ids for r in asyncio.run(together(engine))] == reference
    assert engine.stats.max_adapters_in_forward == 2 and engine.adapter_slots.loads >= 4
    assert eventually(lambda: engine.adapter_slots.in_use == 0)  # every row left: nothing stays pinned
    loads = engine.adapter_slots.loads
    resident = engine.adapter_slots.resident_ids()
    assert len(resident) == 2
    asyncio.run(engine.generate(_adapter_request(9, next(d for d in adapter_dirs if d.name == resident[0]), 3)))
    assert engine.adapter_slots.loads == loads  # still resident: no copy
    assert roomy.adapter_slots.loads == 4 and len({tuple(r) for r in reference}) >= 4


def test_serves_unload_keeps_the_downloaded_adapter_and_deletion_removes_it(engine_factory, adapter_dirs, s3_env):
    """Serve's multiplexed unload (``_ServedAdapter`` going away) drops the adapter from the host cache only: the
    S3 download stays for the next load; deleting the adapter through the API (``evict_adapter``) removes it."""
    from qwenvl_core.storage import open_store, upload_dir
    from workflows.serve_app import _ServedAdapter

    s3_env.client().create_bucket(Bucket="unload-test")
    locator = "s3://unload-test/adapters/a2"
    store, prefix = open_store(locator)
    upload_dir(store, adapter_dirs[2], prefix)
    engine: ServingEngine = engine_factory()
    engine.cache.get("a2", locator)
    local = engine.cache._fetcher.fetch(locator)  # the downloaded copy (a cache hit: no second download)
    assert local.is_dir() and "a2" in engine.cache
    _ServedAdapter(engine, "a2").__del__()
    assert "a2" not in engine.cache and local.is_dir()
    engine.cache.get("a2", locator)
    assert engine.evict_adapter("a2") and not local.exists()
    exposition = engine.metrics.exposition().decode()
    assert "qwenvl_serving_adapter_slots_resident" in exposition and "qwenvl_serving_kv_cache_slots_used" in exposition


def test_stopping_a_replica_removes_its_adapter_downloads_unless_a_folder_is_configured(
        tiny_model_dir, adapter_dirs, s3_env, tmp_path):
    """A replica downloads S3 adapters to scratch; when Serve stops it (``__del__``) the engine thread ends and the
    downloads go (a real adapter is hundreds of MB; a replica restarts often). A configured folder is kept. (The
    engine in its own process closes the same engine when its replica closes it: ``test_engine_process``.)"""
    from qwenvl_core.storage import open_store, upload_dir
    from workflows.serve_app import ModelDeploymentConfig, ModelServerBase

    s3_env.client().create_bucket(Bucket="replica-stop")
    locator = "s3://replica-stop/adapters/a3"
    store, prefix = open_store(locator)
    upload_dir(store, adapter_dirs[3], prefix)
    kept = tmp_path / "adapter-cache"
    for cache_dir in (None, kept):
        server = ModelServerBase(ModelDeploymentConfig(
            base_model="tiny", model_dir=str(tiny_model_dir), engine_process=False, engine=EngineConfig(
                adapter_cache_dir=None if cache_dir is None else str(cache_dir))))
        engine = server.engine
        engine.cache.get("a3", locator)
        local = engine.cache._fetcher.fetch(locator)
        assert (local / "adapter_model.safetensors").is_file() and engine.alive
        server.__del__()
        assert not engine.alive
        assert local.exists() == (cache_dir is not None)
        if cache_dir is None:
            assert not local.parent.exists()  # the whole scratch folder


def test_a_running_batch_takes_in_waiting_requests_a_few_at_a_time(engine_factory):
    """``admit_ratio`` / ``admit_hold_steps``: a lone request waiting beside a large running batch is held back
    (up to the hold) so that later ones, or rows that finish meanwhile, can share its prefill forward; enough
    joiners at once, or no running batch, are taken in at once. Held steps still decode the running rows."""
    engine: ServingEngine = engine_factory(max_batch_size=8, admit_ratio=0.25, admit_hold_steps=2)
    stop_ids = _stop_ids(engine)

    def arrive(*indices: int) -> list:
        seqs = [engine._prepare(_request(i, 40, endless=True, stop_ids=stop_ids), time.perf_counter())
                for i in indices]
        for seq in seqs:
            seq.emit = lambda _event: None
        engine._waiting.extend(seqs)
        return seqs

    running = arrive(0, 1, 2, 3)
    assert engine._take_new() == running  # nothing running: taken at once
    engine._step(running)
    joiner = arrive(4)
    assert engine._take_new() == joiner  # 1 joiner >= 0.25 x 4 running rows
    engine._step(joiner)
    running += joiner
    lone = arrive(5)
    for _ in range(2):  # 1 < 0.25 x 5: held, while the running rows decode
        generated = [s.generated for s in running]
        assert engine._take_new() == []
        engine._step([])
        assert [s.generated for s in running] == [n + 1 for n in generated]
    assert engine._take_new() == lone  # held admit_hold_steps steps: taken
    engine._step(lone)
    pair = arrive(6, 7)
    assert engine._take_new() == pair  # 2 >= 0.25 x 6
