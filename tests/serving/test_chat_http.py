"""The chat route over a real HTTP server (uvicorn in a thread) with the in-process engine backend: the
official ``openai`` client (plain and streaming), images, usage, cross-tenant denial, deletion, hot-swap of an
adapter that appears after start, error envelopes, and a load test over 10 adapters."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Header
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from qwenvl_core.serving.chat import AdapterLocator, InProcessBackend
from qwenvl_core.serving.engine import EngineConfig, ServingEngine
from qwenvl_core.serving.metrics import ServingMetrics
from service.errors import Unauthorized, install_error_handlers
from service.routes.chat import create_chat_router
from tests.fixtures.net import free_port, wait_for_port
from tests.serving.conftest import make_adapter

BASE = "qwen-vl-tiny"
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


@dataclass
class Registry:
    """The control plane's part, reduced to a dict: model id -> (tenant, adapter directory)."""

    models: dict[str, tuple[str, Path]] = field(default_factory=dict)

    def resolve(self, model_id: str, tenant_id: str) -> AdapterLocator | None:
        entry = self.models.get(model_id)
        if entry is None or entry[0] != tenant_id:
            return None
        return AdapterLocator(adapter_id=model_id, base_model=BASE, uri=str(entry[1]))


def _tenant(authorization: str | None = Header(default=None)) -> str:
    token = (authorization or "").removeprefix("Bearer ").strip()
    if token not in KEYS:
        raise Unauthorized("invalid API key")
    return KEYS[token]


@dataclass
class Server:
    url: str
    engine: ServingEngine
    backend: InProcessBackend
    registry: Registry


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_dirs: list[Path]) -> Iterator[Server]:
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_adapters=4, max_batch_size=16),
                                          metrics=ServingMetrics(CollectorRegistry()))
    backend = InProcessBackend({BASE: engine})
    registry = Registry({f"ft:{BASE}:tenant-a:s{i}:job{i}": ("tenant-a", d) for i, d in enumerate(adapter_dirs)})
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(create_chat_router(backend, adapter_resolver=registry.resolve, tenant_dependency=_tenant))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield Server(f"http://127.0.0.1:{port}", engine, backend, registry)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.close()


def _client(server: Server, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def _data_url(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_messages() -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url((200, 0, 0))}},
        {"type": "image_url", "image_url": {"url": _data_url((0, 0, 200), (32, 32))}},
        {"type": "text", "text": "what differs?"}]}]


