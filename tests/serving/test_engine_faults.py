"""Faults in the model thread fail only what they belong to (issue 13: "out-of-memory on one request fails that
request, never the whole batch"). A GPU runs out of memory in a forward or in an adapter's copy to its device slot;
here the fault is raised where it would be (``torch.OutOfMemoryError`` from a forward pre-hook on the real model,
or from the slot copy) for one request's rows only, and the other requests of the same batch must finish with
exactly the tokens they get without the fault. A fault outside that isolation (an engine bug, a broken device)
must not leave any request waiting on a thread that is gone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import torch

from qwenvl_core.conversation import text_message
from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import SamplingParams
from qwenvl_core.serving.engine import EngineFault, EngineRequest, EngineStopped, ServingEngine, _Sequence
from tests.devices import DEVICES
from tests.serving.conftest import eventually


def _request(i: int, tokens: int = 6, adapter: object = None, endless_ids: tuple[int, ...] = ()) -> EngineRequest:
    """Request ``i``: a prompt of its own length (``i`` extra words), so its rows are known by their prompt length."""
    return EngineRequest([text_message("user", "describe the picture " + "in detail " * i)],
                         SamplingParams(max_new_tokens=tokens, suppress_token_ids=endless_ids),
                         adapter_id=adapter.name if adapter else None,
                         adapter_locator=str(adapter) if adapter else None)


class _OutOfMemory:
    """A forward pre-hook on the model that raises ``torch.OutOfMemoryError`` whenever a row of the given prompt
    length is in the forward and ``when(input_ids)`` holds (prefill: several positions; decode: one)."""

    def __init__(self, model: torch.nn.Module, prompt_length: int, when: Callable[[torch.Tensor], bool]) -> None:
        self.prompt_length, self.when, self.raised = prompt_length, when, 0
        self.error: Callable[[], BaseException] = lambda: torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB")
        self._handle = model.register_forward_pre_hook(self._check, with_kwargs=True)

    def _check(self, _module: object, _args: object, kwargs: dict) -> None:
        if self.when(kwargs["input_ids"]) and self.prompt_length in kwargs["prompt_lengths"].tolist():
            self.raised += 1
            raise self.error()

    def remove(self) -> None:
        self._handle.remove()


def _prepared(engine: ServingEngine, requests: list[EngineRequest]) -> list[_Sequence]:
    """The requests prepared, each one's events and errors kept on its sequence as ``events``."""
    seqs = [engine._prepare(r, time.perf_counter()) for r in requests]
    for seq in seqs:
        seq.events = []
        seq.emit = seq.events.append
    return seqs


def _finish(engine: ServingEngine) -> None:
    """The model thread's loop, in this thread, until nothing runs or waits."""
    while engine._batch is not None or engine._chunking is not None or engine._waiting:
        engine._step(engine._take_new())


def _run(engine: ServingEngine, requests: list[EngineRequest]) -> list[_Sequence]:
    """The requests admitted together in one step and run to the end, step by step in this thread."""
    seqs = _prepared(engine, requests)
    engine._step(seqs)
    _finish(engine)
    return seqs


def _outcome(seq: _Sequence) -> list[int] | BaseException:
    errors = [e for e in seq.events if isinstance(e, BaseException)]
    return errors[0] if errors else seq.state.tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_out_of_memory_in_a_forward_fails_only_the_request_whose_rows_it_hit(where, device, engine_factory,
                                                                             adapter_dirs):
    """Prefill: the batched prefill raises, each new request is prefilled alone, the faulty one fails. Decode: the
    batched step raises, the rows are stepped one by one on their own KV slots, the faulty one fails; the next
    step is batched again. Either way the others' greedy tokens equal a run without the fault (on each device)."""
    engine: ServingEngine = engine_factory(device=device)
    requests = [_request(0, adapter=adapter_dirs[0]), _request(3), _request(5, adapter=adapter_dirs[1]),
                _request(8, tokens=4)]
    reference = [_outcome(s) for s in _run(engine, requests)]
    victim = 2
    length = len(engine._prepare(requests[victim], 0.0).prompt_ids)
    fault = _OutOfMemory(engine.model, length, (lambda ids: ids.shape[1] > 1) if where == "prefill"
                         else (lambda ids: ids.shape[1] == 1))
    try:
        seqs = _run(engine, requests)
    finally:
        fault.remove()
    outcomes = [_outcome(s) for s in seqs]
    assert isinstance(outcomes[victim], EngineFault) and "OutOfMemoryError" in str(outcomes[victim])
    assert fault.raised == 2  # the batched forward, then the victim's forward alone
    assert [o for i, o in enumerate(outcomes) if i != victim] == [o for i, o in enumerate(reference) if i != victim]
    if where == "decode":
        assert len(seqs[victim].state.tokens) == 1  # its first token came from the prefill, which did not fail
    assert engine._batch is None and engine.adapter_slots.in_use == 0 and engine.kv.lengths == [0] * engine.slots
    assert _outcome(_run(engine, [requests[victim]])[0]) == reference[victim]  # the engine serves it again


