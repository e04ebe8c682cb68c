"""The serving engine in a child process (``engine_process``): the same tokens as the engine in a thread, errors
with their type and field, abandoned streams cancelled in the child, adapter calls, a child that dies or is
closed, a child that outlives its replica's process (it must not), a model that cannot load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.generation import SamplingParams
from qwenvl_core.serving.engine import (
    EngineConfig,
    EngineFault,
    EngineRequest,
    EngineStopped,
    ServingEngine,
    join_events,
)
from qwenvl_core.serving.engine_process import EngineProcess, portable
from qwenvl_core.serving.lora_batch import AdapterError
from qwenvl_core.serving.preparation import RequestError
from tests.serving.conftest import eventually

ENDLESS = (-1,)  # stop ids no token has: requests run to their max_new_tokens


def _request(i: int, adapter: Path | None = None, tokens: int = 8, image: bool = False,
             **params: object) -> EngineRequest:
    parts: list = [TextPart(f"tell me about item {i}")]
    if image:
        parts.insert(0, ImagePart(Image.new("RGB", (40, 30), (20 * i, 90, 200))))
    return EngineRequest([Message("user", parts)], SamplingParams(max_new_tokens=tokens, **params),
                         adapter_id=adapter.name if adapter else None,
                         adapter_locator=str(adapter) if adapter else None)


@pytest.fixture(scope="module")
def child(tiny_model_dir: Path):
    engine = EngineProcess(tiny_model_dir, EngineConfig(max_batch_size=8))
    yield engine
    engine.close()


def test_a_child_engine_gives_the_tokens_and_events_of_an_engine_in_a_thread(child, tiny_model_dir, adapter_dirs):
    """Concurrent requests over three adapters and the base, with an image and logprobs: each gets the same
    tokens, text, usage and logprobs from the child as from ``ServingEngine`` in this process; streamed, its events
    join to the whole answer."""
    requests = [_request(0), _request(1, adapter_dirs[0]), _request(2, adapter_dirs[1], image=True),
                _request(3, adapter_dirs[9], logprobs=2), _request(4, adapter_dirs[0], do_sample=True, seed=7)]

    async def run_all(engine) -> list:
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    async def streamed() -> list:
        return [event async for event in child.stream(_request(5, adapter_dirs[1]))]

    here = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_batch_size=8))
    try:
        expected = asyncio.run(run_all(here))
        events_here = asyncio.run(_collect(here, _request(5, adapter_dirs[1])))
    finally:
        here.close()
    assert asyncio.run(run_all(child)) == expected
    events = asyncio.run(streamed())
    assert len(events) > 1 and join_events(events) == join_events(events_here)


async def _collect(engine, request: EngineRequest) -> list:
    return [event async for event in engine.stream(request)]


def test_a_requests_error_crosses_with_its_type_and_field_and_the_child_serves_on(child, tmp_path):
    with pytest.raises(RequestError, match="exceeds the limit") as refused:
        asyncio.run(child.generate(_request(0, tokens=5000)))
    assert refused.value.param == "max_tokens" and refused.value.code == "context_length_exceeded"
    bad_image = EngineRequest([Message("user", [ImagePart(b"not an image"), TextPart("x")])],
                              SamplingParams(max_new_tokens=2))
    with pytest.raises(RequestError, match="image") as refused:
        asyncio.run(child.generate(bad_image))
    assert refused.value.param == "messages[0].content[0]"
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match=tmp_path.name):
        asyncio.run(child.generate(_request(1, tmp_path)))
    assert asyncio.run(child.generate(_request(2))).completion_tokens == 8 and child.alive


def test_requests_are_prepared_in_the_replicas_process_and_reach_the_child_as_tokens_and_pixels(child, monkeypatch):
    """The template, tokenizer and image decoding run here (the child's model thread shares its GIL with no
    preparation); what crosses is the prepared request: token ids and pixel tensors, no message, no image bytes,
    and the time it arrived here: the child's time to first token counts the preparation (one clock for both)."""
    import threading

    from qwenvl_core.serving import tensor_pickle

    prepared_in, sent = [], []
    prepare, dumps = child.preparer.prepare, tensor_pickle.dumps

    def recording_prepare(request):
        prepared_in.append((os.getpid(), threading.current_thread().name))
        time.sleep(0.4)  # a slow preparation
        return prepare(request)

    def ttft_sum() -> float:
        return sum(float(x.rsplit(" ", 1)[1]) for x in child.metrics_text().decode().splitlines()
                   if x.startswith("qwenvl_serving_time_to_first_token_seconds_sum"))

    def recording_dumps(message):
        sent.append(message)
        return dumps(message)

    monkeypatch.setattr(child.preparer, "prepare", recording_prepare)
    monkeypatch.setattr(tensor_pickle, "dumps", recording_dumps)
    before = ttft_sum()
    result = asyncio.run(child.generate(_request(9, image=True)))
    assert result.completion_tokens == 8 and 0.4 <= ttft_sum() - before < 60
    assert prepared_in == [(os.getpid(), prepared_in[0][1])] and prepared_in[0][1].startswith("qwenvl-prep")
    (kind, _rid, prepared, arrived), = sent
    assert kind == "submit" and prepared.request.messages == [] and 0 < time.perf_counter() - arrived < 60
    assert len(prepared.images) == 1 and prepared.images[0].pixel_values.dtype == torch.float32  # (the model's)
    assert prepared.image_sizes == [(40, 30)]