def test_openai_client_plain_and_streaming_agree(server):
    client = _client(server)
    model = f"ft:{BASE}:tenant-a:s0:job0"
    streamed: list[bool] = []  # what each engine request says of its client (a Serve replica sends a plain one whole)
    backend_stream = server.backend.stream
    server.backend.stream = lambda base, request: (streamed.append(request.streamed), backend_stream(base, request))[1]
    try:
        plain = client.chat.completions.create(model=model, messages=_image_messages(), max_tokens=8, temperature=0)
        stream = client.chat.completions.create(model=model, messages=_image_messages(), max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    finally:
        del server.backend.stream  # the class's method again
    assert streamed == [False, True]
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 2 * 16 and plain.usage.completion_tokens >= 1
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.choices[0].model_extra["grounding"] == [] or "<box>" in plain.choices[0].message.content

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    base = client.chat.completions.create(model=BASE, messages=_image_messages(), max_tokens=8, temperature=0)
    assert base.choices[0].message.content != plain.choices[0].message.content


def test_tenants_use_base_models_and_only_their_own_adapters(server):
    model = f"ft:{BASE}:tenant-a:s1:job1"
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as denied:
        _client(server, "key-b").chat.completions.create(model=model, messages=msgs, max_tokens=2)
    assert denied.value.body["code"] == "model_not_found" and denied.value.body["param"] == "model"
    assert _client(server, "key-b").chat.completions.create(model=BASE, messages=msgs, max_tokens=2).choices
    assert _client(server, "key-a").chat.completions.create(model=model, messages=msgs, max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").chat.completions.create(model=BASE, messages=msgs, max_tokens=2)


def test_bad_requests_get_the_error_envelope(server):
    body = {"model": BASE, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-a"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    body["messages"][0]["content"][0]["image_url"]["url"] = "file-123"  # no image resolver configured here
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-a"})
    assert response.status_code == 400 and "data: image URLs" in response.json()["error"]["message"]


def test_new_adapter_is_served_without_restart_and_deletion_takes_effect(server, tiny_model_dir, tmp_path):
    client = _client(server)
    model = f"ft:{BASE}:tenant-a:late:job-late"
    msgs = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    server.registry.models[model] = ("tenant-a", make_adapter(tiny_model_dir, tmp_path / "late", seed=99))
    served = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
    assert served.choices[0].message.content is not None and model in server.engine.cache

    del server.registry.models[model]  # what the control plane's delete does to the resolver
    asyncio.run(server.backend.evict(BASE, model))
    with pytest.raises(openai.NotFoundError):  # the very next request is refused, and the weights are gone
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    assert model not in server.engine.cache


def test_load_200_requests_over_10_adapters_16_concurrent(server):
    models = [f"ft:{BASE}:tenant-a:s{i}:job{i}" for i in range(10)]
    errors: list[str] = []

    async def run() -> None:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": "Bearer key-a"}) as http:
            async def one(i: int) -> None:
                async with limit:
                    body = {"model": models[i % 10], "max_tokens": 4, "temperature": 0,
                            "messages": [{"role": "user", "content": f"request {i}"}]}
                    r = await http.post("/v1/chat/completions", json=body)
                    if r.status_code != 200 or not r.json()["choices"]:
                        errors.append(f"{i}: {r.status_code} {r.text[:200]}")

            await asyncio.gather(*(one(i) for i in range(200)))

    forwards = server.engine.stats.forwards
    asyncio.run(run())
    assert errors == []
    assert server.engine.stats.max_adapters_in_forward >= 2
    assert server.engine.stats.forwards - forwards < 200 * 4  # requests shared forwards
    assert server.engine.cache.stats.evictions > 0  # 10 adapters through 4 slots


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` of a Prometheus exposition, parsed by the official parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_metrics_endpoint_reports_per_adapter_series(server):
    ns = "qwenvl_serving_"
    models = [f"ft:{BASE}:tenant-a:s{i}:job{i}" for i in range(6)]  # 6 adapters through 4 cache slots
    before = scrape(httpx.get(f"{server.url}/metrics").text)
    client = _client(server)
    for model in [*models, models[5], models[5]]:  # the last two are cache hits
        client.chat.completions.create(model=model, max_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": "hello"}])

    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = scrape(response.text)

    def delta(name: str, **labels: str) -> float:
        return sample(after, ns + name, **labels) - sample(before, ns + name, **labels)

    first, last = models[0], models[5]
    for model, n in ((first, 1), (last, 3)):
        labels = {"adapter": model, "base_model": BASE}
        assert delta("requests_total", outcome="ok", **labels) == n
        assert delta("time_to_first_token_seconds_count", **labels) == n
        assert delta("request_latency_seconds_count", **labels) == n
        assert delta("inter_token_latency_seconds_count", **labels) == 2 * n  # 3 tokens: 2 gaps per request
        assert delta("generated_tokens_total", **labels) == 3 * n
        assert delta("prompt_tokens_total", **labels) > 0
        assert delta("adapter_cache_hits_total", **labels) + delta("adapter_cache_misses_total", **labels) == n
    assert delta("adapter_cache_hits_total", adapter=last) >= 2
    assert sample(after, ns + "adapter_cache_misses_total", adapter=last) >= 1
    assert sample(after, ns + "adapter_load_seconds_count", adapter=last) >= 1
    assert sample(after, ns + "adapter_load_seconds_sum", adapter=last) > 0
    assert sample(after, ns + "adapter_evictions_total", adapter=first) >= 1  # LRU of 6 adapters in 4 slots
    assert (ns + "running_requests", frozenset({("base_model", BASE)})) in after

    ready = httpx.get(f"{server.url}/v1/chat/ready")
    assert ready.status_code == 200 and ready.json()["base_models"] == [BASE]
