"""The Ray Serve application on a real local Ray: the chat route through Serve's HTTP proxy (official openai
client, streaming), model multiplexing (an adapter goes to the replica that holds it), adapters from S3
(moto) loaded on first use, an adapter written after the application started, deletion, cross-tenant denial."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import openai
import pytest

from qwenvl_core.runs import RunDir
from qwenvl_core.serving.engine import EngineConfig
from service.routes.chat import standalone_app
from tests.fixtures.net import free_port
from tests.serving.conftest import make_adapter

BASE = "qwen-vl-tiny"
BUCKET_ROOT = "s3://serving-test/root"


def _model(job: str, tenant: str = "tenant-a") -> str:
    return f"ft:{BASE}:{tenant}:x:{job}"


def _publish(adapter_dir: Path, job: str, tenant: str = "tenant-a") -> None:
    """What a successful fine-tune job leaves behind: the adapter in its run directory."""
    RunDir(f"{BUCKET_ROOT}/tenants/{tenant}/runs/{job}").upload_adapter(adapter_dir)


@pytest.fixture(scope="module")
def serve_url(tiny_model_dir: Path, adapter_dirs: list[Path], s3_server) -> Iterator[str]:
    import ray
    from ray import serve

    from workflows.serve_app import APP_NAME, ModelDeploymentConfig, RunsRootResolver, build_app

    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        s3_server.client().create_bucket(Bucket="serving-test")
        for i in range(3):
            _publish(adapter_dirs[i], f"job{i}")
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": s3_server.env()})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ModelDeploymentConfig(BASE, str(tiny_model_dir), max_adapters_per_replica=2, num_replicas=2,
                                       num_cpus=0.5, engine=EngineConfig(max_batch_size=8))
        builder = partial(standalone_app, adapter_resolver=RunsRootResolver(BUCKET_ROOT),
                          api_keys={"key-a": "tenant-a", "key-b": "tenant-b"})
        serve.run(build_app([config], builder), name=APP_NAME, route_prefix="/")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def test_an_event_crosses_from_a_replica_to_the_ingress_whole():
    """What a model replica streams (``to_wire``) is the event the ingress gets back (``from_wire``): text, ids,
    finish and usage, logprobs with their alternatives, grounding boxes."""
    from qwenvl_core.models.qwen_vl.grounding import PixelObject
    from qwenvl_core.serving.engine import EngineEvent, ImageBoxes
    from qwenvl_core.vocabulary import TokenLogprob, TopLogprob
    from workflows.serve_app import from_wire, to_wire

    event = EngineEvent("a <box>", [5, 6], finish_reason="stop", prompt_tokens=9, completion_tokens=2,
                        grounding=[ImageBoxes(0, 640, 480, [PixelObject("cat", (1.0, 2.0, 30.0, 40.0))])],
                        logprobs=[TokenLogprob("a", (97,), -0.5, (TopLogprob("b", (98,), -1.5),))])
    item = to_wire(event)
    assert isinstance(item, bytes) and from_wire(item) == event


def test_a_replica_sends_a_completion_that_is_not_streamed_as_one_event(tiny_model_dir: Path):
    """``EngineRequest.streamed`` False (the chat route's non-streamed completions): the replica sends one item, the
    whole answer; streamed, the same tokens come as events."""
    import asyncio

    from qwenvl_core.conversation import text_message
    from qwenvl_core.generation import SamplingParams
    from qwenvl_core.serving.engine import EngineRequest, join_events
    from workflows.serve_app import ModelDeploymentConfig, ModelServerBase, from_wire

    server = ModelServerBase(ModelDeploymentConfig(BASE, str(tiny_model_dir), stream_interval_s=0.0))
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(-1,), logprobs=1)

    async def items(streamed: bool) -> list:
        request = EngineRequest([text_message("user", "hello there")], params, streamed=streamed)
        return [from_wire(item) async for item in server.stream(request)]

    try:
        whole, apart = asyncio.run(items(False)), asyncio.run(items(True))
    finally:
        server.__del__()
    assert len(whole) == 1 and whole[0].finish_reason == "length" and len(whole[0].token_ids) == 8
    assert join_events(apart) == whole[0]


def _client(url: str, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _ask(url: str, model: str, key: str = "key-a", tokens: int = 4) -> str:
    out = _client(url, key).chat.completions.create(model=model, max_tokens=tokens, temperature=0,
                                                     messages=[{"role": "user", "content": "hello there"}])
    return out.choices[0].message.content


def _replica_stats() -> dict[str, dict]:
    from ray import serve

    from workflows.serve_app import APP_NAME

    handle = serve.get_deployment_handle(f"model-{BASE}", APP_NAME)
    stats: dict[str, dict] = {}
    for _ in range(24):  # unrouted calls spread over both replicas
        s = handle.replica_stats.remote().result()
        stats[s["replica"]] = s
    return stats


def _wait_until_routed(model: str, timeout: float = 60.0) -> None:
    """Wait until Serve's routers know which replica holds ``model``.

    A replica reports the adapters it loaded to the controller, which passes them on to every router (the
    ingress's and this process's) a moment later; until then a request for the adapter goes to any replica. Here
    unloaded ``replica_stats`` calls routed by adapter must land on a holder three times in a row.
    """
    from ray import serve

    from workflows.serve_app import APP_NAME

    handle = serve.get_deployment_handle(f"model-{BASE}", APP_NAME).options(multiplexed_model_id=model)
    deadline, in_a_row = time.monotonic() + timeout, 0
    while in_a_row < 3:
        assert time.monotonic() < deadline, f"Serve's routers never learnt which replica holds {model}"
        in_a_row = in_a_row + 1 if model in handle.replica_stats.remote().result()["cached"] else 0
        if not in_a_row:
            time.sleep(0.2)


def test_chat_through_serve_streams_and_denies_other_tenants(serve_url):
    client = _client(serve_url)
    plain = _ask(serve_url, _model("job0"), tokens=6)
    stream = client.chat.completions.create(model=_model("job0"), max_tokens=6, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "hello there"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain
    assert _ask(serve_url, BASE) is not None and _ask(serve_url, BASE, key="key-b") is not None
    with pytest.raises(openai.NotFoundError):
        _ask(serve_url, _model("job0"), key="key-b")
    with pytest.raises(openai.NotFoundError):
        _ask(serve_url, _model("job0", tenant="tenant-b"), key="key-b")
    with pytest.raises(openai.BadRequestError) as refused:  # refused on the replica: the field crosses to the ingress
        _ask(serve_url, BASE, tokens=5000)
    assert (refused.value.body["code"], refused.value.body["param"]) == ("context_length_exceeded", "max_tokens")


def test_multiplexing_sends_an_adapter_to_the_replica_that_holds_it(serve_url):
    for job in ("job1", "job2"):
        _ask(serve_url, _model(job))
        _wait_until_routed(_model(job))
    for _ in range(3):
        for job in ("job1", "job2"):
            _ask(serve_url, _model(job))
    stats = _replica_stats()
    assert len(stats) == 2
    holders = {job: [r for r, s in stats.items() if _model(job) in s["cached"]] for job in ("job1", "job2")}
    assert all(len(h) == 1 for h in holders.values()), stats
    assert sum(s["loads"] for s in stats.values()) <= 3  # job0 (earlier test) + one load each, not one per request


def test_replicas_run_with_their_start_up_heap_frozen_out_of_the_gc(serve_url):
    """A full collection stops every thread of a replica, its engine's streams included, while it walks the
    tracked objects: ~300 ms for the ~500,000 a replica holds once started (Ray, Serve, torch, the model), on the
    CI VM. Ray Serve (2.60, ``RAY_SERVE_FREEZE_GC_ON_STARTUP`` on by default) moves them into the permanent
    generation after the replica's ``__init__``; this guards that the pinned Ray still does, so a collection walks
    only what requests left behind. The engine's own process (``engine_process``) freezes its start-up heap the
    same way."""
    _ask(serve_url, BASE)
    stats = _replica_stats()
    assert len(stats) == 2
    for s in stats.values():
        assert s["gc_frozen"] > 100_000, s  # Ray, Serve, torch, transformers: hundreds of thousands
        assert s["gc_tracked"] < s["gc_frozen"] / 4, s
        assert s["engine_gc_frozen"] > 100_000, s  # torch, transformers and the model
        assert s["engine_gc_tracked"] < s["engine_gc_frozen"] / 4, s


def test_adapter_published_after_start_is_served_then_deleted(serve_url, tiny_model_dir, adapter_dirs, tmp_path,
                                                               s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    model = _model("job-late")
    with pytest.raises(openai.NotFoundError):
        _ask(serve_url, model)
    _publish(make_adapter(tiny_model_dir, tmp_path / "late", seed=77), "job-late")
    assert _ask(serve_url, model) is not None  # the first request after publishing is served: no redeploy
    run = RunDir(f"{BUCKET_ROOT}/tenants/tenant-a/runs/job-late")
    run.store.delete(run.prefix)
    with pytest.raises(openai.NotFoundError):  # and the first one after deleting is refused: nothing stale served
        _ask(serve_url, model)


def test_metrics_endpoint_gathers_every_replica(serve_url, adapter_dirs, s3_server, monkeypatch):
    """``GET /metrics`` through Serve: both replicas answer the broadcast, series are per adapter and replica."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for i in (3, 4, 5):
        _publish(adapter_dirs[i], f"job{i}")
    jobs = [f"job{i}" for i in range(6)]  # 6 adapters over 2 replicas x 2 slots: some must be evicted
    for job in jobs:
        _ask(serve_url, _model(job), tokens=3)
    _wait_until_routed(_model("job5"))
    for _ in range(2):
        _ask(serve_url, _model("job5"), tokens=3)

    response = httpx.get(f"{serve_url}/metrics", timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = [s for f in text_string_to_metric_families(response.text) for s in f.samples]

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == f"qwenvl_serving_{name}" and labels.items() <= s.labels.items())

    replicas = {s.labels["replica"] for s in samples}
    assert len(replicas) == 2 and all(s.labels["base_model"] == BASE for s in samples)  # every replica reported
    assert replicas == set(_replica_stats())
    for job in jobs:
        adapter = _model(job)
        assert total("requests_total", adapter=adapter, outcome="ok") >= 1
        assert total("time_to_first_token_seconds_count", adapter=adapter) >= 1
        assert total("request_latency_seconds_count", adapter=adapter) >= 1
        assert total("generated_tokens_total", adapter=adapter) >= 1
        assert total("adapter_cache_misses_total", adapter=adapter) >= 1
        assert total("adapter_load_seconds_count", adapter=adapter) >= 1
    late = _model("job5")
    assert total("requests_total", adapter=late) == 3 and total("adapter_cache_hits_total", adapter=late) >= 2
    assert total("adapter_load_seconds_sum", adapter=late) > 0
    # each replica reports what it served under its own label; together they account for all three requests
    # (which replica serves a request is Serve's choice: affinity is preferred, not guaranteed, under load)
    per_replica = [total("requests_total", adapter=late, replica=r) for r in replicas]
    assert sum(per_replica) == 3 and max(per_replica) >= 1
    assert total("adapter_evictions_total") >= 2
    assert total("requests_total", adapter="__base__") >= 2  # the first test's base-model requests
    assert httpx.get(f"{serve_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{serve_url}/v1/chat/ready", timeout=60).json()["status"] == "ok"


@pytest.mark.parametrize(("num_gpus", "device", "fraction"), [(0.0, "cpu", 0.8), (0.5, "cuda", 0.4), (1.0, "cuda", 0.8),
                                                               (2.0, "cuda", 0.8)])
def test_a_replica_on_a_shared_gpu_plans_its_kv_cache_from_its_share(num_gpus, device, fraction):
    """A replica's engine runs where Ray puts it, and with a fraction of a GPU (the compose file shares one with
    training) its KV budget is that fraction of what a whole GPU's replica would take."""
    from workflows.serve_app import ModelDeploymentConfig

    config = ModelDeploymentConfig(BASE, "/models/x", max_adapters_per_replica=3, num_gpus=num_gpus,
                                   quantization="4bit",
                                   engine=EngineConfig(max_batch_size=8, kv_cache_memory_fraction=0.8))
    engine = config.replica_engine_config()
    assert (engine.device, engine.max_adapters, engine.quantization, engine.max_batch_size) == (device, 3, "4bit", 8)
    assert engine.kv_cache_memory_fraction == pytest.approx(fraction)