def test_a_bf16_childs_pixels_cross_in_bf16_and_it_answers_as_a_bf16_engine_in_a_thread(tiny_model_dir, monkeypatch):
    """The vision tower casts pixels to its dtype first: prepared in it, they take half the bytes and give the same
    features, so the same tokens as the processor's float32 pixels."""
    from qwenvl_core.serving import tensor_pickle

    sent, dumps = [], tensor_pickle.dumps
    monkeypatch.setattr(tensor_pickle, "dumps", lambda message: sent.append(message) or dumps(message))
    requests = [_request(0, image=True), _request(1, image=True, tokens=6), _request(2)]

    async def run_all(engine) -> list:
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    here = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_batch_size=4), dtype=torch.bfloat16)
    try:
        assert here.preparer.pixel_dtype == torch.bfloat16
        here.preparer.pixel_dtype = None  # the reference: the processor's float32 pixels, cast by the tower
        expected = asyncio.run(run_all(here))
    finally:
        here.close()
    engine = EngineProcess(tiny_model_dir, EngineConfig(max_batch_size=4), dtype="bfloat16")
    try:
        assert asyncio.run(run_all(engine)) == expected
    finally:
        engine.close()
    pixels = [m[2].images[0].pixel_values for m in sent if m[2].images]
    assert len(pixels) == 2 and all(p.dtype == torch.bfloat16 for p in pixels)


def test_a_request_refused_while_preparing_is_counted_by_the_child(child):
    def errors() -> float:
        lines = [x for x in child.metrics_text().decode().splitlines()
                 if x.startswith("qwenvl_serving_requests_total") and 'outcome="error"' in x]
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines)

    before = errors()
    with pytest.raises(RequestError):
        asyncio.run(child.generate(_request(0, tokens=5000)))
    assert eventually(lambda: errors() == before + 1)


