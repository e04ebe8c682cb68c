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


def test_multiplexing_sends_an_adapter_to_the_replica_that_holds_it(serve_url):
    for _ in range(4):
        for job in ("job1", "job2"):
            _ask(serve_url, _model(job))
    stats = _replica_stats()
    assert len(stats) == 2
    holders = {job: [r for r, s in stats.items() if _model(job) in s["cached"]] for job in ("job1", "job2")}
    assert all(len(h) == 1 for h in holders.values()), stats
    assert sum(s["loads"] for s in stats.values()) <= 3  # job0 (earlier test) + one load each, not one per request


def test_adapter_published_after_start_is_served_then_deleted(serve_url, tiny_model_dir, adapter_dirs, tmp_path,
                                                               s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    model = _model("job-late")
    with pytest.raises(openai.NotFoundError):
        _ask(serve_url, model)
    published = time.monotonic()
    _publish(make_adapter(tiny_model_dir, tmp_path / "late", seed=77), "job-late")
    first = _ask(serve_url, model)
    assert first is not None and time.monotonic() - published < 30
    run = RunDir(f"{BUCKET_ROOT}/tenants/tenant-a/runs/job-late")
    run.store.delete(run.prefix)
    deleted = time.monotonic()
    with pytest.raises(openai.NotFoundError):
        _ask(serve_url, model)
    assert time.monotonic() - deleted < 1.0