def test_an_adapter_that_cannot_be_copied_to_its_device_slot_fails_alone(engine_factory, adapter_dirs,
                                                                         monkeypatch):
    """Out of memory while an adapter is copied into a device slot fails that adapter's request; the requests
    that join in the same step finish as they do without the fault, no slot claims the adapter, and it is
    served once the device has room again."""
    requests = [_request(1, adapter=adapter_dirs[2]), _request(4, adapter=adapter_dirs[3]), _request(6)]
    reference = [_outcome(s) for s in _run(engine_factory(), requests)]
    engine: ServingEngine = engine_factory()
    real_write = engine.adapter_slots._write

    def write(slot: int, weights: object) -> None:
        if weights.adapter_id == adapter_dirs[2].name:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        real_write(slot, weights)

    monkeypatch.setattr(engine.adapter_slots, "_write", write)
    outcomes = [_outcome(s) for s in _run(engine, requests)]
    assert isinstance(outcomes[0], EngineFault) and "OutOfMemoryError" in str(outcomes[0])
    assert outcomes[1:] == reference[1:]
    assert engine.adapter_slots.resident_ids() == [adapter_dirs[3].name] and engine.adapter_slots.in_use == 0
    monkeypatch.undo()
    assert [_outcome(s) for s in _run(engine, requests)] == reference


def test_a_failed_model_thread_fails_every_request_at_once_and_refuses_new_ones(engine_factory, monkeypatch):
    """A fault outside the per-request isolation ends the model thread: the running and the waiting request get
    ``EngineFault`` at once (no client waits on a thread that is gone), a new request ``EngineStopped`` (HTTP 503),
    and ``alive`` turns False, which fails the replica's health check so that Serve replaces it."""
    engine: ServingEngine = engine_factory(max_batch_size=1)
    stop_ids = tuple(engine.family.stop_token_ids(engine.processor))

    def engine_bug() -> None:
        raise RuntimeError("an engine bug")

    async def run() -> tuple[list, BaseException | None]:
        running = asyncio.ensure_future(engine.generate(_request(1, tokens=1500, endless_ids=stop_ids)))
        while engine._batch is None:
            await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(engine.generate(_request(2)))
        while not engine._waiting:
            await asyncio.sleep(0.005)
        monkeypatch.setattr(engine, "_expire", engine_bug)  # the next step raises outside any request's isolation
        outcomes = await asyncio.wait_for(asyncio.gather(running, waiting, return_exceptions=True), timeout=60)
        try:
            await engine.generate(_request(3))
        except EngineStopped as refused:
            return outcomes, refused
        return outcomes, None

    outcomes, refused = asyncio.run(run())
    assert all(isinstance(o, EngineFault) and "RuntimeError" in str(o) for o in outcomes), outcomes
    assert isinstance(refused, EngineStopped) and "being replaced" in str(refused)
    assert eventually(lambda: not engine.alive)