def test_a_stream_abandoned_while_being_prepared_never_reaches_the_child(child, monkeypatch):
    """A client that leaves while its request is prepared: the prepared request is dropped here, not run."""
    import threading

    release = threading.Event()
    prepare = child.preparer.prepare

    def slow_prepare(request):
        release.wait(30)
        return prepare(request)

    def outcomes() -> dict[str, float]:
        counts: dict[str, float] = {}
        for line in child.metrics_text().decode().splitlines():
            if line.startswith("qwenvl_serving_requests_total"):
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                counts[outcome] = counts.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
        return counts

    async def leave_while_preparing() -> None:
        task = asyncio.ensure_future(child.generate(_request(10, tokens=4)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = outcomes()
    monkeypatch.setattr(child.preparer, "prepare", slow_prepare)
    asyncio.run(leave_while_preparing())
    release.set()
    monkeypatch.undo()
    assert asyncio.run(child.generate(_request(11, tokens=2))).completion_tokens == 2  # after the dropped one
    time.sleep(0.5)  # (had the dropped one been sent, its 4 tokens would be done by now)
    after = outcomes()
    assert after.get("ok", 0) == before.get("ok", 0) + 1 and after.get("cancelled", 0) == before.get("cancelled", 0)


def test_an_error_that_cannot_be_pickled_crosses_as_an_engine_fault():
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}/{b}")

    crossed = portable(Odd(1, 2))
    assert isinstance(crossed, EngineFault) and "Odd: 1/2" in str(crossed)
    assert portable(RequestError("x", "max_tokens")).param == "max_tokens"


def test_a_stream_the_replica_stops_reading_is_cancelled_in_the_child(child):
    async def first_then_leave() -> None:
        async for _event in child.stream(_request(6, tokens=400, stop_token_ids=ENDLESS)):
            break

    def cancelled() -> float:
        line = next((x for x in child.metrics_text().decode().splitlines()
                     if x.startswith("qwenvl_serving_requests_total") and 'outcome="cancelled"' in x), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = cancelled()
    started = time.perf_counter()
    asyncio.run(first_then_leave())
    assert eventually(lambda: cancelled() == before + 1)
    # its row left the batch: a new request does not wait for 400 tokens of it
    assert asyncio.run(child.generate(_request(7, tokens=2))).completion_tokens == 2
    assert time.perf_counter() - started < 60


def test_adapters_load_count_and_evict_through_calls_to_the_child(child, adapter_dirs):
    adapter = adapter_dirs[4]
    child.load_adapter(adapter.name, str(adapter))
    stats = child.replica_stats()
    assert adapter.name in stats["cached"] and stats["gc_frozen"] > 10_000  # its start-up heap frozen
    asyncio.run(child.generate(_request(8, adapter)))
    assert child.replica_stats()["hits"] > stats["hits"]
    assert child.evict_adapter(adapter.name) and adapter.name not in child.replica_stats()["cached"]
    assert not child.evict_adapter(adapter.name)
    child.load_adapter(adapter.name, str(adapter))
    child.unload_adapter(adapter.name)  # not awaited: Serve calls it from a finalizer
    assert eventually(lambda: adapter.name not in child.replica_stats()["cached"])
    assert b"qwenvl_serving_adapter_slots_resident" in child.metrics_text()


def test_a_child_that_dies_fails_its_requests_and_refuses_new_ones(tiny_model_dir):
    engine = EngineProcess(tiny_model_dir, EngineConfig(max_batch_size=4))

    async def killed_midway() -> BaseException:
        try:
            async for _event in engine.stream(_request(0, tokens=400, stop_token_ids=ENDLESS)):
                os.kill(engine.pid, signal.SIGKILL)
        except BaseException as exc:
            return exc
        raise AssertionError("the stream ended although its engine died")

    try:
        assert isinstance(asyncio.run(killed_midway()), EngineFault)
        assert not engine.alive
        with pytest.raises(EngineStopped):
            asyncio.run(engine.generate(_request(1)))
        with pytest.raises(EngineStopped):
            engine.replica_stats()
    finally:
        engine.close()


def test_closing_stops_the_streams_in_flight_and_the_child(tiny_model_dir):
    engine = EngineProcess(tiny_model_dir, EngineConfig(max_batch_size=4))

    async def closed_midway() -> BaseException:
        try:
            async for _event in engine.stream(_request(0, tokens=400, stop_token_ids=ENDLESS)):
                await asyncio.to_thread(engine.close)
        except BaseException as exc:
            return exc
        raise AssertionError("the stream ended although its engine was closed")

    assert isinstance(asyncio.run(closed_midway()), EngineStopped)
    assert not engine.alive and engine._proc.returncode is not None


def test_the_child_ends_when_its_replicas_process_is_killed(tiny_model_dir, tmp_path):
    """Ray kills a replica's process (a node drain, a failed health check): its engine's process must not live on
    holding the GPU."""
    script = ("import sys, time\n"
              "from qwenvl_core.serving.engine import EngineConfig\n"
              "from qwenvl_core.serving.engine_process import EngineProcess\n"
              f"engine = EngineProcess({str(tiny_model_dir)!r}, EngineConfig(max_batch_size=2))\n"
              "print(engine.pid, flush=True)\n"
              "time.sleep(600)\n")
    replica = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    try:
        child_pid = int(replica.stdout.readline())
        assert _running(child_pid)
        replica.kill()
        replica.wait()
        assert eventually(lambda: not _running(child_pid), timeout=30)
    finally:
        replica.kill()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def test_a_model_that_cannot_load_raises_its_error_in_the_replica(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Exception, match="config.json"):
        EngineProcess(tmp_path, EngineConfig())



def test_closing_the_child_removes_its_adapter_downloads(tiny_model_dir, adapter_dirs, s3_env, tmp_path,
                                                          monkeypatch):
    """The child's engine downloads S3 adapters to its scratch folder; closing the child (a replica stopping)
    removes them, as the engine in a thread does (``test_engine_memory``)."""
    from qwenvl_core.storage import open_store, upload_dir

    s3_env.client().create_bucket(Bucket="child-stop")
    locator = "s3://child-stop/adapters/a5"
    store, prefix = open_store(locator)
    upload_dir(store, adapter_dirs[5], prefix)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the child's scratch folders, where this test can see them
    engine = EngineProcess(tiny_model_dir, EngineConfig(max_batch_size=2))
    try:
        engine.load_adapter("a5", locator)
        assert list(tmp_path.glob("qwenvl-adapters-*/**/adapter_model.safetensors"))
    finally:
        engine.close()
    assert not list(tmp_path.glob("qwenvl-adapters-*"))


def test_the_child_finds_this_package_without_a_site_folder_going_before_the_standard_library(monkeypatch):
    import site

    from qwenvl_core.serving.engine_process import child_environment

    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(site, "getsitepackages", lambda: ["/usr/lib/python3/dist-packages"])
    assert child_environment()["PYTHONPATH"] == os.pathsep.join([root, "/elsewhere"])  # a checkout or Ray's copy
    monkeypatch.setattr(site, "getsitepackages", lambda: [root])  # installed: the child's own path has it
    assert child_environment()["PYTHONPATH"] == "/elsewhere"
    monkeypatch.delenv("PYTHONPATH")
    assert "PYTHONPATH" not in child_environment()


def test_a_child_that_ends_without_a_word_while_loading_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a child that exits at once
    with pytest.raises(RuntimeError, match="exited with code 1 while loading the model"):
        EngineProcess(tiny_model_dir, EngineConfig())


HANGING_FORWARD = """\
import os, time
from qwenvl_core.serving import engine as _engine
_forward = _engine.ServingEngine._forward
def _hanging_forward(self, *args, **kwargs):
    time.sleep(float(os.environ["QWENVL_TEST_FORWARD_HANG_S"]))  # a device that hangs, for a while
    return _forward(self, *args, **kwargs)
_engine.ServingEngine._forward = _hanging_forward
"""


def test_a_child_whose_step_hangs_past_the_stall_timeout_is_reported_and_refuses_new_requests(
        tiny_model_dir, tmp_path, monkeypatch):
    """The child's model thread stuck in one forward past ``stall_timeout_s``: the child tells the replica, whose
    ``problem`` (its health check) names it and which refuses new requests; closing it still ends the child and
    fails the request it held with ``EngineStopped``, no client left waiting."""
    (tmp_path / "sitecustomize.py").write_text(HANGING_FORWARD)  # in the child only: it inherits this environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("QWENVL_TEST_FORWARD_HANG_S", "3")
    engine = EngineProcess(tiny_model_dir, EngineConfig(max_batch_size=2, stall_timeout_s=0.5))

    async def held_then_closed() -> tuple[str | None, BaseException | None]:
        pending = asyncio.ensure_future(engine.generate(_request(0, tokens=4, stop_token_ids=ENDLESS)))
        started = time.monotonic()
        while engine.problem() is None and time.monotonic() - started < 20:
            await asyncio.sleep(0.1)
        problem = engine.problem()
        try:
            await engine.generate(_request(1))
            refused = None
        except EngineStopped as exc:
            refused = exc
        await asyncio.to_thread(engine.close)
        with pytest.raises(EngineStopped):
            await pending
        return problem, refused

    problem, refused = asyncio.run(held_then_closed())
    assert problem is not None and "has run for over 0.5 s" in problem and not engine.alive
    assert refused is not None and "has run for over 0.5 s" in str(refused)


def test_a_call_the_child_does_not_answer_times_out_instead_of_holding_a_thread(tiny_model_dir, monkeypatch):
    """A stopped child (or one whose loop is stuck) must not hold a replica thread per metrics scrape forever."""
    import qwenvl_core.serving.engine_process as engine_process

    monkeypatch.setattr(engine_process, "CALL_TIMEOUT_S", 0.5)
    engine = EngineProcess(tiny_model_dir, EngineConfig(max_batch_size=2))
    try:
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError, match="did not answer metrics_text within 0.5 s"):
                engine.metrics_text()
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        assert engine.replica_stats()["cached"] == [] and not engine._calls  # the late answer found nobody waiting
    finally:
        engine.close()
