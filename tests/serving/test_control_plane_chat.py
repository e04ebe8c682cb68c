"""Chat mounted on the real control-plane app: tenants' own adapters only, and API deletion evicts at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qwenvl_core.serving.chat import InProcessBackend
from qwenvl_core.serving.engine import EngineConfig, ServingEngine
from service import repository as repo
from service.main import create_app
from service.routes.chat import mount_chat
from tests.service.helpers import auth, make_settings, new_tenant

BASE = "qwen-vl-tiny"
ADMIN = "admin-key-for-tests-0123456789"


@pytest.fixture
def app_and_engine(tmp_path: Path, tiny_model_dir: Path):
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_adapters=4))
    app = create_app(make_settings(tmp_path / "data", tiny_model_dir, admin_key=ADMIN))
    mount_chat(app, InProcessBackend({BASE: engine}))
    with TestClient(app) as client:
        yield app, client, engine
    engine.close()


def _chat(client: TestClient, key: str, model: str) -> dict:
    body = {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "what colour?"}]}
    return client.post("/v1/chat/completions", json=body, headers=auth(key)).json()


def test_delete_through_the_api_makes_the_adapter_unservable_and_evicts_it(app_and_engine, adapter_dirs):
    app, client, engine = app_and_engine
    tenant_a, key_a = new_tenant(client, ADMIN, "team-a")
    _, key_b = new_tenant(client, ADMIN, "team-b")
    model_id = f"ft:{BASE}:team-a:demo:ftjob-1"
    with app.state.ctx.sessions.begin() as session:
        repo.add_model(session, model_id=model_id, tenant_id=tenant_a, base_model=BASE, job_id="ftjob-1",
                       adapter_uri=str(adapter_dirs[0]))

    assert _chat(client, key_a, BASE)["choices"][0]["message"]["role"] == "assistant"
    assert _chat(client, key_a, model_id)["model"] == model_id
    assert model_id in engine.cache
    assert _chat(client, key_b, model_id)["error"]["code"] == "model_not_found"  # another tenant's adapter

    assert client.delete(f"/v1/models/{model_id}", headers=auth(key_a)).status_code == 200
    assert model_id not in engine.cache  # evicted by the deletion hook, not by LRU pressure
    assert _chat(client, key_a, model_id)["error"]["code"] == "model_not_found"
    assert BASE in {m["id"] for m in client.get("/v1/models", headers=auth(key_a)).json()["data"]}

    # /metrics names adapters (and so tenants): on the control plane only the admin key may scrape it
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(key_a)).status_code in (401, 403)
    scraped = client.get("/metrics", headers=auth(ADMIN))
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert client.get("/health").status_code == 200 and client.get("/v1/chat/ready", headers=auth(key_a)).json()[
        "status"] == "ok"
