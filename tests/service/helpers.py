"""Helpers shared by the service tests: settings for a temp data dir, tenants, uploads, polling."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from service.settings import Settings

FAKE_WORKFLOW = Path(__file__).with_name("fake_workflow.py")
SAMPLES = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a {i}"}]}
           for i in range(4)]


def jsonl(records: list[Any]) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n").encode()


def make_settings(data_dir: Path, model_dir: Path, **overrides: Any) -> Settings:
    base = {"data_dir": data_dir, "scheduler_enabled": False, "base_models": {"qwen-vl-tiny": str(model_dir)},
            "scheduler_interval_s": 0.3}
    return Settings(**{**base, **overrides})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_tenant(client: TestClient | httpx.Client, admin_key: str, name: str, **limits: Any) -> tuple[str, str]:
    """(tenant id, api key) of a new tenant."""
    resp = client.post("/v1/admin/tenants", json={"name": name, **limits}, headers=auth(admin_key))
    assert resp.status_code == 201, resp.text
    return resp.json()["tenant"]["id"], resp.json()["key"]["key"]


def upload(client: TestClient | httpx.Client, key: str, content: bytes = b"", name: str = "train.jsonl") -> dict[str, Any]:
    resp = client.post("/v1/files", files={"file": (name, content or jsonl(SAMPLES))}, data={"purpose": "fine-tune"},
                       headers=auth(key))
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for(fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout: float = 300.0,
             step: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Poll ``fetch()`` (calling ``step()`` first, e.g. a scheduler tick) until ``done(doc)``; the last doc."""
    deadline = time.monotonic() + timeout
    doc = fetch()
    while not done(doc):
        assert time.monotonic() < deadline, f"timed out; last state: {json.dumps(doc)[:2000]}"
        time.sleep(0.2)
        if step is not None:
            step()
        doc = fetch()
    return doc


def wait_file(client: TestClient | httpx.Client, key: str, file_id: str, timeout: float = 300.0) -> dict[str, Any]:
    return wait_for(lambda: client.get(f"/v1/files/{file_id}", headers=auth(key)).json(),
                    lambda d: d["status"] != "uploaded", timeout)