def test_a_step_stuck_past_the_stall_timeout_makes_the_engine_unhealthy_until_it_ends(engine_factory, monkeypatch):
    """A device that hangs holds the model thread in one forward: requests and their timeouts (checked by that
    thread) wait forever. Past ``stall_timeout_s`` the engine says why it cannot serve (``problem``; the replica's
    health check raises it, and Serve replaces the replica); a step that ends after all clears it."""
    engine: ServingEngine = engine_factory(max_batch_size=2, stall_timeout_s=0.3)
    release = threading.Event()
    forward = engine._forward

    def hanging_forward(*args: object, **kwargs: object) -> torch.Tensor:
        release.wait(timeout=30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", hanging_forward)

    async def run() -> tuple[str | None, int]:
        stop_ids = tuple(engine.family.stop_token_ids(engine.processor))
        pending = asyncio.ensure_future(engine.generate(_request(1, tokens=3, endless_ids=stop_ids)))
        started = time.monotonic()
        while "has run" not in (engine.problem() or "") and time.monotonic() - started < 10:
            await asyncio.sleep(0.05)  # (the model thread starts with the first request)
        problem = engine.problem()
        release.set()
        return problem, (await pending).completion_tokens

    problem, tokens = asyncio.run(run())
    assert problem is not None and "has run for over 0.3 s" in problem
    assert tokens == 3 and engine.alive and engine.problem() is None
    with pytest.raises(QwenVLError, match=r"stall_timeout_s must be > 0 or None \(never\), got 0"):
        engine_factory(stall_timeout_s=0)  # (the setting's 0 means never: the deployment passes None)


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_device_error_in_one_requests_forward_ends_the_model_thread(where, engine_factory):
    """CUDA's errors other than out-of-memory (here ``torch.AcceleratorError``, raised where a forward would raise
    it, for one request's rows) leave the device unusable: unlike out-of-memory they are not that request's fault,
    so the model thread ends as for an engine bug: the running requests fail at once, a new one is refused and the
    engine is no longer alive (before: the one request failed, and the replica went on failing every request with
    a healthy health check)."""
    engine: ServingEngine = engine_factory(max_batch_size=4)
    stop_ids = tuple(engine.family.stop_token_ids(engine.processor))
    faulting = _request(5, tokens=40)
    length = len(engine._prepare(faulting, 0.0).prompt_ids)
    hook = _OutOfMemory(engine.model, length, (lambda ids: ids.shape[1] > 1) if where == "prefill"
                        else (lambda ids: ids.shape[1] == 1))
    hook.error = lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    async def run() -> tuple[list, BaseException | None]:
        # The other request is decoding before the faulting one arrives (sent together, the two are prepared in
        # parallel, and the one prepared second could arrive after the fault and be refused instead).
        running = asyncio.ensure_future(engine.generate(_request(2, tokens=1500, endless_ids=stop_ids)))
        while engine._batch is None:
            await asyncio.sleep(0.005)
        outcomes = await asyncio.wait_for(asyncio.gather(running, engine.generate(faulting),
                                                         return_exceptions=True), timeout=60)
        try:
            await engine.generate(_request(3))
        except EngineStopped as refused:
            return outcomes, refused
        return outcomes, None

    try:
        outcomes, refused = asyncio.run(run())
    finally:
        hook.remove()
    assert all(isinstance(o, EngineFault) and "AcceleratorError" in str(o) for o in outcomes), outcomes
    assert isinstance(refused, EngineStopped)
    assert eventually(lambda: not engine.alive)


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_out_of_memory_of_a_request_running_alone_fails_it_and_the_engine_serves_on(where, engine_factory,
                                                                                    adapter_dirs):
    """The same fault when the request is the only one in its prefill or decode step (no row-by-row retry is left):
    it fails, its KV slot and adapter slot are free, and the next request is served as if nothing happened."""
    engine: ServingEngine = engine_factory(adapter_slots=1)
    victim, other = _request(4, adapter=adapter_dirs[7]), _request(7, adapter=adapter_dirs[8])
    reference = _outcome(_run(engine, [other])[0])
    length = len(engine._prepare(victim, 0.0).prompt_ids)
    fault = _OutOfMemory(engine.model, length, (lambda ids: ids.shape[1] > 1) if where == "prefill"
                         else (lambda ids: ids.shape[1] == 1))
    try:
        (seq,) = _run(engine, [victim])
    finally:
        fault.remove()
    assert isinstance(_outcome(seq), EngineFault) and fault.raised == 1
    assert engine._batch is None and engine.kv.lengths == [0] * engine.slots and engine.adapter_slots.in_use == 0
    assert _outcome(_run(engine, [other])[0]) == reference  # (its adapter needs the one slot)


def _chunked(engine: ServingEngine, long_request: EngineRequest, short: list[EngineRequest],
             between: Callable[[_Sequence], None] = lambda _seq: None) -> list[_Sequence]:
    """``short`` running while ``long_request`` arrives and is prefilled chunk by chunk; ``between(long)`` runs
    after its first chunk."""
    seqs = _prepared(engine, [*short, long_request])
    engine._step(seqs[:-1])
    engine._waiting.append(seqs[-1])
    engine._step(engine._take_new())
    assert engine._chunking is seqs[-1] and seqs[-1].chunks_done == 1 < len(seqs[-1].chunks)
    assert engine._batch is not None  # rows decode between its chunks
    between(seqs[-1])
    _finish(engine)
    return seqs


@pytest.mark.parametrize("how", ["out-of-memory", "client-gone"])
def test_a_long_prompt_that_fails_or_is_abandoned_between_its_chunks_frees_its_slot(how, engine_factory,
                                                                                      adapter_dirs):
    """A long prompt is prefilled a chunk per step in the top KV slot, next to running rows. If a chunk's forward
    runs out of memory, or the client goes away between chunks, the prompt leaves: its KV slot and adapter slot are
    freed, it gets the error (or nothing: nobody listens), and the running rows finish with their own tokens."""
    engine: ServingEngine = engine_factory(prefill_chunk_tokens=48)
    long_request = _request(40, adapter=adapter_dirs[5])
    short = [_request(0, tokens=12), _request(2, tokens=12, adapter=adapter_dirs[6])]
    reference = [_outcome(s) for s in _run(engine_factory(prefill_chunk_tokens=48), short)]
    length = len(engine._prepare(long_request, 0.0).prompt_ids)
    fault = None

    def between(seq: _Sequence) -> None:
        nonlocal fault
        if how == "client-gone":
            seq.cancelled = True
        else:
            fault = _OutOfMemory(engine.model, length, lambda ids: ids.shape[1] > 1)

    try:
        seqs = _chunked(engine, long_request, short, between)
    finally:
        if fault is not None:
            fault.remove()
    if how == "client-gone":
        assert seqs[-1].events == [] and not seqs[-1].state.tokens
    else:
        assert isinstance(_outcome(seqs[-1]), EngineFault) and fault.raised == 1
    assert [_outcome(s) for s in seqs[:-1]] == reference
    assert engine._chunking is None and engine.kv.lengths == [0] * engine.slots
    assert engine.adapter_slots.in_use == 0
    assert _outcome(_chunked(engine, long_request, short)[-1]) == _outcome(_run(engine, [long_request])[0])
